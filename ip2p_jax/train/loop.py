"""``train_and_evaluate(config, workdir)``: the training loop for every stage.

Data -> sharded global batches -> the jitted step -> orbax checkpoints (train state,
the per-process grain iterator states and the config) -> metrics.jsonl, TensorBoard
and sample images. The workdir may be a bucket (``gs://...``): every path goes through
``etils.epath``. Resume is automatic: rerunning the same command continues from the
last checkpoint in ``workdir`` and reproduces the uninterrupted run bit for bit.

Preemption: one process stops on SIGTERM; several processes stop at the step they all
agree on (JAX's preemption sync point, which the coordination service computes when any
host is signalled), save that step together, then exit cleanly.

The host reads the loss back only every ``log_every`` steps and before each checkpoint:
a non-finite loss since the last check stops the run there, naming the last good
checkpoint (the one about to be written is not written).
"""
from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import signal
import sys
import tempfile
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import grain.python as grain
from jax.sharding import NamedSharding, PartitionSpec as P

from ip2p_jax import compilation, paths, sharding
from ip2p_jax.data import builders
from ip2p_jax.data import input_pipeline as ip
from ip2p_jax.train import jobs
from ip2p_jax.train import state as state_lib
from ip2p_jax.train.metrics import MetricsWriter
from ip2p_jax.train.step import make_step

PEAK_TFLOPS = {"TPU v4": 275.0, "TPU v5 lite": 197.0, "TPU v5e": 197.0, "TPU v5p": 459.0,
               "TPU v6 lite": 918.0, "H100": 989.0, "H200": 989.0, "A100": 312.0}
BATCH_AXES = ("dcn", "data", "fsdp")
_BARRIERS = itertools.count()


class NonFiniteLoss(FloatingPointError):
  pass


def _peak_tflops(config) -> float | None:
  if config.get("device_peak_tflops"):
    return float(config.device_peak_tflops)
  kind = jax.devices()[0].device_kind
  return next((v for k, v in PEAK_TFLOPS.items() if k in kind), None)


def _dataset(config, workdir) -> str:
  """The dataset folder: ``config.data.path``, or the shapes world built into the
  workdir (a local workdir, built by process 0) or, for a bucket workdir, into a local
  temporary folder on every host (TFDS writes ArrayRecord files to local disk only;
  the world is deterministic, so every host builds the same one)."""
  if config.data.path:
    return config.data.path
  shapes = config.data.shapes
  name = f"s{shapes.size}_n{shapes.num_train}_h{shapes.num_heldout}_seed{shapes.seed}"
  cfg = builders.ShapesWorldConfig(name=name, size=shapes.size, num_train=shapes.num_train,
                                   num_heldout=shapes.num_heldout, seed=shapes.seed)
  if not paths.is_local(workdir):
    out = os.path.join(tempfile.gettempdir(), "ip2p_jax_shapes", name)
    return builders.build("shapes_world", out, cfg)[0]
  out = os.path.join(os.fspath(workdir), "data")
  if jax.process_index() == 0:
    builders.build("shapes_world", out, cfg)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices("dataset built")
  return builders.find_dataset(out)


class _Renamed:
  """A source whose records use the stage's field names (shapes triplets feed the
  caption stages through their input image and caption)."""

  def __init__(self, source, names: dict[str, str]):
    self._source, self._names = source, names

  def __len__(self):
    return len(self._source)

  def __getitem__(self, i):
    record = self._source[i]
    return {self._names.get(k, k): v for k, v in record.items()}

  def __repr__(self):
    return f"_Renamed({self._source!r}, {sorted(self._names.items())})"


def _source(path: str, split: str, stage: str):
  source = builders.open_split(path, split, skip_decoding=("input_masks", "edited_masks",
                                                           "edit_mask"))
  features = builders.features(path)
  if stage != "instruct_pix2pix" and "image" not in features:
    source = _Renamed(source, {"input_image": "image", "input_caption": "caption"})
  return source


def _loader(config, source, stage: str, tokenizer):
  if config.data.get("latents"):
    from ip2p_jax.data import latent_cache
    cache = latent_cache.LatentCacheSource(config.data.latents)
    return latent_cache.make_loader(
        cache, latent_cache.LatentLoaderConfig(batch_size=config.batch_size // jax.process_count(),
                                               seed=config.seed),
        shard_index=jax.process_index(), shard_count=jax.process_count())
  fields, text = jobs.DATA[stage]
  per_process = config.batch_size // jax.process_count()
  pipe = ip.PipelineConfig(resolution=config.data.resolution, batch_size=per_process,
                           seed=config.seed, worker_count=config.data.worker_count,
                           max_resize=config.data.max_resize, flip=config.data.flip)
  return ip.make_loader(source, pipe, kind=(fields, text), tokenizer=tokenizer)


class Console:
  """One line per ``log_every`` on process 0: a progress bar, step, loss, examples/s on
  training steps and the time left at that rate."""

  def __init__(self, total: int, enabled: bool, stream=None):
    self.total, self.enabled, self.stream = total, enabled, stream or sys.stdout

  def print(self, text: str) -> None:
    if self.enabled:
      print(text, file=self.stream, flush=True)

  def step(self, record: dict, seconds_per_step: float) -> None:
    done = record["step"]
    frac = done / max(1, self.total)
    bar = "#" * int(20 * frac) + "." * (20 - int(20 * frac))
    eta = _duration((self.total - done) * seconds_per_step)
    self.print(f"[{bar}] {100 * frac:3.0f}% step {done}/{self.total} loss "
               f"{record.get('loss', float('nan')):.4f} {record['examples_per_s']:.1f} ex/s "
               f"ETA {eta}")


def _duration(seconds: float) -> str:
  seconds = int(max(0, seconds))
  return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _placer(mesh, rules):
  """``module -> shardings`` of its parameters on ``mesh`` (for loading weights)."""
  def place(module):
    boxed = jax.eval_shape(lambda: module.init(jax.random.key(0), *module.dummy_inputs()))
    return sharding.shardings(boxed["params"], mesh, rules)
  return place


def train_and_evaluate(config, workdir) -> dict:
  """Trains ``config`` in ``workdir`` (a local folder or a bucket path; resuming if it
  holds checkpoints); returns a summary (final step, last metrics, export folder)."""
  if config.get("distributed") and jax.process_count() == 1:
    jax.distributed.initialize()
  if jax.process_count() == 1:
    # A rerun, a resume, or a second call in one notebook kernel loads the compiled step,
    # init and sampler instead of compiling them again (a 5-step tiny training process:
    # 33 -> 17 s), and they compute bit for bit what a fresh compile does (210 arrays
    # equal). Not yet for several processes: a two-process rerun that loaded every program
    # matched a fresh one bit for bit (2026-11-28), but an earlier SIGTERM-and-resume run
    # that loaded the first run's programs ended 1e-5 (relative) off an uninterrupted run
    # (tests/test_pod_scale.py), and that is not explained.
    compilation.enable_compilation_cache()
  workdir = paths.path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  if config.batch_size % (jax.process_count() * config.grad_accum_steps):
    raise ValueError(f"batch_size {config.batch_size} must divide by processes x "
                     f"grad_accum_steps = {jax.process_count() * config.grad_accum_steps}")
  mesh = sharding.make_mesh(config.mesh.to_dict())
  rules = tuple(tuple(r) for r in config.logical_axis_rules) or sharding.DEFAULT_RULES
  console = Console(config.total_steps, enabled=jax.process_index() == 0)

  from ip2p_jax.train.state import learning_rate_schedule, make_optimizer
  optimizer, schedule = make_optimizer(config), learning_rate_schedule(config)

  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    job = jobs.build(config, _placer(mesh, rules))
    dataset = _dataset(config, workdir)
    loader = _loader(config, _source(dataset, config.data.split, config.stage), config.stage,
                     job.tokenizer)
    data_iter = iter(loader)
    boxed = jax.eval_shape(job.init_params, jax.random.key(config.seed))
    abstract = jax.eval_shape(lambda p: state_lib.create(p, optimizer, config.seed), boxed)
    state_shardings = sharding.shardings(abstract, mesh, rules)
    frozen_boxed = {name: jax.eval_shape(lambda m=m: m.init(jax.random.key(0),
                                                            *m.dummy_inputs())["params"])
                    for name, m in job.frozen_modules.items()}
    frozen_shardings = sharding.shardings(frozen_boxed, mesh, rules)
    _report_unshardable({"params": boxed, "frozen": frozen_boxed}, mesh, rules)
    frozen = jax.device_put(job.frozen_params, frozen_shardings)
    abstract_state = jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
        sharding.strip_boxes(abstract), state_shardings)

    def fresh_state():
      if job.load_params is not None:
        params = jax.device_put(job.load_params(), state_shardings.params)
        return jax.jit(lambda p: state_lib.create(p, optimizer, config.seed),
                       out_shardings=state_shardings)(params)
      return jax.jit(lambda k: sharding.strip_boxes(state_lib.create(
          job.init_params(k), optimizer, config.seed)),
                     out_shardings=state_shardings)(jax.random.key(config.seed))

    checkpoints = workdir / "checkpoints"
    _align("checkpoint manager")  # its creation is the run's first collective
    manager = ocp.CheckpointManager(
        checkpoints, options=ocp.CheckpointManagerOptions(
            max_to_keep=config.keep_checkpoints, enable_async_checkpointing=True, create=True))
    start = manager.latest_step()
    if start is not None:
      restored = manager.restore(start, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state),
          data=grain.PyGrainCheckpointRestore(data_iter)))
      state = restored.state
      console.print(f"resumed from step {start} in {checkpoints}")
    else:
      state, start = fresh_state(), 0

    batch_sharding = NamedSharding(mesh, P(BATCH_AXES))
    step_fn = jax.jit(make_step(job.loss, optimizer, schedule, ema_decay=config.ema_decay,
                                grad_accum_steps=config.grad_accum_steps,
                                fused=state_lib.FusedAdamW.of(config)),
                      in_shardings=(state_shardings, frozen_shardings, batch_sharding),
                      out_shardings=(state_shardings, None), donate_argnums=(0,))

    writer = MetricsWriter(workdir, enabled=jax.process_index() == 0, resume_step=start)
    writer.config(config)
    multi = jax.process_count() > 1
    stop: list = []
    # Several processes: JAX's preemption notifier (installed by jax.distributed) must keep
    # SIGTERM; a Python handler here would replace it and let the hosts disagree.
    previous = None if multi else signal.signal(signal.SIGTERM, lambda *_: stop.append(True))

    def save(step: int):
      manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), data=grain.PyGrainCheckpointSave(data_iter),
          config=ocp.args.JsonSave(config.to_dict())), force=True)

    def check_finite(done: int):
      if not bool(jax.device_get(finite)):  # explicit: the only reads are here and at logs
        manager.wait_until_finished()
        raise NonFiniteLoss(
            f"loss is not finite at a step in ({checked[0]}, {done}]; stopping. Last good "
            f"checkpoint: step {manager.latest_step()} in {checkpoints}")
      checked[0] = done

    console.print(f"{config.stage}: steps {start} -> {config.total_steps}, batch "
                  f"{config.batch_size}, {jax.device_count()} devices, mesh "
                  f"{dict(mesh.shape)}, workdir {workdir}")
    compiled, flops, peak = None, None, _peak_tflops(config)
    metrics, record = {}, {}
    finite, checked = jnp.array(True), [start]
    samples = _Samples(config, job, dataset, state_shardings.ema_params, frozen_shardings, mesh)
    evaluate_every = (config.get("eval_every") or 0) if config.stage in (
        "instruct_pix2pix", "text_to_image") else 0
    samples_every = config.get("sample_every") or 0
    eval_cache: dict = {}
    try:
      for step in range(start, config.total_steps):
        local = next(data_iter)
        batch = {k: jax.make_array_from_process_local_data(batch_sharding, np.asarray(v))
                 for k, v in local.items() if k != "corrupt_skipped"}
        if compiled is None:
          compiled = step_fn.lower(state, frozen, batch).compile()
          _align("step compiled")
          analysis = compiled.cost_analysis()
          analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
          flops = (analysis or {}).get("flops")
          last_time, last_step, excluded = time.time(), step, 0.0
        state, metrics = compiled(state, frozen, batch)
        finite = jnp.logical_and(finite, jnp.isfinite(metrics["loss"]))  # stays on device
        done = step + 1
        last = done == config.total_steps
        if done % config.log_every == 0 or last:
          record = {k: float(v) for k, v in jax.device_get(metrics).items()}
          check_finite(done)
          now = time.time()
          seconds = max(1e-9, now - last_time - excluded) / max(1, done - last_step)
          record.update(step=done, examples_per_s=config.batch_size / seconds)
          if "corrupt_skipped" in local:
            record["corrupt_skipped"] = int(local["corrupt_skipped"].sum())
          if flops and peak:
            record["mfu"] = flops / seconds / (peak * 1e12)
          writer.write(record)
          console.step(record, seconds)
          last_time, last_step, excluded = time.time(), done, 0.0
        t0 = time.time()
        if done % config.checkpoint_every == 0 or last:
          check_finite(done)
          save(done)
        if (samples_every and done % samples_every == 0) or last:
          samples.write(state.ema_params, frozen, done, workdir)
        if evaluate_every and (done % evaluate_every == 0 or last):
          writer.write({"step": done, **_evaluate(config, job, state, frozen, done, workdir,
                                                  eval_cache)})
        if stop or (multi and manager.reached_preemption(done)):
          check_finite(done)
          if manager.latest_step() != done:
            save(done)
          console.print(f"preempted: saved step {done} in {checkpoints}, exiting")
          logging.warning("preempted: saved step %d, exiting", done)
          break
        excluded += time.time() - t0
      manager.wait_until_finished()
    finally:
      if previous is not None:
        signal.signal(signal.SIGTERM, previous)
      writer.close()
      manager.close()
    export = None
    final_step = int(jax.device_get(state.step))
    if final_step == config.total_steps and config.get("export", True):
      ema, frozen_host = _gather(state.ema_params), _gather(frozen)
      decoder_only = config.stage == "vae" and config.get("vae_train", "all") == "decoder"
      if decoder_only:  # the encoder exactly as loaded (its EMA may move in the last bit)
        trained = _gather(state.params)
        ema = {name: ema[name] if name in state_lib.VAE_DECODER else trained[name]
               for name in ema}
      if jax.process_index() == 0:
        # a frozen encoder keeps the loaded VAE's scaling factor (its latents are the same)
        calibration = (_calibration_images(config, dataset)
                       if config.stage == "vae" and not decoder_only else None)
        export = jobs.export(dataclasses.replace(job, frozen_params=frozen_host), ema,
                             workdir / "export", calibration)
        console.print(f"exported {export}")
  return {"step": final_step, "metrics": {k: float(v) for k, v in jax.device_get(metrics).items()},
          "export": export, "state": state}


def _align(name: str, minutes: float = 30.0) -> None:
  """Several processes: waits, up to ``minutes``, until all reach this point, on JAX's
  coordination service. Hosts can arrive at a first collective minutes apart (a compile,
  a busy machine), while a CPU collective (gloo) gives its peers 30 s to join."""
  if jax.process_count() > 1:  # a key is used once: every process counts its barriers
    ocp.multihost.get_barrier_sync_fn()(key=f"ip2p_jax/{name}/{next(_BARRIERS)}",
                                         timeout_ms=int(minutes * 60_000))


def _report_unshardable(boxed, mesh, rules) -> list[str]:
  """Lists once, at start-up, every parameter that cannot be sharded as its rules ask
  (replicated along that dimension instead)."""
  problems = sharding.unshardable(boxed, mesh, rules)
  if problems and jax.process_index() == 0:
    logging.warning("%d parameters cannot be sharded as the rules ask (kept replicated "
                    "along those dimensions):\n  %s", len(problems), "\n  ".join(problems))
  return problems


def _gather(tree):
  if jax.process_count() == 1:
    return jax.device_get(tree)
  from jax.experimental import multihost_utils
  return multihost_utils.process_allgather(tree, tiled=True)


class _Samples:
  """The sample sheet written every ``sample_every`` steps: fixed validation examples
  (first of the sample split) through one sampler, compiled once per run, that reads the
  EMA weights where they lie (sharded on the training mesh); every process runs it and
  process 0 writes ``WORKDIR/samples/step_N.png``. None for CLIP, which has no picture
  to show (its accuracy is in the metrics), nor with ``num_samples = 0``."""

  def __init__(self, config, job, dataset, params_shardings, frozen_shardings, mesh):
    self.config, self.job, self.dataset, self.mesh = config, job, dataset, mesh
    self.shardings = (params_shardings, frozen_shardings)
    self.compiled = None

  def _prepare(self, params, frozen):
    from PIL import Image
    config, dataset = self.config, self.dataset
    split = config.data.sample_split if config.data.sample_split in builders.splits(dataset) \
        else config.data.split
    source = _source(dataset, split, config.stage)
    res = config.data.resolution
    self.examples = []
    for i in range(min(config.num_samples, len(source))):
      record = dict(source[i])
      for k, v in list(record.items()):
        if isinstance(v, bytes):
          record[k] = v.decode("utf-8", "replace")
        elif isinstance(v, np.ndarray) and v.ndim == 3 and v.shape[-1] == 3:
          record[k] = np.asarray(Image.fromarray(v).resize((res, res), Image.Resampling.BICUBIC))
      self.examples.append(record)
    replicated = NamedSharding(self.mesh, P())
    inputs = jobs.sample_inputs(self.job, self.examples)
    self.inputs = {k: jax.make_array_from_callback(v.shape, replicated, lambda i, v=v: v[i])
                   for k, v in inputs.items()}
    fn = jobs.sampler(self.job, self.config.sample_steps)
    self.compiled = jax.jit(fn, in_shardings=(*self.shardings, replicated),
                            out_shardings=replicated).lower(params, frozen, self.inputs).compile()
    _align("sampler compiled")

  def write(self, params, frozen, step: int, workdir) -> None:
    if self.job.stage == "clip" or not self.config.num_samples:
      return
    if self.compiled is None:
      self._prepare(params, frozen)
    images = np.asarray(jax.device_get(self.compiled(params, frozen, self.inputs)))
    if jax.process_index() == 0:
      picture = jobs.sheet(self.job.stage, self.examples, images)
      paths.write_image(paths.path(workdir) / "samples" / f"step_{step:07d}.png", picture)


def _calibration_images(config, dataset, count: int = 512) -> np.ndarray:
  """The first ``count`` training images at the training resolution (uint8), from which
  the VAE export measures its latent scaling factor."""
  from PIL import Image
  source = _source(dataset, config.data.split, "vae")
  res = config.data.resolution
  images = [np.asarray(Image.fromarray(source[i]["image"]).resize((res, res),
                                                                  Image.Resampling.BICUBIC))
            for i in range(min(count, len(source)))]
  return np.stack(images)


def _evaluate(config, job, state, frozen, step, workdir, cache: dict) -> dict:
  """Held-out success of the EMA model during training (``eval_every``), logged as
  ``eval/...`` and drawn in ``WORKDIR/eval/step_N.png``. Stage 2: the first ``eval_num``
  examples of the shapes world's held-out split at the training resolution, edited with
  the CLI's default guidance and ``eval_steps`` steps and scored against their exact
  targets (``ip2p_jax.metrics``). Stage 1: those examples' input captions drawn and
  judged by colour (``metrics.scene_match``: background, object colours). The pipeline
  (and so its compiled sampler) is built once per run and kept in ``cache``."""
  from ip2p_jax import metrics
  from ip2p_jax.metrics import report, scene_match
  ema = _gather(state.ema_params)
  if "frozen" not in cache:
    cache["frozen"] = _gather(frozen)
  if jax.process_index() != 0:
    return {}
  if "pipe" not in cache:
    cache["pipe"] = jobs.pipeline(dataclasses.replace(job, frozen_params=cache["frozen"]), ema)
    cache["examples"] = metrics.heldout_examples(config.eval_num, config.data.resolution,
                                                 seed=config.eval_seed)
  examples, pipe = cache["examples"], cache["pipe"]
  picture = paths.path(workdir) / "eval" / f"step_{step:07d}.png"
  if job.stage == "text_to_image":
    pipe.set_params({**pipe.params, "unet": ema})
    result = scene_match.text_to_image_match(
        pipe, [e.input_scene for e in examples], num_inference_steps=config.eval_steps,
        seed=config.eval_seed, batch_size=config.eval_batch_size)
    shown = [{"caption": e.input_caption, "image": e.input_image} for e in examples[:16]]
    paths.write_image(picture, jobs.sheet(job.stage, shown, result.pop("images")[:16] / 255.0,
                                          headers=("the caption's scene", "generated")))
    return {f"eval/t2i/{k}": v for k, v in result.items() if k != "num"}
  result = metrics.evaluate(pipe, examples, num_inference_steps=config.eval_steps,
                            seed=config.eval_seed, batch_size=config.eval_batch_size,
                            params={**pipe.params, "unet": ema})
  rows = report.sheet_rows([e.edit_type for e in examples], min(22, len(examples)))
  paths.write_image(picture, report.sheet(examples, result["outputs"], result["examples"], rows))
  return metrics.scalars(result)
