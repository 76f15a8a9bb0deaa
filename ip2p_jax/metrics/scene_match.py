"""Does a generated picture show a shapes-world caption, and does a generated pair show
its edit? Judged from colours, without positions.

``shapes_scoring`` scores an edit against the exact target picture. A text-to-image
model drawing a caption (stage 1, or the data engine's Prompt-to-Prompt pairs) puts
the objects wherever it likes, so there only the scene description is known: the
background colour, each object's colour, shape and size, the global effects. This
module checks what that description fixes independently of layout:

  background   the picture's border (its outer ``BORDER`` share of pixels on each side)
               is nearest, in mean squared error, to the caption's background rendered in
               the caption's style (plain, gradient, texture) in that colour, among all
               palette colours
  objects      each object colour covers, outside the background (pixels within
               ``BACKGROUND_DISTANCE`` of the rendered background), at least ``MIN_SHARE``
               of the area its objects would cover; every pixel counts for its nearest
               palette colour

and for a pair (before, after) the change the two scene descriptions differ by
(``infer_edit``): recolour (the new colour gained, and the old one lost where no other
object keeps it, ``MIN_SHARE`` of the object's area), add / remove (the colour gained /
lost), resize (the colour's area moved the right way by ``MIN_SHARE`` of the size
change), each of these with the background kept (a repainted background would count as
a gain of its colour), background (the after picture's border), grayscale / invert / darken / flip
(the after picture is nearer the before picture with that effect applied than to the
before picture itself). A reshape keeps every colour and is not judged (None), nor is a
colour rule on a scene under a global effect.

The rules are deliberately position-free, so they can be wrong where a model draws
the right colours in the wrong objects; on exact renders of the shapes world they
agree with the ground truth (``tests/test_scene_match.py``).
"""
from __future__ import annotations

import dataclasses
import functools

import numpy as np

from ip2p_jax.data import shapes
from ip2p_jax.metrics.shapes_scoring import _mse_all as _mse

BORDER = 0.06                # share of the side read as border
BACKGROUND_DISTANCE = 48.0   # RGB distance within which a pixel counts as background
MIN_SHARE = 0.5              # share of an object's area its colour change must show

_NAMES = shapes.COLORS
_PALETTE = np.array([shapes.PALETTE[c] for c in _NAMES], np.float64)
COLOR_EFFECTS = ("grayscale", "invert", "darken", "flip")


@functools.lru_cache(maxsize=None)
def _background(color: str, style: str, size: int) -> np.ndarray:
  """The background of ``color`` in ``style`` with no objects, float RGB (rendered once
  per argument triple: every judged picture compares against all eleven; read-only)."""
  image, _ = shapes.render(shapes.Scene(color, style, 0, ()), size)
  image = image.astype(np.float64)
  image.flags.writeable = False
  return image


def _frame(size: int) -> np.ndarray:
  width = max(1, int(round(BORDER * size)))
  mask = np.zeros((size, size), bool)
  mask[:width], mask[-width:], mask[:, :width], mask[:, -width:] = True, True, True, True
  return mask


def background_color(image: np.ndarray, style: str = "plain") -> str:
  """The palette colour whose background in ``style`` the picture's border is nearest."""
  size = image.shape[0]
  frame = _frame(size)
  pixels = image.astype(np.float64)[frame]
  errors = [np.square(pixels - _background(c, style, size)[frame]).mean() for c in _NAMES]
  return _NAMES[int(np.argmin(errors))]


def color_shares(image: np.ndarray, background: str, style: str = "plain") -> np.ndarray:
  """Per palette colour, the share of the picture's pixels that are not background
  (farther than ``BACKGROUND_DISTANCE`` from ``background`` rendered in ``style``) and
  nearest that colour."""
  size = image.shape[0]
  pixels = image.astype(np.float64)
  away = np.linalg.norm(pixels - _background(background, style, size), axis=-1)
  fg = pixels[away > BACKGROUND_DISTANCE]
  nearest = np.argmin(np.square(fg[:, None, :] - _PALETTE[None]).sum(-1), axis=1)
  return np.bincount(nearest, minlength=len(_NAMES)) / float(size * size)


def area(obj: shapes.Obj, size: int) -> float:
  """The share of a ``size`` picture that ``obj`` covers (independent of its place)."""
  centred = dataclasses.replace(obj, x=0.5, y=0.5)
  return float(shapes.coverage(centred, size).sum()) / (size * size)


def _areas(scene: shapes.Scene, size: int) -> dict[str, float]:
  out: dict[str, float] = {}
  for o in scene.objects:
    out[o.color] = out.get(o.color, 0.0) + area(o, size)
  return out


def depicts(image: np.ndarray, scene: shapes.Scene) -> dict:
  """``{"ok": bool | None, "background": name, "missing": [colours]}``: the picture
  shows the scene's background and every object colour (None under a global effect)."""
  if scene.effects:
    return {"ok": None, "reason": "effects"}
  size = image.shape[0]
  background = background_color(image, scene.style)
  shares = color_shares(image, scene.background, scene.style)
  missing = [c for c, a in _areas(scene, size).items()
             if shares[_NAMES.index(c)] < MIN_SHARE * a]
  return {"ok": bool(background == scene.background and not missing),
          "background": background, "missing": missing}


@dataclasses.dataclass(frozen=True)
class Edit:
  """The change between two scene descriptions: ``kind`` (a shapes-world edit type)
  and the objects it removed (``old``) and added (``new``)."""
  kind: str
  old: shapes.Obj | None = None
  new: shapes.Obj | None = None


def _key(o: shapes.Obj) -> tuple:
  return (o.shape, o.color, o.size)


def infer_edit(before: shapes.Scene, after: shapes.Scene) -> Edit | None:
  """The single shapes-world edit that turns ``before`` into ``after`` (places ignored:
  captions do not carry them), or None when they differ by none or by several."""
  if after.effects != before.effects:
    added = after.effects[len(before.effects):]
    if after.effects[:len(before.effects)] == before.effects and len(added) == 1 \
        and after.background == before.background:
      return Edit(added[0])
    return None
  if after.background != before.background:
    same = sorted(map(_key, before.objects)) == sorted(map(_key, after.objects))
    return Edit("background") if same else None
  old = [o for o in before.objects if _key(o) not in map(_key, after.objects)]
  new = [o for o in after.objects if _key(o) not in map(_key, before.objects)]
  if len(old) == 1 and len(new) == 1:
    a, b = old[0], new[0]
    differs = [f for f in ("shape", "color", "size") if getattr(a, f) != getattr(b, f)]
    kinds = {("color",): "recolor", ("size",): "resize", ("shape",): "reshape"}
    kind = kinds.get(tuple(differs))
    if kind is None and "shape" in differs and "size" not in differs:
      kind = "reshape"  # "replace the circle with a blue star" may change both
    return Edit(kind, a, b) if kind else None
  if len(old) == 1 and not new and len(after.objects) == len(before.objects) - 1:
    return Edit("remove", old[0], None)
  if len(new) == 1 and not old and len(after.objects) == len(before.objects) + 1:
    return Edit("add", None, new[0])
  return None


def follows(before_image: np.ndarray, after_image: np.ndarray, before: shapes.Scene,
            after: shapes.Scene) -> dict:
  """``{"ok": bool | None, "edit": kind, ...}``: whether the pair shows the change from
  ``before`` to ``after`` (the module docstring's rules); None where it cannot be judged
  from colours (a reshape, an unrecognised change, a colour edit under an effect)."""
  edit = infer_edit(before, after)
  if edit is None:
    return {"ok": None, "edit": None, "reason": "not a single shapes-world edit"}
  if edit.kind in COLOR_EFFECTS or edit.kind == "sepia":
    target = shapes._apply_effect(before_image, edit.kind)  # pylint: disable=protected-access
    ok = bool(_mse(after_image, target) < _mse(after_image, before_image))
    return {"ok": ok, "edit": edit.kind}
  if edit.kind == "reshape" or before.effects:
    return {"ok": None, "edit": edit.kind, "reason": "not judged from colours"}
  size = after_image.shape[0]
  if edit.kind == "background":
    seen = background_color(after_image, after.style)
    return {"ok": bool(seen == after.background), "edit": edit.kind, "background": seen}
  s0 = color_shares(before_image, before.background, before.style)
  s1 = color_shares(after_image, after.background, after.style)
  change = lambda c: float(s1[_NAMES.index(c)] - s0[_NAMES.index(c)])
  # An object edit must keep the background: a repainted one would also add its colour.
  kept = background_color(after_image, after.style) == after.background
  details = {"edit": edit.kind, "background_kept": bool(kept)}
  if edit.kind == "recolor":
    need = MIN_SHARE * area(edit.new, size)
    gained = change(edit.new.color) >= need
    lost = edit.old.color in _areas(after, size) or change(edit.old.color) <= -need
    ok, details["gained"], details["lost"] = (gained and lost, change(edit.new.color),
                                              -change(edit.old.color))
  elif edit.kind == "add":
    ok = change(edit.new.color) >= MIN_SHARE * area(edit.new, size)
    details["gained"] = change(edit.new.color)
  elif edit.kind == "remove":
    ok = change(edit.old.color) <= -MIN_SHARE * area(edit.old, size)
    details["lost"] = -change(edit.old.color)
  else:  # resize
    delta = area(edit.new, size) - area(edit.old, size)
    moved = change(edit.old.color)
    ok = moved * np.sign(delta) >= MIN_SHARE * abs(delta)
    details["moved"], details["expected"] = moved, delta
  return {"ok": bool(ok and kept), **details}

def text_to_image_match(pipe, scenes, *, num_inference_steps: int = 20,
                        guidance_scale: float = 7.5, seed: int = 0,
                        batch_size: int = 16) -> dict:
  """How often a ``TextToImagePipeline`` draws what a shapes-world caption says: each
  scene's caption drawn once (noise ``seed``, image id = its index) and judged by
  :func:`depicts`. Returns the shares with the right background, with every object
  colour present, and with both (``depicts``), and the images (uint8)."""
  captions = [shapes.caption(s) for s in scenes]
  images = []
  for start in range(0, len(captions), batch_size):
    ids = list(range(start, min(start + batch_size, len(captions))))
    padded = ids + [ids[-1]] * (batch_size - len(ids))  # one shape: one compile
    out = pipe([captions[i] for i in padded], num_inference_steps=num_inference_steps,
               guidance_scale=guidance_scale, seed=seed, image_ids=padded,
               output_type="np", progress_bar=False).images
    images.append((np.asarray(out[:len(ids)]) * 255).round().clip(0, 255).astype(np.uint8))
  images = np.concatenate(images)
  verdicts = [depicts(im, s) for im, s in zip(images, scenes)]
  n = len(verdicts)
  return {"num": n,
          "background": sum(v["background"] == s.background
                            for v, s in zip(verdicts, scenes)) / n,
          "colours": sum(not v["missing"] for v in verdicts) / n,
          "depicts": sum(bool(v["ok"]) for v in verdicts) / n,
          "images": images}
