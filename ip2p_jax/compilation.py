"""JAX's persistent compilation cache, on for the CLI and for library users alike.

The cache lives in ``~/.cache/ip2p_jax/xla`` (``$IP2P_COMPILATION_CACHE`` elsewhere;
``IP2P_COMPILATION_CACHE=off`` turns it off), so a second run, or a second notebook
kernel, loads the compiled sampler instead of compiling it again; single-process training
(``train_and_evaluate``) loads its step the same way on a rerun or resume. A cache
directory the user configured in JAX already is kept.
"""
from __future__ import annotations

import os

OFF = ("0", "off", "false", "no", "")


def cache_dir() -> str | None:
  """Where the cache goes, or None if ``$IP2P_COMPILATION_CACHE`` turns it off."""
  env = os.environ.get("IP2P_COMPILATION_CACHE")
  if env is not None and env.strip().lower() in OFF:
    return None
  return env or os.path.join(os.path.expanduser("~"), ".cache", "ip2p_jax", "xla")


def enable_compilation_cache(path: str | None = None) -> str | None:
  """Turns the persistent compilation cache on (at ``path`` or :func:`cache_dir`) and
  returns its folder; None if turned off by the environment. Keeps a folder already set
  with ``jax.config.update("jax_compilation_cache_dir", ...)``."""
  import jax
  current = jax.config.jax_compilation_cache_dir
  if current and path is None:
    return current
  path = path or cache_dir()
  if path is None:
    return None
  os.makedirs(path, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  return path
