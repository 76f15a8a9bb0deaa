"""Training objectives, each a pure function ``loss(params, frozen, batch, rng) ->
(loss, metrics)`` built once (outside the jitted step) from the models and config.

Batches hold uint8 images ``[B, R, R, 3]`` and token ids ``[B, 77]``, or, on a latent
cache (the ``*_cached`` objectives), latents and text states.
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


def snr_weights(schedule: schedules.ScheduleConfig, t: jax.Array, gamma: float) -> jax.Array:
  """Min-SNR-gamma loss weights (Hang et al. 2023, "Efficient Diffusion Training via
  Min-SNR Weighting Strategy"): each timestep's loss is weighted so that it counts as
  ``min(SNR, gamma)`` in x0-space. For epsilon targets that is ``min(SNR, gamma) / SNR``,
  for v targets ``min(SNR, gamma) / (SNR + 1)``, for x0 targets ``min(SNR, gamma)``.
  ``gamma = 0`` gives weight 1 (plain MSE)."""
  if not gamma:
    return jnp.ones(t.shape, jnp.float32)
  ac = jnp.asarray(schedules.alphas_cumprod(schedule))[t]
  snr = ac / (1 - ac)
  clipped = jnp.minimum(snr, gamma)
  if schedule.prediction_type == "epsilon":  # 0 where SNR = 0 (zero terminal SNR): x0 is
    return jnp.where(snr > 0, clipped / jnp.maximum(snr, 1e-20), 0.0)  # not in the target
  if schedule.prediction_type == "v_prediction":
    return clipped / (snr + 1)
  return clipped


def _diffusion_mse(unet, schedule, params, x0, cond, text, rng, min_snr_gamma,
                   position_weights=None):
  """Weighted MSE of the UNet's prediction at uniform random timesteps; ``cond`` (or
  None) is concatenated to the noisy latent on the channel axis, noisy latent first.
  ``position_weights`` ([B, h, w], mean 1 per example, or None) weighs latent positions."""
  k_noise, k_t = jax.random.split(rng)
  b = x0.shape[0]
  noise = jax.random.normal(k_noise, x0.shape)
  t = jax.random.randint(k_t, (b,), 0, schedule.num_train_timesteps)
  noisy, target = _noise_targets(schedule, x0, noise, t)
  inputs = noisy if cond is None else jnp.concatenate([noisy, cond], -1)
  pred = unet.apply({"params": params}, inputs, t, text)
  error = jnp.square(pred.astype(jnp.float32) - target)
  if position_weights is not None:
    error = error * position_weights[..., None]
  per_example = jnp.mean(error, axis=(1, 2, 3))
  mse = jnp.mean(per_example)
  loss = jnp.mean(snr_weights(schedule, t, min_snr_gamma) * per_example)
  return loss, {"loss": loss, "mse": mse}


def _sample_posterior(mean, logvar, rng):
  return mean + jnp.exp(0.5 * jnp.clip(logvar, -30.0, 20.0)) * jax.random.normal(rng, mean.shape)


def _ip2p_dropout(text, empty, image_latent, rng, dropout):
  """Conditioning dropout of Brooks et al. 2023, r ~ U(0, 1) per example: the text is
  replaced by the empty prompt's embedding if r < 2p, the image latent zeroed if
  p <= r < 3p (p = 0.05: 5% text only, 5% both, 5% image only)."""
  r = jax.random.uniform(rng, (text.shape[0], 1, 1))
  text = jnp.where(r < 2 * dropout, empty, text)
  image_latent = image_latent * (1.0 - ((r >= dropout) & (r < 3 * dropout))[..., None])
  return text, image_latent


def instruct_pix2pix(unet, vae, text_encoder, schedule: schedules.ScheduleConfig,
                     empty_ids: np.ndarray, *, dropout: float = 0.05,
                     min_snr_gamma: float = 0.0) -> Loss:
  """Stage 2 (Brooks et al. 2023): predict the noise (or v) of the edited image's latent
  from [noisy latent, input image latent] and the instruction, with the conditioning
  dropout of ``_ip2p_dropout``. Target latent = scaling_factor x posterior sample;
  condition = posterior mode, unscaled."""
  scale = vae.config.scaling_factor
  empty_ids = jnp.asarray(empty_ids)

  def loss(params, frozen, batch, rng):
    k_post, k_drop, k_diff = jax.random.split(rng, 3)
    # Both images through the encoder as one batch, each example's pair side by side (a
    # batch sharded over devices stays where it is; per image the same arithmetic, one
    # call of each layer instead of two).
    pairs = jnp.stack([batch["edited_image"], batch["input_image"]], 1)
    both = vae.apply({"params": frozen["vae"]},
                     to_unit(pairs.reshape((-1,) + pairs.shape[2:])), method="encode")
    edited, image = (jax.tree.map(lambda a, i=i: a.reshape((-1, 2) + a.shape[1:])[:, i], both)
                     for i in (0, 1))
    target_latent = edited.sample(k_post) * scale
    image_latent = image.mode()
    text = text_encoder.apply({"params": frozen["text_encoder"]},
                              jnp.concatenate([batch["input_ids"], empty_ids[None]])
                              ).last_hidden_state
    text, image_latent = _ip2p_dropout(text[:-1], text[-1:], image_latent, k_drop, dropout)
    return _diffusion_mse(unet, schedule, params, target_latent, image_latent, text, k_diff,
                          min_snr_gamma)
  return loss


def object_weights(object_mask: jax.Array, weight: float) -> jax.Array:
  """Per-position loss weights ``1 + weight * mask``, normalised to mean 1 per example.
  ``object_mask`` ([B, h, w]) is the share of each latent cell covered by an object of
  the input or the edited image (``latent_cache``). The objects cover a few percent of
  a shapes-world picture, so under the plain loss a model learns the background and
  the global edits long before it learns which object an instruction names or to keep
  the others intact (measured on the bundled model: the instruction changed the named
  object no more than the others, and background edits lost the objects). Every local
  edit's region lies inside the mask. Not in the paper (its synthesized pairs have no
  masks): a lever for small budgets on data with exact object masks. Measured on the
  default model (weight 10, 750 steps on from its stage-2 step 6500): recolour stayed
  at 0 and PSNR outside the edit fell from 20.1 to 16.7 dB, so its recipe leaves it off."""
  w = 1.0 + weight * object_mask.astype(jnp.float32)
  return w / jnp.mean(w, axis=(1, 2), keepdims=True)


def instruct_pix2pix_cached(unet, schedule: schedules.ScheduleConfig, empty_text: np.ndarray,
                            scaling_factor: float, *, dropout: float = 0.05,
                            min_snr_gamma: float = 0.0, object_weight: float = 0.0) -> Loss:
  """``instruct_pix2pix`` on a latent cache (``ip2p_jax.data.latent_cache``): the batch
  holds the input's posterior mode, the edited image's posterior (mean, logvar) and the
  instruction's text states, so the frozen encoders never run. ``empty_text`` is the
  text encoder's output for "" ([1, 77, D]). ``object_weight`` > 0 weighs the cache's
  ``object_mask`` positions up (:func:`object_weights`)."""
  empty_text = jnp.asarray(empty_text, jnp.float32)

  def loss(params, frozen, batch, rng):
    del frozen
    k_post, k_drop, k_diff = jax.random.split(rng, 3)
    target_latent = _sample_posterior(batch["edited_mean"], batch["edited_logvar"],
                                      k_post) * scaling_factor
    text, image_latent = _ip2p_dropout(batch["text"].astype(jnp.float32), empty_text,
                                       batch["image_latent"], k_drop, dropout)
    weights = (object_weights(batch["object_mask"], object_weight)
               if object_weight > 0 else None)
    return _diffusion_mse(unet, schedule, params, target_latent, image_latent, text, k_diff,
                          min_snr_gamma, weights)
  return loss


def text_to_image(unet, vae, text_encoder, schedule: schedules.ScheduleConfig,
                  empty_ids: np.ndarray, *, caption_dropout: float = 0.1,
                  min_snr_gamma: float = 0.0) -> Loss:
  """Stage 1: latent-diffusion noise prediction (epsilon, or v with v_prediction) on
  image-caption pairs; captions dropped to "" with ``caption_dropout`` so the model
  also learns the unconditional prediction used by classifier-free guidance."""
  scale = vae.config.scaling_factor
  empty_ids = jnp.asarray(empty_ids)

  def loss(params, frozen, batch, rng):
    k_post, k_drop, k_diff = jax.random.split(rng, 3)
    b = batch["input_ids"].shape[0]
    latent = vae.apply({"params": frozen["vae"]}, to_unit(batch["image"]),
                       method="encode").sample(k_post) * scale
    text = text_encoder.apply({"params": frozen["text_encoder"]},
                              jnp.concatenate([batch["input_ids"], empty_ids[None]])
                              ).last_hidden_state
    drop = jax.random.uniform(k_drop, (b, 1, 1)) < caption_dropout
    text = jnp.where(drop, text[-1:], text[:-1])
    return _diffusion_mse(unet, schedule, params, latent, None, text, k_diff, min_snr_gamma)
  return loss


def text_to_image_cached(unet, schedule: schedules.ScheduleConfig, empty_text: np.ndarray,
                         scaling_factor: float, *, caption_dropout: float = 0.1,
                         min_snr_gamma: float = 0.0) -> Loss:
  """``text_to_image`` on a latent cache: the edited image's posterior and its caption's
  text states (``edited_mean``, ``edited_logvar``, ``caption_text``)."""
  empty_text = jnp.asarray(empty_text, jnp.float32)

  def loss(params, frozen, batch, rng):
    del frozen
    k_post, k_drop, k_diff = jax.random.split(rng, 3)
    latent = _sample_posterior(batch["edited_mean"], batch["edited_logvar"],
                               k_post) * scaling_factor
    text = batch["caption_text"].astype(jnp.float32)
    drop = jax.random.uniform(k_drop, (text.shape[0], 1, 1)) < caption_dropout
    text = jnp.where(drop, empty_text, text)
    return _diffusion_mse(unet, schedule, params, latent, None, text, k_diff, min_snr_gamma)
  return loss


def random_crop(images: jax.Array, size: int, rng: jax.Array) -> jax.Array:
  """One random ``size`` x ``size`` window of a batch ``[B, H, W, C]`` (the same window
  for the whole batch; ``size`` 0 or >= the image returns the batch unchanged)."""
  h, w = images.shape[1:3]
  if not size or size >= min(h, w):
    return images
  ky, kx = jax.random.split(rng)
  y = jax.random.randint(ky, (), 0, h - size + 1)
  x = jax.random.randint(kx, (), 0, w - size + 1)
  return jax.lax.dynamic_slice(images, (0, y, x, 0), (images.shape[0], size, size,
                                                      images.shape[3]))


def autoencoder(vae, *, kl_weight: float = 1e-6, perceptual=None,
                perceptual_weight: float = 0.0, image_field: str = "image",
                crop: int = 0, mse_weight: float = 0.0, decoder_only: bool = False) -> Loss:
  """VAE: L1 reconstruction of a posterior sample's decoding + ``kl_weight`` x KL to
  N(0, I) (latent diffusion's KL-f8 objective, without the adversarial term).
  ``crop`` > 0 trains on random ``crop`` x ``crop`` windows, as latent diffusion
  trained its autoencoders: a convolutional VAE (no mid-block attention) learns the
  same function from a fraction of the pixels. ``mse_weight`` adds the squared error
  (PSNR's own measure), which weighs the large colour errors of small objects more
  than L1 does. ``decoder_only`` stops the gradient at the posterior sample, so only
  the decoder learns (the optimizer must also leave the encoder alone:
  ``state.make_optimizer`` with ``vae_train = "decoder"``).
  ``perceptual(x, y) -> [B]`` adds a feature-space distance (e.g. CLIP vision
  features) weighted by ``perceptual_weight``."""
  def loss(params, frozen, batch, rng):
    k_crop, k_post = jax.random.split(rng)
    x = random_crop(to_unit(batch[image_field]), crop, k_crop)
    if decoder_only:
      posterior = vae.apply({"params": params}, x, method="encode")
      z = jax.lax.stop_gradient(posterior.sample(k_post))
      recon = vae.apply({"params": params}, z, method="decode")
    else:
      recon, posterior = vae.apply({"params": params}, x, k_post)
    error = recon.astype(jnp.float32) - x
    rec = jnp.mean(jnp.abs(error))
    kl = jnp.mean(posterior.kl())
    mse = jnp.mean(jnp.square(error))
    total = rec + mse_weight * mse + kl_weight * kl
    # PSNR in [0, 1] pixel units, of the batch (a posterior sample's decoding).
    psnr = -10 * jnp.log10(jnp.mean(jnp.square(error / 2)) + 1e-12)
    metrics = {"reconstruction": rec, "kl": kl, "psnr": psnr}
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
