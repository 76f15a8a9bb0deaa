"""A contact sheet: a few examples of a dataset in one PNG, so a person can look at it."""
from __future__ import annotations

import textwrap

import numpy as np
from PIL import Image, ImageDraw


def _text(value) -> str:
  return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def contact_sheet(source, num: int = 8, tile: int = 128, seed: int = 0) -> Image.Image:
  """Rows of (input | edited) with the instruction (triplets) or (image) with the caption."""
  rng = np.random.default_rng(seed)
  n = min(num, len(source))
  indices = sorted(rng.choice(len(source), n, replace=False)) if n else []
  rows = []
  for i in indices:
    record = source[int(i)]
    if "edited_image" in record:
      images = [record["input_image"], record["edited_image"]]
      label = _text(record["instruction"])
      if "edit_type" in record:
        label = f"[{_text(record['edit_type'])}] {label}"
    else:
      images, label = [record["image"]], _text(record["caption"])
    rows.append(([Image.fromarray(np.asarray(im)).resize((tile, tile), Image.Resampling.NEAREST)
                  for im in images], label))
  width = max((len(ims) for ims, _ in rows), default=1) * tile + 8
  text_h = 28
  sheet = Image.new("RGB", (max(width, 2 * tile + 8), max(1, len(rows)) * (tile + text_h) + 4),
                    "white")
  draw = ImageDraw.Draw(sheet)
  for r, (ims, label) in enumerate(rows):
    y = r * (tile + text_h) + 4
    for c, im in enumerate(ims):
      sheet.paste(im, (4 + c * tile, y))
    lines = textwrap.wrap(label, width=max(20, width // 6))[:2]
    for j, line in enumerate(lines):
      draw.text((4, y + tile + 2 + 12 * j), line, fill="black")
  return sheet
