"""Editing a set of image files: the job behind ``ip2p edit``.

Files, folders and globs are expanded into one sorted list; image ``k`` of that
list is edited with the noise of ``(seed, k)`` whatever the batching, process
count or earlier runs. Outputs are written atomically and an existing output is
kept (so a killed run resumes where it stopped); unreadable inputs are skipped,
reported, and listed in a JSON manifest next to the outputs. On several hosts
each process edits the files ``k`` with ``k % process_count == process_index``.
"""
from __future__ import annotations

import dataclasses
import glob
import json
import os
import time
from typing import Callable, Iterable, Sequence

import jax
from PIL import Image, ImageDraw

from ip2p_jax import images as imagelib
from ip2p_jax.atomic import TMP_PREFIX, atomic_write

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm")


@dataclasses.dataclass
class EditSettings:
  prompt: str
  steps: int = 50
  text_scale: float = 7.5
  image_scale: float = 1.5
  seed: int = 0
  sampler: str | None = None
  resolution: int = 512
  resize: str = "fit"
  batch_size: int = 1
  overwrite: bool = False
  max_pixels: int = imagelib.DEFAULT_MAX_PIXELS


@dataclasses.dataclass
class Report:
  edited: list[dict] = dataclasses.field(default_factory=list)
  skipped_existing: list[dict] = dataclasses.field(default_factory=list)
  failed: list[dict] = dataclasses.field(default_factory=list)
  seconds: float = 0.0

  @property
  def ok(self) -> bool:
    return not self.failed


def expand_inputs(inputs: Sequence[str]) -> tuple[list[str], list[dict]]:
  """Files, folders (their image files, recursively) and globs -> a sorted, de-duplicated
  file list; inputs that match nothing are returned as failures."""
  files, missing = [], []
  for item in inputs:
    if os.path.isdir(item):
      found = [os.path.join(root, f) for root, _, names in os.walk(item) for f in names
               if f.lower().endswith(IMAGE_SUFFIXES) and not f.startswith(TMP_PREFIX)]
    elif os.path.isfile(item):
      found = [item]
    else:
      found = [f for f in glob.glob(item, recursive=True) if os.path.isfile(f)]
      if not found:
        missing.append({"input": item, "error": "no such file, folder or matching glob"})
    files.extend(found)
  return sorted(dict.fromkeys(os.path.normpath(f) for f in files)), missing


def output_names(files: Sequence[str]) -> list[str]:
  """``stem.png`` per input; repeated stems get ``-k`` (k = list position), so every
  process derives the same names."""
  stems = [os.path.splitext(os.path.basename(f))[0] for f in files]
  counts: dict[str, int] = {}
  for s in stems:
    counts[s] = counts.get(s, 0) + 1
  return [f"{s}.png" if counts[s] == 1 else f"{s}-{k}.png" for k, s in enumerate(stems)]


def _remove_stale_temporaries(out_dir: str) -> None:
  for f in glob.glob(os.path.join(out_dir, TMP_PREFIX + "*")):
    try:
      os.unlink(f)
    except OSError:
      pass


def write_json(path: str, data) -> None:
  with atomic_write(path, "w", encoding="utf-8") as f:
    json.dump(data, f, indent=2)
    f.write("\n")


def _batches(items: list, size: int) -> Iterable[list]:
  for i in range(0, len(items), size):
    yield items[i:i + size]


def edit_files(pipe, inputs: Sequence[str], out_dir: str, settings: EditSettings, *,
               progress: Callable | None = None) -> Report:
  """Edits every image of ``inputs`` into ``out_dir`` (see module docstring)."""
  start = time.time()
  os.makedirs(out_dir, exist_ok=True)
  _remove_stale_temporaries(out_dir)
  files, missing = expand_inputs(inputs)
  names = output_names(files)
  report = Report(failed=list(missing))
  rank, world = jax.process_index(), jax.process_count()
  todo = []
  for k, (f, name) in enumerate(zip(files, names)):
    if k % world != rank:
      continue
    out = os.path.join(out_dir, name)
    if os.path.exists(out) and not settings.overwrite:
      report.skipped_existing.append({"input": f, "output": out})
    else:
      todo.append((k, f, out))
  multiple = pipe.vae_scale_factor * 2 ** (len(pipe.unet.config.block_out_channels) - 1)
  bar = progress(total=len(todo)) if progress else None
  # Load a window at a time, group by prepared size (one compiled program per size).
  for window in _batches(todo, max(settings.batch_size * 8, 8)):
    groups: dict[tuple[int, int], list] = {}
    for k, f, out in window:
      try:
        im = imagelib.load(f, settings.max_pixels)
        prepared = imagelib.prepare(im, settings.resolution, settings.resize, multiple)
      except (imagelib.ImageError, OSError) as e:
        report.failed.append({"input": f, "error": str(e)})
        if bar:
          bar.update(1)
        continue
      groups.setdefault(prepared.image.size, []).append((k, f, out, prepared))
    for group in groups.values():
      for batch in _batches(group, settings.batch_size):
        result = pipe(settings.prompt, [p.image for _, _, _, p in batch],
                      num_inference_steps=settings.steps, guidance_scale=settings.text_scale,
                      image_guidance_scale=settings.image_scale, seed=settings.seed,
                      scheduler=settings.sampler, image_ids=[k for k, *_ in batch])
        for (k, f, out, prepared), edited in zip(batch, result.images):
          imagelib.save(imagelib.unpad(edited, prepared), out)
          report.edited.append({"input": f, "output": out})
        if bar:
          bar.update(len(batch))
  if bar:
    bar.close()
  report.seconds = time.time() - start
  manifest = "manifest.json" if world == 1 else f"manifest.process-{rank}.json"
  write_json(os.path.join(out_dir, manifest), {
      "settings": dataclasses.asdict(settings), "edited": report.edited,
      "skipped_existing": report.skipped_existing, "failed": report.failed,
      "seconds": round(report.seconds, 3)})
  return report


def scale_grid(pipe, image: Image.Image, settings: EditSettings, text_scales: Sequence[float],
               image_scales: Sequence[float]) -> Image.Image:
  """One picture sweeping text scale (columns) x image scale (rows), all cells with the
  same noise, like Figure 4 of the paper. Scales are per-image inputs, so the whole
  grid is one batch and one compiled program."""
  multiple = pipe.vae_scale_factor * 2 ** (len(pipe.unet.config.block_out_channels) - 1)
  prepared = imagelib.prepare(image, settings.resolution, settings.resize, multiple)
  cells = [(t, s) for s in image_scales for t in text_scales]
  result = pipe(settings.prompt, [prepared.image] * len(cells),
                num_inference_steps=settings.steps,
                guidance_scale=[t for t, _ in cells], image_guidance_scale=[s for _, s in cells],
                seed=settings.seed, scheduler=settings.sampler, image_ids=[0] * len(cells))
  tiles = [imagelib.unpad(im, prepared) for im in result.images]
  w, h = tiles[0].size
  left, top = 64, 18  # room for the row and column labels (PIL's default font)
  grid = Image.new("RGB", (left + w * len(text_scales), top + h * len(image_scales)), "white")
  draw = ImageDraw.Draw(grid)
  for c, t in enumerate(text_scales):
    draw.text((left + c * w + 2, 3), f"text {t:g}", fill="black")
  for r, s in enumerate(image_scales):
    draw.text((2, top + r * h + h // 2 - 5), f"image {s:g}", fill="black")
  for i, tile in enumerate(tiles):
    r, c = divmod(i, len(text_scales))
    grid.paste(tile, (left + c * w, top + r * h))
  return grid

