"""Training at pod scale: a workdir in a bucket, every UNet shardable on 8 devices, weights
read shard by shard, several processes stopping together on SIGTERM."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from configs import tiny_ip2p

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def _run(*args, **kw):
  return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, **kw)


# -- a workdir in a bucket ------------------------------------------------------------------

@pytest.fixture
def fake_bucket(tmp_path, monkeypatch):
  """``gs://`` backed by a local folder: fsspec's "gs"/"gcs" protocols (what etils.epath
  uses for gs:// without TensorFlow) map bucket paths into ``tmp_path/store`` and list them
  back without the folder, as gcsfs does; orbax's array data (TensorStore's GCS driver)
  goes to the same folder, and the bucket has a flat namespace (what orbax would ask
  google-cloud-storage). Returns that folder."""
  import fsspec
  from etils.epath import backend
  from fsspec.implementations.dirfs import DirFileSystem
  from fsspec.implementations.local import LocalFileSystem
  from orbax.checkpoint._src.path import gcs_utils

  store = str(tmp_path / "store")
  os.makedirs(store)

  class FakeGCS(DirFileSystem):
    protocol = ("gs", "gcs")

    def __init__(self, *args, finalize_on_close=False, **kwargs):
      super().__init__(path=store, fs=LocalFileSystem(auto_mkdir=True))

  for name in ("gs", "gcs"):
    fsspec.register_implementation(name, FakeGCS, clobber=True)
  backend.fsspec_backend._get_filesystem.cache_clear()

  def kvstore(path):
    bucket, blob = gcs_utils.parse_gcs_path(path, add_trailing_slash=False)
    return {"driver": "file", "path": os.path.join(store, bucket, blob)}
  monkeypatch.setattr(gcs_utils, "get_kvstore_for_gcs", kvstore)
  monkeypatch.setattr(gcs_utils, "is_hierarchical_namespace_enabled", lambda path: False)
  yield store
  backend.fsspec_backend._get_filesystem.cache_clear()


def test_a_workdir_in_a_bucket_trains_resumes_and_exports(fake_bucket, shapes_dataset, tmp_path,
                                                         monkeypatch, capsys):
  """Checkpoints, metrics, TensorBoard, samples and the export of a ``gs://`` workdir all
  land in the bucket, nothing under the working directory, and the run resumes from it."""
  from ip2p_jax.data import builders
  from ip2p_jax.train.loop import train_and_evaluate
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  monkeypatch.chdir(cwd)
  # Dataset discovery through epath: the bucket copy of a built dataset is found.
  import shutil
  shutil.copytree(shapes_dataset, os.path.join(fake_bucket, "bucket", "data", "t", "1.0.0"))
  found = "gs://bucket/data/t/1.0.0"
  assert builders.find_dataset(found) == found and builders.find_dataset("gs://bucket") == found

  def config(steps):
    c = tiny_ip2p.get_config()
    c.data.path = shapes_dataset
    c.total_steps, c.checkpoint_every, c.log_every = steps, 2, 1
    c.sample_every, c.num_samples, c.sample_steps = 2, 2, 2
    return c
  train_and_evaluate(config(2), "gs://bucket/run")
  first = capsys.readouterr().out
  summary = train_and_evaluate(config(3), "gs://bucket/run")
  second = capsys.readouterr().out
  run = os.path.join(fake_bucket, "bucket", "run")
  assert os.listdir(cwd) == []
  assert sorted(int(d) for d in os.listdir(os.path.join(run, "checkpoints")) if d.isdigit()) \
      == [2, 3]
  lines = [json.loads(l) for l in open(os.path.join(run, "metrics.jsonl"))]
  assert [l["step"] for l in lines] == [1, 2, 3]
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(os.path.join(run, "tensorboard")))
  assert sorted(os.listdir(os.path.join(run, "samples"))) == ["step_0000002.png", "step_0000003.png"]
  assert summary["export"] == "gs://bucket/run/export"
  assert os.path.isfile(os.path.join(run, "export", "unet", "diffusion_pytorch_model.safetensors"))
  assert os.path.isfile(os.path.join(run, "export", "model_index.json"))
  # The console: one line per logged step with a bar, loss, examples/s and ETA.
  assert "resumed from step 2 in gs://bucket/run/checkpoints" in second
  steps = [l for l in (first + second).splitlines() if " ex/s ETA " in l]
  assert [l.split(" step ")[1].split()[0] for l in steps] == ["1/2", "2/2", "3/3"]
  assert steps[-1].startswith("[####################] 100% step 3/3 loss ")
  # The sample sheet is labelled: a header row and a text line above each example.
  from PIL import Image
  sheet = np.asarray(Image.open(os.path.join(run, "samples", "step_0000003.png")))
  assert sheet.shape == (14 + 4 + 2 * (96 + 14 + 4) + 4, 3 * (96 + 4) + 4, 3)
  assert (sheet[2:12, 4:100] < 128).any() and (sheet[18:30, 4:300] < 128).any()  # text drawn
