"""A latent cache: VAE latents and text embeddings precomputed into an ArrayRecord file,
so small-scale training skips the frozen encoders (``config.data.latents``: the
diffusion stages' objectives read these fields instead of images and token ids).

Each record (msgpack via ``flax.serialization``, never pickle) holds, for a triplet:
  ``image_latent``   posterior mode of the input image, unscaled (the IP2P condition);
  ``edited_mean``, ``edited_logvar``  the edited image's posterior, so each epoch can
                     draw a fresh ``scaling_factor * sample`` target;
  ``text``           the text encoder's last hidden state of the instruction (float16);
  ``caption_text``   the same for the edited image's caption (stage 1 trains on
                     edited image + caption), when the source has captions;
  ``object_mask``    the share of each latent cell covered by an object of the input or
                     the edited image ([h, w] float16: the union of the source's
                     ``input_masks`` and ``edited_masks`` averaged over the VAE's
                     downsampling blocks), when the source has object masks (the shapes
                     world does).
Images are centre-cropped and resized to ``resolution`` (no random augmentation).

The file may be in a bucket (``gs://...``): it is written locally and then copied there,
and read from a copy in this host's staging folder (``paths.local_copy``; ArrayRecord's
reader opens local files only).
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import json
import os
import tempfile
from typing import Iterator

import grain.python as grain
import jax
import jax.numpy as jnp
import numpy as np
from array_record.python import array_record_data_source, array_record_module
from flax import serialization
from PIL import Image, ImageOps

from ip2p_jax import paths
from ip2p_jax import tokenizer as tokenizers
from ip2p_jax.data.input_pipeline import Shard


def _center(image: np.ndarray, resolution: int) -> np.ndarray:
  return np.asarray(ImageOps.fit(Image.fromarray(image), (resolution, resolution),
                                 Image.Resampling.BICUBIC))


def _latent_mask(mask: np.ndarray, resolution: int, latent_size: int) -> np.ndarray:
  """An image mask ([S, S] or [S, S, 1], bool or 0/255) centre-cropped like the images
  and averaged over blocks: the share of each of the [latent_size, latent_size] cells
  it covers."""
  mask = np.asarray(mask).reshape(np.asarray(mask).shape[:2])
  image = Image.fromarray((mask > 0).astype(np.uint8) * 255)
  full = np.asarray(ImageOps.fit(image, (resolution, resolution),
                                 Image.Resampling.NEAREST), np.float32) / 255.0
  f = resolution // latent_size
  return full.reshape(latent_size, f, latent_size, f).mean((1, 3)).astype(np.float16)


def _batches(source, batch_size: int) -> Iterator[list[dict]]:
  """``source``'s records in order, ``batch_size`` at a time, decoded by a thread pool
  (PNG decoding releases the GIL) up to two batches ahead of the one being encoded."""
  n = len(source)
  with concurrent.futures.ThreadPoolExecutor(min(16, os.cpu_count() or 1)) as pool:
    pending = collections.deque()
    for start in range(0, n, batch_size):
      pending.append([pool.submit(source.__getitem__, i)
                      for i in range(start, min(n, start + batch_size))])
      if len(pending) > 2:
        yield [f.result() for f in pending.popleft()]
    while pending:
      yield [f.result() for f in pending.popleft()]


def build(source, path: str, parts, *, resolution: int, batch_size: int = 16,
          progress=None) -> int:
  """Encodes every triplet of ``source`` with ``parts`` (a ``PipelineParts``: VAE, text
  encoder, tokenizer) into the ArrayRecord file ``path`` (local or in a bucket); returns
  the record count."""
  if not paths.is_local(path):
    with tempfile.TemporaryDirectory() as tmp:
      local = os.path.join(tmp, os.path.basename(path.rstrip("/")))
      count = build(source, local, parts, resolution=resolution, batch_size=batch_size,
                    progress=progress)
      paths.put(local, path)
    return count
  vae, text_encoder = parts.modules["vae"], parts.modules["text_encoder"]

  @jax.jit
  def encode(params, inputs, edited, ids, caption_ids):
    to_unit = lambda x: x.astype(jnp.float32) / 127.5 - 1.0
    cond = vae.apply({"params": params["vae"]}, to_unit(inputs), method="encode")
    target = vae.apply({"params": params["vae"]}, to_unit(edited), method="encode")
    embed = lambda i: text_encoder.apply({"params": params["text_encoder"]},
                                         i).last_hidden_state.astype(jnp.float16)
    return cond.mode(), target.mean, target.logvar, embed(ids), embed(caption_ids)

  def text_of(record, key):
    value = record.get(key, b"")
    return value.decode() if isinstance(value, bytes) else str(value)

  writer = array_record_module.ArrayRecordWriter(path, "group_size:1")
  count = 0
  try:
    for batch in _batches(source, batch_size):
      inputs = np.stack([_center(r["input_image"], resolution) for r in batch])
      edited = np.stack([_center(r["edited_image"], resolution) for r in batch])
      ids = tokenizers.tokenize(parts.tokenizer, [text_of(r, "instruction") for r in batch])
      has_captions = "edited_caption" in batch[0]
      caption_ids = tokenizers.tokenize(parts.tokenizer,
                                        [text_of(r, "edited_caption") for r in batch])
      outs = jax.device_get(encode(parts.params, inputs, edited, ids, caption_ids))
      for j in range(len(batch)):
        record = {"image_latent": outs[0][j], "edited_mean": outs[1][j],
                  "edited_logvar": outs[2][j], "text": outs[3][j]}
        if has_captions:
          record["caption_text"] = outs[4][j]
        if "input_masks" in batch[j]:
          objects = (np.asarray(batch[j]["input_masks"]) > 0) | \
              (np.asarray(batch[j]["edited_masks"]) > 0)
          record["object_mask"] = _latent_mask(objects, resolution, outs[0].shape[1])
        writer.write(serialization.msgpack_serialize(record))
        count += 1
      if progress:
        progress(len(batch))
  finally:
    writer.close()
  return count


# Caches up to this size are read into memory once when opened (one sequential pass,
# ~1 s for the shapes world's 12,000 records of 44 KB), as one array per field, so that
# a batch is one fancy-indexing gather per field. Measured
# (benchmarks/input_pipeline_benchmark.py --latents, batch 256, this project's 2-core
# CPU; BENCHMARKS.md "Input pipeline"): on a cache of the default model's shapes, from
# the file through grain's threaded reader 1,067-1,658 examples/s; records held in
# memory and batched by grain 8,552-8,990; held as columns and gathered 16,468-16,728.
# At 900 examples/s (the file, on an H200's host) a GPU training run of the default
# model was input-bound at 0.07% MFU.
IN_MEMORY_BYTES = 4 << 30


class LatentCacheSource(grain.RandomAccessDataSource):
  """Random access to a latent cache file (local or in a bucket): ``source[i]`` -> dict
  of numpy arrays. ``in_memory``: read every record into memory when opened, as one
  array per field (None: when the file is at most ``IN_MEMORY_BYTES``); an access is then
  a view into those arrays, and ``make_loader`` gathers whole batches at once."""

  def __init__(self, path: str, *, in_memory: bool | None = None):
    self.path = path
    local = paths.local_copy(path)
    self._records = array_record_data_source.ArrayRecordDataSource([local])
    if in_memory is None:
      in_memory = os.path.getsize(local) <= IN_MEMORY_BYTES
    self.columns = self._read_columns() if in_memory and len(self._records) else None

  def _read_columns(self) -> dict[str, np.ndarray]:
    """Every record's fields stacked into one array per field (records of a cache all
    have the same fields, shapes and dtypes: ``build`` writes them so)."""
    n, chunk, columns = len(self._records), 1024, None
    for start in range(0, n, chunk):
      for i, raw in enumerate(self._records.__getitems__(range(start, min(n, start + chunk))),
                              start):
        record = serialization.msgpack_restore(raw)
        if columns is None:
          columns = {k: np.empty((n,) + np.shape(v), np.asarray(v).dtype)
                     for k, v in record.items()}
        if record.keys() != columns.keys():
          raise ValueError(f"{self.path}: record {i} has fields {sorted(record)}, record 0 "
                           f"{sorted(columns)}; rebuild the cache (scripts/build_latent_cache.py)")
        for k, v in record.items():
          columns[k][i] = v
    return columns

  @property
  def in_memory(self) -> bool:
    return self.columns is not None

  def __len__(self) -> int:
    return len(self._records)

  def __getitem__(self, index: int) -> dict:
    if self.columns is not None:
      return {k: column[index] for k, column in self.columns.items()}
    return serialization.msgpack_restore(self._records[index])

  def __repr__(self) -> str:
    return f"LatentCacheSource({self.path!r})"


@dataclasses.dataclass(frozen=True)
class LatentLoaderConfig:
  batch_size: int = 32
  seed: int = 0
  shuffle: bool = True
  num_epochs: int | None = None


def make_loader(source: LatentCacheSource, config: LatentLoaderConfig, *, shard_index: int,
                shard_count: int):
  """Shuffled, sharded batches of cached latents, resumable like the image pipeline
  (iterators checkpoint with ``grain.PyGrainCheckpointSave``). The order is grain's
  ``IndexSampler``'s either way; a cache held in memory is batched by gathering its
  columns (``HeldBatches``), a cache read from its file by ``grain.DataLoader``."""
  shard = Shard(source, shard_index, shard_count, drop_remainder=True)
  sampler = grain.IndexSampler(len(shard), shuffle=config.shuffle, num_epochs=config.num_epochs,
                               seed=config.seed)
  if getattr(source, "in_memory", False):
    columns = {k: v[shard_index::shard_count][:len(shard)] for k, v in source.columns.items()}
    return HeldBatches(columns, sampler, config, repr(shard))
  return grain.DataLoader(data_source=shard, sampler=sampler,
                          operations=[grain.Batch(config.batch_size, drop_remainder=True)])


class HeldBatches:
  """Batches of columns held in memory in ``sampler``'s order: what ``grain.DataLoader``
  with ``grain.Batch(drop_remainder=True)`` yields from the same records, without its
  per-record work (a record read, a dict, a stack per field, a random generator per
  index). The record order is the sampler's own construction (``grain.MapDataset.range``
  shuffled with the seed; a test checks it against ``grain.DataLoader``)."""

  def __init__(self, columns: dict[str, np.ndarray], sampler, config: LatentLoaderConfig,
               name: str):
    n = len(next(iter(columns.values())))
    self._columns, self._sampler, self._batch_size, self._name = (
        columns, sampler, config.batch_size, name)
    self._keys = (grain.MapDataset.range(n).shuffle(seed=config.seed) if config.shuffle
                  else None)
    self._n = n
    self._limit = None if config.num_epochs is None else config.num_epochs * n

  def record_keys(self, start: int, stop: int) -> np.ndarray:
    """Record indices at sampler positions ``start .. stop - 1`` (IndexError past the
    last epoch)."""
    if self._limit is not None and stop > self._limit:
      raise IndexError(f"position {stop - 1} is past the last epoch")
    if self._keys is None:
      return np.arange(start, stop) % self._n
    return np.fromiter((self._keys[i] for i in range(start, stop)), np.int64, stop - start)

  def __iter__(self) -> "HeldBatchIterator":
    return HeldBatchIterator(self)


class HeldBatchIterator:
  """Iterator over ``HeldBatches``. Its state is ``grain.DataLoader``'s iterator state
  (JSON bytes; the next sampler index follows ``last_seen_indices``), so a checkpoint
  restores into either kind of loader over the same cache."""

  def __init__(self, loader: HeldBatches):
    self._loader, self._next = loader, 0

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    loader = self._loader
    try:
      index = loader.record_keys(self._next, self._next + loader._batch_size)
    except IndexError:  # the epochs are over; a partial batch is dropped
      raise StopIteration from None
    self._next += loader._batch_size
    return {k: column[index] for k, column in loader._columns.items()}

  def get_state(self) -> bytes:
    return json.dumps({"version": 2, "last_seen_indices": {"0": self._next - 1},
                       "last_worker_index": -1, "worker_count": 0,
                       "sampler": repr(self._loader._sampler),
                       "data_source": self._loader._name}, indent=4).encode()

  def set_state(self, state: bytes) -> None:
    state = json.loads(state)
    if state["sampler"] != repr(self._loader._sampler):
      raise ValueError(f"the checkpoint's data order ({state['sampler']}) is not this "
                       f"loader's ({self._loader._sampler!r})")
    self._next = max(state["last_seen_indices"].values()) + 1

  def start_prefetch(self) -> None:
    """Nothing to prefetch (grain's checkpoint handler calls it after a restore)."""
