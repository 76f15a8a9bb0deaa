"""Iterative refinement: noise schedules, samplers (lax.scan loops) and guidance."""
from ip2p_jax.diffusion import guidance, samplers, schedules
from ip2p_jax.diffusion.samplers import SAMPLER_FNS
from ip2p_jax.diffusion.schedules import SAMPLERS, NoiseLevels, ScheduleConfig, noise_levels

__all__ = ["SAMPLERS", "SAMPLER_FNS", "NoiseLevels", "ScheduleConfig", "guidance",
           "noise_levels", "samplers", "schedules"]
