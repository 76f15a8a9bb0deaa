"""A small, strict reader and writer for the safetensors format.

Format: 8-byte little-endian header length N, N bytes of JSON
(``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``),
then the raw little-endian tensor bytes. Our own reader gives errors that name
the file and the tensor (truncated downloads are the common failure), reads
bf16 without torch, and memory-maps so loading SD-size files copies nothing twice.
"""
from __future__ import annotations

import json
import struct
import threading
from typing import Mapping

import ml_dtypes
import numpy as np

from ip2p_jax import paths
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
  size = paths.getsize(path)
  with paths.open(path, "rb") as f:
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
  """All tensors of a file as (memory-mapped, read-only) numpy arrays; for a remote
  file, as :class:`LazyTensor` s that read only what is indexed."""
  header, _, offset = read_header(path)
  if not header:
    return {}
  if not paths.is_local(path):
    return {name: LazyTensor(path, offset + entry["data_offsets"][0], DTYPES[entry["dtype"]],
                             tuple(entry["shape"])) for name, entry in header.items()}
  data = np.memmap(path, dtype=np.uint8, mode="r", offset=offset)
  out = {}
  for name, entry in header.items():
    begin, end = entry["data_offsets"]
    out[name] = data[begin:end].view(DTYPES[entry["dtype"]]).reshape(entry["shape"])
  return out


class LazyTensor:
  """A tensor of a remote safetensors file, read when indexed: ``t[index]`` (a tuple of
  unit-step slices, what ``jax.make_array_from_callback`` asks for) reads the bytes of the
  stored rows (leading dimension) the index touches, nothing else. ``transpose``/``.T``
  give views (PyTorch -> Flax kernel layouts) without reading. The last span read is kept
  (shared by the views of one tensor) until :meth:`release`, so devices that each want a
  slice of a non-leading dimension do not fetch the same rows again."""

  def __init__(self, path: str, offset: int, dtype, shape: tuple[int, ...],
               axes: tuple[int, ...] | None = None, cache: dict | None = None):
    self.path, self.offset, self.dtype = path, offset, np.dtype(dtype)
    self.stored_shape = tuple(shape)
    self.axes = tuple(range(len(shape))) if axes is None else tuple(axes)
    self._cache = {} if cache is None else cache
    self._lock = threading.Lock()

  @property
  def shape(self) -> tuple[int, ...]:
    return tuple(self.stored_shape[a] for a in self.axes)

  @property
  def ndim(self) -> int:
    return len(self.stored_shape)

  @property
  def nbytes(self) -> int:
    return int(np.prod(self.stored_shape, dtype=np.int64)) * self.dtype.itemsize

  def transpose(self, *axes) -> "LazyTensor":
    if len(axes) == 1 and isinstance(axes[0], (tuple, list)):
      axes = tuple(axes[0])
    axes = axes or tuple(reversed(range(self.ndim)))
    return LazyTensor(self.path, self.offset, self.dtype, self.stored_shape,
                      tuple(self.axes[a] for a in axes), self._cache)

  @property
  def T(self) -> "LazyTensor":  # noqa: N802 - numpy's name
    return self.transpose()

  def release(self) -> None:
    """Forgets the span kept from the last read."""
    self._cache.clear()

  def __array__(self, dtype=None, copy=None):
    out = self[tuple(slice(None) for _ in self.shape)]
    return out if dtype is None else out.astype(dtype)

  def __getitem__(self, index) -> np.ndarray:
    index = index if isinstance(index, tuple) else (index,)
    if any(i is Ellipsis for i in index):
      at = index.index(Ellipsis)
      index = index[:at] + (slice(None),) * (self.ndim - len(index) + 1) + index[at + 1:]
    index = index + (slice(None),) * (self.ndim - len(index))
    if self.ndim == 0:
      return self._rows(0, 1).reshape(())
    stored = [slice(None)] * self.ndim
    for view_dim, item in enumerate(index):
      stored[self.axes[view_dim]] = item
    lead = stored[0]
    if isinstance(lead, slice) and lead.step in (None, 1):
      start, stop, _ = lead.indices(self.stored_shape[0])
      stop = max(start, stop)
      rows, stored[0] = self._rows(start, stop), slice(None)
    else:  # an integer or a strided selection: the whole tensor, then numpy
      rows = self._rows(0, self.stored_shape[0])
    block = rows[tuple(stored)]
    # Integer indices drop dimensions: order the kept ones as the view has them.
    kept = [a for a in self.axes if not isinstance(stored[a], (int, np.integer))]
    return np.transpose(block, [sorted(kept).index(a) for a in kept])

  def _rows(self, start: int, stop: int) -> np.ndarray:
    """Stored rows ``[start, stop)`` (of the leading dimension) as an array."""
    row = int(np.prod(self.stored_shape[1:], dtype=np.int64)) * self.dtype.itemsize
    with self._lock:
      kept = self._cache.get("span")
      if kept is not None and kept[0] <= start and stop <= kept[1]:
        return kept[2][start - kept[0]:stop - kept[0]]
      data = paths.read_range(self.path, self.offset + start * row, (stop - start) * row)
      rows = np.frombuffer(data, dtype=self.dtype).reshape(
          (stop - start,) + self.stored_shape[1:] if self.ndim else ())
      self._cache["span"] = (start, stop, rows)
      self._cache["bytes_read"] = self._cache.get("bytes_read", 0) + len(data)
      return rows

  def __repr__(self) -> str:
    return f"LazyTensor({self.path!r}, shape={self.shape}, dtype={self.dtype})"


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
