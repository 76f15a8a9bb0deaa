"""XLA flags of the test processes (the suite's own and every subprocess it starts).

The tests compile far more than they run: hundreds of small programs, each executed a few
times. ``--xla_backend_optimization_level=0`` skips LLVM's optimisation passes over the
generated CPU code, which halves compile time (a 3-step tiny training process: 52 -> 26
s of compiles, 71 -> 46 s wall; the whole suite 59 -> 38 min on a 2-core box). Matrix
products and convolutions still run in Eigen; the generated code rounds differently in
the last bits at most (of the whole suite, one bound of 1e-6 met 1.2e-6 on an output of
order 1 and became 2e-6). ``benchmarks/`` runs without it; the tests that run those
scripts at a tiny size inherit it (they check that the scripts run, not how fast).
"""
from __future__ import annotations

import os

TEST_FLAGS = ("--xla_backend_optimization_level=0",)


def xla_flags(devices: int | None = None) -> str:
  """``XLA_FLAGS`` for a test process: the inherited ``$XLA_FLAGS``, the test flags, and
  ``devices`` forced host devices (replacing an inherited count)."""
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if not (
      devices is not None and f.startswith("--xla_force_host_platform_device_count"))]
  flags += [f for f in TEST_FLAGS if f not in flags]
  if devices is not None:
    flags.append(f"--xla_force_host_platform_device_count={devices}")
  return " ".join(flags)


def without_shared_cache(env: dict[str, str]) -> dict[str, str]:
  """``env`` without the suite's shared persistent compilation cache (``conftest.py``), for
  processes joined by ``jax.distributed`` (there, runs that loaded an earlier run's programs
  once differed from fresh ones in the last bits, on a crowded machine:
  ``tests/test_pod_scale.py``) and for tests of ip2p's own cache folder
  (``$IP2P_COMPILATION_CACHE``), which JAX's setting would override."""
  return {k: v for k, v in env.items() if k != "JAX_COMPILATION_CACHE_DIR"}
