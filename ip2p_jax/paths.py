"""Paths that may be local or in a bucket (``gs://``, ``s3://``): ``etils.epath``.

Training names its workdir, checkpoints, metrics, samples and exports through these
helpers only, so ``--workdir=gs://bucket/run`` means the same place on every host.
Writes are whole-file (a bucket has no append) and atomic where the filesystem can
rename. ``gs://`` needs ``gcsfs`` (``pip install -e ".[gcs]"``) or TensorFlow's gfile.
"""
from __future__ import annotations

import contextlib
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
