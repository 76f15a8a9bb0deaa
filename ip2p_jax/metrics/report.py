"""Evaluation results for people: a markdown table, a picture sheet, the scale sweep.

  markdown(report)           per edit type: n, success, PSNR, PSNR outside, CLIP metrics
  sheet(examples, outputs, scores)   rows of input | instruction | output | ground truth
  SWEEP_POINTS, sweep_csv, sweep_plot   the paper's Figure 8: CLIP direction similarity
                             against CLIP image similarity as the guidance scales vary
"""
from __future__ import annotations

import csv
import io
import textwrap
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from ip2p_jax.atomic import atomic_write
from ip2p_jax.data import shapes
from ip2p_jax.metrics.aggregate import CLIP_KEYS

# Brooks et al. 2023, Fig. 8: image scale 1.0-2.2 at text scale 7.5, and text scale
# 3-12 at image scale 1.5. (text_scale, image_scale, which scale varies)
SWEEP_POINTS = tuple((7.5, round(1.0 + 0.2 * i, 1), "image") for i in range(7)) + \
    tuple((t, 1.5, "text") for t in (3.0, 4.5, 6.0, 7.5, 9.0, 10.5, 12.0))
SWEEP_COLUMNS = ("sweep", "text_scale", "image_scale", "sim_direction", "sim_image", "sim_0",
                 "sim_1", "success", "psnr", "psnr_outside")

TILE = 128          # sheet: image cell side, pixels
TEXT_WIDTH = 256    # sheet: instruction cell width
MARGIN = 4
HEADER = 20


# -- markdown --------------------------------------------------------------------------

def _fmt(value, kind: str) -> str:
  if value is None:
    return "-"
  if kind == "rate":
    return f"{100 * value:.1f}%"
  if kind == "db":
    return f"{value:.2f}"
  return f"{value:.3f}"


def markdown(report: dict) -> str:
  """A table per edit type, then overall and held-out rows, then the settings."""
  has_clip = any(k in report["overall"] for k in CLIP_KEYS)
  head = ["edit type", "n", "success", "PSNR (dB)", "PSNR outside (dB)"]
  if has_clip:
    head += list(CLIP_KEYS)
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

  def row(name, group):
    cells = [name, str(group["n"]), _fmt(group["success"], "rate"), _fmt(group["psnr"], "db"),
             _fmt(group["psnr_outside"], "db")]
    if has_clip:
      cells += [_fmt(group.get(k), "sim") for k in CLIP_KEYS]
    lines.append("| " + " | ".join(cells) + " |")

  for edit_type, group in report["per_edit_type"].items():
    row(edit_type, group)
  row("**all**", report["overall"])
  row("held-out combination anywhere", report["held_out"])
  row("held-out combination edited", report["held_out_edit"])
  settings = ", ".join(f"{k}={v}" for k, v in report["settings"].items())
  notes = [
      "", f"Settings: {settings}.", ""]
  if report.get("vae_psnr") is not None:
    notes += [f"VAE reconstruction of the inputs (posterior mode): "
              f"{report['vae_psnr']:.2f} dB PSNR.", ""]
  notes += [
      "Success is judged from the shapes world's exact scene graphs "
      "(ip2p_jax/metrics/shapes_scoring.py); PSNR is against the exact target, PSNR "
      "outside against the input where the edit must not change pixels (none for "
      "grayscale/invert/darken/flip/sepia)."]
  if has_clip:
    notes.append("CLIP metrics as in Brooks et al. 2023 (input/edited captions as texts).")
  return "\n".join(lines + notes) + "\n"


# -- the sheet -------------------------------------------------------------------------

def sheet_rows(edit_types: Sequence[str], num: int) -> list[int]:
  """Up to ``num`` example indices, taking edit types in turn so each one shows."""
  by_type: dict[str, list[int]] = {}
  for i, t in enumerate(edit_types):
    by_type.setdefault(t, []).append(i)
  queues = [by_type[t] for t in shapes.ALL_EDIT_TYPES if t in by_type]
  picked = []
  while len(picked) < num and any(queues):
    for q in queues:
      if q and len(picked) < num:
        picked.append(q.pop(0))
  return sorted(picked)


def sheet_size(rows: int) -> tuple[int, int]:
  return (3 * TILE + TEXT_WIDTH + 5 * MARGIN, HEADER + rows * (TILE + MARGIN) + MARGIN)


def _tile(image: np.ndarray) -> Image.Image:
  return Image.fromarray(image).resize((TILE, TILE), Image.Resampling.NEAREST)


def sheet(examples: Sequence[shapes.Example], outputs: np.ndarray,
          scores: Sequence[dict], rows: Sequence[int]) -> Image.Image:
  """One row per index in ``rows``: input | [type] verdict and instruction | output |
  ground truth; size :func:`sheet_size`."""
  im = Image.new("RGB", sheet_size(len(rows)), "white")
  draw = ImageDraw.Draw(im)
  x_text = 2 * MARGIN + TILE
  x_out = x_text + TEXT_WIDTH + MARGIN
  x_gt = x_out + TILE + MARGIN
  for x, title in ((MARGIN, "input"), (x_text, "instruction"), (x_out, "output"),
                   (x_gt, "ground truth")):
    draw.text((x, 4), title, fill="black")
  for r, k in enumerate(rows):
    y = HEADER + r * (TILE + MARGIN)
    ex, score = examples[k], scores[k]
    im.paste(_tile(ex.input_image), (MARGIN, y))
    im.paste(_tile(outputs[k]), (x_out, y))
    im.paste(_tile(ex.edited_image), (x_gt, y))
    verdict = {True: "success", False: "failure", None: "not scored"}[score["success"]]
    color = {True: (0, 120, 0), False: (190, 0, 0), None: (90, 90, 90)}[score["success"]]
    draw.text((x_text, y + 2), f"[{ex.edit_type}] {verdict}", fill=color)
    for j, line in enumerate(textwrap.wrap(ex.instruction, width=TEXT_WIDTH // 7)[:6]):
      draw.text((x_text, y + 20 + 14 * j), line, fill="black")
    if score["psnr"] is not None:
      draw.text((x_text, y + TILE - 14), f"PSNR {score['psnr']:.1f} dB", fill=(90, 90, 90))
  return im


# -- the sweep -------------------------------------------------------------------------

def sweep_row(text_scale: float, image_scale: float, which: str, report: dict) -> dict:
  overall = report["overall"]
  row = {"sweep": which, "text_scale": text_scale, "image_scale": image_scale}
  for key in SWEEP_COLUMNS[3:]:
    row[key] = overall.get(key)
  return row


def sweep_csv(rows: Sequence[dict]) -> str:
  buf = io.StringIO()
  writer = csv.DictWriter(buf, fieldnames=SWEEP_COLUMNS, lineterminator="\n")
  writer.writeheader()
  for row in rows:
    writer.writerow({k: ("" if row[k] is None else row[k]) for k in SWEEP_COLUMNS})
  return buf.getvalue()


def sweep_plot(rows: Sequence[dict], path: str) -> None:
  """Direction similarity (y) against image similarity (x), one curve per swept
  scale, each point labelled with its scale, as in the paper's Figure 8."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(5.5, 4.5), dpi=120)
  for which, label, marker in (("image", "image scale (text 7.5)", "o"),
                               ("text", "text scale (image 1.5)", "s")):
    pts = [r for r in rows if r["sweep"] == which and r["sim_image"] is not None]
    if not pts:
      continue
    xs, ys = [r["sim_image"] for r in pts], [r["sim_direction"] for r in pts]
    ax.plot(xs, ys, marker=marker, label=label)
    for r, x, y in zip(pts, xs, ys):
      ax.annotate(f"{r[which + '_scale']:g}", (x, y), textcoords="offset points", xytext=(4, 4),
                  fontsize=7)
  ax.set_xlabel("CLIP image similarity")
  ax.set_ylabel("CLIP text-image direction similarity")
  ax.set_title("Guidance scale sweep (Brooks et al. 2023, Fig. 8)")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  with atomic_write(path) as f:
    fig.savefig(f, format="png")
  plt.close(fig)
