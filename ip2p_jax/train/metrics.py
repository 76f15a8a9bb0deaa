"""Training metrics: ``WORKDIR/metrics.jsonl`` (one JSON object per logged step) and
TensorBoard event files (``WORKDIR/tensorboard``, written without TensorFlow). The
workdir may be a bucket (``gs://``): both go through ``etils.epath``."""
from __future__ import annotations

import json

from ip2p_jax import paths


class MetricsWriter:
  """Writes metrics; on resume from ``resume_step`` drops lines logged after it by
  the interrupted run, so the file reads as one uninterrupted run. The file is
  rewritten whole at each write (buckets cannot append; a run logs a few thousand lines)."""

  def __init__(self, workdir, *, enabled: bool = True, resume_step: int = 0):
    self.enabled = enabled
    self.path = paths.path(workdir) / "metrics.jsonl"
    self._tb = None
    self._lines: list[str] = []
    if not enabled:
      return
    if self.path.exists():
      self._lines = [line + "\n" for line in self.path.read_text(encoding="utf-8").splitlines()
                     if line.strip() and json.loads(line).get("step", 0) <= resume_step]
      paths.write_text(self.path, "".join(self._lines))
    self._tb = _tensorboard(paths.path(workdir) / "tensorboard")

  def config(self, config) -> None:
    if self.enabled:
      self._tb.add_text("config", "```\n" + str(config) + "\n```")

  def write(self, record: dict) -> None:
    if not self.enabled:
      return
    self._lines.append(json.dumps(record, sort_keys=True) + "\n")
    paths.write_text(self.path, "".join(self._lines))
    for key, value in record.items():
      if key != "step" and isinstance(value, (int, float)):
        self._tb.add_scalar(key, value, record["step"])
    self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


class _EpathRecords:
  """tensorboardX's record-file interface over an epath file: the bytes written so far
  are rewritten whole at each flush (a bucket object cannot be appended to)."""

  def __init__(self, target: str):
    self.target = paths.path(target)
    self.data = bytearray()

  def write(self, data: bytes) -> None:
    self.data += data

  def flush(self) -> None:
    self.target.write_bytes(bytes(self.data))

  def close(self) -> None:
    self.flush()


class _EpathRecordsFactory:
  def open(self, target: str):
    return _EpathRecords(target)

  def directory_check(self, target: str) -> None:
    paths.path(target).mkdir(parents=True, exist_ok=True)


def _tensorboard(folder):
  """A tensorboardX writer; a remote folder's event file goes through epath (its own
  GCS writer needs google-cloud-storage, and nothing else knows other schemes)."""
  from tensorboardX import SummaryWriter, record_writer
  if not paths.is_local(folder):
    scheme = str(folder).split("://")[0]
    record_writer.register_writer_factory(scheme, _EpathRecordsFactory())
  return SummaryWriter(str(folder))
