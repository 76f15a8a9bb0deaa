"""The shapes world: procedural scenes and instruction edits with exact ground truth.

The seed's "programmatic editing" route to training triplets. A scene graph
(background + 1-3 non-overlapping objects) is rendered with anti-aliasing
(4x4 supersampling); an edit changes the *graph* and the edited image is rendered
from the edited graph, so the target of every instruction is exact, and so are
the object masks.

Vocabulary
  shapes   circle, square, triangle, star, diamond
  colours  red, green, blue, yellow, purple, orange, white, black, pink, cyan, gray
  sizes    small, medium, large (object diameter 0.22 / 0.30 / 0.38 of the canvas)
  places   left, right, top, bottom, center, top left, top right, bottom left, bottom right
  backgrounds  a plain colour, a vertical gradient, or a light texture

Edits (each with several paraphrased templates, see ``TEMPLATES``)
  recolor      "make the circle blue", "turn the red square green", ...
  background   "make the background purple", ...
  reshape      "turn the triangle into a star", ...
  remove       "remove the blue circle", ...
  add          "add a small red star", ...
  move         "move the square to the left", ...
  resize       "make the circle bigger", ...
  grayscale, invert, darken ("make it night"), flip (horizontal)
Edits outside the default mix (``EXTRA_EDITS``: made only when asked for by name,
``generate(..., edit_types=("sepia",))``, ``ip2p eval --edit-types sepia``)
  sepia        "make it sepia", ... (the classic sepia matrix, ``SEPIA``): the concept
               the customization example teaches the bundled editor
               (examples/customize_sepia.py)
An instruction names its object by shape alone when that is unique in the scene,
otherwise by colour and shape (scenes never hold two objects of one colour+shape).

Held-out split
  Colour/shape pairs in ``HELD_OUT_PAIRS`` and (edit, shape) combinations in
  ``HELD_OUT_EDITS`` never occur in the "train" split (in neither image); every
  "heldout" example contains at least one of them. It measures generalisation
  to unseen combinations of seen words.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np

SHAPES = ("circle", "square", "triangle", "star", "diamond")
PALETTE = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
    "yellow": (240, 210, 40), "purple": (140, 60, 190), "orange": (245, 140, 30),
    "white": (245, 245, 245), "black": (20, 20, 20), "pink": (240, 130, 180),
    "cyan": (40, 200, 210), "gray": (128, 128, 128),
}
COLORS = tuple(PALETTE)
SIZES = {"small": 0.22, "medium": 0.30, "large": 0.38}
PLACES = {
    "left": (0.25, 0.5), "right": (0.75, 0.5), "top": (0.5, 0.25), "bottom": (0.5, 0.75),
    "center": (0.5, 0.5), "top left": (0.25, 0.25), "top right": (0.75, 0.25),
    "bottom left": (0.25, 0.75), "bottom right": (0.75, 0.75),
}
BACKGROUND_STYLES = ("plain", "gradient", "texture")
LOCAL_EDITS = ("recolor", "reshape", "remove", "add", "move", "resize")
GLOBAL_EDITS = ("background", "grayscale", "invert", "darken", "flip")
EDIT_TYPES = LOCAL_EDITS + GLOBAL_EDITS  # the default mix
EXTRA_EDITS = ("sepia",)                 # whole-image edits made only when named
ALL_EDIT_TYPES = EDIT_TYPES + EXTRA_EDITS
WHOLE_IMAGE_EDITS = GLOBAL_EDITS + EXTRA_EDITS
# Sepia tone (the matrix of Microsoft's "sepia" filter, widely reused): RGB rows of the
# output as weights of the input's R, G, B; the result is rounded and clipped to 0-255.
SEPIA = ((0.393, 0.769, 0.189), (0.349, 0.686, 0.168), (0.272, 0.534, 0.131))

HELD_OUT_PAIRS = frozenset({("purple", "star"), ("orange", "square"), ("cyan", "triangle")})
HELD_OUT_EDITS = frozenset({("resize", "diamond"), ("move", "star"), ("reshape", "circle")})

TEMPLATES = {
    "recolor": ("make the {ref} {color}", "turn the {ref} {color}", "paint the {ref} {color}",
                "change the color of the {ref} to {color}", "color the {ref} {color}"),
    "background": ("make the background {color}", "change the background to {color}",
                   "turn the background {color}", "paint the background {color}"),
    "reshape": ("turn the {ref} into {a_shape}", "make the {ref} {a_shape}",
                "replace the {ref} with {a_color_shape}", "change the {ref} into {a_shape}"),
    "remove": ("remove the {ref}", "delete the {ref}", "get rid of the {ref}",
               "take away the {ref}", "erase the {ref}"),
    "add": ("add a {size} {color} {shape}", "put a {size} {color} {shape} in the picture",
            "add a {size} {color} {shape} at the {place}", "draw a {size} {color} {shape}"),
    # (sizes begin with a consonant, so "a" is always right)
    "move": ("move the {ref} to the {place}", "put the {ref} at the {place}",
             "shift the {ref} to the {place}", "place the {ref} at the {place}"),
    "resize": ("make the {ref} {bigger}", "make the {ref} {bigger} please",
               "{enlarge} the {ref}", "change the {ref} to {size}"),
    "grayscale": ("make it black and white", "convert it to grayscale", "remove the colors",
                  "make the picture grayscale"),
    "invert": ("invert the colors", "make it a negative", "invert the image",
               "turn it into a color negative"),
    "darken": ("make it night", "darken the image", "make it darker", "turn it into night time"),
    "flip": ("flip it horizontally", "mirror the image", "flip the picture left to right",
             "make a mirror image"),
    "sepia": ("make it sepia", "give it a sepia tone", "turn it into a sepia photo",
              "apply a sepia filter"),
}


@dataclasses.dataclass(frozen=True)
class Obj:
  shape: str
  color: str
  size: str
  x: float  # centre, as a fraction of the canvas
  y: float

  @property
  def radius(self) -> float:
    return SIZES[self.size] / 2


@dataclasses.dataclass(frozen=True)
class Scene:
  background: str
  style: str = "plain"
  texture_seed: int = 0
  objects: tuple[Obj, ...] = ()
  effects: tuple[str, ...] = ()  # global edits applied after rendering, in order


@dataclasses.dataclass
class Example:
  input_image: np.ndarray    # [S, S, 3] uint8
  edited_image: np.ndarray   # [S, S, 3] uint8
  instruction: str
  input_caption: str
  edited_caption: str
  edit_type: str
  input_masks: np.ndarray    # [S, S] uint8: 0 background, k + 1 for object k
  edited_masks: np.ndarray   # [S, S] uint8, objects of the edited scene
  edit_mask: np.ndarray      # [S, S] bool: where a local edit may change pixels
  input_scene: Scene
  edited_scene: Scene


# -- rendering -------------------------------------------------------------------------

SUPERSAMPLE = 4


def _polygon(shape: str) -> np.ndarray | None:
  """Unit-radius outline of a polygonal shape, centred at the origin (y down)."""
  if shape == "triangle":
    angles = np.deg2rad([-90, 30, 150])
    return np.stack([np.cos(angles), np.sin(angles)], 1)
  if shape == "star":
    angles = np.deg2rad(-90 + 36 * np.arange(10))
    radii = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], 1)
  if shape == "diamond":
    return np.array([[0, -1], [1, 0], [0, 1], [-1, 0]], float)
  return None


def _inside(shape: str, dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
  """Point-in-shape for offsets in units of the radius."""
  if shape == "circle":
    return dx * dx + dy * dy <= 1.0
  if shape == "square":
    side = 0.8  # the square's half side, so it looks as large as the circle
    return (np.abs(dx) <= side) & (np.abs(dy) <= side)
  poly = _polygon(shape)
  inside = np.zeros(dx.shape, bool)  # even-odd rule
  for (x0, y0), (x1, y1) in zip(poly, np.roll(poly, -1, 0)):
    crosses = (y0 > dy) != (y1 > dy)
    x_at = (x1 - x0) * (dy - y0) / np.where(y1 != y0, y1 - y0, 1) + x0
    inside ^= crosses & (dx < x_at)
  return inside


def coverage(obj: Obj, size: int) -> np.ndarray:
  """Fraction of each pixel covered by ``obj`` (4x4 supersampling), [size, size]."""
  n = size * SUPERSAMPLE
  centres = (np.arange(n) + 0.5) / n
  r = obj.radius
  # Every shape lies inside its radius: test only the pixels of its bounding box.
  out = np.zeros((size, size), np.float32)
  lo_x, hi_x = max(0, int((obj.x - r) * size) - 1), min(size, int((obj.x + r) * size) + 2)
  lo_y, hi_y = max(0, int((obj.y - r) * size) - 1), min(size, int((obj.y + r) * size) + 2)
  sx = slice(lo_x * SUPERSAMPLE, hi_x * SUPERSAMPLE)
  sy = slice(lo_y * SUPERSAMPLE, hi_y * SUPERSAMPLE)
  dx, dy = np.meshgrid((centres[sx] - obj.x) / r, (centres[sy] - obj.y) / r)
  inside = _inside(obj.shape, dx, dy).astype(np.float32)
  out[lo_y:hi_y, lo_x:hi_x] = inside.reshape(hi_y - lo_y, SUPERSAMPLE, hi_x - lo_x,
                                             SUPERSAMPLE).mean(axis=(1, 3))
  return out


def _background(scene: Scene, size: int) -> np.ndarray:
  color = np.array(PALETTE[scene.background], np.float32)
  img = np.broadcast_to(color, (size, size, 3)).copy()
  if scene.style == "gradient":  # darker towards the bottom
    ramp = np.linspace(1.0, 0.65, size, dtype=np.float32)[:, None, None]
    img = img * ramp
  elif scene.style == "texture":  # light, smooth value noise
    rng = np.random.default_rng(scene.texture_seed)
    grid = rng.uniform(-1, 1, (5, 5)).astype(np.float32)
    t = np.linspace(0, 4, size)
    i = np.minimum(t.astype(int), 3)
    f = (t - i)[:, None]
    rows = grid[i] * (1 - f) + grid[i + 1] * f
    field = rows[:, i] * (1 - f.T) + rows[:, i + 1] * f.T
    img = img + 18.0 * field[..., None]
  return img


def render(scene: Scene, size: int = 64) -> tuple[np.ndarray, np.ndarray]:
  """(RGB uint8 image, object label map) for ``scene`` at ``size`` x ``size``."""
  img = _background(scene, size)
  labels = np.zeros((size, size), np.uint8)
  for k, obj in enumerate(scene.objects):
    cov = coverage(obj, size)[..., None]
    img = img * (1 - cov) + np.array(PALETTE[obj.color], np.float32) * cov
    labels[cov[..., 0] > 0] = k + 1
  img = np.clip(np.round(img), 0, 255).astype(np.uint8)
  for effect in scene.effects:
    img = _apply_effect(img, effect)
    if effect == "flip":
      labels = labels[:, ::-1]
  return img, labels


def _apply_effect(img: np.ndarray, effect: str) -> np.ndarray:
  if effect == "grayscale":
    gray = np.round(img.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32))
    return np.repeat(np.clip(gray, 0, 255).astype(np.uint8)[..., None], 3, axis=-1)
  if effect == "invert":
    return 255 - img
  if effect == "darken":
    return np.round(img.astype(np.float32) * 0.35 + np.array([0, 0, 12], np.float32)).clip(
        0, 255).astype(np.uint8)
  if effect == "flip":
    return img[:, ::-1].copy()
  if effect == "sepia":
    toned = img.astype(np.float32) @ np.array(SEPIA, np.float32).T
    return np.clip(np.round(toned), 0, 255).astype(np.uint8)
  raise ValueError(f"unknown effect {effect!r}")


# -- captions ------------------------------------------------------------------------

_EFFECT_CAPTIONS = {"grayscale": "in black and white", "invert": "with inverted colors",
                    "darken": "at night", "flip": "mirrored", "sepia": "in sepia"}


def caption(scene: Scene) -> str:
  """"a red circle and a blue square on a yellow background" (objects left to right)."""
  objects = sorted(scene.objects, key=lambda o: (o.x, o.y))
  names = [f"a {o.size} {o.color} {o.shape}" for o in objects]  # sizes start with consonants
  things = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
  style = {"plain": "", "gradient": " gradient", "texture": " textured"}[scene.style]
  text = f"{things} on {_article(scene.background)} {scene.background}{style} background"
  for effect in scene.effects:
    text += f", {_EFFECT_CAPTIONS[effect]}"
  return text


def _article(word: str) -> str:
  return "an" if word[0] in "aeiou" else "a"


def reference(scene: Scene, obj: Obj) -> str:
  """The shortest unambiguous name: "circle" if it is the only circle, else "red circle"."""
  same_shape = [o for o in scene.objects if o.shape == obj.shape]
  return obj.shape if len(same_shape) == 1 else f"{obj.color} {obj.shape}"


# -- sampling scenes and edits -------------------------------------------------------

def _overlaps(a: Obj, b: Obj, margin: float = 0.04) -> bool:
  return math.hypot(a.x - b.x, a.y - b.y) < a.radius + b.radius + margin


def _fits(obj: Obj, others: Sequence[Obj]) -> bool:
  inside = obj.radius + 0.02 <= obj.x <= 1 - obj.radius - 0.02 and \
      obj.radius + 0.02 <= obj.y <= 1 - obj.radius - 0.02
  return inside and not any(_overlaps(obj, o) for o in others)


def _random_object(rng, others, colors=COLORS, shapes=SHAPES, size=None, tries=50):
  for _ in range(tries):
    shape = str(rng.choice(shapes))
    color = str(rng.choice(colors))
    s = size or str(rng.choice(list(SIZES)))
    r = SIZES[s] / 2
    obj = Obj(shape, color, s, float(rng.uniform(r + 0.02, 1 - r - 0.02)),
              float(rng.uniform(r + 0.02, 1 - r - 0.02)))
    if _fits(obj, others) and all((o.color, o.shape) != (color, shape) for o in others):
      return obj
  return None


def random_scene(rng: np.random.Generator) -> Scene:
  background = str(rng.choice(COLORS))
  objects: list[Obj] = []
  for _ in range(int(rng.integers(1, 4))):
    obj = _random_object(rng, objects, colors=[c for c in COLORS if c != background])
    if obj is not None:
      objects.append(obj)
  if not objects:
    objects.append(Obj("circle", "red" if background != "red" else "blue", "medium", 0.5, 0.5))
  style = str(rng.choice(BACKGROUND_STYLES, p=[0.6, 0.2, 0.2]))
  return Scene(background, style, int(rng.integers(0, 2 ** 31)), tuple(objects))


def _replace(scene: Scene, index: int, obj: Obj | None) -> Scene:
  objects = list(scene.objects)
  if obj is None:
    del objects[index]
  else:
    objects[index] = obj
  return dataclasses.replace(scene, objects=tuple(objects))


def random_edit(rng: np.random.Generator, scene: Scene, edit_type: str):
  """(edited scene, instruction, target shape or None) or None when the edit cannot
  apply to this scene (e.g. removing the only object)."""
  template = str(rng.choice(TEMPLATES[edit_type]))
  objects = scene.objects
  k = int(rng.integers(len(objects)))
  obj = objects[k]
  others = objects[:k] + objects[k + 1:]
  ref = reference(scene, obj)
  taken = {(o.color, o.shape) for o in others}
  if edit_type == "recolor":
    choices = [c for c in COLORS if c not in (obj.color, scene.background)
               and (c, obj.shape) not in taken]
    color = str(rng.choice(choices))
    return (_replace(scene, k, dataclasses.replace(obj, color=color)),
            template.format(ref=ref, color=color), obj.shape)
  if edit_type == "reshape":
    choices = [s for s in SHAPES if s != obj.shape and (obj.color, s) not in taken]
    shape = str(rng.choice(choices))
    new = dataclasses.replace(obj, shape=shape)
    text = template.format(ref=ref, a_shape=f"{_article(shape)} {shape}",
                           a_color_shape=f"{_article(obj.color)} {obj.color} {shape}")
    return _replace(scene, k, new), text, obj.shape
  if edit_type == "remove":
    if len(objects) < 2:
      return None
    return _replace(scene, k, None), template.format(ref=ref), obj.shape
  if edit_type == "add":
    if len(objects) >= 3:
      return None
    new = _random_object(rng, objects, colors=[c for c in COLORS if c != scene.background])
    if new is None:
      return None
    if "{place}" in template:
      place = str(rng.choice(list(PLACES)))
      new = dataclasses.replace(new, x=PLACES[place][0], y=PLACES[place][1])
      if not _fits(new, objects):
        return None
    else:
      place = ""
    edited = dataclasses.replace(scene, objects=objects + (new,))
    return edited, template.format(size=new.size, color=new.color, shape=new.shape,
                                   place=place), new.shape
  if edit_type == "move":
    places = [p for p, (x, y) in PLACES.items()
              if math.hypot(x - obj.x, y - obj.y) > 0.2]
    rng.shuffle(places)
    for place in places:
      new = dataclasses.replace(obj, x=PLACES[place][0], y=PLACES[place][1])
      if _fits(new, others):
        return _replace(scene, k, new), template.format(ref=ref, place=place), obj.shape
    return None
  if edit_type == "resize":
    order = list(SIZES)
    i = order.index(obj.size)
    options = [j for j in (i - 1, i + 1) if 0 <= j < len(order)]
    j = int(rng.choice(options))
    new = dataclasses.replace(obj, size=order[j])
    if not _fits(new, others):
      return None
    bigger = j > i
    text = template.format(ref=ref, bigger="bigger" if bigger else "smaller",
                           enlarge="enlarge" if bigger else "shrink", size=order[j])
    return _replace(scene, k, new), text, obj.shape
  if edit_type == "background":
    used = {o.color for o in objects}
    color = str(rng.choice([c for c in COLORS if c != scene.background and c not in used]))
    return dataclasses.replace(scene, background=color), template.format(color=color), None
  if scene.effects and edit_type in scene.effects:
    return None
  return dataclasses.replace(scene, effects=scene.effects + (edit_type,)), template, None


def _pairs(scene: Scene) -> set[tuple[str, str]]:
  return {(o.color, o.shape) for o in scene.objects}


def is_held_out(before: Scene, after: Scene, edit_type: str, target: str | None) -> bool:
  return bool((_pairs(before) | _pairs(after)) & HELD_OUT_PAIRS) or \
      (edit_type, target) in HELD_OUT_EDITS


def edit_mask(before: np.ndarray, after: np.ndarray, edit_type: str,
              before_scene: Scene, after_scene: Scene) -> np.ndarray:
  """Pixels a local edit may change: the union of the changed objects' masks."""
  size = before.shape[0]
  if edit_type in WHOLE_IMAGE_EDITS:
    return np.ones((size, size), bool)
  mask = np.zeros((size, size), bool)
  old, new = set(before_scene.objects), set(after_scene.objects)
  for obj in old ^ new:
    mask |= coverage(obj, size) > 0
  return mask


def generate(seed: int, index: int, size: int = 64, split: str = "train",
             edit_types: Sequence[str] = EDIT_TYPES) -> Example:
  """Example ``index`` of ``split``: deterministic in (seed, split, index, edit_types)."""
  if split not in ("train", "heldout"):
    raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
  unknown = [t for t in edit_types if t not in ALL_EDIT_TYPES]
  if unknown or not edit_types:
    raise ValueError(f"edit types {unknown or list(edit_types)}: choose from "
                     f"{', '.join(ALL_EDIT_TYPES)}")
  rng = np.random.default_rng([seed, index, 0 if split == "train" else 1])
  while True:
    scene = random_scene(rng)
    edit_type = str(rng.choice(edit_types))
    result = random_edit(rng, scene, edit_type)
    if result is None:
      continue
    edited, instruction, target = result
    if is_held_out(scene, edited, edit_type, target) != (split == "heldout"):
      continue
    before, labels_before = render(scene, size)
    after, labels_after = render(edited, size)
    return Example(before, after, instruction, caption(scene), caption(edited), edit_type,
                   labels_before, labels_after,
                   edit_mask(before, after, edit_type, scene, edited), scene, edited)
