"""Helpers shared by subcommands: the default model, the compilation cache, errors."""
from __future__ import annotations

import os
import sys

DEFAULT_MODEL = os.path.join(os.path.dirname(os.path.dirname(__file__)), "assets", "default_model")


class CommandError(Exception):
  """A user-facing error: printed without a traceback, exit status 2."""


def resolve_model(model: str | None) -> str:
  """``--model``, else the bundled default model (``$IP2P_DEFAULT_MODEL`` overrides where)."""
  if model:
    return model
  default = os.environ.get("IP2P_DEFAULT_MODEL", DEFAULT_MODEL)
  if os.path.isfile(os.path.join(default, "model_index.json")):
    return default
  raise CommandError(
      "no default model is bundled with this installation yet. Pass --model with a "
      "diffusers-format InstructPix2Pix folder, e.g. a local copy of timbrooks/instruct-pix2pix "
      "(`huggingface-cli download timbrooks/instruct-pix2pix --local-dir ip2p-model`, then "
      "`--model ip2p-model`).")


def enable_compilation_cache(path: str | None = None) -> str:
  """JAX's persistent compilation cache, so a second run does not recompile."""
  import jax
  path = path or os.environ.get("IP2P_COMPILATION_CACHE") or os.path.join(
      os.path.expanduser("~"), ".cache", "ip2p_jax", "xla")
  os.makedirs(path, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  return path


def fail(message: str, status: int = 2) -> int:
  print(f"ip2p: error: {message}", file=sys.stderr)
  return status
