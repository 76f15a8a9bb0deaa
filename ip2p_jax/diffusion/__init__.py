"""Iterative refinement: noise schedules, samplers (lax.scan loops) and guidance."""
from ip2p_jax import _lazy

__all__ = ["DEFAULT_STEPS", "SAMPLERS", "SAMPLER_FNS", "NoiseLevels", "ScheduleConfig",
           "guidance", "noise_levels", "samplers", "schedules"]
_SOURCE = {"guidance": "", "samplers": "", "schedules": "", "SAMPLER_FNS": "samplers"}
__getattr__, __dir__ = _lazy.exports(__name__, {name: _SOURCE.get(name, "schedules")
                                                for name in __all__})
