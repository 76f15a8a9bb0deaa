"""Runs a tiny training in a subprocess (device count and distributed setup must be
fixed before jax starts) and saves the final params.

  python train_worker.py CONFIG WORKDIR OUT.npz [--devices N] [--mesh data=2,fsdp=4]
      [--steps 3] [--coordinator HOST:PORT --process-id I --num-processes N]
"""
import argparse
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
args = p.parse_args()
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

import importlib.util  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import traverse_util  # noqa: E402

if args.coordinator:
  jax.distributed.initialize(coordinator_address=args.coordinator,
                             num_processes=args.num_processes, process_id=args.process_id)

from ip2p_jax.train.loop import train_and_evaluate  # noqa: E402

spec = importlib.util.spec_from_file_location("cfg", os.path.join(ROOT, args.config))
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
config = module.get_config()
config.total_steps = args.steps
config.batch_size = args.batch
config.checkpoint_every = 1000
config.export = False
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
np.savez(args.out, __local_bytes__=np.array(local_bytes), **flat)
