"""Samplers with one interface, each a ``jax.lax.scan`` over steps.

    x0 = sampler(denoiser, x, levels, keys)

``denoiser(x, sigma, t) -> denoised x0`` (k-diffusion's convention, Karras et al.
2022); ``x`` is the VE state ``x0 + sigma * eps``, batch first; ``levels`` is a
:class:`~ip2p_jax.diffusion.schedules.NoiseLevels`; ``keys`` holds one PRNG key
per image, and the noise added at step ``i`` to image ``b`` is drawn from
``fold_in(keys[b], i)``, so an image's result never depends on its batch.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from ip2p_jax.diffusion.schedules import NoiseLevels

Denoiser = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def to_d(x, sigma, denoised):
  """The probability-flow ODE derivative dx/dsigma (Karras et al. 2022, eq. 3)."""
  return (x - denoised) / sigma


def ancestral_step(sigma_from, sigma_to, eta=1.0):
  """Split a step from ``sigma_from`` to ``sigma_to`` into a deterministic step down
  to ``sigma_down`` and fresh noise of size ``sigma_up`` (k-diffusion)."""
  sigma_up = jnp.minimum(sigma_to, eta * jnp.sqrt(
      sigma_to ** 2 * (sigma_from ** 2 - sigma_to ** 2) / sigma_from ** 2))
  sigma_down = jnp.sqrt(sigma_to ** 2 - sigma_up ** 2)
  return sigma_down, sigma_up


def step_noise(keys: jax.Array, step: jax.Array, like: jax.Array) -> jax.Array:
  """Unit Gaussian noise for one step: image b's from ``fold_in(keys[b], step)``."""
  draw = lambda k: jax.random.normal(jax.random.fold_in(k, step), like.shape[1:], like.dtype)
  return jax.vmap(draw)(keys)


def _levels(levels: NoiseLevels):
  return (jnp.arange(levels.num_steps), jnp.asarray(levels.sigmas[:-1]),
          jnp.asarray(levels.sigmas_next), jnp.asarray(levels.sigmas[1:]),
          jnp.asarray(levels.timesteps))


def euler(denoiser: Denoiser, x: jax.Array, levels: NoiseLevels, keys=None) -> jax.Array:
  """Euler's method on the probability-flow ODE (Karras et al. 2022, Alg. 2 with
  no churn); diffusers' ``EulerDiscreteScheduler``."""
  def step(x, s):
    _, sigma, sigma_next, _, t = s
    d = to_d(x, sigma, denoiser(x, sigma, t))
    return x + d * (sigma_next - sigma), None
  return jax.lax.scan(step, x, _levels(levels))[0]


def euler_ancestral(denoiser: Denoiser, x: jax.Array, levels: NoiseLevels, keys: jax.Array,
                    s_noise: float = 1.0) -> jax.Array:
  """Ancestral Euler (k-diffusion ``sample_euler_ancestral``; InstructPix2Pix's
  sampler): an Euler step to ``sigma_down``, then fresh noise ``sigma_up``.
  ``s_noise`` scales the fresh noise (0 gives a deterministic variant)."""
  def step(x, s):
    i, sigma, sigma_next, _, t = s
    denoised = denoiser(x, sigma, t)
    sigma_down, sigma_up = ancestral_step(sigma, sigma_next)
    x = x + to_d(x, sigma, denoised) * (sigma_down - sigma)
    return x + step_noise(keys, i, x) * (s_noise * sigma_up), None
  return jax.lax.scan(step, x, _levels(levels))[0]


def ddim(denoiser: Denoiser, x: jax.Array, levels: NoiseLevels, keys: jax.Array | None = None,
         eta: float = 0.0, clip_sample: float | None = None) -> jax.Array:
  """DDIM (Song et al. 2021, eq. 12) in VE form: ``x_next = x0 + sqrt(s'^2 - s_up^2) eps
  + s_up z`` with ``s_up = eta * std_t / sqrt(alphabar_next)``. ``clip_sample`` clips
  the predicted x0 (not the epsilon), as diffusers' ``DDIMScheduler`` does."""
  def step(x, s):
    i, sigma, sigma_next, sigma_following, t = s
    denoised = denoiser(x, sigma, t)
    eps = to_d(x, sigma, denoised)
    if clip_sample is not None:
      denoised = jnp.clip(denoised, -clip_sample, clip_sample)
    a_t, a_next = 1 / (1 + sigma ** 2), 1 / (1 + sigma_next ** 2)
    std = eta * jnp.sqrt((1 - a_next) / (1 - a_t) * (1 - a_t / a_next))
    sigma_up = std / jnp.sqrt(a_next)
    x = denoised + jnp.sqrt(jnp.maximum(sigma_next ** 2 - sigma_up ** 2, 0.0)) * eps
    if keys is not None and eta > 0:
      x = x + sigma_up * step_noise(keys, i, x)
    # diffusers keeps the VP latent x / sqrt(1 + s'^2) and treats it as the latent at the
    # next step's level s'' (they differ for "linspace"/"trailing"): the VE state there
    # is that VP latent times sqrt(1 + s''^2).
    return x * jnp.sqrt((1 + sigma_following ** 2) / (1 + sigma_next ** 2)), None
  return jax.lax.scan(step, x, _levels(levels))[0]


def dpmpp_2m(denoiser: Denoiser, x: jax.Array, levels: NoiseLevels, keys=None) -> jax.Array:
  """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2), multistep second order in
  log-sigma; first order at the first step and, per ``levels.final_first_order``,
  at the last (diffusers' ``lower_order_final``/``final_sigmas_type="zero"``)."""
  last = levels.num_steps - 1
  lam = lambda s: -jnp.log(s)

  def step(carry, s):
    x, old_denoised, old_sigma = carry
    i, sigma, sigma_next, _, t = s
    denoised = denoiser(x, sigma, t)
    # exp(-h) with h = lambda_next - lambda = log(sigma / sigma_next); 0 when sigma_next = 0.
    ratio = sigma_next / sigma
    first = jnp.logical_or(i == 0, jnp.logical_and(i == last, levels.final_first_order))
    h = lam(sigma_next) - lam(sigma)
    h_last = lam(sigma) - lam(old_sigma)
    r = h_last / h
    second = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
    d = jnp.where(first, denoised, second)
    x = ratio * x + (1 - ratio) * d
    return (x, denoised, sigma), None

  init = (x, jnp.zeros_like(x), jnp.asarray(levels.sigmas[0]))
  return jax.lax.scan(step, init, _levels(levels))[0][0]


SAMPLER_FNS = {
    "euler_ancestral": euler_ancestral,
    "euler": euler,
    "ddim": ddim,
    "dpmpp_2m": dpmpp_2m,
}
