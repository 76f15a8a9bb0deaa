"""FlashAttention on the CPU as a C++ kernel behind XLA's FFI (``cpu_attention.cc``).

XLA:CPU runs the blocked attention of :func:`ip2p_jax.models.layers.flash_attention` with
each tile's scores going through memory between its fused products, and its tile loops on
one thread (BENCHMARKS.md, "Attention"). This kernel keeps a block of scores in cache from
``Q K^T`` to ``P V``, uses register-blocked products, and splits heads and query blocks
over XLA's intra-op thread pool; its backward recomputes the probabilities from the saved
log-sum-exp (Dao et al. 2022, Algorithm 2).

The C++ source is compiled for this machine (``-march=native``) on first use and cached in
``~/.cache/ip2p_jax/kernels`` (``$IP2P_KERNELS`` elsewhere; ``IP2P_KERNELS=off`` never
builds or uses it), under a name that hashes the source, jaxlib's version, the compiler
flags and the CPU's features, so an upgrade or another machine builds its own. Where no
C++ compiler is found or the build fails, :func:`load` logs why once and returns False and
``layers.dot_product_attention`` keeps XLA's blocked kernel.
"""
from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading

import jax
import jax.numpy as jnp
import numpy as np

from ip2p_jax.compilation import OFF

log = logging.getLogger(__name__)

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cpu_attention.cc")
FLAGS = ("-O3", "-march=native", "-std=c++17", "-fPIC", "-shared")
FORWARD, BACKWARD = "ip2p_flash_forward", "ip2p_flash_backward"

_lock = threading.Lock()
_loaded: bool | None = None  # None: not tried yet in this process


def cache_dir() -> str | None:
  """Where built kernels go, or None if ``$IP2P_KERNELS`` turns them off."""
  env = os.environ.get("IP2P_KERNELS")
  if env is not None and env.strip().lower() in OFF:
    return None
  return env or os.path.join(os.path.expanduser("~"), ".cache", "ip2p_jax", "kernels")


def _cpu_features() -> str:
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      for line in f:
        if line.startswith(("flags", "Features")):
          return line
  except OSError:
    pass
  return platform.processor()


def library_path(folder: str) -> str:
  """The built library's path in ``folder``: one per source, jaxlib, flags and CPU."""
  import jaxlib
  digest = hashlib.sha256()
  with open(SOURCE, "rb") as f:
    digest.update(f.read())
  for part in (jaxlib.__version__, " ".join(FLAGS), platform.machine(), _cpu_features()):
    digest.update(part.encode())
  return os.path.join(folder, f"cpu_attention-{digest.hexdigest()[:16]}.so")


def build(folder: str) -> str:
  """Compiles the kernel into ``folder`` (atomically: a finished file or none) and
  returns its path; an existing build is reused. Raises RuntimeError with the
  compiler's message when it cannot be built."""
  path = library_path(folder)
  if os.path.exists(path):
    return path
  compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
  if compiler is None:
    raise RuntimeError("no C++ compiler (g++ or c++ on PATH, or $CXX)")
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(suffix=".so", dir=folder)
  os.close(fd)
  try:
    command = [compiler, *FLAGS, "-isystem", jax.ffi.include_dir(), SOURCE, "-o", tmp]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
      raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return path


def load() -> bool:
  """Builds (or finds) the kernel and registers its two FFI targets with XLA:CPU, once
  per process. False, after one logged warning, if it is turned off or cannot be built."""
  global _loaded
  with _lock:
    if _loaded is None:
      _loaded = _register()
    return _loaded


def _register() -> bool:
  folder = cache_dir()
  if folder is None:
    return False
  try:
    import ctypes
    library = ctypes.cdll.LoadLibrary(build(folder))
  except (RuntimeError, OSError) as e:
    log.warning("the CPU attention kernel is not available, XLA's blocked attention runs "
                "instead (slower): %s", e)
    return False
  for name, symbol in ((FORWARD, library.Ip2pFlashForward),
                       (BACKWARD, library.Ip2pFlashBackward)):
    jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(symbol), platform="cpu")
  return True


def takes(query: jax.Array, key: jax.Array, value: jax.Array) -> bool:
  """Whether the kernel runs these operands: float32, one head_dim, a multiple of 8."""
  d = query.shape[-1]
  return (query.dtype == key.dtype == value.dtype == jnp.float32
          and d == key.shape[-1] == value.shape[-1] and d % 8 == 0
          and query.shape[-2] == key.shape[-2] == value.shape[-2]
          and key.shape[:-1] == value.shape[:-1])


def flash_attention(query: jax.Array, key: jax.Array, value: jax.Array) -> jax.Array:
  """``softmax(q k^T / sqrt(d)) v`` by the C++ kernel; ``[batch, length, heads,
  head_dim]`` in and out, float32 (:func:`takes`). Differentiable once (a custom VJP
  whose backward is the kernel's); under ``vmap`` the mapped axis joins the batch.
  Raises RuntimeError if the kernel is not available (:func:`load`)."""
  if not load():
    raise RuntimeError("the CPU attention kernel is not available (see the log, or "
                       "IP2P_KERNELS); use implementation='flash' or None")
  if not takes(query, key, value):
    raise ValueError(f"the CPU attention kernel takes float32 with head_dim a multiple of "
                     f"8; got {query.dtype} {query.shape}, {key.dtype} {key.shape}")
  return _attention(query, key, value)


def _scale(query: jax.Array) -> np.float32:
  return np.float32(query.shape[-1] ** -0.5)


def _forward_call(query, key, value):
  *batch, length, heads, _ = query.shape
  lse = jax.ShapeDtypeStruct((*batch, heads, length), jnp.float32)
  call = jax.ffi.ffi_call(FORWARD, (jax.ShapeDtypeStruct(query.shape, query.dtype), lse),
                          vmap_method="broadcast_all")
  return call(query, key, value, scale=_scale(query))


@jax.custom_vjp
def _attention(query, key, value):
  return _forward_call(query, key, value)[0]


def _attention_forward(query, key, value):
  out, lse = _forward_call(query, key, value)
  return out, (query, key, value, out, lse)


def _attention_backward(residuals, d_out):
  query, key, value, out, lse = residuals
  shapes = tuple(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (query, key, value))
  call = jax.ffi.ffi_call(BACKWARD, shapes, vmap_method="broadcast_all")
  return call(query, key, value, out, lse, d_out.astype(out.dtype), scale=_scale(query))


_attention.defvjp(_attention_forward, _attention_backward)
