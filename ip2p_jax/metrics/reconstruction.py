"""How well a pipeline's VAE gives images back: every edit passes through it, so its
reconstruction PSNR caps the PSNR of every edit."""
from __future__ import annotations

import jax
import numpy as np

from ip2p_jax.metrics.shapes_scoring import psnr


def vae_psnr(pipe, images: np.ndarray, batch_size: int = 32) -> float:
  """Mean PSNR (dB) of uint8 ``images`` [N, H, W, 3] against their decoded posterior
  mode (the deterministic round trip the editor's input takes)."""
  vae, params = pipe.vae, pipe.params["vae"]

  @jax.jit
  def roundtrip(x):
    z = vae.apply({"params": params}, x.astype(np.float32) / 127.5 - 1.0, method="encode").mode()
    y = vae.apply({"params": params}, z, method="decode")
    y = getattr(y, "sample", y)
    return ((y + 1.0) * 127.5).clip(0, 255).round().astype(np.uint8)

  values = []
  for start in range(0, len(images), batch_size):
    chunk = images[start:start + batch_size]
    out = np.asarray(roundtrip(np.asarray(chunk)))
    values += [psnr(a, b) for a, b in zip(chunk, out)]
  return float(np.mean(values))
