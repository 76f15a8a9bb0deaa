"""Denoisers built from a noise-prediction network, and guidance as denoiser wrappers.

The UNet predicts epsilon, v or x0 from the VP latent ``x / sqrt(1 + sigma^2)``;
:func:`to_denoised` turns any of them into x0. Guidance combines denoised
predictions; because x0 is affine in the network output with the same
coefficients for every branch, this equals guiding the raw outputs (diffusers).
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

# (sample [B,h,w,C_in], timestep, context [B,L,D]) -> prediction [B,h,w,C]
Network = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def to_denoised(output: jax.Array, x: jax.Array, sigma: jax.Array, prediction_type: str):
  """x0 from the network output at VE state ``x`` and noise level ``sigma``."""
  if prediction_type == "epsilon":
    return x - sigma * output
  if prediction_type == "v_prediction":  # Salimans & Ho 2022
    return output * (-sigma / jnp.sqrt(sigma ** 2 + 1)) + x / (sigma ** 2 + 1)
  if prediction_type == "sample":
    return output
  raise ValueError(f"unknown prediction_type {prediction_type!r}")


def _per_image(scale: jax.Array, like: jax.Array) -> jax.Array:
  return jnp.reshape(scale, (-1,) + (1,) * (like.ndim - 1)).astype(like.dtype)


def instruct_pix2pix(network: Network, prediction_type: str, text: jax.Array, empty: jax.Array,
                     image_latents: jax.Array, text_scale: jax.Array, image_scale: jax.Array):
  """Two-scale guidance of Brooks et al. 2023 (eq. 3), three conditionings in one
  network call, in diffusers' order: (text, image), (empty, image), (empty, no image)::

      out = uncond + s_T * (cond - image_cond) + s_I * (image_cond - uncond)

  The image latent is the VAE posterior mode, unscaled. Scales are per image.
  """
  context = jnp.concatenate([text, empty, empty])
  image = jnp.concatenate([image_latents, image_latents, jnp.zeros_like(image_latents)])

  def denoiser(x, sigma, t):
    x3 = jnp.concatenate([x, x, x])
    model_in = jnp.concatenate([x3 / jnp.sqrt(sigma ** 2 + 1), image.astype(x.dtype)], axis=-1)
    out = network(model_in, t, context).astype(x.dtype)
    cond, image_cond, uncond = jnp.split(to_denoised(out, x3, sigma, prediction_type), 3)
    return (uncond + _per_image(text_scale, x) * (cond - image_cond)
            + _per_image(image_scale, x) * (image_cond - uncond))
  return denoiser


def image_conditioned(network: Network, prediction_type: str, text: jax.Array,
                      image_latents: jax.Array):
  """No guidance: one (text, image) evaluation (diffusers when text scale <= 1 or
  image scale < 1)."""
  def denoiser(x, sigma, t):
    model_in = jnp.concatenate([x / jnp.sqrt(sigma ** 2 + 1), image_latents.astype(x.dtype)], -1)
    return to_denoised(network(model_in, t, text).astype(x.dtype), x, sigma, prediction_type)
  return denoiser


def classifier_free(network: Network, prediction_type: str, text: jax.Array,
                    negative: jax.Array, scale: jax.Array):
  """Classifier-free guidance (Ho & Salimans 2022): ``uncond + s (cond - uncond)``,
  batched as (negative, text) like diffusers."""
  context = jnp.concatenate([negative, text])

  def denoiser(x, sigma, t):
    x2 = jnp.concatenate([x, x])
    out = network(x2 / jnp.sqrt(sigma ** 2 + 1), t, context).astype(x.dtype)
    uncond, cond = jnp.split(to_denoised(out, x2, sigma, prediction_type), 2)
    return uncond + _per_image(scale, x) * (cond - uncond)
  return denoiser


def text_conditioned(network: Network, prediction_type: str, text: jax.Array):
  """No guidance (scale <= 1): one text-conditioned evaluation."""
  def denoiser(x, sigma, t):
    out = network(x / jnp.sqrt(sigma ** 2 + 1), t, text).astype(x.dtype)
    return to_denoised(out, x, sigma, prediction_type)
  return denoiser
