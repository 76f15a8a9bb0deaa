"""Atomic file writes: a temporary file in the target folder, renamed into place.

A reader (or a resumed run) sees either the old file or the complete new one,
never a partial write; a killed writer leaves only a hidden ``.tmp-*`` file
(``ip2p edit`` and ``ip2p synth`` remove those in their output folders on their next
run; elsewhere they stay, hidden, and are never read).
"""
from __future__ import annotations

import contextlib
import os
import tempfile

TMP_PREFIX = ".tmp-"


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "wb", encoding: str | None = None):
  """``with atomic_write(p) as f: f.write(...)`` -- ``p`` appears only when complete."""
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=folder, prefix=TMP_PREFIX, suffix=os.path.splitext(path)[1])
  try:
    with os.fdopen(fd, mode, encoding=encoding) as f:
      yield f
      f.flush()
      os.fsync(f.fileno())
    os.chmod(tmp, 0o666 & ~_umask())
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.unlink(tmp)
    raise
