"""Noise schedules and timesteps against diffusers' schedulers, across beta schedules,
timestep spacings, step counts and Karras sigmas."""
import itertools

import diffusers
import numpy as np
import pytest

from ip2p_jax.diffusion.schedules import (ScheduleConfig, alphas_cumprod, noise_levels,
                                          sampler_of_scheduler_config)
from ip2p_jax.models import ConfigError

CLASSES = {"euler": diffusers.EulerDiscreteScheduler,
           "euler_ancestral": diffusers.EulerAncestralDiscreteScheduler,
           "ddim": diffusers.DDIMScheduler, "dpmpp_2m": diffusers.DPMSolverMultistepScheduler}
BASE = [
    dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    dict(beta_schedule="linear"),
    dict(beta_schedule="squaredcos_cap_v2"),
]
SPACINGS = [dict(timestep_spacing="leading", steps_offset=1), dict(timestep_spacing="linspace"),
            dict(timestep_spacing="trailing")]


def _cases():
  for sampler, base, spacing, steps in itertools.product(CLASSES, BASE, SPACINGS, (1, 7, 10, 50)):
    yield sampler, {**base, **spacing}, steps
  for sampler in ("euler", "dpmpp_2m"):
    for steps in (5, 20):
      yield sampler, {**BASE[0], "use_karras_sigmas": True}, steps
  yield "ddim", {**BASE[0], "set_alpha_to_one": False, "clip_sample": False}, 10
  yield "dpmpp_2m", {**BASE[0], "final_sigmas_type": "sigma_min"}, 20
  yield "euler", {**BASE[0], "final_sigmas_type": "sigma_min"}, 20


@pytest.mark.parametrize("sampler,raw,steps", list(_cases()))
def test_levels_match_diffusers(sampler, raw, steps):
  ref = CLASSES[sampler](**raw)
  ref.set_timesteps(steps)
  levels = noise_levels(ScheduleConfig.from_dict(raw, sampler), sampler, steps)
  np.testing.assert_allclose(levels.timesteps, ref.timesteps.numpy().astype(np.float64),
                             rtol=0, atol=1e-3)
  if sampler == "ddim":
    ac = ref.alphas_cumprod.numpy().astype(np.float64)
    t = ref.timesteps.numpy()
    prev = t - ref.config.num_train_timesteps // steps
    a_next = np.where(prev >= 0, ac[np.clip(prev, 0, None)], float(ref.final_alpha_cumprod))
    np.testing.assert_allclose(levels.sigmas[:-1], np.sqrt((1 - ac[t]) / ac[t]), rtol=5e-5)
    np.testing.assert_allclose(levels.sigmas_next, np.sqrt((1 - a_next) / a_next), rtol=5e-5,
                               atol=1e-7)
    return
  # float32 cumprod in numpy vs torch: agreement to a few float32 ulps of the product.
  np.testing.assert_allclose(levels.sigmas, ref.sigmas.numpy(), rtol=5e-5, atol=1e-7)
  init = float(ref.init_noise_sigma)
  if sampler == "dpmpp_2m":  # diffusers starts in the VP latent; our VE state is it / alpha
    init *= np.sqrt(1 + float(ref.sigmas[0]) ** 2)
    np.testing.assert_allclose(levels.final_scale, 1 / np.sqrt(1 + float(ref.sigmas[-1]) ** 2))
  np.testing.assert_allclose(levels.init_noise_sigma, init, rtol=5e-5)


def test_alphas_cumprod_match():
  for base in BASE:
    ref = diffusers.DDPMScheduler(**base).alphas_cumprod.numpy()
    np.testing.assert_allclose(alphas_cumprod(ScheduleConfig.from_dict(base, "euler")), ref,
                               rtol=2e-5)


def test_from_config_semantics_follow_the_sampler_class():
  """A folder written for Euler ancestral, sampled with DDIM, gets DDIM's own defaults
  for keys it does not set (as ``DDIMScheduler.from_config`` would)."""
  raw = {"_class_name": "EulerAncestralDiscreteScheduler", **BASE[0]}
  assert sampler_of_scheduler_config(raw) == "euler_ancestral"
  ddim = ScheduleConfig.from_dict(raw, "ddim")
  assert ddim.clip_sample and ddim.set_alpha_to_one and ddim.timestep_spacing == "leading"
  assert ScheduleConfig.from_dict(raw, "dpmpp_2m").timestep_spacing == "linspace"


def test_bad_scheduler_options_are_named():
  with pytest.raises(ConfigError, match="'thresholding'"):  # (zero SNR is supported now)
    ScheduleConfig.from_dict({"thresholding": True}, "euler")
  with pytest.raises(ConfigError, match="'beta_schedule' = 'sigmoid'"):
    ScheduleConfig.from_dict({"beta_schedule": "sigmoid"}, "euler")
  with pytest.raises(ValueError, match="unknown sampler 'dpm_fast'"):
    ScheduleConfig.from_dict({}, "dpm_fast")
  with pytest.raises(ValueError, match="num_inference_steps must be >= 1"):
    noise_levels(ScheduleConfig(), "euler", 0)


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_a_config_without_clip_sample_clips_like_diffusers_and_warns(sampler):
  """Another class's config switched to DDIM/DDPM takes diffusers' class default
  ``clip_sample=True`` (as ``DDIMScheduler.from_config`` does), which clips a latent
  model's predictions to [-1, 1]: we follow diffusers and say so in a warning. With
  ``clip_sample: false`` in the config, nothing is clipped and nothing is said."""
  cls = {"ddim": diffusers.DDIMScheduler, "ddpm": diffusers.DDPMScheduler}[sampler]
  raw = {"_class_name": "EulerAncestralDiscreteScheduler", **BASE[0]}
  with pytest.warns(UserWarning, match="clip_sample"):
    ours = ScheduleConfig.from_dict(raw, sampler)
  assert ours.clip_sample == cls.from_config(raw).config.clip_sample is True
  import warnings
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    ours = ScheduleConfig.from_dict({**raw, "clip_sample": False}, sampler)
  assert ours.clip_sample == cls.from_config({**raw, "clip_sample": False}).config.clip_sample
  assert ours.clip_sample is False


def test_shipped_scheduler_configs_do_not_clip_latents():
  """The configs our training writes (``configs.common.IP2P_SCHEDULER``, every stage's
  scheduler) and both bundled models' say ``clip_sample: false``, so a user who picks
  DDIM or DDPM gets no clipping of latents."""
  import json
  import os

  from configs.common import IP2P_SCHEDULER
  from configs.default_model import SCHEDULER
  from ip2p_jax import bundled
  folders = [bundled.DEFAULT_MODEL, bundled.DEFAULT_T2I]
  raws = [IP2P_SCHEDULER, SCHEDULER] + [
      json.load(open(os.path.join(f, "scheduler", "scheduler_config.json"))) for f in folders]
  for raw in raws:
    for sampler in ("ddim", "ddpm"):
      assert ScheduleConfig.from_dict(raw, sampler).clip_sample is False, raw
