"""Every sampler against its diffusers scheduler, step loop for step loop, on an analytic
"network" (no UNet), so the whole grid is cheap: every timestep spacing ("leading" with
steps_offset 1, "linspace", "trailing") x step counts 1, 7 (1000 / 7 is no integer) and
20 x epsilon / v-prediction, plus Karras sigmas where diffusers has them and the
class-specific options (clip_sample, DDPM's variance, UniPC's order and corrector, PNDM's
Runge-Kutta warm-up).
Stochastic samplers run with their fresh noise set to zero on both sides. Max abs
difference of the final latents (values of order 1) <= 2e-3.
"""
import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from ip2p_jax.diffusion import samplers, schedules
from ip2p_jax.diffusion.guidance import to_denoised

TOL = 2e-3
SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
SPACINGS = [dict(timestep_spacing="leading", steps_offset=1), dict(timestep_spacing="linspace"),
            dict(timestep_spacing="trailing")]
NOISY = ("euler_ancestral", "ddpm", "dpmpp_2m_sde")
EXTRA = {"dpmpp_2m": dict(algorithm_type="dpmsolver++"),
         "dpmpp_2m_sde": dict(algorithm_type="sde-dpmsolver++"), "pndm": dict(skip_prk_steps=True),
         "ddpm": dict(clip_sample=False)}


def torch_net(z, t):
  return 0.5 * z * torch.cos(t / 300) + 0.3 * torch.sin(z + t / 500)


def jax_net(z, t):
  return 0.5 * z * jnp.cos(t / 300) + 0.3 * jnp.sin(z + t / 500)


@pytest.fixture
def no_noise(monkeypatch):
  import diffusers.schedulers.scheduling_ddpm as ddpm
  import diffusers.schedulers.scheduling_dpmsolver_multistep as dpm
  import diffusers.schedulers.scheduling_euler_ancestral_discrete as ea
  zeros = lambda shape, **kw: torch.zeros(shape, dtype=kw.get("dtype") or torch.float32)
  for module in (ddpm, dpm, ea):
    monkeypatch.setattr(module, "randn_tensor", zeros)
  monkeypatch.setattr(samplers, "step_noise", lambda keys, step, like: jnp.zeros_like(like))


def diffusers_run(name, raw, steps, noise):
  cls = getattr(diffusers, schedules.SCHEDULER_CLASSES[name])
  sched = cls(**raw)
  sched.set_timesteps(steps)
  z = torch.from_numpy(noise) * sched.init_noise_sigma
  for t in sched.timesteps:
    out = torch_net(sched.scale_model_input(z, t), t.float())
    z = sched.step(out, t, z).prev_sample
  return z.numpy()


def ours_run(name, raw, steps, noise):
  raw = {**raw, "_class_name": schedules.SCHEDULER_CLASSES[name]}
  config = schedules.ScheduleConfig.from_dict(raw, name)
  levels = schedules.noise_levels(config, name, steps)

  def denoiser(x, sigma, t):
    return to_denoised(jax_net(x / jnp.sqrt(1 + sigma ** 2), t), x, sigma, config.prediction_type)
  keys = jax.random.split(jax.random.key(0), len(noise))
  out = samplers.for_config(name, config)(denoiser, jnp.asarray(noise) * levels.init_noise_sigma,
                                          levels, keys)
  return np.asarray(out) * levels.final_scale


def _cases():
  for name in schedules.SAMPLERS:
    for spacing in SPACINGS:
      for steps in (1, 7, 20):
        for prediction in ("epsilon", "v_prediction"):
          yield name, {**SD, **spacing, **EXTRA.get(name, {}), "prediction_type": prediction}, steps
    if name in schedules.KARRAS_SAMPLERS:
      for steps in (7, 20):
        yield name, {**SD, **EXTRA.get(name, {}), "use_karras_sigmas": True}, steps
  yield "heun", {**SD, "clip_sample": True, "clip_sample_range": 0.5}, 7
  yield "ddpm", {**SD, "clip_sample": True, "clip_sample_range": 0.5}, 7
  yield "ddpm", {**SD, "variance_type": "fixed_large", "clip_sample": False}, 7
  yield "ddpm", {"beta_schedule": "linear", "timestep_spacing": "linspace", "clip_sample": False}, 20
  yield "pndm", {"beta_schedule": "linear", **SPACINGS[1], **EXTRA["pndm"]}, 20
  yield "pndm", {**SD, **SPACINGS[0], **EXTRA["pndm"], "set_alpha_to_one": True}, 7
  yield "pndm", {**SD, **SPACINGS[0], **EXTRA["pndm"]}, 2
  # PNDM with its Runge-Kutta warm-up (the class's default, skip_prk_steps false)
  for spacing in SPACINGS:
    for steps in (4, 7, 20):
      for prediction in ("epsilon", "v_prediction"):
        yield "pndm", {**SD, **spacing, "skip_prk_steps": False, "prediction_type": prediction}, steps
  yield "pndm", {"beta_schedule": "linear", "skip_prk_steps": False, "set_alpha_to_one": True}, 5
  yield "unipc", {**SD, "solver_order": 3}, 20  # (diffusers gives NaN with order 1)
  # bh1 and lower_order_final=False are finite in diffusers only short of sigma = 0
  yield "unipc", {**SD, "solver_type": "bh1", "final_sigmas_type": "sigma_min"}, 20
  yield "unipc", {**SD, "disable_corrector": [0, 3]}, 7
  yield "unipc", {**SD, "final_sigmas_type": "sigma_min"}, 7
  yield "unipc", {**SD, "lower_order_final": False, "final_sigmas_type": "sigma_min"}, 7
  yield "lms", {"beta_schedule": "linear", "timestep_spacing": "trailing"}, 20
  yield "dpmpp_2m_sde", {**SD, **EXTRA["dpmpp_2m_sde"], "final_sigmas_type": "sigma_min"}, 20


@pytest.mark.parametrize("name,raw,steps", list(_cases()))
def test_sampler_matches_diffusers(name, raw, steps, no_noise):
  noise = np.random.default_rng(steps).standard_normal((2, 3, 4, 2)).astype(np.float32)
  want = diffusers_run(name, raw, steps, noise)
  got = ours_run(name, raw, steps, noise)
  assert np.isfinite(want).all()
  err = np.abs(got - want).max()
  assert err <= TOL, f"max abs {err:.2e} (diffusers' latents up to {np.abs(want).max():.2f})"


def test_pndm_warm_up_needs_four_steps():
  config = schedules.ScheduleConfig.from_dict(
      {**SD, "_class_name": "PNDMScheduler", "skip_prk_steps": False}, "pndm")
  with pytest.raises(ValueError, match="num_inference_steps must be >= 4 for PNDM.*"
                                       "skip_prk_steps true"):
    schedules.noise_levels(config, "pndm", 3)
  assert len(schedules.noise_levels(config, "pndm", 4).plms_timesteps) == 13  # 12 RK + 1
