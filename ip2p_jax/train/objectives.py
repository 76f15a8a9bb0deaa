"""Training objectives, each a pure function ``loss(params, frozen, batch, rng) ->
(loss, metrics)`` built once (outside the jitted step) from the models and config.

Batches hold uint8 images ``[B, R, R, 3]`` and token ids ``[B, 77]``.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from ip2p_jax.diffusion import schedules

Loss = Callable[[Any, Any, dict, jax.Array], tuple[jax.Array, dict]]


def to_unit(images: jax.Array) -> jax.Array:
  """uint8 [0, 255] -> float32 [-1, 1]."""
  return images.astype(jnp.float32) / 127.5 - 1.0


def _noise_targets(schedule: schedules.ScheduleConfig, x0, noise, t):
  """``(noisy, target)`` of DDPM's forward process at integer timesteps ``t``."""
  ac = jnp.asarray(schedules.alphas_cumprod(schedule))[t].reshape(-1, 1, 1, 1)
  noisy = jnp.sqrt(ac) * x0 + jnp.sqrt(1 - ac) * noise
  if schedule.prediction_type == "epsilon":
    return noisy, noise
  if schedule.prediction_type == "v_prediction":  # Salimans & Ho 2022
    return noisy, jnp.sqrt(ac) * noise - jnp.sqrt(1 - ac) * x0
  return noisy, x0


def expand_conv_in(unet_params: dict, in_channels: int) -> dict:
  """Stage 1 -> stage 2: ``conv_in`` reads ``in_channels`` instead of 4. The old
  kernel is copied for the first channels, the new ones are zero and the bias is kept
  (diffusers' script drops the bias: diffusers issue #4960)."""
  kernel = unet_params["conv_in"]["kernel"]
  extra = in_channels - kernel.shape[2]
  if extra < 0:
    raise ValueError(f"conv_in already reads {kernel.shape[2]} > {in_channels} channels")
  pad = jnp.zeros(kernel.shape[:2] + (extra,) + kernel.shape[3:], kernel.dtype)
  new = dict(unet_params)
  new["conv_in"] = {**unet_params["conv_in"], "kernel": jnp.concatenate([kernel, pad], axis=2)}
  return new


def instruct_pix2pix(unet, vae, text_encoder, schedule: schedules.ScheduleConfig,
                     empty_ids: np.ndarray, *, dropout: float = 0.05) -> Loss:
  """Stage 2 (Brooks et al. 2023): predict the noise of the edited image's latent from
  [noisy latent, input image latent] and the instruction. Target latent =
  scaling_factor x posterior sample; condition = posterior mode, unscaled.
  Conditioning dropout, r ~ U(0, 1) per example: the text is replaced by the empty
  prompt's embedding if r < 2p, the image latent zeroed if p <= r < 3p (p = 0.05:
  5% text only, 5% both, 5% image only)."""
  scale = vae.config.scaling_factor
  empty_ids = jnp.asarray(empty_ids)

  def loss(params, frozen, batch, rng):
    k_post, k_noise, k_t, k_drop = jax.random.split(rng, 4)
    b = batch["input_ids"].shape[0]
    encode = lambda x: vae.apply({"params": frozen["vae"]}, to_unit(x), method="encode")
    target_latent = encode(batch["edited_image"]).sample(k_post) * scale
    image_latent = encode(batch["input_image"]).mode()
    text = text_encoder.apply({"params": frozen["text_encoder"]},
                              jnp.concatenate([batch["input_ids"], empty_ids[None]])
                              ).last_hidden_state
    text, empty = text[:-1], text[-1:]
    r = jax.random.uniform(k_drop, (b, 1, 1))
    text = jnp.where(r < 2 * dropout, empty, text)
    image_latent = image_latent * (1.0 - ((r >= dropout) & (r < 3 * dropout))[..., None])
    noise = jax.random.normal(k_noise, target_latent.shape)
    t = jax.random.randint(k_t, (b,), 0, schedule.num_train_timesteps)
    noisy, target = _noise_targets(schedule, target_latent, noise, t)
    pred = unet.apply({"params": params}, jnp.concatenate([noisy, image_latent], -1), t, text)
    mse = jnp.mean(jnp.square(pred.astype(jnp.float32) - target))
    return mse, {"loss": mse}
  return loss


def text_to_image(unet, vae, text_encoder, schedule: schedules.ScheduleConfig,
                  empty_ids: np.ndarray, *, caption_dropout: float = 0.1) -> Loss:
  """Stage 1: latent-diffusion noise prediction (epsilon, or v with v_prediction) on
  image-caption pairs; captions dropped to "" with ``caption_dropout`` so the model
  also learns the unconditional prediction used by classifier-free guidance."""
  scale = vae.config.scaling_factor
  empty_ids = jnp.asarray(empty_ids)

  def loss(params, frozen, batch, rng):
    k_post, k_noise, k_t, k_drop = jax.random.split(rng, 4)
    b = batch["input_ids"].shape[0]
    latent = vae.apply({"params": frozen["vae"]}, to_unit(batch["image"]),
                       method="encode").sample(k_post) * scale
    text = text_encoder.apply({"params": frozen["text_encoder"]},
                              jnp.concatenate([batch["input_ids"], empty_ids[None]])
                              ).last_hidden_state
    drop = jax.random.uniform(k_drop, (b, 1, 1)) < caption_dropout
    text = jnp.where(drop, text[-1:], text[:-1])
    noise = jax.random.normal(k_noise, latent.shape)
    t = jax.random.randint(k_t, (b,), 0, schedule.num_train_timesteps)
    noisy, target = _noise_targets(schedule, latent, noise, t)
    pred = unet.apply({"params": params}, noisy, t, text)
    mse = jnp.mean(jnp.square(pred.astype(jnp.float32) - target))
    return mse, {"loss": mse}
  return loss


def autoencoder(vae, *, kl_weight: float = 1e-6, perceptual=None,
                perceptual_weight: float = 0.0, image_field: str = "image") -> Loss:
  """VAE: L1 reconstruction of a posterior sample's decoding + ``kl_weight`` x KL to
  N(0, I) (latent diffusion's KL-f8 objective, without the adversarial term).
  ``perceptual(x, y) -> [B]`` adds a feature-space distance (e.g. CLIP vision
  features) weighted by ``perceptual_weight``."""
  def loss(params, frozen, batch, rng):
    x = to_unit(batch[image_field])
    recon, posterior = vae.apply({"params": params}, x, rng)
    rec = jnp.mean(jnp.abs(recon.astype(jnp.float32) - x))
    kl = jnp.mean(posterior.kl())
    total = rec + kl_weight * kl
    metrics = {"reconstruction": rec, "kl": kl}
    if perceptual is not None and perceptual_weight > 0:
      p = jnp.mean(perceptual(frozen, recon, x))
      total = total + perceptual_weight * p
      metrics["perceptual"] = p
    metrics["loss"] = total
    return total, metrics
  return loss


def contrastive(clip_model, *, image_field: str = "image", max_logit_scale: float = 100.0) -> Loss:
  """CLIP (Radford et al. 2021): symmetric cross-entropy over the batch's image-text
  similarity matrix with a learned temperature (capped at 100)."""
  def loss(params, frozen, batch, rng):
    del rng
    pixels = to_unit(batch[image_field])
    params = {**params, "logit_scale": jnp.minimum(params["logit_scale"],
                                                   jnp.log(max_logit_scale))}
    out = clip_model.apply({"params": params}, batch["input_ids"], pixels)
    logits = out.logits_per_image
    labels = jnp.arange(logits.shape[0])
    xent = lambda l: -jnp.mean(jax.nn.log_softmax(l, axis=-1)[labels, labels])
    total = 0.5 * (xent(logits) + xent(logits.T))
    accuracy = jnp.mean(jnp.argmax(logits, -1) == labels)
    return total, {"loss": total, "accuracy": accuracy}
  return loss
