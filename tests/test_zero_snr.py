"""Zero terminal SNR (Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps
are Flawed"): ``rescale_betas_zero_snr: true`` in a scheduler config. Oracles: diffusers'
``rescale_zero_terminal_snr`` for the betas, and each diffusers scheduler that has the
option, step loop for step loop on the analytic network of test_scheduler_parity (v
targets, every spacing, 1/7/20 steps). Max abs difference <= 2e-3 on latents of order 1.
"""
import numpy as np
import pytest
import torch
from diffusers.schedulers.scheduling_euler_discrete import rescale_zero_terminal_snr

from ip2p_jax.diffusion import schedules
from test_scheduler_parity import EXTRA, SD, SPACINGS, TOL, diffusers_run, no_noise, ours_run

ZERO_SNR = dict(SD, prediction_type="v_prediction", rescale_betas_zero_snr=True)


def test_betas_match_diffusers_and_end_in_pure_noise():
  config = schedules.ScheduleConfig.from_dict(ZERO_SNR, "euler")
  base = schedules.ScheduleConfig.from_dict(SD, "euler")
  ref = rescale_zero_terminal_snr(torch.from_numpy(schedules.betas(base))).numpy()
  ac = schedules.alphas_cumprod(config)
  # float32 cumulative products in another order: alphabar to 1e-6, betas (ratios of
  # nearly equal alphabars) to 1e-3 relative
  np.testing.assert_allclose(ac, np.cumprod(1 - ref.astype(np.float64)), atol=1e-6)
  np.testing.assert_allclose(schedules.betas(config), ref, rtol=1e-3)
  assert ac[-1] == 0.0  # x_T carries no signal of x_0 in training
  assert ac[0] == pytest.approx(schedules.alphas_cumprod(base)[0], rel=1e-6)
  # the samplers start from a finite sigma_T, as diffusers' (alphabar_T = 2^-24)
  assert schedules.train_sigmas(config)[-1] == pytest.approx(4096.0, rel=1e-4)


@pytest.mark.parametrize("steps", [1, 7, 20])
@pytest.mark.parametrize("spacing", SPACINGS, ids=lambda s: s["timestep_spacing"])
@pytest.mark.parametrize("name", schedules.ZERO_SNR_SAMPLERS)
def test_zero_snr_samplers_match_diffusers(name, spacing, steps, no_noise):
  raw = {**ZERO_SNR, **spacing, **EXTRA.get(name, {})}
  noise = np.random.default_rng(steps).standard_normal((2, 4, 4, 3)).astype(np.float32)
  ref = diffusers_run(name, raw, steps, noise)
  ours = ours_run(name, raw, steps, noise)
  assert np.isfinite(ours).all()
  np.testing.assert_allclose(ours, ref, atol=TOL, rtol=0)


@pytest.mark.parametrize("name", sorted(set(schedules.SAMPLERS) - set(schedules.ZERO_SNR_SAMPLERS)))
def test_classes_without_the_option_ignore_it_as_diffusers_does(name, no_noise):
  raw = {**ZERO_SNR, **EXTRA.get(name, {})}
  noise = np.random.default_rng(0).standard_normal((2, 4, 4, 3)).astype(np.float32)
  without = {k: v for k, v in raw.items() if k != "rescale_betas_zero_snr"}  # from_config drops it
  np.testing.assert_allclose(ours_run(name, raw, 7, noise), diffusers_run(name, without, 7, noise),
                             atol=TOL, rtol=0)
