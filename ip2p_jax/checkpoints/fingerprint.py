"""Content hashes that name a model in records (``ip2p edit``'s manifest).

:func:`folder_hash` hashes every config, tokenizer and safetensors file of a model
folder (names and bytes), so two folders with the same files get the same hash
wherever they live, and a fine-tuned copy gets another. Hashing Stable Diffusion's
weights reads ~4 GB once; the result is cached per folder, keyed on each file's
size and modification time, in ``~/.cache/ip2p_jax/model_hashes.json``
(``$IP2P_HASH_CACHE`` overrides where).
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any

from ip2p_jax.atomic import atomic_write

SUFFIXES = (".json", ".safetensors", ".txt")
_CHUNK = 16 * 2 ** 20


def _cache_path() -> str:
  return os.environ.get("IP2P_HASH_CACHE") or os.path.join(
      os.path.expanduser("~"), ".cache", "ip2p_jax", "model_hashes.json")


def _model_files(folder: str) -> list[str]:
  """The files that define the model, relative to ``folder``, sorted; hidden ones skipped."""
  found = []
  for root, dirs, names in os.walk(folder):
    dirs[:] = sorted(d for d in dirs if not d.startswith("."))
    found += [os.path.relpath(os.path.join(root, n), folder) for n in names
              if n.endswith(SUFFIXES) and not n.startswith(".")]
  return sorted(f.replace(os.sep, "/") for f in found)


def _stat(folder: str, files: list[str]) -> list[list[Any]]:
  return [[f, st.st_size, st.st_mtime_ns]
          for f, st in ((f, os.stat(os.path.join(folder, f))) for f in files)]


def _hash_files(folder: str, files: list[str]) -> str:
  h = hashlib.sha256()
  for f in files:
    h.update(f"{f}\0{os.path.getsize(os.path.join(folder, f))}\0".encode())
    with open(os.path.join(folder, f), "rb") as fh:
      while chunk := fh.read(_CHUNK):
        h.update(chunk)
  return "sha256:" + h.hexdigest()[:16]


def _read_cache() -> dict:
  try:
    with open(_cache_path(), encoding="utf-8") as f:
      cache = json.load(f)
    return cache if isinstance(cache, dict) else {}
  except (OSError, ValueError):
    return {}


def folder_hash(folder: str) -> str:
  """``"sha256:<16 hex>"`` over the model files of ``folder`` (see module docstring)."""
  folder = os.path.realpath(folder)
  files = _model_files(folder)
  stat = _stat(folder, files)
  cache = _read_cache()
  entry = cache.get(folder)
  if isinstance(entry, dict) and entry.get("stat") == stat:
    return entry["hash"]
  digest = _hash_files(folder, files)
  cache[folder] = {"stat": stat, "hash": digest}
  try:
    with atomic_write(_cache_path(), "w", encoding="utf-8") as f:
      json.dump(cache, f)
  except OSError:
    pass  # a read-only home only costs the next run a re-hash
  return digest


def params_hash(params) -> str:
  """``"sha256:<16 hex>"`` over a parameter pytree's paths, dtypes, shapes and values:
  a model's name when it was not loaded from a folder."""
  import jax
  import numpy as np
  h = hashlib.sha256()
  for path, leaf in sorted(jax.tree_util.tree_leaves_with_path(params),
                           key=lambda pl: jax.tree_util.keystr(pl[0])):
    array = np.asarray(jax.device_get(leaf))
    h.update(f"{jax.tree_util.keystr(path)}\0{array.dtype}\0{array.shape}\0".encode())
    h.update(np.ascontiguousarray(array).tobytes())
  return "sha256:" + h.hexdigest()[:16]
