"""Runs a tiny training in a subprocess (device count and distributed setup must be
fixed before jax starts) and saves the final params.

  python train_worker.py CONFIG WORKDIR OUT.npz [--devices N] [--mesh data=2,fsdp=4]
      [--steps 3] [--coordinator HOST:PORT --process-id I --num-processes N]
      [--as-processes N] [--data DATASET] [--samples N]

``--as-processes N``: one process that reads the data as N processes would (each
global batch is shard 0's per-process batch, then shard 1's, ..., the row order of
``jax.make_array_from_process_local_data``): the reference an N-process run must equal.
"""
import argparse
import dataclasses
import json
import os
import sys

p = argparse.ArgumentParser()
p.add_argument("config")
p.add_argument("workdir")
p.add_argument("out")
p.add_argument("--devices", type=int, default=1)
p.add_argument("--mesh", default="")
p.add_argument("--steps", type=int, default=3)
p.add_argument("--batch", type=int, default=4)
p.add_argument("--coordinator")
p.add_argument("--process-id", type=int, default=0)
p.add_argument("--num-processes", type=int, default=1)
p.add_argument("--as-processes", type=int, default=1)
p.add_argument("--data", default="", help="a built dataset (default: the config's)")
p.add_argument("--samples", type=int, default=-1,
               help="num_samples (0: no sample sheet), one sampling step (default: the config's)")
args = p.parse_args()
from xla_env import xla_flags  # noqa: E402  (this folder is on the path of a script)

os.environ["XLA_FLAGS"] = xla_flags(devices=args.devices)
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

import importlib.util  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import traverse_util  # noqa: E402

if args.coordinator:
  jax.distributed.initialize(coordinator_address=args.coordinator,
                             num_processes=args.num_processes, process_id=args.process_id)

from ip2p_jax.data import input_pipeline as ip  # noqa: E402
from ip2p_jax.train.loop import train_and_evaluate  # noqa: E402


class _ShardsIterator:
  """Concatenates one batch of each shard's iterator; checkpointable like grain's."""

  def __init__(self, loaders):
    self.iterators = [iter(loader) for loader in loaders]

  def __iter__(self):
    return self

  def __next__(self):
    parts = [next(it) for it in self.iterators]
    return {k: np.concatenate([np.asarray(p[k]) for p in parts]) for k in parts[0]}

  def get_state(self) -> bytes:
    return json.dumps([it.get_state().decode() for it in self.iterators]).encode()

  def set_state(self, state: bytes) -> None:
    for it, s in zip(self.iterators, json.loads(state)):
      it.set_state(s.encode())

  def start_prefetch(self) -> None:
    pass


class _ShardsLoader:
  def __init__(self, loaders):
    self.loaders = loaders

  def __iter__(self):
    return _ShardsIterator(self.loaders)


if args.as_processes > 1:
  one_process_loader = ip.make_loader

  def make_loader(source, config, **kw):
    n = args.as_processes
    per_process = dataclasses.replace(config, batch_size=config.batch_size // n)
    return _ShardsLoader([one_process_loader(source, per_process, shard_index=i, shard_count=n,
                                             **kw) for i in range(n)])

  ip.make_loader = make_loader

spec = importlib.util.spec_from_file_location("cfg", os.path.join(ROOT, args.config))
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
config = module.get_config()
config.total_steps = args.steps
config.batch_size = args.batch
config.checkpoint_every = 1000
config.export = False
if args.data:
  config.data.path = args.data
if args.samples >= 0:
  config.num_samples, config.sample_steps = args.samples, 1
for item in filter(None, args.mesh.split(",")):
  key, value = item.split("=")
  config.mesh[key] = int(value)
summary = train_and_evaluate(config, args.workdir)
state = summary["state"]
params = state.params
if jax.process_count() > 1:
  from jax.experimental import multihost_utils
  params = multihost_utils.process_allgather(params, tiled=True)
flat = {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(
    jax.device_get(params)).items()}
# Bytes of the trained params held by this process's first device.
device = jax.local_devices()[0]
local_bytes = sum(s.data.nbytes for leaf in jax.tree.leaves(state.params)
                  for s in leaf.addressable_shards if s.device == device)
np.savez(args.out, __local_bytes__=np.array(local_bytes),
         __step__=np.array(int(jax.device_get(state.step))), **flat)
