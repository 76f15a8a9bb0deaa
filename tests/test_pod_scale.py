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


# -- several processes stop together ----------------------------------------------------------

def _free_port():
  import socket
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _two_processes(workdir, outs, steps, mesh="dcn=2,data=1"):
  worker = os.path.join(HERE, "helpers", "train_worker.py")
  port = _free_port()
  return [subprocess.Popen(
      [sys.executable, worker, "configs/tiny_ip2p.py", str(workdir), str(outs[i]),
       "--steps", str(steps), "--mesh", mesh, "--coordinator", f"127.0.0.1:{port}",
       "--process-id", str(i), "--num-processes", "2"], cwd=ROOT,
      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for i in range(2)]


def _finish(procs, timeout=900):
  errors = [p.communicate(timeout=timeout)[1] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], "\n---\n".join(e[-3000:] for e in errors)
  return errors


def test_sigterm_to_one_of_two_processes_stops_both_at_one_step_and_resumes_bitwise(tmp_path):
  """SIGTERM to process 1 only: both processes leave the loop at the same step (JAX's
  preemption sync point), save it together and exit cleanly; rerunning continues to the
  same parameters, bit for bit, as a two-process run that was never interrupted. The mesh
  has a dcn axis over the two processes (the multi-slice layout)."""
  import time
  work = tmp_path / "run"
  outs = [tmp_path / "a0.npz", tmp_path / "a1.npz"]
  procs = _two_processes(work, outs, steps=100000)
  metrics = work / "metrics.jsonl"
  deadline = time.time() + 1800
  while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
    assert all(p.poll() is None for p in procs), procs[0].communicate()[1][-3000:]
    if time.time() > deadline:
      for p in procs:
        p.kill()
      pytest.fail("the two processes did not log 2 steps in 30 minutes")
    time.sleep(0.2)
  procs[1].send_signal(15)
  _finish(procs)
  stopped = [int(np.load(o)["__step__"]) for o in outs]
  assert stopped[0] == stopped[1] >= 2
  saved = sorted(int(d) for d in os.listdir(work / "checkpoints") if d.isdigit())
  assert saved[-1] == stopped[0]
  target = stopped[0] + 2
  _finish(_two_processes(work, [tmp_path / "b0.npz", tmp_path / "b1.npz"], steps=target))
  _finish(_two_processes(tmp_path / "fresh", [tmp_path / "c0.npz", tmp_path / "c1.npz"],
                         steps=target))
  resumed, fresh = np.load(tmp_path / "b0.npz"), np.load(tmp_path / "c0.npz")
  assert int(resumed["__step__"]) == int(fresh["__step__"]) == target
  names = [k for k in fresh.files if not k.startswith("__")]
  assert names and sorted(names) == sorted(k for k in resumed.files if not k.startswith("__"))
  for k in names:
    np.testing.assert_array_equal(resumed[k], fresh[k], err_msg=k)


# -- every UNet shards; weights are read shard by shard -----------------------------------------

@pytest.fixture(scope="module")
def unet_shardings():
  r = _run(os.path.join(HERE, "helpers", "shard_unets.py"), timeout=900)
  assert r.returncode == 0, r.stderr[-3000:]
  return {(d["unet"], d["mesh"]): d for d in map(json.loads, r.stdout.splitlines())}


@pytest.mark.parametrize("unet", ["sd15", "sd2", "ip2p", "tiny_sd2"])
def test_every_unet_shards_on_both_8_device_meshes(unet_shardings, unet):
  """SD 1.x, SD 2.x (linear proj_in/proj_out, whose (embed, embed) axes used to raise
  "Dimensions ('embed',) occur more than once") and the 8-channel IP2P UNet: eval_shape
  under each mesh, every sharding valid for its array, nothing the rules ask left undone.
  Per-device bytes: data=2 x fsdp=4 keeps 1/4 of the large weights (norms and biases stay
  replicated: 1/3.5 at most); fsdp=2 x tensor=4 splits attention and feed-forward 8 ways
  but convolutions only 2 ways (their channels are on fsdp): about 1/2.6."""
  fsdp = unet_shardings[(unet, "data=2,fsdp=4")]
  tensor = unet_shardings[(unet, "fsdp=2,tensor=4")]
  assert fsdp["unshardable"] == [] and tensor["unshardable"] == []
  assert fsdp["device_bytes"] <= fsdp["bytes"] / 3.5
  assert tensor["device_bytes"] <= tensor["bytes"] / 2.4


def test_a_weight_the_mesh_cannot_split_is_listed(unet_shardings):
  """fsdp=8: SD 1.5's conv_out has 4 output channels; it stays replicated and is named."""
  listed = unet_shardings[("sd15", "fsdp=8")]["unshardable"]
  assert [l.split()[0] for l in listed] == ["params/conv_out/bias", "params/conv_out/kernel"]
  assert all("conv_out (4) -> fsdp (8): does not divide" in l for l in listed)


def test_weights_are_read_shard_by_shard(tmp_path):
  """Over the safetensors memory map, each sharded parameter is read as its devices'
  slices only, never whole, and the result equals a plain load bit for bit."""
  r = _run(os.path.join(HERE, "helpers", "sharded_load.py"), str(tmp_path / "unet"), timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  out = json.loads(r.stdout.splitlines()[-1])
  assert out["equal"] and out["placed"]
  assert out["sharded_params"] > 20 and out["reads_of_sharded_params"] > 0
  assert out["whole_reads_of_sharded_params"] == []
  assert out["elements_read"] <= out["elements_per_device_copy"]


def test_training_from_a_pipeline_folder_places_its_weights(model, shapes_dataset, tmp_path):
  """``init_from``: the frozen encoders and the UNet come from the folder, placed shard
  by shard on the training mesh; with learning rate 0 the trained UNet is still exactly
  the folder's."""
  from flax import traverse_util
  import jax
  from ip2p_jax.checkpoints import load_component
  from ip2p_jax.train.loop import train_and_evaluate
  c = tiny_ip2p.get_config()
  c.data.path, c.model.init_from = shapes_dataset, model
  c.total_steps, c.learning_rate, c.export, c.num_samples, c.sample_steps = 1, 0.0, False, 1, 1
  summary = train_and_evaluate(c, str(tmp_path))
  _, folder = load_component(os.path.join(model, "unet"))
  trained = traverse_util.flatten_dict(jax.device_get(summary["state"].params))
  folder = traverse_util.flatten_dict(folder)
  assert trained.keys() == folder.keys()
  for k in folder:
    np.testing.assert_array_equal(trained[k], folder[k], err_msg="/".join(k))
