"""Noise schedules and the noise levels a sampler visits, read from diffusers'
``scheduler_config.json``.

All samplers run in the variance-exploding parameterisation of Karras et al.
(2022): ``x = x0 + sigma * eps`` with ``sigma_t = sqrt((1 - alphabar_t) / alphabar_t)``.
The UNet sees ``x / sqrt(1 + sigma^2)`` (the variance-preserving latent) and the
training timestep ``t``. :func:`noise_levels` reproduces each diffusers scheduler's
``set_timesteps`` so that results match diffusers step for step.

Timestep spacing follows Lin et al. 2023 (Table 2): "leading", "trailing", "linspace".
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any, Mapping

import numpy as np

from ip2p_jax.models.configuration import ConfigError, parse_config

# Sampler name -> diffusers scheduler class (README has the table). Two names share
# DPMSolverMultistepScheduler and differ in its algorithm_type.
_CLASS = {
    "euler_ancestral": "EulerAncestralDiscreteScheduler",
    "euler": "EulerDiscreteScheduler",
    "heun": "HeunDiscreteScheduler",
    "lms": "LMSDiscreteScheduler",
    "ddim": "DDIMScheduler",
    "pndm": "PNDMScheduler",
    "ddpm": "DDPMScheduler",
    "dpmpp_2m": "DPMSolverMultistepScheduler",
    "dpmpp_2m_sde": "DPMSolverMultistepScheduler",
    "unipc": "UniPCMultistepScheduler",
}
SAMPLERS = tuple(_CLASS)
DEFAULT_STEPS = 50  # the Python API's and the CLI's (the HF demo's; the original used 100)
SCHEDULER_CLASSES = dict(_CLASS)
# Samplers whose diffusers class has `use_karras_sigmas`.
KARRAS_SAMPLERS = ("euler", "heun", "lms", "dpmpp_2m", "dpmpp_2m_sde", "unipc")
# Samplers whose diffusers class has `rescale_betas_zero_snr` (PNDM, LMS and Heun ignore it).
ZERO_SNR_SAMPLERS = ("euler_ancestral", "euler", "ddim", "ddpm", "dpmpp_2m", "dpmpp_2m_sde",
                     "unipc")
# Samplers that keep the variance-preserving latent between steps (diffusers' DDIM, PNDM,
# DDPM, DPM-Solver and UniPC); the Euler family, LMS and Heun keep the VE sample.
VP_SAMPLERS = ("ddim", "pndm", "ddpm", "dpmpp_2m", "dpmpp_2m_sde", "unipc")

# The class's own defaults: diffusers' `Scheduler.from_config(other_config)` keeps the shared
# keys and takes these for the rest.
_DPM = {"timestep_spacing": "linspace", "use_karras_sigmas": False, "final_sigmas_type": "zero",
        "lower_order_final": True, "euler_at_final": False, "solver_order": 2,
        "solver_type": "midpoint"}
_CLASS_DEFAULTS = {
    "euler_ancestral": {"timestep_spacing": "linspace"},
    "euler": {"timestep_spacing": "linspace", "use_karras_sigmas": False,
              "final_sigmas_type": "zero"},
    "heun": {"timestep_spacing": "linspace", "use_karras_sigmas": False, "clip_sample": False,
             "clip_sample_range": 1.0, "beta_start": 0.00085, "beta_end": 0.012},
    "lms": {"timestep_spacing": "linspace", "use_karras_sigmas": False},
    "ddim": {"timestep_spacing": "leading", "clip_sample": True, "clip_sample_range": 1.0,
             "set_alpha_to_one": True},
    "pndm": {"timestep_spacing": "leading", "set_alpha_to_one": False, "skip_prk_steps": False},
    "ddpm": {"timestep_spacing": "leading", "clip_sample": True, "clip_sample_range": 1.0,
             "variance_type": "fixed_small"},
    "dpmpp_2m": {**_DPM, "algorithm_type": "dpmsolver++"},
    "dpmpp_2m_sde": {**_DPM, "algorithm_type": "sde-dpmsolver++"},
    "unipc": {"timestep_spacing": "linspace", "use_karras_sigmas": False,
              "final_sigmas_type": "zero", "lower_order_final": True, "solver_order": 2,
              "solver_type": "bh2", "predict_x0": True, "disable_corrector": []},
}
# Keys a sampler name fixes whatever the folder says (the two DPM-Solver++ variants).
_FORCED = {"dpmpp_2m": {"algorithm_type": "dpmsolver++"},
           "dpmpp_2m_sde": {"algorithm_type": "sde-dpmsolver++"}}
# Keys that belong to some classes only: they must not leak into another class's config.
_OWN_KEYS = {
    "clip_sample": ("ddim", "heun", "ddpm"), "set_alpha_to_one": ("ddim", "pndm"),
    "skip_prk_steps": ("pndm",), "variance_type": ("ddpm",),
    "algorithm_type": ("dpmpp_2m", "dpmpp_2m_sde"), "solver_order": ("dpmpp_2m", "dpmpp_2m_sde",
                                                                     "unipc"),
    "solver_type": ("dpmpp_2m", "dpmpp_2m_sde", "unipc"), "predict_x0": ("unipc",),
    "disable_corrector": ("unipc",), "use_karras_sigmas": KARRAS_SAMPLERS,
    "final_sigmas_type": ("euler", "dpmpp_2m", "dpmpp_2m_sde", "unipc"),
    "lower_order_final": ("dpmpp_2m", "dpmpp_2m_sde", "unipc"),
    "euler_at_final": ("dpmpp_2m", "dpmpp_2m_sde"),
    "rescale_betas_zero_snr": ZERO_SNR_SAMPLERS,
}


@dataclasses.dataclass(frozen=True)
class ScheduleConfig:
  """The keys of a diffusers scheduler config that define the noise levels and the
  sampler's options."""
  num_train_timesteps: int = 1000
  beta_start: float = 0.0001
  beta_end: float = 0.02
  beta_schedule: str = "linear"  # or "scaled_linear", "squaredcos_cap_v2"
  prediction_type: str = "epsilon"  # or "v_prediction", "sample"
  timestep_spacing: str = "linspace"  # or "leading", "trailing"
  steps_offset: int = 0
  rescale_betas_zero_snr: bool = False  # Lin et al. 2023: alphabar_T = 0 (needs v/x0 targets)
  use_karras_sigmas: bool = False
  final_sigmas_type: str = "zero"  # or "sigma_min"
  set_alpha_to_one: bool = True  # DDIM, PNDM: the last step lands on alphabar = 1
  clip_sample: bool = False  # DDIM, Heun, DDPM: clip the predicted x0
  clip_sample_range: float = 1.0
  lower_order_final: bool = True  # DPM-Solver++, UniPC
  euler_at_final: bool = False  # DPM-Solver++
  algorithm_type: str = "dpmsolver++"  # DPM-Solver: or "sde-dpmsolver++"
  solver_order: int = 2  # DPM-Solver++: 2; UniPC: 2 or 3
  solver_type: str = "midpoint"  # DPM-Solver++: "midpoint"; UniPC: "bh1" or "bh2"
  predict_x0: bool = True  # UniPC
  disable_corrector: tuple[int, ...] = ()  # UniPC: steps whose corrector is skipped
  skip_prk_steps: bool = False  # PNDM: True = PLMS only; False = a Runge-Kutta warm-up first
  variance_type: str = "fixed_small"  # DDPM: or "fixed_small_log", "fixed_large"

  UNSUPPORTED = {
      "trained_betas": None, "thresholding": False,
      "interpolation_type": "linear", "timestep_type": "discrete", "use_exponential_sigmas": False,
      "use_beta_sigmas": False, "use_lu_lambdas": False, "use_flow_sigmas": False,
      "sigma_min": None, "sigma_max": None, "lambda_min_clipped": -math.inf,
      "use_dynamic_shifting": False, "solver_p": None,
  }
  IGNORED = frozenset({
      "dynamic_thresholding_ratio", "sample_max_value", "flow_shift",
      "time_shift_type", "clip_sample_range_max", "shift_terminal", "invert_sigmas",
      "max_image_seq_len", "base_image_seq_len", "base_shift", "max_shift", "shift",
      "beta_sigmas_alpha", "beta_sigmas_beta", "use_beta_sigmas",
  })
  # Per sampler: key -> the values implemented.
  ALLOWED = {
      "dpmpp_2m": {"algorithm_type": ("dpmsolver++",), "solver_order": (2,),
                   "solver_type": ("midpoint",)},
      "dpmpp_2m_sde": {"algorithm_type": ("sde-dpmsolver++",), "solver_order": (2,),
                       "solver_type": ("midpoint",)},
      "unipc": {"solver_order": (2, 3), "solver_type": ("bh1", "bh2"), "predict_x0": (True,)},
      "pndm": {"prediction_type": ("epsilon", "v_prediction")},
      "ddpm": {"variance_type": ("fixed_small", "fixed_small_log", "fixed_large")},
  }

  @classmethod
  def from_dict(cls, raw: Mapping[str, Any], sampler: str) -> "ScheduleConfig":
    """The schedule diffusers' ``SCHEDULER_CLASSES[sampler].from_config(raw)`` would build
    (with ``algorithm_type`` set for the two DPM-Solver++ names, and PLMS for a folder of
    another class run with ``"pndm"``)."""
    if sampler not in SAMPLERS:
      raise ValueError(f"unknown sampler {sampler!r}; choose one of {list(SAMPLERS)}")
    if raw.get("algorithm_type") not in (None, "dpmsolver++", "sde-dpmsolver++"):
      raise ConfigError(f"scheduler: config key 'algorithm_type' = {raw['algorithm_type']!r} is "
                        "not supported; choose one of ['dpmsolver++', 'sde-dpmsolver++']")
    own_class = raw.get("_class_name") == _CLASS[sampler]
    raw = {k: v for k, v in raw.items() if v is not None or k in cls.UNSUPPORTED}
    for key, owners in _OWN_KEYS.items():  # another class's keys must not leak in
      if sampler not in owners:
        raw.pop(key, None)
    if sampler == "pndm" and not own_class:
      raw["skip_prk_steps"] = True  # the name "pndm" means PLMS
    if (sampler in ("ddim", "ddpm") and not own_class and "clip_sample" not in raw
        and _CLASS_DEFAULTS[sampler]["clip_sample"]):
      warnings.warn(
          f"scheduler: the model's config does not set 'clip_sample', so {sampler} takes "
          "diffusers' class default (True) and clips every predicted latent to [-1, 1], "
          "which ruins a latent model's output; add \"clip_sample\": false to its "
          "scheduler_config.json (Stable Diffusion's and InstructPix2Pix's have it)",
          stacklevel=3)
    raw = {**_CLASS_DEFAULTS[sampler], **raw, **_FORCED.get(sampler, {})}
    config = parse_config(cls, raw, component="scheduler", unsupported=cls.UNSUPPORTED,
                          ignored=cls.IGNORED)
    checks = [("beta_schedule", ("linear", "scaled_linear", "squaredcos_cap_v2")),
              ("prediction_type", ("epsilon", "v_prediction", "sample")),
              ("timestep_spacing", ("linspace", "leading", "trailing")),
              ("final_sigmas_type", ("zero", "sigma_min"))]
    checks += list(cls.ALLOWED.get(sampler, {}).items())
    for key, allowed in checks:
      if getattr(config, key) not in allowed:
        raise ConfigError(f"scheduler: config key {key!r} = {getattr(config, key)!r} is not "
                          f"supported by {sampler}; choose one of {list(allowed)}")
    return config


def sampler_of_scheduler_config(raw: Mapping[str, Any]) -> str:
  """The sampler a folder's scheduler_config.json names (Euler ancestral if unknown)."""
  name = raw.get("_class_name", "EulerAncestralDiscreteScheduler")
  if name == "DPMSolverMultistepScheduler":
    return "dpmpp_2m_sde" if raw.get("algorithm_type") == "sde-dpmsolver++" else "dpmpp_2m"
  return {v: k for k, v in _CLASS.items()}.get(name, "euler_ancestral")


def betas(config: ScheduleConfig) -> np.ndarray:
  b = _base_betas(config)
  return _zero_terminal_snr(b) if config.rescale_betas_zero_snr else b


def _zero_terminal_snr(betas_: np.ndarray) -> np.ndarray:
  """Lin et al. 2023, Algorithm 1: shift and scale sqrt(alphabar) so that alphabar_T = 0
  (the last timestep is pure noise, no signal leaks to the sampler's first step) and
  alphabar_0 is unchanged. float32 throughout, in diffusers' order of operations."""
  root = np.sqrt(np.cumprod(1.0 - betas_, dtype=np.float32))
  first, last = root[0].copy(), root[-1].copy()
  root = (root - last) * (first / (first - last))
  bar = root ** 2
  return (1.0 - np.concatenate([bar[:1], bar[1:] / bar[:-1]])).astype(np.float32)


def _base_betas(config: ScheduleConfig) -> np.ndarray:
  n = config.num_train_timesteps
  if config.beta_schedule == "linear":
    return np.linspace(config.beta_start, config.beta_end, n, dtype=np.float32)
  if config.beta_schedule == "scaled_linear":  # latent diffusion's schedule
    return np.linspace(config.beta_start ** 0.5, config.beta_end ** 0.5, n, dtype=np.float32) ** 2
  # Nichol & Dhariwal 2021, cosine alpha-bar, betas capped at 0.999.
  alpha_bar = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
  return np.array([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999) for i in range(n)],
                  dtype=np.float32)


def alphas_cumprod(config: ScheduleConfig) -> np.ndarray:
  """alphabar_t of training; 0 at the last step under zero terminal SNR."""
  return np.cumprod(1.0 - betas(config), dtype=np.float32)


def sampling_alphas_cumprod(config: ScheduleConfig) -> np.ndarray:
  """alphabar_t as the samplers use it: under zero terminal SNR the last one is 2^-24, as
  in diffusers (sigma_T = 4096 instead of infinity)."""
  ac = alphas_cumprod(config)
  if config.rescale_betas_zero_snr:
    ac = ac.copy()
    ac[-1] = 2.0 ** -24
  return ac


def train_sigmas(config: ScheduleConfig) -> np.ndarray:
  """sigma_t for every training timestep t, as the samplers see it (finite at t = T under
  zero terminal SNR; see :func:`sampling_alphas_cumprod`)."""
  ac = sampling_alphas_cumprod(config)
  return ((1 - ac) / ac) ** 0.5


@dataclasses.dataclass(frozen=True)
class NoiseLevels:
  """What a sampler visits: ``sigmas[i] -> sigmas[i + 1]`` at model timestep ``timesteps[i]``.

  ``init_noise_sigma`` scales unit-variance noise into the first state;
  ``final_scale`` turns the last state into the latent diffusers returns (1 for
  the Euler family, which decodes the VE state; 1/sqrt(1+sigma^2) for DDIM and
  DPM-Solver, which work on the VP latent). DDIM steps to
  ``sigmas_next[i]`` (t - T/S), which differs from ``sigmas[i + 1]`` for
  "linspace"/"trailing" spacing; the state is reinterpreted at the new level
  between steps exactly as diffusers does.
  """
  sigmas: np.ndarray       # [S + 1], float32, decreasing
  timesteps: np.ndarray    # [S], what the UNet is given
  sigmas_next: np.ndarray  # [S]
  init_noise_sigma: float
  final_scale: float
  final_first_order: bool = True  # DPM-Solver++: first-order last step
  # PNDM's model calls (PLMS: S + 1; with the Runge-Kutta warm-up: its prk_calls first, then
  # S - 3 PLMS calls): call k evaluates at timestep plms_timesteps[k] and sigma
  # plms_sigmas[k, 0], and steps from level plms_sigmas[k, 1] to plms_sigmas[k, 2].
  plms_timesteps: np.ndarray | None = None
  plms_sigmas: np.ndarray | None = None
  prk_calls: int = 0

  @property
  def num_steps(self) -> int:
    return len(self.timesteps)


def _spaced(config: ScheduleConfig, num_steps: int, *, integer: bool, extra: int = 0) -> np.ndarray:
  """Training timesteps for ``num_steps`` sampling steps, by ``timestep_spacing``.
  ``extra=1`` is DPM-Solver's variant (S + 1 points, the last dropped)."""
  n = config.num_train_timesteps
  points = num_steps + extra
  if config.timestep_spacing == "linspace":
    t = np.linspace(0, n - 1, points)
    t = (t.round() if integer else t.astype(np.float32))[::-1]
  elif config.timestep_spacing == "leading":
    t = (np.arange(0, points) * (n // points)).round()[::-1] + config.steps_offset
  else:  # trailing
    t = np.round(np.arange(n, 0, -n / num_steps)) - 1
  t = t[:num_steps] if extra else t
  return t.astype(np.int64) if integer else t.astype(np.float32)


def _karras(sigma_min: float, sigma_max: float, num_steps: int, rho: float = 7.0) -> np.ndarray:
  """Karras et al. 2022, eq. 5: sigmas evenly spaced in sigma^(1/rho)."""
  ramp = np.linspace(0, 1, num_steps)
  return (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho


def _sigma_to_t(sigma: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
  """The (fractional) training timestep whose sigma is ``sigma``, interpolating log sigma."""
  log_sigma = np.log(np.maximum(sigma, 1e-10))
  dists = log_sigma - log_sigmas[:, None]
  low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=len(log_sigmas) - 2)
  w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1]), 0, 1)
  return (1 - w) * low + w * (low + 1)


def noise_levels(config: ScheduleConfig, sampler: str, num_steps: int) -> NoiseLevels:
  """The noise levels of diffusers' scheduler for ``sampler`` after ``set_timesteps``."""
  if num_steps < 1:
    raise ValueError(f"num_inference_steps must be >= 1, got {num_steps}")
  ac = sampling_alphas_cumprod(config)
  all_sigmas = train_sigmas(config)
  log_sigmas = np.log(all_sigmas)
  sigma_min_last = float(all_sigmas[0])
  if sampler == "ddim":
    t = _spaced(config, num_steps, integer=True)
    prev = t - config.num_train_timesteps // num_steps
    final_ac = 1.0 if config.set_alpha_to_one else float(ac[0])
    ac_next = np.where(prev >= 0, ac[np.clip(prev, 0, None)], final_ac)
    sigmas_next = ((1 - ac_next) / ac_next) ** 0.5
    sigmas = np.concatenate([all_sigmas[t], sigmas_next[-1:]])
    return NoiseLevels(sigmas.astype(np.float32), t.astype(np.float32),
                       sigmas_next.astype(np.float32),
                       init_noise_sigma=float(np.sqrt(1 + sigmas[0].astype(np.float64) ** 2)),
                       final_scale=float(1 / np.sqrt(1 + float(sigmas[-1]) ** 2)))
  if sampler == "pndm":
    return _pndm_levels(config, num_steps, ac, all_sigmas)
  if sampler == "ddpm":  # ancestral steps between consecutive timesteps, the last to t = -1
    t = _spaced(config, num_steps, integer=True)
    sigmas = np.concatenate([all_sigmas[t], [0.0]]).astype(np.float32)
    return NoiseLevels(sigmas, t.astype(np.float32), sigmas[1:],
                       init_noise_sigma=float(np.sqrt(1 + float(sigmas[0]) ** 2)), final_scale=1.0)
  if sampler in ("dpmpp_2m", "dpmpp_2m_sde", "unipc"):
    t = _spaced(config, num_steps, integer=True, extra=1)
    if config.use_karras_sigmas:
      flipped = all_sigmas[::-1]
      sigmas = _karras(float(flipped[-1]), float(flipped[0]), num_steps)
      t = _sigma_to_t(sigmas, log_sigmas)
      t = t.round() if config.beta_schedule != "squaredcos_cap_v2" or sampler == "unipc" else t
      t = t.astype(np.int64)
    else:
      sigmas = np.interp(t, np.arange(len(all_sigmas)), all_sigmas)
    last = sigma_min_last if config.final_sigmas_type == "sigma_min" else 0.0
    sigmas = np.concatenate([sigmas, [last]]).astype(np.float32)
    first_order = (config.final_sigmas_type == "zero" or config.euler_at_final
                   or (config.lower_order_final and num_steps < 15))
    return NoiseLevels(sigmas, t.astype(np.float32), sigmas[1:], init_noise_sigma=float(
        np.sqrt(1 + float(sigmas[0]) ** 2)), final_scale=float(1 / np.sqrt(1 + float(last) ** 2)),
        final_first_order=first_order)
  # Euler, Euler ancestral, Heun, LMS: fractional timesteps, sigmas interpolated in t.
  t = _spaced(config, num_steps, integer=False)
  sigmas = np.interp(t, np.arange(len(all_sigmas)), all_sigmas)
  last = 0.0
  if config.use_karras_sigmas and sampler in KARRAS_SAMPLERS:
    sigmas = _karras(float(sigmas[-1]), float(sigmas[0]), num_steps)
    t = _sigma_to_t(sigmas, log_sigmas)
  if sampler == "euler" and config.final_sigmas_type == "sigma_min":
    last = sigma_min_last
  sigmas = np.concatenate([sigmas, [last]]).astype(np.float32)
  smax = float(sigmas.max())
  init = smax if config.timestep_spacing in ("linspace", "trailing") else (smax ** 2 + 1) ** 0.5
  return NoiseLevels(sigmas, t.astype(np.float32), sigmas[1:], init_noise_sigma=float(init),
                     final_scale=1.0)


def _pndm_levels(config: ScheduleConfig, num_steps: int, ac: np.ndarray,
                 all_sigmas: np.ndarray) -> NoiseLevels:
  """PNDM as diffusers' ``PNDMScheduler`` runs it, on integer timesteps t_0 > ... > t_{S-1}.

  PLMS (``skip_prk_steps``, Stable Diffusion's folders): model calls at t_0, t_1, t_1, t_2,
  ..., t_{S-1}. Call 0 steps from t_0 to t_0 - T/S; call 1 redoes that step from the same
  start with the mean of both predictions, stepping from t_1 + T/S to t_1 (= t_0 -> t_1 for
  "leading" spacing); call k >= 2 steps from t_{k-1} to t_{k-1} - T/S.

  With the Runge-Kutta warm-up (the class's default): first 12 calls, classic RK4 over the
  3 steps from t_0 (4 calls each: at the step's start, twice at its midpoint - T/2S, at its
  end, each stepping from the start), then PLMS calls at t_3, ..., t_{S-1}, each from t_k
  to t_k - T/S. A level below 0 is the final alphabar."""
  t = _spaced(config, num_steps, integer=True)
  ratio = config.num_train_timesteps // num_steps
  final_ac = 1.0 if config.set_alpha_to_one else float(ac[0])
  level = lambda step: (np.sqrt((1 - ac[step]) / ac[step]) if step >= 0
                        else np.sqrt((1 - final_ac) / final_ac))
  prk_calls = 0
  if not config.skip_prk_steps:
    if num_steps < 4:
      raise ValueError(
          f"num_inference_steps must be >= 4 for PNDM with its Runge-Kutta warm-up "
          f"(scheduler_config skip_prk_steps false), got {num_steps}; diffusers fails there "
          "too. Set skip_prk_steps true for PLMS, as Stable Diffusion's folders do")
    ascending = t[::-1]  # diffusers' set_timesteps, verbatim
    prk = np.array(ascending[-4:]).repeat(2) + np.tile(np.array([0, ratio // 2]), 4)
    prk = prk[:-1].repeat(2)[1:-1][::-1]
    calls = [(m, prk[c // 4 * 4], m - (0 if c % 2 else ratio // 2)) for c, m in enumerate(prk)]
    calls += [(s, s, s - ratio) for s in ascending[:-3][::-1]]
    prk_calls = len(prk)
  else:
    calls = [(t[0], t[0], t[0] - ratio)]
    if num_steps > 1:
      calls.append((t[1], t[1] + ratio, t[1]))
      calls += [(t[k - 1], t[k - 1], t[k - 1] - ratio) for k in range(2, num_steps + 1)]
  plms_sigmas = np.array([[level(m), level(f), level(p)] for m, f, p in calls], np.float32)
  sigmas_next = np.array([level(s - ratio) for s in t], np.float32)
  sigmas = np.concatenate([all_sigmas[t], plms_sigmas[-1:, 2]]).astype(np.float32)
  return NoiseLevels(sigmas, t.astype(np.float32), sigmas_next,
                     init_noise_sigma=float(np.sqrt(1 + float(sigmas[0]) ** 2)),
                     final_scale=float(1 / np.sqrt(1 + float(sigmas[-1]) ** 2)),
                     plms_timesteps=np.array([m for m, _, _ in calls], np.float32),
                     plms_sigmas=plms_sigmas, prk_calls=prk_calls)
