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
    ahead = collections.deque(pool.submit(source.__getitem__, i)
                              for i in range(min(n, 2 * batch_size)))
    submitted = len(ahead)
    while ahead:
      batch = [ahead.popleft().result() for _ in range(min(batch_size, len(ahead)))]
      for i in range(submitted, min(n, submitted + len(batch))):
        ahead.append(pool.submit(source.__getitem__, i))
      submitted = min(n, submitted + len(batch))
      yield batch


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


# Caches up to this size are read and deserialized into memory once (one sequential
# pass, ~1 s for the shapes world's 12,000 records of 44 KB) instead of record by record
# at every access. Measured (benchmarks/input_pipeline_benchmark.py --latents, batch 256,
# this project's 2-core CPU): 1,900 examples/s from the file through grain's threaded
# reader, 12,000 from memory without threads. At 900 examples/s (the file, on an H200's
# host) a GPU training run of the default model was input-bound at 0.07% MFU.
IN_MEMORY_BYTES = 4 << 30


class LatentCacheSource(grain.RandomAccessDataSource):
  """Random access to a latent cache file (local or in a bucket): ``source[i]`` -> dict
  of numpy arrays. ``in_memory``: deserialize every record into memory when opened
  (None: when the file is at most ``IN_MEMORY_BYTES``); each access is then a lookup."""

  def __init__(self, path: str, *, in_memory: bool | None = None):
    self.path = path
    local = paths.local_copy(path)
    self._records = array_record_data_source.ArrayRecordDataSource([local])
    if in_memory is None:
      in_memory = os.path.getsize(local) <= IN_MEMORY_BYTES
    self._held = None
    if in_memory:
      n, chunk = len(self._records), 1024
      self._held = [serialization.msgpack_restore(raw) for start in range(0, n, chunk)
                    for raw in self._records.__getitems__(range(start, min(n, start + chunk)))]

  @property
  def in_memory(self) -> bool:
    return self._held is not None

  def __len__(self) -> int:
    return len(self._records)

  def __getitem__(self, index: int) -> dict:
    if self._held is not None:
      return dict(self._held[index])  # a new dict: callers may add or drop keys
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
                shard_count: int) -> grain.DataLoader:
  """Shuffled, sharded batches of cached latents (resumable like the image pipeline)."""
  shard = Shard(source, shard_index, shard_count, drop_remainder=True)
  sampler = grain.IndexSampler(len(shard), shuffle=config.shuffle, num_epochs=config.num_epochs,
                               seed=config.seed)
  # From memory, grain's reader threads cost more than they save (its prefetch buffer is
  # polled per record): read in the loop's own thread. Order and state are the sampler's.
  read = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0) if getattr(
      source, "in_memory", False) else grain.ReadOptions()
  return grain.DataLoader(data_source=shard, sampler=sampler, read_options=read,
                          operations=[grain.Batch(config.batch_size, drop_remainder=True)])
