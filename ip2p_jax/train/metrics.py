"""Training metrics: ``WORKDIR/metrics.jsonl`` (one JSON object per logged step) and
TensorBoard event files (``WORKDIR/tensorboard``, written without TensorFlow)."""
from __future__ import annotations

import json
import os


class MetricsWriter:
  """Appends metrics; on resume from ``resume_step`` drops lines logged after it by
  the interrupted run, so the file reads as one uninterrupted run."""

  def __init__(self, workdir: str, *, enabled: bool = True, resume_step: int = 0):
    self.enabled = enabled
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if not enabled:
      return
    if os.path.exists(self.path):
      with open(self.path, encoding="utf-8") as f:
        kept = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= resume_step]
      with open(self.path, "w", encoding="utf-8") as f:
        f.writelines(kept)
    from tensorboardX import SummaryWriter
    self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def config(self, config) -> None:
    if self.enabled:
      self._tb.add_text("config", "```\n" + str(config) + "\n```")

  def write(self, record: dict) -> None:
    if not self.enabled:
      return
    with open(self.path, "a", encoding="utf-8") as f:
      f.write(json.dumps(record, sort_keys=True) + "\n")
    for key, value in record.items():
      if key != "step" and isinstance(value, (int, float)):
        self._tb.add_scalar(key, value, record["step"])
    self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
