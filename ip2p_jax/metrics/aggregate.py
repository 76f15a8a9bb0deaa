"""Per-example scores -> the numbers a run reports: success per edit type, mean
PSNRs, success on held-out combinations, and flat scalars for TensorBoard."""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

from ip2p_jax.data import shapes

CLIP_KEYS = ("sim_0", "sim_1", "sim_direction", "sim_image")
_COUNTS = ("n", "n_scored")


def _mean(values: Iterable) -> float | None:
  values = [float(v) for v in values if v is not None]
  return float(np.mean(values)) if values else None


def _group(scores: Sequence[dict]) -> dict:
  group = {"n": len(scores), "n_scored": sum(s["success"] is not None for s in scores),
           "success": _mean(s["success"] for s in scores),
           "psnr": _mean(s["psnr"] for s in scores),
           "psnr_outside": _mean(s["psnr_outside"] for s in scores)}
  for key in CLIP_KEYS:
    if any(key in s for s in scores):
      group[key] = _mean(s.get(key) for s in scores)
  return group


def summarize(scores: Sequence[dict]) -> dict:
  """Aggregates :func:`score_edit` dicts (optionally carrying CLIP ``sim_*`` keys).

  Returns ``{"overall": G, "per_edit_type": {type: G for every shapes.EDIT_TYPES, then
  each type outside that default mix that ``scores`` hold (sepia)},
  "held_out": G, "held_out_edit": G}`` where a group ``G`` is ``{"n", "n_scored"
  (examples with a success verdict), "success" (rate), "psnr", "psnr_outside"
  (means, None where undefined), and the CLIP similarity means when present}``. ``held_out``: examples holding a held-out
  colour/shape pair or (edit, shape) combination anywhere; ``held_out_edit``:
  those where the edit itself involves one.
  """
  present = {s["edit_type"] for s in scores}
  types = list(shapes.EDIT_TYPES) + [t for t in shapes.EXTRA_EDITS if t in present]
  return {
      "overall": _group(scores),
      "per_edit_type": {t: _group([s for s in scores if s["edit_type"] == t])
                        for t in types},
      "held_out": _group([s for s in scores if s["held_out"]]),
      "held_out_edit": _group([s for s in scores if s["held_out_edit"]]),
  }


def scalars(summary: dict, prefix: str = "eval/") -> dict[str, float]:
  """Flat ``{name: value}`` of a :func:`summarize` result for metrics.jsonl /
  TensorBoard (``eval/success/recolor``, ``eval/psnr``, ``eval/held_out/success``,
  ...); undefined values (no examples of a type) are left out."""
  out = {}

  def put(name, group):
    for key, value in group.items():
      if key not in _COUNTS and value is not None:
        out[f"{prefix}{name}{key}"] = float(value)

  put("", summary["overall"])
  for edit_type, group in summary["per_edit_type"].items():
    for key, value in group.items():
      if key not in _COUNTS and value is not None:
        out[f"{prefix}{key}/{edit_type}"] = float(value)
  put("held_out/", summary["held_out"])
  put("held_out_edit/", summary["held_out_edit"])
  return out
