"""TFDS builders (ArrayRecord files, no TensorFlow) for every dataset we train on.

  * ``shapes_world``: the procedural shapes world (``data.shapes``), "train" and
    "heldout" splits, deterministic in the seed;
  * ``instructpix2pix``: local copies of the paper's data, either the original
    folder format (``seeds.json``, ``DIR/prompt.json``, ``DIR/{seed}_0.jpg``,
    ``DIR/{seed}_1.jpg``) or the Hugging Face parquet export (``original_prompt``,
    ``original_image``, ``edit_prompt``, ``edited_prompt``, ``edited_image``);
  * ``image_captions``: stage-1 pairs from a folder (an image with a ``.txt`` beside
    it, or ``captions.jsonl`` lines ``{"file": ..., "text": ...}``) or parquet with
    image and text columns.

A listed-but-missing folder, an unreadable image or an empty prompt is skipped,
counted and listed with the reason (``{"item": "dir/seed" or "file.parquet/row",
"reason": ...}``); :func:`build` returns the counts and writes counts and list to
``build_report.json`` in the dataset folder. A parquet file without the columns a
format needs is an error naming them. Read back with :func:`open_split`.
Images are stored as encoded bytes (PNG/JPEG as given), text as UTF-8.

:func:`import_source` is the ``ip2p data import`` job: it records where a dataset
came from (``OUT/import.json``) and refuses to put a second source into a
non-empty ``OUT`` (or rebuilds it under ``overwrite``), so a rerun never reports an
old dataset as the new one.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import glob
import io
import json
import multiprocessing
import os
import shutil
from typing import Iterator

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from ip2p_jax.atomic import atomic_write
from ip2p_jax.data import shapes

_TRIPLET_FEATURES = dict(
    input_image=tfds.features.Image(shape=(None, None, 3)),
    edited_image=tfds.features.Image(shape=(None, None, 3)),
    instruction=tfds.features.Text(),
    input_caption=tfds.features.Text(),
    edited_caption=tfds.features.Text(),
)


def png_bytes(array: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(array).save(buf, format="PNG")
  return buf.getvalue()


def _checked_image(data: bytes) -> bytes:
  """``data`` if it decodes to an image (in RGB after conversion), else ValueError."""
  try:
    with Image.open(io.BytesIO(data)) as im:
      im.load()
      if im.mode != "RGB":
        return png_bytes(np.asarray(im.convert("RGB")))
  except Exception as e:  # noqa: BLE001 - PIL raises many kinds for bad bytes
    raise ValueError(f"unreadable image ({e})") from None
  return data


class _Counting:
  """Mixin: a per-build report of what was written and what was skipped, and why."""

  def _count(self, what: str, n: int = 1) -> None:
    if not hasattr(self, "report"):
      self.report = collections.Counter()
    self.report[what] += n

  def _skip(self, what: str, item: str, reason: str, n: int = 1) -> None:
    """Counts ``what`` and lists ``item`` with ``reason``."""
    self._count(what, n)
    if not hasattr(self, "skipped"):
      self.skipped = []
    self.skipped.append({"item": item, "reason": reason})


@dataclasses.dataclass
class ShapesWorldConfig(tfds.core.BuilderConfig):
  size: int = 64
  num_train: int = 1000
  num_heldout: int = 100
  seed: int = 0


class ShapesWorld(tfds.core.GeneratorBasedBuilder, _Counting):
  """Procedural instruction/edit triplets with exact ground truth and masks."""
  VERSION = tfds.core.Version("1.0.0")
  BUILDER_CONFIG_CLASS = ShapesWorldConfig
  BUILDER_CONFIGS = [ShapesWorldConfig(name="default")]

  def _info(self):
    size = self.builder_config.size
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(dict(
        _TRIPLET_FEATURES,
        edit_type=tfds.features.Text(),
        input_masks=tfds.features.Image(shape=(size, size, 1), encoding_format="png"),
        edited_masks=tfds.features.Image(shape=(size, size, 1), encoding_format="png"),
        edit_mask=tfds.features.Image(shape=(size, size, 1), encoding_format="png"),
    )), description=shapes.__doc__)

  def _split_generators(self, dl_manager):
    cfg = self.builder_config
    counts = {"train": cfg.num_train, "heldout": cfg.num_heldout}
    return {split: self._generate_examples(split, n) for split, n in counts.items() if n > 0}

  def _generate_examples(self, split: str, count: int):
    cfg = self.builder_config
    if not 8 <= cfg.size <= 512:
      raise ValueError(f"shapes world size must be in [8, 512], got {cfg.size}")
    jobs = ((cfg.seed, i, cfg.size, split) for i in range(count))
    # Each example is a function of (seed, index): rendering them in worker processes
    # (in order) writes the same records. Spawned, not forked: the parent may hold JAX's
    # threads. ~8.5 ms an example at 128 px, so a pool pays off from about a thousand.
    workers = (min(os.cpu_count() or 1, max(2, count // 250))
               if count >= SHAPES_PARALLEL_FROM else 0)
    with contextlib.ExitStack() as stack:
      rows = map(_shapes_row, jobs)
      if workers > 1:
        pool = stack.enter_context(multiprocessing.get_context("spawn").Pool(workers))
        rows = pool.imap(_shapes_row, jobs, chunksize=32)
      for i, row in enumerate(rows):
        self._count(f"{split}_written")
        yield i, row


# Shapes-world splits of at least this many examples are rendered by a process pool.
SHAPES_PARALLEL_FROM = 1000


def _shapes_row(job: tuple[int, int, int, str]) -> dict:
  """One shapes-world example, ``(seed, index, size, split)`` -> the builder's features."""
  seed, index, size, split = job
  ex = shapes.generate(seed, index, size, split)
  return dict(
      input_image=png_bytes(ex.input_image), edited_image=png_bytes(ex.edited_image),
      instruction=ex.instruction, input_caption=ex.input_caption,
      edited_caption=ex.edited_caption, edit_type=ex.edit_type,
      input_masks=png_bytes(ex.input_masks), edited_masks=png_bytes(ex.edited_masks),
      edit_mask=png_bytes(ex.edit_mask.astype(np.uint8) * 255))


@dataclasses.dataclass
class SourceConfig(tfds.core.BuilderConfig):
  source: str = ""
  format: str = ""  # instructpix2pix: "ip2p-folder" | "hf-parquet"; captions: "folder" | "parquet"
  image_column: str = "image"
  text_column: str = "text"


class Instructpix2pix(tfds.core.GeneratorBasedBuilder, _Counting):
  """The paper's (input, instruction, edited) triplets from a local copy."""
  VERSION = tfds.core.Version("1.0.0")
  BUILDER_CONFIG_CLASS = SourceConfig
  BUILDER_CONFIGS = [SourceConfig(name="default")]

  def _info(self):
    return tfds.core.DatasetInfo(builder=self,
                                 features=tfds.features.FeaturesDict(_TRIPLET_FEATURES))

  def _split_generators(self, dl_manager):
    cfg = self.builder_config
    if cfg.format not in ("ip2p-folder", "hf-parquet"):
      raise ValueError(f"instructpix2pix format must be 'ip2p-folder' or 'hf-parquet', "
                       f"got {cfg.format!r}")
    return {"train": self._generate_examples(cfg.format, cfg.source)}

  def _generate_examples(self, fmt: str, source: str):
    return self._from_folder(source) if fmt == "ip2p-folder" else self._from_parquet(source)

  def _emit(self, key, input_image, edited_image, instruction, input_caption, edited_caption):
    if not (instruction or "").strip():
      self._skip("skipped_empty_prompt", key, "empty edit instruction")
      return None
    try:
      a = _checked_image(input_image)
    except ValueError as e:
      self._skip("skipped_corrupt_image", key, f"input image: {e}")
      return None
    try:
      b = _checked_image(edited_image)
    except ValueError as e:
      self._skip("skipped_corrupt_image", key, f"edited image: {e}")
      return None
    self._count("written")
    return key, dict(input_image=a, edited_image=b, instruction=instruction.strip(),
                     input_caption=input_caption or "", edited_caption=edited_caption or "")

  def _from_folder(self, root: str) -> Iterator:
    seeds_file = os.path.join(root, "seeds.json")
    if not os.path.isfile(seeds_file):
      raise FileNotFoundError(f"{root}: no seeds.json (the InstructPix2Pix folder format)")
    with open(seeds_file, encoding="utf-8") as f:
      listing = json.load(f)
    for name, seeds in listing:
      folder = os.path.join(root, name)
      prompt_file = os.path.join(folder, "prompt.json")
      if not os.path.isfile(prompt_file):
        self._count("skipped_examples_in_missing_folders", len(seeds))
        self._skip("skipped_missing_folder", name,
                   f"listed in seeds.json but {name}/prompt.json is missing ({len(seeds)} examples)")
        continue
      with open(prompt_file, encoding="utf-8") as f:
        prompt = json.load(f)
      for seed in seeds:
        paths = [os.path.join(folder, f"{seed}_{i}.jpg") for i in (0, 1)]
        absent = [os.path.basename(p) for p in paths if not os.path.isfile(p)]
        if absent:
          self._skip("skipped_missing_image", f"{name}/{seed}", f"missing {', '.join(absent)}")
          continue
        images = [open(p, "rb").read() for p in paths]
        out = self._emit(f"{name}/{seed}", *images, prompt.get("edit", ""),
                         prompt.get("input", prompt.get("caption", "")), prompt.get("output", ""))
        if out:
          yield out

  def _from_parquet(self, source: str) -> Iterator:
    for path, row_id, row in _parquet_rows(source, HF_COLUMNS):
      image = lambda v: v["bytes"] if isinstance(v, dict) else v
      out = self._emit(f"{os.path.basename(path)}/{row_id}", image(row["original_image"]),
                       image(row["edited_image"]), row.get("edit_prompt"),
                       row.get("original_prompt"), row.get("edited_prompt"))
      if out:
        yield out


class ImageCaptions(tfds.core.GeneratorBasedBuilder, _Counting):
  """(image, caption) pairs for stage-1 text-to-image training."""
  VERSION = tfds.core.Version("1.0.0")
  BUILDER_CONFIG_CLASS = SourceConfig
  BUILDER_CONFIGS = [SourceConfig(name="default")]

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(dict(
        image=tfds.features.Image(shape=(None, None, 3)), caption=tfds.features.Text())))

  def _split_generators(self, dl_manager):
    cfg = self.builder_config
    if cfg.format not in ("folder", "parquet"):
      raise ValueError(f"image_captions format must be 'folder' or 'parquet', got {cfg.format!r}")
    return {"train": self._generate_examples(cfg.format, cfg.source)}

  def _generate_examples(self, fmt: str, source: str):
    return self._from_folder(source) if fmt == "folder" else self._from_parquet(source)

  def _emit(self, key, image, text):
    if not (text or "").strip():
      self._skip("skipped_empty_prompt", key, "empty caption")
      return None
    try:
      image = _checked_image(image)
    except ValueError as e:
      self._skip("skipped_corrupt_image", key, str(e))
      return None
    self._count("written")
    return key, dict(image=image, caption=text.strip())

  def _from_folder(self, root: str) -> Iterator:
    listing = os.path.join(root, "captions.jsonl")
    if os.path.isfile(listing):
      with open(listing, encoding="utf-8") as f:
        pairs = [json.loads(line) for line in f if line.strip()]
      items = [(os.path.join(root, p["file"]), p.get("text", "")) for p in pairs]
    else:
      items = []
      for path in sorted(glob.glob(os.path.join(root, "**", "*"), recursive=True)):
        stem, ext = os.path.splitext(path)
        if ext.lower() in (".jpg", ".jpeg", ".png", ".webp") and os.path.isfile(stem + ".txt"):
          items.append((path, open(stem + ".txt", encoding="utf-8").read()))
    for path, text in items:
      if not os.path.isfile(path):
        self._skip("skipped_missing_image", os.path.relpath(path, root), "no such file")
        continue
      out = self._emit(os.path.relpath(path, root), open(path, "rb").read(), text)
      if out:
        yield out

  def _from_parquet(self, source: str) -> Iterator:
    cfg = self.builder_config
    for path, row_id, row in _parquet_rows(source, (cfg.image_column, cfg.text_column)):
      value = row[cfg.image_column]
      out = self._emit(f"{os.path.basename(path)}/{row_id}",
                       value["bytes"] if isinstance(value, dict) else value, row[cfg.text_column])
      if out:
        yield out


HF_COLUMNS = ("original_prompt", "original_image", "edit_prompt", "edited_prompt", "edited_image")


def _parquet_files(source: str, columns: tuple[str, ...]) -> list[str]:
  """The parquet files of ``source``, each checked to hold ``columns``."""
  import pyarrow
  import pyarrow.parquet as pq
  files = sorted(glob.glob(os.path.join(source, "**", "*.parquet"), recursive=True)) \
      if os.path.isdir(source) else [source]
  if not files:
    raise FileNotFoundError(f"{source}: no .parquet files")
  for path in files:
    try:
      names = pq.ParquetFile(path).schema_arrow.names
    except (pyarrow.ArrowException, OSError) as e:
      raise ValueError(f"{path}: not a readable parquet file ({e})") from None
    missing = [c for c in columns if c not in names]
    if missing:
      raise ValueError(f"{path}: missing column(s) {missing}; it has {names}")
  return files


def _parquet_rows(source: str, columns: tuple[str, ...]) -> Iterator[tuple[str, int, dict]]:
  import pyarrow.parquet as pq
  for path in _parquet_files(source, columns):
    table = pq.ParquetFile(path)
    row_id = 0
    for batch in table.iter_batches(batch_size=256):
      for row in batch.to_pylist():
        yield path, row_id, row
        row_id += 1


BUILDERS = {"shapes_world": ShapesWorld, "instructpix2pix": Instructpix2pix,
            "image_captions": ImageCaptions}


def build(kind: str, out_dir: str, config: tfds.core.BuilderConfig) -> tuple[str, dict]:
  """Builds dataset ``kind`` into ``out_dir``; returns (dataset folder, report): counts,
  and under ``"skipped"`` each skipped item with the reason."""
  if kind not in BUILDERS:
    raise ValueError(f"unknown dataset kind {kind!r}; choose one of {sorted(BUILDERS)}")
  if kind != "shapes_world" and config.format in ("hf-parquet", "parquet"):
    _parquet_files(config.source, HF_COLUMNS if kind == "instructpix2pix"  # before any writing
                   else (config.image_column, config.text_column))
  builder = BUILDERS[kind](data_dir=out_dir, config=config, file_format="array_record")
  try:
    builder.download_and_prepare()
  except AssertionError as e:  # TFDS: a split with no examples
    if "No examples were yielded" not in str(e):
      raise
    counts = {k: v for k, v in dict(getattr(builder, "report", {})).items() if v}
    why = (", ".join(f"{k}: {v}" for k, v in sorted(counts.items())) if counts else
           "it lists none (an ip2p synth run that kept no pair writes an empty seeds.json)")
    raise EmptySourceError(f"{getattr(config, 'source', '') or out_dir}: nothing to import, "
                           f"no example was readable ({why})") from None
  report = dict(getattr(builder, "report", {}))  # empty when the dataset already existed
  if report and kind != "shapes_world":  # generated data has nothing to skip
    report["skipped"] = list(getattr(builder, "skipped", []))
  path = builder.data_dir
  report_file = os.path.join(path, "build_report.json")
  if report:
    with atomic_write(report_file, "w", encoding="utf-8") as f:
      json.dump(report, f, indent=2, sort_keys=True)
  elif os.path.isfile(report_file):
    with open(report_file, encoding="utf-8") as f:
      report = json.load(f)
  return path, report


IMPORT_RECORD = "import.json"


class EmptySourceError(ValueError):
  """A source with no example to import (nothing is left in the output folder)."""


def import_source(kind: str, out_dir: str, config: SourceConfig, *,
                  overwrite: bool = False) -> tuple[str, dict, bool]:
  """``ip2p data import``: builds ``config.source`` into ``out_dir`` and records the
  source in ``OUT/import.json``. A non-empty ``out_dir`` holding anything but an import
  of this same source (path and format) is a ValueError saying how to proceed, unless
  ``overwrite``, which first deletes the earlier import (its dataset folders and record).
  Returns (dataset folder, report, whether it was built now)."""
  wanted = {"kind": kind, "source": os.path.abspath(config.source), "format": config.format,
            "image_column": config.image_column, "text_column": config.text_column}
  record_file = os.path.join(out_dir, IMPORT_RECORD)
  previous = _read_record(record_file)
  entries = os.listdir(out_dir) if os.path.isdir(out_dir) else []
  if os.path.exists(out_dir) and not os.path.isdir(out_dir):
    raise ValueError(f"--out {out_dir}: exists and is not a folder")
  same = previous == wanted
  if entries and not same:
    if not overwrite:
      what = (f"an import of {previous['source']} ({previous['format']})" if previous
              else f"{len(entries)} other entries ({', '.join(sorted(entries)[:3])}...)")
      raise ValueError(f"--out {out_dir} is not empty: it holds {what}; pass --overwrite to "
                       "replace it, or choose another --out")
    _remove_import(out_dir, entries)
  built_before = same and bool(entries)
  try:
    path, report = build(kind, out_dir, config)
  except EmptySourceError:
    if not entries and os.path.isdir(out_dir):  # what this build began: a rerun starts clean
      for name in os.listdir(out_dir):
        shutil.rmtree(os.path.join(out_dir, name), ignore_errors=True)
    raise
  with atomic_write(record_file, "w", encoding="utf-8") as f:
    json.dump(wanted, f, indent=2)
  return path, report, not built_before


def _read_record(path: str) -> dict | None:
  try:
    with open(path, encoding="utf-8") as f:
      data = json.load(f)
    return data if isinstance(data, dict) else None
  except (OSError, ValueError):
    return None


def _remove_import(out_dir: str, entries: list[str]) -> None:
  """Deletes what an import writes into ``out_dir``: TFDS dataset folders and the record.
  Anything else is left, and refused (the caller must choose another folder)."""
  is_dataset = lambda full: os.path.isdir(full) and bool(
      glob.glob(os.path.join(full, "**", "dataset_info.json"), recursive=True))
  ours = {IMPORT_RECORD, "downloads"}  # TFDS makes downloads/ next to the dataset
  others = [n for n in entries if n not in ours and not is_dataset(os.path.join(out_dir, n))]
  if others:
    raise ValueError(f"--out {out_dir}: --overwrite replaces only an earlier dataset, but it "
                     f"also holds {sorted(others)[:5]}; choose another --out")
  for name in entries:
    full = os.path.join(out_dir, name)
    if os.path.isdir(full):
      shutil.rmtree(full)
    else:
      os.unlink(full)


def find_dataset(path: str) -> str:
  """The folder holding ``dataset_info.json`` at or below ``path`` (local or a bucket,
  through ``etils.epath``)."""
  from etils import epath
  root = epath.Path(path)
  if not root.is_dir():
    raise FileNotFoundError(f"{path}: no TFDS dataset there (no such folder)")
  if (root / "dataset_info.json").is_file():
    return str(path)
  found, level = [], [root]
  for _ in range(4):  # TFDS: DATA_DIR/name/config/version/dataset_info.json
    level = [child for folder in level for child in folder.iterdir() if child.is_dir()]
    found += [str(folder) for folder in level if (folder / "dataset_info.json").is_file()]
  found.sort()
  if not found:
    raise FileNotFoundError(f"{path}: no TFDS dataset (dataset_info.json) found")
  if len(found) > 1:
    raise ValueError(f"{path}: several datasets found, pass one of {found}")
  return found[0]


def local_dataset(path: str, split: str | None = None) -> str:
  """A local folder TFDS can open for the dataset at or below ``path``. A dataset in a
  bucket is copied to this host's staging folder (``paths.local_copy``): ArrayRecord's
  reader opens local files only (google/array_record#120). Only the metadata and, when
  ``split`` is given, that split's record files are copied; a copy is reused."""
  from ip2p_jax import paths
  found = find_dataset(path)
  if paths.is_local(found):
    return found
  records = ".array_record"
  return paths.local_copy(found, keep=lambda name: records not in name or (
      split is not None and f"-{split}{records}" in name))


def open_split(path: str, split: str = "train", skip_decoding: tuple[str, ...] = ()):
  """A random-access data source (``len``, ``[i]``) for ``split`` of a built dataset
  (local or in a bucket); features in ``skip_decoding`` come back as encoded bytes."""
  builder = tfds.builder_from_directory(local_dataset(path, split))
  decoders = {name: tfds.decode.SkipDecoding() for name in skip_decoding
              if name in builder.info.features}
  return builder.as_data_source(split=split, decoders=decoders or None)


def splits(path: str) -> list[str]:
  return sorted(tfds.builder_from_directory(local_dataset(path)).info.splits.keys())


def features(path: str) -> list[str]:
  return sorted(tfds.builder_from_directory(local_dataset(path)).info.features.keys())
