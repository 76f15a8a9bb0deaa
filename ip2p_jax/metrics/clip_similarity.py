"""The CLIP metrics of InstructPix2Pix (Brooks, Holynski & Efros 2023, Sec. 4 and Fig. 8).

With L2-normalised CLIP embeddings of the input image ``img0``, the edited image
``img1`` and the captions before/after the edit ``txt0``/``txt1``:

  sim_0         = cos(img0, txt0)   how well the input matches its caption
  sim_1         = cos(img1, txt1)   how well the output matches the edited caption
  sim_direction = cos(img1 - img0, txt1 - txt0)   the image changed the way the text did
  sim_image     = cos(img0, img1)   how much of the input the output kept

The paper's Figure 8 plots sim_direction against sim_image while sweeping the
guidance scales. Images are resized like the paper's ``ClipSimilarity``
(``F.interpolate(..., mode="bicubic", align_corners=False)`` on [0, 1] pixels, to
the vision tower's ``image_size``), then normalised by the folder's
``preprocessor_config.json`` ``image_mean``/``image_std`` if it has one, else
OpenAI CLIP's. Any transformers-format ``CLIPModel`` folder works, run by this
package's Flax CLIP (``models.clip``).
"""
from __future__ import annotations

import functools
import json
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ip2p_jax import bundled
from ip2p_jax import tokenizer as tokenizers
from ip2p_jax.checkpoints import load_component
from ip2p_jax.models import clip as cliplib

DEFAULT_CLIP = bundled.DEFAULT_CLIP
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def _cubic(t: np.ndarray, a: float = -0.75) -> np.ndarray:
  """Keys' cubic convolution kernel with PyTorch's ``a = -0.75``."""
  t = np.abs(t)
  return np.where(t <= 1, ((a + 2) * t - (a + 3)) * t * t + 1,
                  np.where(t < 2, ((a * t - 5 * a) * t + 8 * a) * t - 4 * a, 0.0))


@functools.lru_cache(maxsize=16)
def resize_matrix(in_size: int, out_size: int) -> np.ndarray:
  """``[out_size, in_size]`` weights of PyTorch's bicubic interpolation
  (``align_corners=False``, no antialiasing, edge pixels repeated), so that
  ``W @ x`` resizes one axis exactly as ``F.interpolate`` does."""
  w = np.zeros((out_size, in_size), np.float64)
  # Source positions in float32 arithmetic, as PyTorch computes them (this matters
  # at 1e-5 when downsampling); not clamped at 0 for cubic, as in PyTorch.
  scale = np.float32(in_size) / np.float32(out_size)
  for i in range(out_size):
    src = np.float32(scale * np.float32(i + 0.5) - np.float32(0.5))
    base = int(np.floor(src))
    t = float(src - np.float32(base))
    for k in range(-1, 3):
      w[i, min(max(base + k, 0), in_size - 1)] += _cubic(np.array(k - t))
  return w.astype(np.float32)


def resize_bicubic(images: jax.Array, size: int) -> jax.Array:
  """``[B, H, W, C]`` -> ``[B, size, size, C]``, PyTorch's bicubic (see :func:`resize_matrix`)."""
  rows = jnp.asarray(resize_matrix(images.shape[1], size))
  cols = jnp.asarray(resize_matrix(images.shape[2], size))
  hp = jax.lax.Precision.HIGHEST
  return jnp.einsum("oh,bhwc,pw->bopc", rows, images, cols, precision=hp)


def _cos(a: np.ndarray, b: np.ndarray, eps: float = 1e-8) -> np.ndarray:
  na = np.maximum(np.linalg.norm(a, axis=-1), eps)
  nb = np.maximum(np.linalg.norm(b, axis=-1), eps)
  return np.sum(a * b, -1) / (na * nb)


def similarities(img0: np.ndarray, img1: np.ndarray, txt0: np.ndarray,
                 txt1: np.ndarray) -> dict[str, np.ndarray]:
  """The four metrics from L2-normalised embeddings ``[B, D]`` (module docstring)."""
  return {"sim_0": _cos(img0, txt0), "sim_1": _cos(img1, txt1),
          "sim_direction": _cos(img1 - img0, txt1 - txt0), "sim_image": _cos(img0, img1)}


def _normalization(folder: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
  path = os.path.join(folder, "preprocessor_config.json")
  if os.path.isfile(path):
    with open(path, encoding="utf-8") as f:
      raw = json.load(f)
    return tuple(raw.get("image_mean", OPENAI_MEAN)), tuple(raw.get("image_std", OPENAI_STD))
  return OPENAI_MEAN, OPENAI_STD


def _has_tokenizer(folder: str) -> bool:
  return any(os.path.isfile(os.path.join(folder, f)) for f in ("tokenizer.json", "vocab.json"))


class ClipSimilarity:
  """Embeds images and captions with a ``CLIPModel`` folder and computes the paper's
  metrics. ``folder``'s own tokenizer is used if it has one, else the packaged CLIP
  vocabulary.

      clip = ClipSimilarity("path/to/clip")
      sims = clip(inputs_uint8, outputs_uint8, input_captions, edited_captions)
      sims["sim_direction"]  # [B]
  """

  def __init__(self, folder: str = DEFAULT_CLIP, *, batch_size: int = 32):
    if not os.path.isfile(os.path.join(folder, "config.json")):
      raise FileNotFoundError(f"{folder}: not a CLIP model folder (no config.json)")
    bundled_clip = os.path.abspath(folder) == os.path.abspath(bundled.DEFAULT_CLIP)
    module, params = bundled.load_clip() if bundled_clip else load_component(folder)
    if not isinstance(module, cliplib.CLIPModel):
      raise ValueError(f"{folder}: a CLIPModel (both towers) is needed, found "
                       f"{type(module).__name__}")
    self.module, self.params, self.batch_size = module, params, batch_size
    self.tokenizer = tokenizers.load(folder if _has_tokenizer(folder) else None)
    cfg = module.config
    self.image_size = cfg.vision_config.image_size
    self.max_length = min(cfg.text_config.max_position_embeddings, tokenizers.MAX_LENGTH)
    self.mean, self.std = _normalization(folder)
    self._image_fn = jax.jit(self._embed_images)
    self._text_fn = jax.jit(self._embed_texts)

  def preprocess(self, images: jax.Array) -> jax.Array:
    """Float ``[B, H, W, 3]`` in [0, 1] -> the vision tower's normalised input."""
    x = resize_bicubic(images, self.image_size)
    return (x - jnp.asarray(self.mean, jnp.float32)) / jnp.asarray(self.std, jnp.float32)

  def _embed_images(self, params, images):
    e = self.module.apply({"params": params}, self.preprocess(images), method="get_image_features")
    return e / jnp.linalg.norm(e, axis=-1, keepdims=True)

  def _embed_texts(self, params, ids):
    e = self.module.apply({"params": params}, ids, method="get_text_features")
    return e / jnp.linalg.norm(e, axis=-1, keepdims=True)

  def _batched(self, fn, inputs: np.ndarray) -> np.ndarray:
    """Runs ``fn`` in fixed-size batches (the last one padded) so it compiles once."""
    out = []
    n = len(inputs)
    for start in range(0, n, self.batch_size):
      chunk = inputs[start:start + self.batch_size]
      pad = self.batch_size - len(chunk) if n > self.batch_size else 0
      if pad:
        chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, 0)])
      out.append(np.asarray(fn(self.params, chunk))[:len(chunk) - pad])
    return np.concatenate(out)

  def encode_images(self, images) -> np.ndarray:
    """L2-normalised embeddings ``[B, D]`` of uint8 (or [0, 1] float) images ``[B, H, W, 3]``."""
    images = np.asarray(images)
    images = images.astype(np.float32) / 255.0 if images.dtype == np.uint8 else \
        images.astype(np.float32)
    return self._batched(self._image_fn, images)

  def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
    """L2-normalised embeddings ``[B, D]`` of ``texts``."""
    ids = tokenizers.tokenize(self.tokenizer, list(texts), self.max_length)
    return self._batched(self._text_fn, ids)

  def __call__(self, images_0, images_1, texts_0: Sequence[str],
               texts_1: Sequence[str]) -> dict[str, np.ndarray]:
    """``sim_0``, ``sim_1``, ``sim_direction``, ``sim_image``, each ``[B]``."""
    return similarities(self.encode_images(images_0), self.encode_images(images_1),
                        self.encode_texts(texts_0), self.encode_texts(texts_1))
