"""Samplers against closed-form answers and the statistics of their injected noise.

For data x0 ~ N(0, s^2) the exact denoiser is D(x, sigma) = x s^2 / (s^2 + sigma^2) and
the probability-flow ODE maps x(sigma_T) to x(0) = x(sigma_T) s / sqrt(s^2 + sigma_T^2).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ip2p_jax.diffusion import samplers
from ip2p_jax.diffusion.schedules import NoiseLevels, ScheduleConfig, noise_levels

CONFIG = ScheduleConfig.from_dict(dict(beta_schedule="scaled_linear", beta_start=0.00085,
                                       beta_end=0.012), "euler")


def levels_for(sampler, steps):
  """SD's schedule; x0 unclipped and (PNDM) the last step landing on sigma = 0."""
  return noise_levels(ScheduleConfig.from_dict(
      dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
           clip_sample=False, set_alpha_to_one=True), sampler), sampler, steps)


def gaussian_denoiser(s):
  return lambda x, sigma, t: x * s ** 2 / (s ** 2 + sigma ** 2)


def geometric_levels(steps, sigma_max=10.0, sigma_min=0.05):
  """Log-uniform noise levels that stop at sigma_min (no final jump to 0), so the
  solver's own order shows."""
  sigmas = np.geomspace(sigma_max, sigma_min, steps + 1).astype(np.float32)
  return NoiseLevels(sigmas, np.linspace(999, 0, steps).astype(np.float32), sigmas[1:], 1.0, 1.0,
                     final_first_order=False)


def ode_error(sampler, steps, s=0.7):
  lv = geometric_levels(steps)
  x_t = jax.random.normal(jax.random.key(0), (4, 8, 8, 2)) * lv.sigmas[0]
  out = samplers.SAMPLER_FNS[sampler](gaussian_denoiser(s), x_t, lv, None)
  exact = x_t * np.sqrt(s ** 2 + lv.sigmas[-1] ** 2) / np.sqrt(s ** 2 + lv.sigmas[0] ** 2)
  return float(jnp.max(jnp.abs(out - exact)) / jnp.max(jnp.abs(exact)))


# Observed at 40 steps: Euler and DDIM (the same update in VE form) 0.032, DPM++(2M) 0.001,
# Heun 0.0022 (its last step is Euler, as diffusers'), LMS 0.00046, UniPC 0.00013.
@pytest.mark.parametrize("sampler,tol", [("euler", 0.04), ("ddim", 0.04), ("dpmpp_2m", 0.002),
                                         ("heun", 0.003), ("lms", 0.001), ("unipc", 0.0003)])
def test_deterministic_samplers_solve_the_gaussian_ode(sampler, tol):
  assert ode_error(sampler, 40) < tol


def test_convergence_orders():
  """Halving the step size cuts DPM-Solver++(2M)'s and Heun's error ~4x (second order),
  Euler's and DDIM's ~2x, UniPC-2's (predictor + corrector: third order) ~8x, LMS's
  (fourth order after its warm-up) more. Observed 20 -> 40 steps: Euler 1.97, Heun 4.13,
  DPM++(2M) 3.87, UniPC 8.9, LMS 10.0."""
  names = ("euler", "ddim", "dpmpp_2m", "heun", "unipc", "lms")
  ratio = {k: ode_error(k, 20) / ode_error(k, 40) for k in names}
  assert 1.7 < ratio["euler"] < 2.3 and 1.7 < ratio["ddim"] < 2.3
  assert 3.4 < ratio["dpmpp_2m"] < 4.6 and 3.4 < ratio["heun"] < 4.6
  assert 7.0 < ratio["unipc"] < 11.0
  assert ratio["lms"] > 7.0


def _keys(n, seed=0):
  return jax.vmap(lambda i: jax.random.fold_in(jax.random.key(seed), i))(jnp.arange(n))


@pytest.mark.parametrize("sampler", ["euler_ancestral", "ddpm", "dpmpp_2m_sde"])
def test_stochastic_samplers_keep_the_marginal_noise_level(sampler):
  """With a zero denoiser (data = 0), each step maps N(0, sigma^2) to N(0, sigma_next^2)
  exactly: Euler ancestral's shrink to sigma_down plus sigma_up of noise; DDPM's posterior
  mean plus beta~ of noise (c_z^2 (1 - a_t) + beta~ = 1 - a_prev); the SDE solver's
  r^2 x plus sigma' sqrt(1 - r^2) of noise. 256 x 16 x 16 x 4 draws: std within 1%."""
  full = levels_for(sampler, 10)
  lv = NoiseLevels(full.sigmas[:6], full.timesteps[:5], full.sigmas[1:6], 1.0, 1.0)
  x = jax.random.normal(jax.random.key(1), (256, 16, 16, 4)) * full.sigmas[0]
  out = samplers.SAMPLER_FNS[sampler](lambda x, s, t: jnp.zeros_like(x), x, lv, _keys(256))
  std = float(jnp.std(out))
  assert abs(std / full.sigmas[5] - 1) < 0.01


def test_euler_ancestral_injected_noise_is_standard_normal_and_independent():
  lv = NoiseLevels(np.array([2.0, 1.0], np.float32), np.array([500.0], np.float32),
                   np.array([1.0], np.float32), 1.0, 1.0)
  x = jnp.ones((512, 8, 8, 4))
  out = samplers.euler_ancestral(lambda x, s, t: jnp.zeros_like(x), x, lv, _keys(512))
  down, up = samplers.ancestral_step(2.0, 1.0)
  z = np.asarray((out - x * down / 2.0) / up)
  assert abs(z.mean()) < 0.01 and abs(z.var() - 1) < 0.02
  assert abs(np.mean(np.abs(z) < 1.96) - 0.95) < 0.005  # Gaussian tails, not just moments
  flat = z.reshape(512, -1)
  corr = np.corrcoef(flat[:, :64].T.ravel(), flat[:, 64:128].T.ravel())[0, 1]
  assert abs(corr) < 0.02  # different elements and images: independent draws
  again = samplers.euler_ancestral(lambda x, s, t: jnp.zeros_like(x), x, lv, _keys(512))
  np.testing.assert_array_equal(np.asarray(again), np.asarray(out))  # keyed, reproducible
  other = samplers.euler_ancestral(lambda x, s, t: jnp.zeros_like(x), x, lv, _keys(512, seed=1))
  assert not np.allclose(np.asarray(other), np.asarray(out))


def test_noise_depends_only_on_the_image_key_and_step():
  keys = _keys(4)
  like = jnp.zeros((4, 3, 3, 2))
  batch = samplers.step_noise(keys, 7, like)
  alone = samplers.step_noise(keys[2:3], 7, like[:1])
  np.testing.assert_array_equal(np.asarray(batch[2]), np.asarray(alone[0]))
  assert not np.allclose(np.asarray(samplers.step_noise(keys, 8, like)), np.asarray(batch))


@pytest.mark.parametrize("sampler", samplers.SAMPLER_FNS)
def test_exact_denoiser_of_a_point_lands_on_it(sampler):
  """If the data is a single point c, every sampler must end exactly at c."""
  c = jnp.linspace(-1, 1, 32).reshape(1, 4, 4, 2)
  lv = levels_for(sampler, 8)
  x = jax.random.normal(jax.random.key(2), (2, 4, 4, 2)) * lv.init_noise_sigma
  out = samplers.SAMPLER_FNS[sampler](lambda x, s, t: jnp.broadcast_to(c, x.shape), x, lv,
                                      _keys(2)) * lv.final_scale
  np.testing.assert_allclose(np.asarray(out), np.broadcast_to(np.asarray(c), out.shape), atol=1e-4)
