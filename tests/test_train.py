"""Training: every stage runs and learns, sharding and several processes give the same
params as one device, resume is exact, SIGTERM leaves a checkpoint, NaN stops the run."""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny_clip, tiny_ip2p, tiny_t2i, tiny_vae
from helpers.xla_env import without_shared_cache
from ip2p_jax.train import jobs, objectives
from ip2p_jax.train import state as state_lib
from ip2p_jax.train.loop import NonFiniteLoss, train_and_evaluate
from ip2p_jax.train.step import make_step

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CONFIGS = {"instruct_pix2pix": tiny_ip2p, "text_to_image": tiny_t2i, "vae": tiny_vae,
           "clip": tiny_clip}


def _config(stage, dataset, **overrides):
  c = CONFIGS[stage].get_config()
  c.data.path = dataset
  for key, value in overrides.items():
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


@pytest.mark.parametrize("stage", sorted(CONFIGS))
def test_each_stage_trains_and_exports(stage, shapes_dataset, tmp_path):
  summary = train_and_evaluate(_config(stage, shapes_dataset, total_steps=2, sample_every=2,
                                       num_samples=2, sample_steps=2), str(tmp_path))
  assert summary["step"] == 2 and np.isfinite(summary["metrics"]["loss"])
  lines = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  assert [l["step"] for l in lines] == [1, 2]
  assert {"loss", "lr", "grad_norm", "examples_per_s"} <= set(lines[0])
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "tensorboard"))
  if stage == "clip":  # CLIP has no picture to show; its accuracy is logged
    assert not os.path.exists(tmp_path / "samples") and "accuracy" in lines[0]
  else:
    assert os.listdir(tmp_path / "samples") == ["step_0000002.png"]
  assert os.path.isdir(summary["export"])
  if stage == "instruct_pix2pix":  # the export is a pipeline folder our editor loads
    from ip2p_jax import InstructPix2PixPipeline
    pipe = InstructPix2PixPipeline.from_pretrained(summary["export"])
    out = pipe("make it red", np.zeros((32, 32, 3), np.uint8), num_inference_steps=2,
               output_type="np")
    assert out.images.shape == (1, 32, 32, 3) and np.isfinite(out.images).all()
    assert np.abs(out.images).mean() > 1 / 255  # a picture, not the black input back
  else:  # it loads in diffusers / transformers, holding the run's EMA weights
    import diffusers
    import transformers
    ema = jax.device_get(summary["state"].ema_params)
    if stage == "vae":
      vae = diffusers.AutoencoderKL.from_pretrained(os.path.join(summary["export"], "vae"))
      theirs, ours = vae.decoder.conv_out.weight, ema["decoder"]["conv_out"]["kernel"]
      scale = vae.config.scaling_factor
      assert np.isfinite(scale) and scale > 0 and scale != 0.18215  # measured on the data
    elif stage == "text_to_image":  # a text-to-image pipeline folder: its UNet
      unet = diffusers.UNet2DConditionModel.from_pretrained(os.path.join(summary["export"],
                                                                         "unet"))
      theirs, ours = unet.conv_out.weight, ema["conv_out"]["kernel"]
    else:
      clip = transformers.CLIPModel.from_pretrained(os.path.join(summary["export"], "clip"))
      transformers.CLIPTextModel.from_pretrained(os.path.join(summary["export"], "text_encoder"))
      theirs = clip.text_model.final_layer_norm.weight
      ours = ema["text_model"]["final_layer_norm"]["scale"]
    theirs = theirs.detach().numpy()
    ours = np.asarray(ours).transpose(3, 2, 0, 1) if theirs.ndim == 4 else np.asarray(ours)
    np.testing.assert_array_equal(theirs, ours)


@pytest.mark.parametrize("stage", sorted(CONFIGS))
def test_loss_on_a_fixed_batch_decreases(stage, shapes_dataset):
  config = _config(stage, shapes_dataset, learning_rate=2e-3)
  job = jobs.build(config)
  from ip2p_jax.train.loop import _loader, _source
  batch = next(iter(_loader(config, _source(shapes_dataset, "train", stage), stage,
                            job.tokenizer)))
  batch = {k: jnp.asarray(v) for k, v in batch.items() if k != "corrupt_skipped"}
  optimizer = state_lib.make_optimizer(config)
  import flax.linen as nn
  st = state_lib.create(nn.unbox(job.init_params(jax.random.key(0))), optimizer, 0)
  step = jax.jit(make_step(job.loss, optimizer, state_lib.learning_rate_schedule(config),
                           ema_decay=0.99))
  fixed = jax.random.key(42)  # same noise and timesteps before and after
  evaluate = jax.jit(lambda p: job.loss(p, job.frozen_params, batch, fixed)[0])
  before = float(evaluate(st.params))
  for _ in range(25):
    st, _ = step(st, job.frozen_params, batch)
  assert float(evaluate(st.params)) < 0.9 * before


def test_gradient_accumulation_matches_the_full_batch(shapes_dataset):
  """4 micro-batches of 1 give the same update as one batch of 4 (a mean of equal-size
  means), with a deterministic objective (the posterior mode's reconstruction)."""
  config = _config("vae", shapes_dataset)
  job = jobs.build(config)
  import flax.linen as nn
  params = nn.unbox(job.init_params(jax.random.key(0)))
  images = jax.random.randint(jax.random.key(1), (4, 32, 32, 3), 0, 256).astype(jnp.uint8)
  batch = {"image": images}

  def loss(p, frozen, b, rng):
    x = objectives.to_unit(b["image"])
    value = jnp.mean(jnp.abs(job.module.apply({"params": p}, x)[0] - x))
    return value, {"loss": value}
  import optax
  optimizer = optax.sgd(1.0)  # the update is the gradient itself
  sched = optax.constant_schedule(1.0)
  s = state_lib.create(params, optimizer, 0)
  a, ma = jax.jit(make_step(loss, optimizer, sched, ema_decay=0.9))(s, {}, batch)
  b, mb = jax.jit(make_step(loss, optimizer, sched, ema_decay=0.9, grad_accum_steps=4))(
      s, {}, batch)
  np.testing.assert_allclose(float(mb["loss"]), float(ma["loss"]), rtol=1e-5)
  np.testing.assert_allclose(float(mb["grad_norm"]), float(ma["grad_norm"]), rtol=1e-4)
  for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6)  # fp32 summation order


def test_conv_in_expansion_keeps_the_stage_1_function():
  from configs import models
  from ip2p_jax.checkpoints import module_from_config
  import flax.linen as nn
  stage1 = module_from_config(models.TINY_UNET)
  p1 = nn.unbox(stage1.init(jax.random.key(0), *stage1.dummy_inputs())["params"])
  p1 = jax.tree.map(lambda x: x + 0.1 * jax.random.normal(jax.random.key(1), x.shape), p1)
  stage2 = module_from_config(models.TINY_IP2P_UNET)
  p2 = objectives.expand_conv_in(p1, 8)
  np.testing.assert_array_equal(np.asarray(p2["conv_in"]["bias"]), np.asarray(p1["conv_in"]["bias"]))
  x = jax.random.normal(jax.random.key(2), (2, 8, 8, 4))
  ctx = jax.random.normal(jax.random.key(3), (2, 5, 32))
  want = stage1.apply({"params": p1}, x, 10, ctx)
  got = stage2.apply({"params": p2}, jnp.concatenate([x, jnp.zeros_like(x)], -1), 10, ctx)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def _read(path):
  return [json.loads(l) for l in open(path)]


def _params(summary):
  from flax import traverse_util
  return traverse_util.flatten_dict(jax.device_get(summary["state"].params))


def test_resume_is_exact(shapes_dataset, tmp_path, capsys):
  one = train_and_evaluate(_config("instruct_pix2pix", shapes_dataset, total_steps=6,
                                   checkpoint_every=2, export=False), str(tmp_path / "a"))
  train_and_evaluate(_config("instruct_pix2pix", shapes_dataset, total_steps=4,
                             checkpoint_every=2, export=False), str(tmp_path / "b"))
  first_four = open(tmp_path / "b" / "metrics.jsonl").read()
  capsys.readouterr()
  two = train_and_evaluate(_config("instruct_pix2pix", shapes_dataset, total_steps=6,
                                   checkpoint_every=2, export=False), str(tmp_path / "b"))
  # A resume, not a deterministic restart (which would also end at equal parameters):
  # the loop says where it resumed, and steps 1-4's lines (their wall-clock rates
  # included) are the first run's, untouched.
  assert "resumed from step 4" in capsys.readouterr().out
  assert open(tmp_path / "b" / "metrics.jsonl").read().startswith(first_four)
  a, b = _params(one), _params(two)
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])
  saved = json.load(open(tmp_path / "b" / "checkpoints" / "6" / "config" / "metadata"))
  assert saved["total_steps"] == 6 and saved["stage"] == "instruct_pix2pix"
  la, lb = _read(tmp_path / "a" / "metrics.jsonl"), _read(tmp_path / "b" / "metrics.jsonl")
  assert [l["step"] for l in lb] == [1, 2, 3, 4, 5, 6]
  assert [l["loss"] for l in la[4:]] == [l["loss"] for l in lb[4:]]


def test_non_finite_loss_names_the_last_good_checkpoint(shapes_dataset, tmp_path):
  config = _config("vae", shapes_dataset, total_steps=30, checkpoint_every=1,
                   learning_rate=1e30, grad_clip_norm=1e30, export=False)
  with pytest.raises(NonFiniteLoss, match=r"Last good checkpoint: step \d+ in .*checkpoints"):
    train_and_evaluate(config, str(tmp_path))


def test_the_loop_reads_nothing_back_between_logs(shapes_dataset, tmp_path, monkeypatch):
  """No per-step host sync: with JAX's transfer guard forbidding implicit device-to-host
  copies (``float(loss)``, ``bool(x)``, ``np.asarray(x)``), a run completes; the loop's
  explicit reads (``jax.device_get`` in loop.py) happen only at the ``log_every`` steps,
  the checkpoint and the end. Orbax's save copies the state to host itself and is let
  through."""
  import orbax.checkpoint as ocp
  from ip2p_jax.train import loop
  save = ocp.CheckpointManager.save

  def save_allowed(self, *args, **kwargs):
    with jax.transfer_guard_device_to_host("allow"):
      return save(self, *args, **kwargs)
  monkeypatch.setattr(ocp.CheckpointManager, "save", save_allowed)
  reads, steps = [], []

  class CountingJax:
    def __getattr__(self, name):
      return getattr(jax, name)

    @staticmethod
    def device_get(x):
      reads.append(len(steps))
      return jax.device_get(x)

    @staticmethod
    def make_array_from_process_local_data(*args):
      steps.append(None)  # one batch placed per step
      return jax.make_array_from_process_local_data(*args)
  monkeypatch.setattr(loop, "jax", CountingJax())
  config = _config("instruct_pix2pix", shapes_dataset, total_steps=6, log_every=3,
                   checkpoint_every=100, num_samples=0, export=False)
  with jax.transfer_guard_device_to_host("disallow"):
    summary = train_and_evaluate(config, str(tmp_path))
  assert summary["step"] == 6
  batches_per_step = len(steps) // 6  # one placement per batch field
  assert len(steps) == 6 * batches_per_step
  assert sorted(set(r // batches_per_step for r in reads)) == [3, 6], reads
  assert [l["step"] for l in _read(tmp_path / "metrics.jsonl")] == [3, 6]


def _run(*args, env=None, **kw):
  return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT,
                        env={**os.environ, **(env or {})}, **kw)


def test_a_rerun_loads_its_programs_from_the_cache_and_trains_the_same_bits(tmp_path):
  """Single-process training turns on ip2p's compilation cache: the first run fills the
  folder, a second run (a fresh process and workdir) loads from it, and its parameters
  equal the first run's bit for bit."""
  worker = os.path.join(HERE, "helpers", "train_worker.py")
  cache = tmp_path / "xla"
  env = {**without_shared_cache(os.environ), "IP2P_COMPILATION_CACHE": str(cache)}
  runs, entries = [], []
  for name in ("first", "again"):
    r = subprocess.run([sys.executable, worker, "configs/tiny_ip2p.py", str(tmp_path / name),
                        str(tmp_path / f"{name}.npz"), "--steps", "2", "--samples", "0"],
                       capture_output=True, text=True, cwd=ROOT, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    runs.append(np.load(tmp_path / f"{name}.npz"))
    entries.append(sorted(f for f in os.listdir(cache) if f.endswith("-cache")))
  assert any(f.startswith("jit_step-") for f in entries[0]), entries[0]  # the train step
  assert entries[1] == entries[0]  # the rerun compiled nothing new: every program loaded
  first, again = runs
  assert sorted(first.files) == sorted(again.files)
  for k in first.files:
    np.testing.assert_array_equal(first[k], again[k], err_msg=k)


def test_sharded_8_devices_equals_one_device_and_fsdp_shrinks_params(tmp_path):
  worker = os.path.join(HERE, "helpers", "train_worker.py")
  r1 = _run(worker, "configs/tiny_ip2p.py", str(tmp_path / "w1"), str(tmp_path / "one.npz"),
            "--batch", "8")
  assert r1.returncode == 0, r1.stderr[-3000:]
  r8 = _run(worker, "configs/tiny_ip2p.py", str(tmp_path / "w8"), str(tmp_path / "eight.npz"),
            "--devices", "8", "--mesh", "data=2,fsdp=4", "--batch", "8")
  assert r8.returncode == 0, r8.stderr[-3000:]
  # Listed once at start-up: the frozen tiny VAE's 3-channel conv_out cannot split 4 ways.
  assert r8.stderr.count("cannot be sharded as the rules ask") == 1, r8.stderr[-3000:]
  assert re.search(r"frozen/vae/decoder/conv_out/kernel \(3, 3, \d+, 3\): .*does not divide",
                   r8.stderr), r8.stderr[-3000:]
  assert "cannot be sharded" not in r1.stderr
  one, eight = np.load(tmp_path / "one.npz"), np.load(tmp_path / "eight.npz")
  names = [k for k in one.files if not k.startswith("__")]
  for k in names:
    np.testing.assert_allclose(eight[k], one[k], atol=1e-5, rtol=0)
  total = sum(one[k].nbytes for k in names)
  assert int(one["__local_bytes__"]) == total
  shrink = total / int(eight["__local_bytes__"])
  assert 3.3 < shrink <= 4.0  # norms and tiny dims stay replicated


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_process_distributed_training_equals_one_process(tmp_path):
  """Two processes (each its data shard, gradients reduced across them) train the same
  params as one process that reads the same global batches (``--as-processes 2``)."""
  worker = os.path.join(HERE, "helpers", "train_worker.py")
  port = _free_port()
  procs = [subprocess.Popen(
      [sys.executable, worker, "configs/tiny_ip2p.py", str(tmp_path / "w"),
       str(tmp_path / f"p{i}.npz"), "--steps", "2", "--coordinator", f"127.0.0.1:{port}",
       "--process-id", str(i), "--num-processes", "2"], cwd=ROOT,
      env=without_shared_cache(os.environ), stdout=subprocess.DEVNULL,
      stderr=subprocess.PIPE) for i in range(2)]
  errors = [p.communicate(timeout=600)[1] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], errors[0][-3000:]
  r = _run(worker, "configs/tiny_ip2p.py", str(tmp_path / "w1"), str(tmp_path / "one.npz"),
           "--steps", "2", "--devices", "2", "--as-processes", "2")
  assert r.returncode == 0, r.stderr[-3000:]
  two, one = np.load(tmp_path / "p0.npz"), np.load(tmp_path / "one.npz")
  names = [k for k in one.files if not k.startswith("__")]
  assert sorted(names) == sorted(k for k in two.files if not k.startswith("__"))
  for k in names:
    np.testing.assert_allclose(two[k], one[k], atol=1e-5, rtol=0, err_msg=k)


def test_sigterm_saves_a_restorable_checkpoint(tmp_path):
  workdir = tmp_path / "run"
  proc = subprocess.Popen(
      [sys.executable, "scripts/train.py", "--config=configs/tiny_vae.py",
       f"--workdir={workdir}", "--config.total_steps=100000", "--config.checkpoint_every=100000",
       "--config.export=False"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  metrics = workdir / "metrics.jsonl"
  deadline = time.time() + 300
  while time.time() < deadline and not (metrics.exists() and len(open(metrics).readlines()) >= 3):
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err[-3000:]
  steps = sorted(int(d) for d in os.listdir(workdir / "checkpoints") if d.isdigit())
  assert steps and steps[-1] >= 3
  before = [l for l in open(metrics) if json.loads(l)["step"] <= steps[-1]]
  # Restorable: the same command continues from that step (it says so, runs one more
  # step, and leaves the lines of the steps before it as they were).
  r = _run("scripts/train.py", "--config=configs/tiny_vae.py", f"--workdir={workdir}",
           f"--config.total_steps={steps[-1] + 1}", "--config.export=False")
  assert r.returncode == 0, r.stderr[-3000:]
  assert f"resumed from step {steps[-1]}" in r.stdout + r.stderr
  after = open(metrics).readlines()
  assert after[:len(before)] == before and len(before) == steps[-1]
  assert [json.loads(l)["step"] for l in after[len(before):]] == [steps[-1] + 1]


def test_unknown_config_override_is_an_error(tmp_path):
  r = _run("scripts/train.py", "--config=configs/tiny_ip2p.py", f"--workdir={tmp_path}",
           "--config.not_a_key=3")
  assert r.returncode != 0 and "not_a_key" in r.stderr


def test_examples_per_s_counts_training_steps_only(shapes_dataset, tmp_path, monkeypatch):
  """Writing samples (here made to take 2 s after every step) is left out of the logged
  examples/s: with it counted, no step could log more than batch / 2 s."""
  from ip2p_jax.train import loop
  monkeypatch.setattr(loop._Samples, "write", lambda *args, **kwargs: time.sleep(2.0))
  config = _config("vae", shapes_dataset, total_steps=4, log_every=2, sample_every=1)
  train_and_evaluate(config, str(tmp_path))
  lines = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  rates = [l["examples_per_s"] for l in lines if "examples_per_s" in l]
  assert len(rates) == 2
  assert min(rates) > config.batch_size / 1.0, rates  # a step here takes well under 1 s
