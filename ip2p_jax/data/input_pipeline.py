"""grain input pipelines: a TFDS data source -> shuffled, per-process-sharded, paired-
augmented, tokenized batches, with iterator state that resumes exactly.

    source = builders.open_split("data/shapes", "train")
    loader = make_loader(source, PipelineConfig(resolution=64, batch_size=32), kind="triplets")
    it = iter(loader); batch = next(it)   # {"input_image", "edited_image": uint8 [B,R,R,3],
                                          #  "input_ids": int32 [B,77], "corrupt_skipped": [B]}
    state = it.get_state(); ...; it.set_state(state)  # the same next batch again

The input and edited images of a triplet always get the *same* random crop and
flip (the bug diffusers fixed in PR #2478). A record that fails to read is skipped
(the next record is used instead, deterministically) and counted in
``corrupt_skipped``. Multiprocess prefetch: ``worker_count > 0`` (absl flags are
marked parsed first, grain #1355).
"""
from __future__ import annotations

import dataclasses
import logging
import re

import grain.python as grain
import jax
import numpy as np
from PIL import Image

from ip2p_jax import tokenizer as tokenizers

KINDS = {
    # kind: (image fields augmented together, text field)
    "triplets": (("input_image", "edited_image"), "instruction"),
    "captions": (("image",), "caption"),
}


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
  resolution: int = 64
  batch_size: int = 32
  seed: int = 0
  shuffle: bool = True
  num_epochs: int | None = None  # None: repeat forever
  worker_count: int = 0
  worker_buffer_size: int = 2
  max_resize: float = 1.125  # shorter side scaled to U(1, max_resize) x resolution, then cropped
  flip: bool = True
  drop_remainder: bool = True  # equal shard sizes, so hosts stay in step


class SkipCorrupt(grain.RandomAccessDataSource):
  """Wraps a source so an unreadable record is replaced by the next readable one."""

  def __init__(self, source, max_skip: int = 64):
    self._source = source
    self._max_skip = max_skip

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int):
    n = len(self._source)
    for skipped in range(self._max_skip):
      try:
        record = dict(self._source[(index + skipped) % n])
      except Exception as e:  # noqa: BLE001 - any decoding failure of a bad record
        logging.warning("skipping unreadable record %d: %s", (index + skipped) % n, e)
        continue
      record["corrupt_skipped"] = np.int32(skipped)
      return record
    raise RuntimeError(f"{self._max_skip} consecutive unreadable records from {index}")

  def __repr__(self) -> str:
    return f"SkipCorrupt({self._source!r})"


class Shard(grain.RandomAccessDataSource):
  """Records ``index, index + count, index + 2 count, ...`` of ``source``: shards are
  disjoint and together complete; with ``drop_remainder`` all have ``len // count``
  records, so that every host runs the same number of steps."""

  def __init__(self, source, index: int, count: int, drop_remainder: bool):
    if not 0 <= index < count:
      raise ValueError(f"shard index {index} is not in [0, {count})")
    self._source, self._index, self._count = source, index, count
    n = len(source)
    self._len = n // count if drop_remainder else (n - index + count - 1) // count

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, i: int):
    return self._source[i * self._count + self._index]

  def __repr__(self) -> str:
    return f"Shard({self._source!r}, {self._index}/{self._count})"


_MIRRORED = {"left": "right", "right": "left"}
_SIDE_WORD = re.compile(r"\b(left|right)\b", re.IGNORECASE)
_MIRROR_TEXT_FIELDS = ("instruction", "input_caption", "edited_caption", "caption")


def mirror_text(text):
  """The words of a horizontally flipped picture: "left" <-> "right" (case kept), so a
  flipped "move the square to the left" becomes "... to the right". Bytes stay bytes."""
  as_bytes = isinstance(text, bytes)
  value = text.decode("utf-8") if as_bytes else str(text)

  def swap(m):
    word = _MIRRORED[m.group(0).lower()]
    return word.capitalize() if m.group(0)[0].isupper() else word
  value = _SIDE_WORD.sub(swap, value)
  return value.encode("utf-8") if as_bytes else value


class PairedCropFlip(grain.RandomMapTransform):
  """Resizes the shorter side to U(1, max_resize) x resolution, then one random square
  crop and one random horizontal flip applied to *all* image fields alike; a flip also
  mirrors the text ("left" <-> "right", :func:`mirror_text`), or half the flipped
  "move ... to the left" examples would teach the opposite side."""

  def __init__(self, fields, resolution: int, max_resize: float, flip: bool):
    self.fields, self.resolution, self.max_resize, self.flip = fields, resolution, max_resize, flip

  def random_map(self, element, rng: np.random.Generator):
    res = self.resolution
    first = np.asarray(element[self.fields[0]])
    h, w = first.shape[:2]
    side = int(round(res * rng.uniform(1.0, self.max_resize))) if self.max_resize > 1 else res
    scale = side / min(h, w)
    size = (max(res, int(round(w * scale))), max(res, int(round(h * scale))))
    top = int(rng.integers(0, size[1] - res + 1))
    left = int(rng.integers(0, size[0] - res + 1))
    flip = self.flip and rng.random() < 0.5
    out = dict(element)
    for field in self.fields:
      image = np.asarray(element[field])
      if image.shape[:2] != (size[1], size[0]):
        image = np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BICUBIC))
      image = image[top:top + res, left:left + res]
      out[field] = np.ascontiguousarray(image[:, ::-1] if flip else image)
    if flip:
      for field in _MIRROR_TEXT_FIELDS:
        if field in out:
          out[field] = mirror_text(out[field])
    return out


class Tokenize(grain.MapTransform):
  """Text field (bytes) -> ``input_ids`` [77]; keeps only what training needs."""

  def __init__(self, fields, text_field: str, tokenizer):
    self.fields, self.text_field, self.tokenizer = fields, text_field, tokenizer

  def map(self, element):
    text = element[self.text_field]
    text = text.decode("utf-8") if isinstance(text, bytes) else str(text)
    out = {f: element[f] for f in self.fields}
    out["input_ids"] = tokenizers.tokenize(self.tokenizer, [text])[0]
    out["corrupt_skipped"] = element.get("corrupt_skipped", np.int32(0))
    return out


def _ensure_absl_flags_parsed() -> None:
  from absl import flags
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def make_loader(source, config: PipelineConfig, *, kind="triplets", tokenizer=None,
                shard_index: int | None = None, shard_count: int | None = None) -> grain.DataLoader:
  """A ``grain.DataLoader`` over ``source`` (see module docstring). The shard defaults
  to this JAX process's (``jax.process_index()`` of ``jax.process_count()``)."""
  if isinstance(kind, tuple):  # (image fields, text field)
    fields, text_field = kind
  elif kind in KINDS:
    fields, text_field = KINDS[kind]
  else:
    raise ValueError(f"kind must be one of {sorted(KINDS)} or (fields, text field), got {kind!r}")
  source = Shard(SkipCorrupt(source),
                 jax.process_index() if shard_index is None else shard_index,
                 jax.process_count() if shard_count is None else shard_count,
                 config.drop_remainder)
  sampler = grain.IndexSampler(len(source), shuffle=config.shuffle,
                               num_epochs=config.num_epochs, seed=config.seed)
  operations = [
      PairedCropFlip(fields, config.resolution, config.max_resize, config.flip),
      Tokenize(fields, text_field, tokenizer or tokenizers.load()),
      grain.Batch(config.batch_size, drop_remainder=config.drop_remainder),
  ]
  if config.worker_count > 0:
    _ensure_absl_flags_parsed()
  return grain.DataLoader(data_source=source, sampler=sampler, operations=operations,
                          worker_count=config.worker_count,
                          worker_buffer_size=config.worker_buffer_size)
