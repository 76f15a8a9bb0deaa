"""Paths that may be local or in a bucket (``gs://``, ``s3://``): ``etils.epath``.

Training names its workdir, checkpoints, metrics, samples and exports through these
helpers only, so ``--workdir=gs://bucket/run`` means the same place on every host.
Writes are whole-file (a bucket has no append) and atomic where the filesystem can
rename. ``gs://`` needs ``gcsfs`` (``pip install -e ".[gcs]"``) or TensorFlow's gfile.

Reading: model folders (``init_from``, ``vae_from``, ...) are read in place (JSON whole,
safetensors by byte ranges, see ``checkpoints.safetensors``); what only a local-file
library can open (ArrayRecord files: google/array_record#120; tokenizer folders) is
copied once per host into a local staging folder by :func:`local_copy`.
"""
from __future__ import annotations

import builtins
import contextlib
import glob as _glob
import io
import os
import shutil
import tempfile

from etils import epath


def is_local(path) -> bool:
  return "://" not in os.fspath(path)


def path(p) -> epath.Path:
  """``p`` as an ``epath.Path``; a local path made absolute (orbax requires it; a
  relative path would mean another folder on each host's working directory)."""
  return epath.Path(os.path.abspath(p)) if is_local(p) else epath.Path(p)


def write_bytes(target, data: bytes) -> None:
  """Writes ``data`` to ``target`` as a whole: a temporary file beside it, then a rename,
  so a reader never sees part of it."""
  target = path(target)
  target.parent.mkdir(parents=True, exist_ok=True)
  tmp = target.parent / f".tmp-{target.name}"
  tmp.write_bytes(data)
  tmp.replace(target)


def write_text(target, text: str) -> None:
  write_bytes(target, text.encode("utf-8"))


def write_image(target, image) -> None:
  """A PIL image as a PNG at ``target``."""
  buffer = io.BytesIO()
  image.save(buffer, format="PNG")
  write_bytes(target, buffer.getvalue())


@contextlib.contextmanager
def local_folder(target):
  """A local folder to write into; a remote ``target`` receives a copy of its files when
  the block ends (libraries that write only to local disk: safetensors, tokenizers)."""
  if is_local(target):
    os.makedirs(target, exist_ok=True)
    yield os.fspath(target)
    return
  with tempfile.TemporaryDirectory() as tmp:
    yield tmp
    upload(tmp, target)


def put(local: str, target) -> None:
  """Copies the local file ``local`` to ``target`` (any epath), streamed; a local target
  is written beside itself and renamed, a bucket object appears whole when closed."""
  target = path(target)
  target.parent.mkdir(parents=True, exist_ok=True)
  tmp = target.parent / f".tmp-{target.name}" if is_local(target) else target
  with builtins.open(local, "rb") as src, tmp.open("wb") as dst:
    shutil.copyfileobj(src, dst, 16 << 20)
  if tmp != target:
    tmp.replace(target)


def upload(local: str, target) -> None:
  """Copies the files under the local folder ``local`` to ``target`` (any epath)."""
  target = path(target)
  for root, _, files in os.walk(local):
    rel = os.path.relpath(root, local)
    folder = target if rel == "." else target / rel
    folder.mkdir(parents=True, exist_ok=True)
    for name in files:
      with open(os.path.join(root, name), "rb") as src, (folder / name).open("wb") as dst:
        shutil.copyfileobj(src, dst)


# -- reading what may be local or remote --------------------------------------------------

def isdir(p) -> bool:
  return os.path.isdir(p) if is_local(p) else _quiet(lambda: epath.Path(p).is_dir())


def isfile(p) -> bool:
  return os.path.isfile(p) if is_local(p) else _quiet(lambda: epath.Path(p).is_file())


def _quiet(test) -> bool:
  """A remote existence test; a path the filesystem cannot even look at does not exist."""
  try:
    return bool(test())
  except (OSError, ValueError):
    return False


def open(p, mode: str = "r", encoding: str | None = None):  # noqa: A001 - shadows on purpose
  """``open`` for a local path or a bucket object."""
  if is_local(p):
    return builtins.open(p, mode, encoding=encoding)
  if "b" in mode:
    return epath.Path(p).open(mode)
  return epath.Path(p).open(mode, encoding=encoding or "utf-8")


def getsize(p) -> int:
  return os.path.getsize(p) if is_local(p) else int(epath.Path(p).stat().length)


def glob(folder, pattern: str) -> list[str]:
  """Paths in ``folder`` matching ``pattern`` (``*``, ``**``), as strings like ``folder``."""
  if is_local(folder):
    return _glob.glob(os.path.join(folder, pattern), recursive=True)
  return [str(x) for x in epath.Path(folder).glob(pattern)]


def read_range(p, start: int, length: int) -> bytes:
  """``length`` bytes of the file ``p`` from byte ``start`` (a ranged read on a bucket)."""
  with open(p, "rb") as f:
    f.seek(start)
    data = f.read(length)
  if len(data) != length:
    raise OSError(f"{p}: read {len(data)} of {length} bytes at offset {start} (truncated?)")
  return data


def staging_root() -> str:
  """Where remote files are copied for local-only readers: ``$IP2P_JAX_STAGING`` or a
  folder under the system temporary directory."""
  return os.environ.get("IP2P_JAX_STAGING") or os.path.join(tempfile.gettempdir(),
                                                            "ip2p_jax_staging")


def local_copy(p, keep=None) -> str:
  """A local path holding the file or folder ``p``: ``p`` itself when local, else a copy
  under :func:`staging_root` (same relative layout, ``scheme/bucket/...``). Each file is
  downloaded to a temporary name and renamed, so processes sharing a host never see part
  of one, and a copy of the same size is reused. ``keep(name) -> bool`` chooses which
  files of a folder are copied (all by default)."""
  if is_local(p):
    return os.fspath(p)
  scheme, rest = os.fspath(p).split("://", 1)
  target = os.path.join(staging_root(), scheme, rest.strip("/"))
  source = epath.Path(p)
  if source.is_dir():
    for remote in _files_under(source):
      rel = os.path.relpath(str(remote), str(source))
      if keep is None or keep(rel):
        _fetch(remote, os.path.join(target, rel))
    os.makedirs(target, exist_ok=True)
  else:
    _fetch(source, target)
  return target


def _files_under(folder: epath.Path) -> list[epath.Path]:
  """Every file below ``folder``, one listing per folder (epath refuses ``**`` on GCS)."""
  files = []
  for child in sorted(folder.iterdir(), key=str):
    files.extend(_files_under(child) if child.is_dir() else [child])
  return files


def _fetch(remote: epath.Path, local: str) -> None:
  size = int(remote.stat().length)
  if os.path.isfile(local) and os.path.getsize(local) == size:
    return
  folder = os.path.dirname(local)
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-")
  try:
    with os.fdopen(fd, "wb") as dst, remote.open("rb") as src:
      shutil.copyfileobj(src, dst, 16 << 20)
    if os.path.getsize(tmp) != size:
      raise OSError(f"{remote}: copied {os.path.getsize(tmp)} of {size} bytes")
    os.replace(tmp, local)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.unlink(tmp)
    raise
