"""A small, strict reader and writer for the safetensors format.

Format: 8-byte little-endian header length N, N bytes of JSON
(``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``),
then the raw little-endian tensor bytes. Our own reader gives errors that name
the file and the tensor (truncated downloads are the common failure), reads
bf16 without torch, and memory-maps so loading SD-size files copies nothing twice.
"""
from __future__ import annotations

import json
import os
import struct
from typing import Mapping

import ml_dtypes
import numpy as np

from ip2p_jax.atomic import atomic_write

DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


class SafetensorsError(ValueError):
  """A safetensors file is malformed or truncated."""


def read_header(path: str) -> tuple[dict, dict, int]:
  """Returns (tensor entries, metadata, byte offset of the data section)."""
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    head = f.read(8)
    if len(head) < 8:
      raise SafetensorsError(f"{path}: not a safetensors file ({size} bytes, truncated or empty)")
    (n,) = struct.unpack("<Q", head)
    if n > min(size - 8, _MAX_HEADER):
      raise SafetensorsError(f"{path}: header length {n} exceeds the file ({size} bytes): "
                             "truncated or not a safetensors file")
    try:
      header = json.loads(f.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise SafetensorsError(f"{path}: unreadable header ({e})") from None
  if not isinstance(header, dict):
    raise SafetensorsError(f"{path}: the header is a JSON {type(header).__name__}, not an object")
  metadata = header.pop("__metadata__", {}) or {}
  data_size = size - 8 - n
  for name, entry in header.items():
    _check_entry(path, name, entry)
    begin, end = entry["data_offsets"]
    if entry["dtype"] not in DTYPES:
      raise SafetensorsError(f"{path}: tensor {name!r} has unsupported dtype {entry['dtype']}")
    expected = int(np.prod(entry["shape"], dtype=np.int64)) * DTYPES[entry["dtype"]].itemsize
    if end - begin != expected:
      raise SafetensorsError(f"{path}: tensor {name!r} spans {end - begin} bytes, its shape "
                             f"{entry['shape']} needs {expected}")
    if end > data_size:
      raise SafetensorsError(f"{path}: truncated: tensor {name!r} ends at byte {end} of the data "
                             f"section but the file holds only {data_size} data bytes")
  return header, metadata, 8 + n


def _check_entry(path: str, name: str, entry) -> None:
  """A header entry must be ``{"dtype": str, "shape": [int >= 0, ...],
  "data_offsets": [begin, end]}`` with ``0 <= begin <= end``."""
  where = f"{path}: tensor {name!r}"
  if not isinstance(entry, dict):
    raise SafetensorsError(f"{where}: header entry is {entry!r}, not an object")
  for key in ("dtype", "shape", "data_offsets"):
    if key not in entry:
      raise SafetensorsError(f"{where}: header entry has no {key!r} (has {sorted(entry)})")
  is_int = lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0
  if not isinstance(entry["dtype"], str):
    raise SafetensorsError(f"{where}: dtype {entry['dtype']!r} is not a string")
  shape, offsets = entry["shape"], entry["data_offsets"]
  if not (isinstance(shape, list) and all(is_int(d) for d in shape)):
    raise SafetensorsError(f"{where}: shape {shape!r} is not a list of sizes")
  if not (isinstance(offsets, list) and len(offsets) == 2 and all(is_int(o) for o in offsets)
          and offsets[0] <= offsets[1]):
    raise SafetensorsError(f"{where}: data_offsets {offsets!r} is not [begin, end] with "
                           "0 <= begin <= end")


def load(path: str) -> dict[str, np.ndarray]:
  """All tensors of a file as (memory-mapped, read-only) numpy arrays."""
  header, _, offset = read_header(path)
  if not header:
    return {}
  data = np.memmap(path, dtype=np.uint8, mode="r", offset=offset)
  out = {}
  for name, entry in header.items():
    begin, end = entry["data_offsets"]
    out[name] = data[begin:end].view(DTYPES[entry["dtype"]]).reshape(entry["shape"])
  return out


def save(path: str, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None):
  """Writes ``tensors`` atomically (temporary file in the same folder, then rename)."""
  header, offset, arrays = {}, 0, []
  for name in sorted(tensors):
    arr = np.array(tensors[name], order="C", copy=None)  # keeps 0-d shapes, unlike ascontiguousarray
    if arr.dtype not in _NAMES:
      raise SafetensorsError(f"cannot store tensor {name!r} of dtype {arr.dtype}")
    header[name] = {"dtype": _NAMES[arr.dtype], "shape": list(arr.shape),
                    "data_offsets": [offset, offset + arr.nbytes]}
    offset += arr.nbytes
    arrays.append(arr)
  header["__metadata__"] = dict(metadata or {"format": "pt"})
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)
  with atomic_write(path) as f:
    f.write(struct.pack("<Q", len(blob)))
    f.write(blob)
    for arr in arrays:
      f.write(arr.tobytes())
