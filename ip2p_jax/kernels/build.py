"""Builds this folder's C++ kernels into one library for this machine and registers
them with XLA:CPU as FFI targets.

The sources (``*.cc``, ``*.h`` here) are compiled on first use with ``-march=native``
(plus ``$IP2P_KERNELS_CXXFLAGS``, e.g. ``-mno-avx512f`` for the 8-float vector code on a
CPU with AVX-512) and cached in ``~/.cache/ip2p_jax/kernels`` (``$IP2P_KERNELS``
elsewhere; ``IP2P_KERNELS=off`` never builds or uses them), under a name that hashes the
sources, jaxlib's version, the compiler and its flags and the CPU's features, so an
upgrade or another machine builds its own.
Where no C++ compiler is found or the build fails, :func:`load` logs why once and
returns False, and the layers keep XLA's own kernels.
"""
from __future__ import annotations

import glob
import hashlib
import logging
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import threading

import jax

from ip2p_jax.compilation import OFF

log = logging.getLogger(__name__)

FOLDER = os.path.dirname(os.path.abspath(__file__))
# -fno-math-errno: sqrt vectorises (no errno to set; the values are the same).
FLAGS = ("-O3", "-march=native", "-std=c++17", "-fno-math-errno", "-fPIC", "-shared")


def flags() -> tuple[str, ...]:
  """The compiler flags: :data:`FLAGS` and then ``$IP2P_KERNELS_CXXFLAGS``."""
  return FLAGS + tuple(shlex.split(os.environ.get("IP2P_KERNELS_CXXFLAGS", "")))


# FFI target name -> the library's handler symbol.
TARGETS = {
    "ip2p_flash_forward": "Ip2pFlashForward",
    "ip2p_flash_backward": "Ip2pFlashBackward",
    "ip2p_conv3x3": "Ip2pConv3x3",
    "ip2p_conv3x3_filter": "Ip2pConv3x3Filter",
    "ip2p_norm_forward": "Ip2pNormForward",
    "ip2p_norm_backward": "Ip2pNormBackward",
    "ip2p_adamw_ema": "Ip2pAdamWEma",
}

_lock = threading.Lock()
_loaded: bool | None = None  # None: not tried yet in this process
_vector_width = 0


def sources() -> list[str]:
  return sorted(glob.glob(os.path.join(FOLDER, "*.cc")))


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


def compiler() -> str | None:
  """``$CXX``, else ``g++`` or ``c++`` on PATH; None if there is none."""
  return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


def _compiler_version(path: str | None) -> str:
  if path is None:
    return ""
  try:
    return subprocess.run([path, "--version"], capture_output=True, text=True,
                          errors="replace", timeout=30).stdout
  except (OSError, subprocess.SubprocessError):
    return ""


def library_path(folder: str) -> str:
  """The library's path in ``folder``: one per sources, jaxlib, compiler, flags and CPU."""
  import jaxlib
  digest = hashlib.sha256()
  for path in sorted(glob.glob(os.path.join(FOLDER, "*.cc")) +
                     glob.glob(os.path.join(FOLDER, "*.h"))):
    with open(path, "rb") as f:
      digest.update(os.path.basename(path).encode() + f.read())
  cxx = compiler()
  for part in (jaxlib.__version__, str(cxx), _compiler_version(cxx), " ".join(flags()),
               platform.machine(), _cpu_features()):
    digest.update(part.encode())
  return os.path.join(folder, f"ip2p_kernels-{digest.hexdigest()[:16]}.so")


def build(folder: str) -> str:
  """Compiles the kernels into ``folder`` (atomically: a finished file or none) and
  returns the library's path; an existing build is reused. The sources compile side by
  side, then link. Raises RuntimeError with the compiler's message when they cannot be
  built."""
  path = library_path(folder)
  if os.path.exists(path):
    return path
  cxx = compiler()
  if cxx is None:
    raise RuntimeError("no C++ compiler (g++ or c++ on PATH, or $CXX)")
  os.makedirs(folder, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=folder) as work:
    objects = [os.path.join(work, os.path.basename(src) + ".o") for src in sources()]
    run = lambda cmd: (cmd, subprocess.Popen(cmd, stdout=subprocess.PIPE,
                                             stderr=subprocess.PIPE, text=True,
                                             errors="replace"))
    _finish([run([cxx, *flags(), "-c", "-isystem", jax.ffi.include_dir(), src, "-o", obj])
             for src, obj in zip(sources(), objects)])
    tmp = os.path.join(work, "library.so")
    _finish([run([cxx, *flags(), *objects, "-o", tmp])])
    os.replace(tmp, path)
  return path


def _finish(jobs) -> None:
  failed = None
  for command, job in jobs:
    _, stderr = job.communicate()
    if job.returncode != 0 and failed is None:
      failed = f"{' '.join(command)} failed:\n{stderr[-2000:]}"
  if failed:
    raise RuntimeError(failed)


def load() -> bool:
  """Builds (or finds) the library and registers its FFI targets with XLA:CPU, once per
  process. False, after one logged warning, if turned off or it cannot be built."""
  global _loaded
  with _lock:
    if _loaded is None:
      _loaded = _register()
    return _loaded


def vector_width() -> int:
  """Floats per vector in the loaded kernels' products: 16 where they were built for
  AVX-512, 8 otherwise; 0 if they are not loaded."""
  return _vector_width if load() else 0


def _register() -> bool:
  global _vector_width
  folder = cache_dir()
  if folder is None:
    return False
  try:
    import ctypes
    library = ctypes.cdll.LoadLibrary(build(folder))
    handlers = {name: getattr(library, symbol) for name, symbol in TARGETS.items()}
    _vector_width = int(library.ip2p_vector_width())
  except (RuntimeError, OSError, AttributeError) as e:
    log.warning("the CPU kernels are not available, XLA's own kernels run instead "
                "(slower): %s", e)
    return False
  for name, handler in handlers.items():
    jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(handler), platform="cpu")
  return True
