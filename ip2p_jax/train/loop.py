"""``train_and_evaluate(config, workdir)``: the training loop for every stage.

Data -> sharded global batches -> the jitted step -> orbax checkpoints (train state,
the per-process grain iterator states and the config) -> metrics.jsonl, TensorBoard
and sample images. Resume is automatic: rerunning the same command continues from
the last checkpoint in ``workdir`` and reproduces the uninterrupted run bit for bit.
SIGTERM (TPU preemption) saves a checkpoint and exits cleanly; a NaN/Inf loss stops
the run naming the last good checkpoint.
"""
from __future__ import annotations

import logging
import os
import signal
import time

import flax.linen as nn
import jax
import numpy as np
import orbax.checkpoint as ocp
import grain.python as grain
from jax.sharding import NamedSharding, PartitionSpec as P

from ip2p_jax import sharding
from ip2p_jax.data import builders
from ip2p_jax.data import input_pipeline as ip
from ip2p_jax.train import jobs
from ip2p_jax.train import state as state_lib
from ip2p_jax.train.metrics import MetricsWriter
from ip2p_jax.train.step import make_step

PEAK_TFLOPS = {"TPU v4": 275.0, "TPU v5 lite": 197.0, "TPU v5e": 197.0, "TPU v5p": 459.0,
               "TPU v6 lite": 918.0, "H100": 989.0, "H200": 989.0, "A100": 312.0}


class NonFiniteLoss(FloatingPointError):
  pass


def _peak_tflops(config) -> float | None:
  if config.get("device_peak_tflops"):
    return float(config.device_peak_tflops)
  kind = jax.devices()[0].device_kind
  return next((v for k, v in PEAK_TFLOPS.items() if k in kind), None)


def _dataset(config, workdir: str) -> str:
  """The dataset folder: ``config.data.path``, or the shapes world built into the workdir."""
  if config.data.path:
    return config.data.path
  shapes = config.data.shapes
  out = os.path.join(workdir, "data")
  cfg = builders.ShapesWorldConfig(
      name=f"s{shapes.size}_n{shapes.num_train}_h{shapes.num_heldout}_seed{shapes.seed}",
      size=shapes.size, num_train=shapes.num_train, num_heldout=shapes.num_heldout,
      seed=shapes.seed)
  if jax.process_index() == 0:
    path, _ = builders.build("shapes_world", out, cfg)
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


def train_and_evaluate(config, workdir: str) -> dict:
  """Trains ``config`` in ``workdir`` (resuming if it holds checkpoints); returns a
  summary (final step, last metrics, export folder)."""
  if config.get("distributed") and jax.process_count() == 1:
    jax.distributed.initialize()
  os.makedirs(workdir, exist_ok=True)
  if config.batch_size % (jax.process_count() * config.grad_accum_steps):
    raise ValueError(f"batch_size {config.batch_size} must divide by processes x "
                     f"grad_accum_steps = {jax.process_count() * config.grad_accum_steps}")
  mesh = sharding.make_mesh(config.mesh.to_dict())
  rules = tuple(tuple(r) for r in config.logical_axis_rules) or sharding.DEFAULT_RULES
  job = jobs.build(config)
  dataset = _dataset(config, workdir)
  loader = _loader(config, _source(dataset, config.data.split, config.stage), config.stage,
                   job.tokenizer)
  data_iter = iter(loader)

  from ip2p_jax.train.state import learning_rate_schedule, make_optimizer
  optimizer, schedule = make_optimizer(config), learning_rate_schedule(config)

  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    boxed = jax.eval_shape(job.init_params, jax.random.key(config.seed))
    abstract = jax.eval_shape(lambda p: state_lib.create(p, optimizer, config.seed), boxed)
    state_shardings = sharding.shardings(abstract, mesh, rules)
    frozen_boxed = {name: jax.eval_shape(lambda m=m: m.init(jax.random.key(0),
                                                            *m.dummy_inputs())["params"])
                    for name, m in job.frozen_modules.items()}
    frozen_shardings = sharding.shardings(frozen_boxed, mesh, rules)
    frozen = jax.device_put(job.frozen_params, frozen_shardings)
    abstract_state = jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
        sharding.strip_boxes(abstract), state_shardings)

    def fresh_state():
      if job.loaded_params is not None:
        params = jax.device_put(job.loaded_params, state_shardings.params)
        return jax.jit(lambda p: state_lib.create(p, optimizer, config.seed),
                       out_shardings=state_shardings)(params)
      return jax.jit(lambda k: sharding.strip_boxes(state_lib.create(
          job.init_params(k), optimizer, config.seed)),
                     out_shardings=state_shardings)(jax.random.key(config.seed))

    manager = ocp.CheckpointManager(
        os.path.abspath(os.path.join(workdir, "checkpoints")),
        options=ocp.CheckpointManagerOptions(max_to_keep=config.keep_checkpoints,
                                             enable_async_checkpointing=True, create=True))
    start = manager.latest_step()
    if start is not None:
      restored = manager.restore(start, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state),
          data=grain.PyGrainCheckpointRestore(data_iter)))
      state = restored.state
      logging.info("resumed from step %d", start)
    else:
      state, start = fresh_state(), 0

    batch_sharding = NamedSharding(mesh, P(("data", "fsdp")))
    step_fn = jax.jit(make_step(job.loss, optimizer, schedule, ema_decay=config.ema_decay,
                                grad_accum_steps=config.grad_accum_steps),
                      in_shardings=(state_shardings, frozen_shardings, batch_sharding),
                      out_shardings=(state_shardings, None), donate_argnums=(0,))

    writer = MetricsWriter(workdir, enabled=jax.process_index() == 0, resume_step=start)
    writer.config(config)
    stop: list = []
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.append(True))

    def save(step: int):
      manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), data=grain.PyGrainCheckpointSave(data_iter),
          config=ocp.args.JsonSave(config.to_dict())), force=True)

    compiled, flops, peak = None, None, _peak_tflops(config)
    metrics, last_time, last_step = {}, time.time(), start
    samples_every = config.get("sample_every") or 0
    evaluate_every = (config.get("eval_every") or 0) if config.stage == "instruct_pix2pix" else 0
    eval_cache: dict = {}
    try:
      for step in range(start, config.total_steps):
        local = next(data_iter)
        batch = {k: jax.make_array_from_process_local_data(batch_sharding, np.asarray(v))
                 for k, v in local.items() if k != "corrupt_skipped"}
        if compiled is None:
          compiled = step_fn.lower(state, frozen, batch).compile()
          analysis = compiled.cost_analysis()
          analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
          flops = (analysis or {}).get("flops")
        state, metrics = compiled(state, frozen, batch)
        loss = float(metrics["loss"])
        done = step + 1
        if not np.isfinite(loss):
          manager.wait_until_finished()
          raise NonFiniteLoss(
              f"loss is {loss} at step {done}; stopping. Last good checkpoint: step "
              f"{manager.latest_step()} in {os.path.join(workdir, 'checkpoints')}")
        if done % config.log_every == 0 or done == config.total_steps:
          now = time.time()
          seconds = (now - last_time) / max(1, done - last_step)
          record = {k: float(v) for k, v in jax.device_get(metrics).items()}
          record.update(step=done, examples_per_s=config.batch_size / seconds)
          if "corrupt_skipped" in local:
            record["corrupt_skipped"] = int(local["corrupt_skipped"].sum())
          if flops and peak:
            record["mfu"] = flops / seconds / (peak * 1e12)
          writer.write(record)
          last_time, last_step = now, done
        if done % config.checkpoint_every == 0 or done == config.total_steps:
          save(done)
        if (samples_every and done % samples_every == 0) or done == config.total_steps:
          _write_samples(config, job, state, dataset, done, workdir)
        if evaluate_every and (done % evaluate_every == 0 or done == config.total_steps):
          writer.write({"step": done, **_evaluate(config, job, state, done, workdir, eval_cache)})
        if stop or (jax.process_count() > 1 and manager.reached_preemption(done)):
          if manager.latest_step() != done:
            save(done)
          logging.warning("SIGTERM: saved step %d, exiting", done)
          break
      manager.wait_until_finished()
    finally:
      signal.signal(signal.SIGTERM, previous)
      writer.close()
      manager.close()
    export = None
    final_step = int(jax.device_get(state.step))
    if final_step == config.total_steps and config.get("export", True):
      ema = _gather(state.ema_params)
      if jax.process_index() == 0:
        calibration = _calibration_images(config, dataset) if config.stage == "vae" else None
        export = jobs.export(job, ema, os.path.join(workdir, "export"), calibration)
  return {"step": final_step, "metrics": {k: float(v) for k, v in jax.device_get(metrics).items()},
          "export": export, "state": state}


def _gather(tree):
  if jax.process_count() == 1:
    return jax.device_get(tree)
  from jax.experimental import multihost_utils
  return multihost_utils.process_allgather(tree, tiled=True)


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


def _evaluate(config, job, state, step, workdir, cache: dict) -> dict:
  """Held-out edit success of the EMA model during training (``eval_every``): the first
  ``eval_num`` examples of the shapes world's held-out split at the training resolution,
  edited with the CLI's default guidance and ``eval_steps`` steps and scored against their
  exact targets (``ip2p_jax.metrics``). Returns the metrics logged as ``eval/...``; the
  edits are drawn in ``WORKDIR/eval/step_N.png``. The pipeline (and so its compiled
  sampler) is built once per run and kept in ``cache``."""
  from ip2p_jax import metrics
  from ip2p_jax.images import save
  from ip2p_jax.metrics import report
  ema = _gather(state.ema_params)
  if jax.process_index() != 0:
    return {}
  if "pipe" not in cache:
    cache["pipe"] = jobs.pipeline(job, ema)
    cache["examples"] = metrics.heldout_examples(config.eval_num, config.data.resolution,
                                                 seed=config.eval_seed)
  examples = cache["examples"]
  result = metrics.evaluate(cache["pipe"], examples, num_inference_steps=config.eval_steps,
                            seed=config.eval_seed, batch_size=config.eval_batch_size,
                            params={**cache["pipe"].params, "unet": ema})
  rows = report.sheet_rows([e.edit_type for e in examples], min(22, len(examples)))
  save(report.sheet(examples, result["outputs"], result["examples"], rows),
       os.path.join(workdir, "eval", f"step_{step:07d}.png"))
  return metrics.scalars(result)


def _write_samples(config, job, state, dataset, step, workdir):
  """A PNG of the EMA model on fixed validation examples (first of the sample split);
  none for CLIP, which has no picture to show (its accuracy is in the metrics)."""
  if job.stage == "clip":
    return
  ema = _gather(state.ema_params)
  if jax.process_index() != 0:
    return
  from ip2p_jax.images import save
  from PIL import Image
  split = config.data.sample_split if config.data.sample_split in builders.splits(dataset) \
      else config.data.split
  source = _source(dataset, split, config.stage)
  res = config.data.resolution
  examples = []
  for i in range(min(config.num_samples, len(source))):
    record = dict(source[i])
    for k, v in list(record.items()):
      if isinstance(v, bytes):
        record[k] = v.decode("utf-8", "replace")
      elif isinstance(v, np.ndarray) and v.ndim == 3 and v.shape[-1] == 3:
        record[k] = np.asarray(Image.fromarray(v).resize((res, res), Image.Resampling.BICUBIC))
    examples.append(record)
  grid = jobs.samples(job, ema, examples, config.sample_steps)
  save(Image.fromarray(grid), os.path.join(workdir, "samples", f"step_{step:07d}.png"))
