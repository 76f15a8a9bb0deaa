"""Did an edit of a shapes-world scene succeed? Scored from the exact ground truth.

Every shapes-world example carries the scene graphs before and after the edit
(``data.shapes``), so success is decided from what the instruction asked for, not
from a learned judge, and returning the input unchanged fails every rule:

  recolor     the recoloured object's region has mean colour nearest (in the palette)
              to the target colour
  add         the new object's region: mean colour nearest the new colour, and closer
              to the target than to the input there
  remove      the old object's region is closer to the target (background) than to
              the input (the object)
  move        the vacated region is closer to the target than to the input, and the
              new region's colour is the object's (as for ``add``)
  resize,     segment the object by colour (each pixel nearer the object's colour than
  reshape     the exact background there); IoU with the target mask > IoU with the
              input mask, and > 0.5
  background  the background's mean colour is nearest the target colour's, among the
              backgrounds rendered in the scene's style (gradient, texture) in every
              palette colour
  grayscale, invert, darken, flip (and sepia, outside the default mix)
              the output is nearest (MSE) the target among the input and the input
              with each of the four default effects (and the asked one, when it is
              another), and its PSNR vs the target exceeds its PSNR vs the input by
              ``GLOBAL_MARGIN_DB``

"Region" means the pixels an object covers fully, eroded by ``erosion(size)``
pixels, so anti-aliased edges and a decoder's blur do not decide the colour.

A local or background edit must also keep the rest of the picture: its PSNR vs the
input where the edit may not change pixels must be at least ``KEEP_DB``, so an output
that paints everything one colour does not "recolour" an object to that colour.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

from ip2p_jax.data import shapes

PSNR_CAP_DB = 100.0     # PSNR of identical images (keeps the JSON finite)
GLOBAL_MARGIN_DB = 1.0  # global edits: closer to the target than to the input by this
MIN_IOU = 0.5           # resize/reshape: the segmented object must overlap its target this much
KEEP_DB = 18.0          # local/background edits: the untouched pixels kept at least this well

_PALETTE_NAMES = shapes.COLORS
_PALETTE = np.array([shapes.PALETTE[c] for c in _PALETTE_NAMES], np.float64)


# -- pixels and regions ------------------------------------------------------------------

def psnr(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> float | None:
  """PSNR in dB of two uint8 images (over ``mask``'s pixels if given), capped at
  ``PSNR_CAP_DB``; None for an empty mask."""
  err = np.square(a.astype(np.float64) - b.astype(np.float64))
  if mask is not None:
    if not mask.any():
      return None
    err = err[mask]
  mse = float(err.mean())
  if mse == 0.0:
    return PSNR_CAP_DB
  return min(PSNR_CAP_DB, 10.0 * math.log10(255.0 ** 2 / mse))


def _mse(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
  return float(np.square(a[mask].astype(np.float64) - b[mask].astype(np.float64)).mean())


def erosion(size: int) -> int:
  """Pixels eroded from regions: 1 at 64 px, 2 at 128 px (decoder blur grows with size)."""
  return max(1, size // 64)


def erode(mask: np.ndarray, steps: int) -> np.ndarray:
  """Binary erosion by a 3x3 square, ``steps`` times (outside the image counts as off)."""
  for _ in range(steps):
    padded = np.pad(mask, 1, constant_values=False)
    h, w = mask.shape
    out = np.ones_like(mask)
    for dy in (0, 1, 2):
      for dx in (0, 1, 2):
        out &= padded[dy:dy + h, dx:dx + w]
    mask = out
  return mask


def dilate(mask: np.ndarray, steps: int) -> np.ndarray:
  return ~erode(~mask, steps)


def core(obj: shapes.Obj, size: int) -> np.ndarray:
  """The pixels ``obj`` covers fully, eroded; falls back to less erosion (never
  empty) for the thin arms of a small star at low resolution."""
  cov = shapes.coverage(obj, size)
  full = cov >= 1.0
  for steps in range(erosion(size), 0, -1):
    region = erode(full, steps)
    if region.any():
      return region
  return full if full.any() else cov >= 0.5


def nearest_color(rgb: np.ndarray) -> str:
  """The palette colour name nearest (Euclidean RGB) to ``rgb``."""
  d = np.square(_PALETTE - np.asarray(rgb, np.float64)).sum(-1)
  return _PALETTE_NAMES[int(np.argmin(d))]


def _mean_color(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
  return image[mask].astype(np.float64).mean(0)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
  union = (a | b).sum()
  return float((a & b).sum() / union) if union else 0.0


# -- what changed ----------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Change:
  """The object an edit touched: as it was (``old``) and as it is (``new``)."""
  old: shapes.Obj | None
  new: shapes.Obj | None
  others: tuple[shapes.Obj, ...]


def change(example: shapes.Example) -> Change:
  before, after = example.input_scene.objects, example.edited_scene.objects
  old = [o for o in before if o not in after]
  new = [o for o in after if o not in before]
  others = tuple(o for o in before if o in after)
  return Change(old[0] if old else None, new[0] if new else None, others)


def edit_target(example: shapes.Example) -> str | None:
  """The shape ``data.shapes`` files the edit under (``HELD_OUT_EDITS``' second item)."""
  if example.edit_type in shapes.WHOLE_IMAGE_EDITS:
    return None
  c = change(example)
  return (c.old or c.new).shape


def held_out(example: shapes.Example) -> bool:
  """The example holds a held-out colour/shape pair or (edit, shape) combination
  anywhere (every example of the "heldout" split does)."""
  return shapes.is_held_out(example.input_scene, example.edited_scene, example.edit_type,
                            edit_target(example))


def held_out_edit(example: shapes.Example) -> bool:
  """The *edited* object is a held-out pair (before or after) or the (edit, shape)
  combination is held out: the edit itself must generalise."""
  if example.edit_type in shapes.WHOLE_IMAGE_EDITS:
    return False
  c = change(example)
  pairs = {(o.color, o.shape) for o in (c.old, c.new) if o is not None}
  return bool(pairs & shapes.HELD_OUT_PAIRS) or \
      (example.edit_type, edit_target(example)) in shapes.HELD_OUT_EDITS


# -- the rules -------------------------------------------------------------------------

def _colour_right(out, example, region, color):
  """The region's mean colour is nearest ``color``, and the region is closer to the
  target than to the input (a darkened gradient can sit near another palette colour)."""
  predicted = nearest_color(_mean_color(out, region))
  closer = _mse(out, example.edited_image, region) < _mse(out, example.input_image, region)
  return predicted == color and closer, {"predicted_color": predicted, "target_color": color}


def _closer_to_target(out, example, region):
  to_target = _mse(out, example.edited_image, region)
  to_input = _mse(out, example.input_image, region)
  return to_target < to_input, {"mse_target": to_target, "mse_input": to_input}


def _recolor(out, example, c, size):
  predicted = nearest_color(_mean_color(out, core(c.new, size)))
  return predicted == c.new.color, {"predicted_color": predicted, "target_color": c.new.color}


def _add(out, example, c, size):
  return _colour_right(out, example, core(c.new, size), c.new.color)


def _remove(out, example, c, size):
  return _closer_to_target(out, example, core(c.old, size))


def _move(out, example, c, size):
  old_cov = shapes.coverage(c.old, size) > 0
  new_cov = shapes.coverage(c.new, size) > 0
  vacated = core(c.old, size) & ~new_cov
  arrived = core(c.new, size) & ~old_cov
  if not (vacated.any() or arrived.any()):  # moved onto itself: judge the shape instead
    return _segment_by_shape(out, example, c, size)
  ok, detail = True, {}
  if vacated.any():
    gone, more = _closer_to_target(out, example, vacated)
    ok, detail = ok and gone, {**detail, **more}
  if arrived.any():
    there, more = _colour_right(out, example, arrived, c.new.color)
    ok, detail = ok and there, {**detail, **more}
  return ok, detail


def _segment_by_shape(out, example, c, size):
  """resize/reshape: which mask does the object's colour now fill, the target's or
  the input's?"""
  color = np.array(shapes.PALETTE[c.new.color], np.float64)
  background = shapes.render(dataclasses.replace(example.edited_scene, objects=()), size)[0]
  window = np.ones((size, size), bool)
  for o in c.others:  # another object may share the colour; it is not this one
    window &= ~dilate(shapes.coverage(o, size) > 0, 1)
  pixels = out.astype(np.float64)
  to_object = np.square(pixels - color).sum(-1)
  to_background = np.square(pixels - background.astype(np.float64)).sum(-1)
  segment = (to_object < to_background) & window
  iou_target = _iou(segment, (shapes.coverage(c.new, size) >= 0.5) & window)
  iou_input = _iou(segment, (shapes.coverage(c.old, size) >= 0.5) & window)
  ok = iou_target > iou_input and iou_target > MIN_IOU
  return ok, {"iou_target": iou_target, "iou_input": iou_input}


def _background_region(example, size):
  objects = example.input_scene.objects + example.edited_scene.objects
  covered = np.zeros((size, size), bool)
  for o in objects:
    covered |= shapes.coverage(o, size) > 0
  region = ~dilate(covered, erosion(size))
  return region if region.any() else ~covered


def _background(out, example, c, size):
  """Nearest among the scene's background rendered in each palette colour (the
  gradient darkens and the texture shifts each colour, so the palette alone would
  misjudge them)."""
  region = _background_region(example, size)
  scene = dataclasses.replace(example.edited_scene, objects=(), effects=())
  means = np.stack([_mean_color(shapes.render(dataclasses.replace(scene, background=name),
                                              size)[0], region) for name in _PALETTE_NAMES])
  d = np.square(means - _mean_color(out, region)).sum(-1)
  predicted = _PALETTE_NAMES[int(np.argmin(d))]
  target = example.edited_scene.background
  return predicted == target, {"predicted_color": predicted, "target_color": target}


_EFFECTS = ("grayscale", "invert", "darken", "flip")


def _global(out, example, c, size):
  """Which global edit did the output do? Nearest (MSE) among the input and each
  effect applied to it must be the asked one, and beat the input by the margin. The
  effects: the default mix's four, plus the asked one if it is another (sepia), so
  the default mix's verdicts do not depend on the extra edit types."""
  candidates = {"unedited": example.input_image}
  effects = _EFFECTS + (() if example.edit_type in _EFFECTS else (example.edit_type,))
  for effect in effects:
    scene = dataclasses.replace(example.input_scene,
                                effects=example.input_scene.effects + (effect,))
    candidates[effect] = example.edited_image if effect == example.edit_type else \
        shapes.render(scene, size)[0]
  mse = {name: _mse_all(out, image) for name, image in candidates.items()}
  nearest = min(mse, key=mse.get)
  target = mse[example.edit_type]
  # Compared as MSEs so that identical images (infinite PSNR) need no cap.
  ok = target <= min(mse.values()) and mse["unedited"] > target * 10 ** (GLOBAL_MARGIN_DB / 10)
  return ok, {"nearest_edit": nearest, "psnr_target": psnr(out, example.edited_image),
              "psnr_input": psnr(out, example.input_image)}


def _mse_all(a, b):
  return float(np.square(a.astype(np.float64) - b.astype(np.float64)).mean())


RULES = {
    "recolor": _recolor, "add": _add, "remove": _remove, "move": _move,
    "resize": _segment_by_shape, "reshape": _segment_by_shape, "background": _background,
    "grayscale": _global, "invert": _global, "darken": _global, "flip": _global,
    "sepia": _global,
}


def _outside(example: shapes.Example) -> np.ndarray | None:
  """Pixels the edit must leave as they were: outside a local edit's mask; the
  objects' interiors for a background edit; none for the other global edits."""
  if example.edit_type in shapes.LOCAL_EDITS:
    return ~example.edit_mask
  if example.edit_type == "background":
    size = example.input_image.shape[0]
    inside = np.zeros((size, size), bool)
    for o in example.input_scene.objects:
      inside |= shapes.coverage(o, size) >= 1.0
    return inside
  return None


def score_edit(example: shapes.Example, output: np.ndarray) -> dict:
  """Scores ``output`` (uint8 [S, S, 3]) as the edit of ``example``.

  Returns a JSON-ready dict: ``edit_type``; ``success`` (bool, the rule of the
  module docstring); ``psnr`` (dB vs the exact target, whole image);
  ``psnr_outside`` (dB vs the input where the edit must not change pixels, None
  for grayscale/invert/darken/flip/sepia); ``held_out`` / ``held_out_edit`` (see
  :func:`held_out`, :func:`held_out_edit`); ``detail`` (the rule's numbers).
  """
  output = np.asarray(output)
  if output.shape != example.edited_image.shape or output.dtype != np.uint8:
    raise ValueError(f"output must be uint8 {example.edited_image.shape}, got "
                     f"{output.dtype} {output.shape}")
  if example.input_scene is None:
    return _unscored(example, output)
  size = output.shape[0]
  ok, detail = RULES[example.edit_type](output, example, change(example), size)
  outside = _outside(example)
  kept = None if outside is None else psnr(output, example.input_image, outside)
  if kept is not None and kept < KEEP_DB:
    ok, detail = False, {**detail, "rest_of_image_lost_db": kept}
  return {
      "edit_type": example.edit_type,
      "success": bool(ok),
      "psnr": psnr(output, example.edited_image),
      "psnr_outside": kept,
      "held_out": held_out(example),
      "held_out_edit": held_out_edit(example),
      "detail": detail,
  }


def _unscored(example: shapes.Example, output: np.ndarray) -> dict:
  local = example.edit_type in shapes.LOCAL_EDITS
  return {"edit_type": example.edit_type, "success": None,
          "psnr": psnr(output, example.edited_image),
          "psnr_outside": psnr(output, example.input_image, ~example.edit_mask) if local else None,
          "held_out": None, "held_out_edit": None, "detail": {"unscored": "no scene graph"}}
