"""Shards every UNet the loader accepts on 8 forced CPU devices (the device count must be
fixed before jax starts, hence a subprocess) and prints one JSON line per (UNet, mesh):
parameter count, bytes of the largest per-device share, and the parameters that could
not be sharded as the rules ask.

  python shard_unets.py
"""
import json
import os
import sys

from xla_env import xla_flags  # noqa: E402  (this folder is on the path of a script)

os.environ["XLA_FLAGS"] = xla_flags(devices=8)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from configs import models  # noqa: E402
from configs.common import FSDP_RULES  # noqa: E402
from ip2p_jax import sharding  # noqa: E402
from ip2p_jax.checkpoints import module_from_config  # noqa: E402

UNETS = {"sd15": models.SD15_UNET, "sd2": models.SD2_UNET, "ip2p": models.IP2P_UNET,
         "tiny_sd2": {**models.TINY_UNET, "use_linear_projection": True}}
MESHES = {"data=2,fsdp=4": dict(data=2, fsdp=4), "fsdp=2,tensor=4": dict(fsdp=2, tensor=4),
          "fsdp=8": dict(fsdp=8)}  # conv_out (4 channels) cannot split 8 ways
rules = tuple((name, tuple(t) if isinstance(t, list) else t) for name, t in FSDP_RULES)
for name, raw in UNETS.items():
  module = module_from_config(raw, dtype=jnp.bfloat16)
  for mesh_name, shape in MESHES.items():
    mesh = sharding.make_mesh(shape)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      boxed = jax.eval_shape(lambda: module.init(jax.random.key(0), *module.dummy_inputs()))
    shards = sharding.shardings(boxed, mesh, rules)
    leaves = jax.tree.leaves(sharding.strip_boxes(boxed))
    total = sum(int(np.prod(l.shape)) * 4 for l in leaves)
    # Every sharding is valid for its array; the per-device share of the bytes follows.
    local = sum(int(np.prod(s.shard_shape(l.shape))) * 4
                for l, s in zip(leaves, jax.tree.leaves(shards)))
    print(json.dumps({"unet": name, "mesh": mesh_name, "params": sum(
        int(np.prod(l.shape)) for l in leaves), "bytes": total, "device_bytes": local,
        "unshardable": sharding.unshardable(boxed, mesh, rules)}), flush=True)
