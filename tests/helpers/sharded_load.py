"""Loads a saved tiny UNet shard by shard on 8 forced CPU devices (mesh data=2, fsdp=4)
and prints one JSON line: whether the values equal a plain load, and what was read from
the file for each parameter (every read is recorded on the memory-mapped tensors).

  python sharded_load.py FOLDER
"""
import json
import os
import sys

from xla_env import xla_flags  # noqa: E402  (this folder is on the path of a script)

os.environ["XLA_FLAGS"] = xla_flags(devices=8)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import traverse_util  # noqa: E402

from configs import models  # noqa: E402
from configs.common import FSDP_RULES  # noqa: E402
from ip2p_jax import sharding  # noqa: E402
from ip2p_jax.checkpoints import io, load_component, module_from_config, save_component  # noqa: E402


class Recording(np.ndarray):
  """A tensor of the file that records the size of every slice read from it."""
  reads: list = []

  def __array_finalize__(self, obj):
    self.name = getattr(obj, "name", None)

  def __getitem__(self, index):
    out = super().__getitem__(index)
    Recording.reads.append((self.name, int(np.size(out)), int(self.size)))
    return out


folder = sys.argv[1]
module = module_from_config(models.TINY_IP2P_UNET)
params = nn.unbox(module.init(jax.random.key(0), *module.dummy_inputs())["params"])
save_component(folder, module, params)
_, plain = load_component(folder)

load = io.safetensors.load


def recording_load(path):
  out = {}
  for name, array in load(path).items():
    out[name] = array.view(Recording)
    out[name].name = name
  return out


io.safetensors.load = recording_load
mesh = sharding.make_mesh(dict(data=2, fsdp=4))
rules = tuple((name, tuple(t) if isinstance(t, list) else t) for name, t in FSDP_RULES)
placed = {}


def place(m):
  boxed = jax.eval_shape(lambda: m.init(jax.random.key(0), *m.dummy_inputs()))["params"]
  placed.update(traverse_util.flatten_dict(sharding.shardings(boxed, mesh, rules)))
  return sharding.shardings(boxed, mesh, rules)


with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
  _, sharded = load_component(folder, shardings=place)
flat, reference = traverse_util.flatten_dict(sharded), traverse_util.flatten_dict(plain)
from ip2p_jax.checkpoints import formats  # noqa: E402
by_key = {formats.torch_key(p): p for p in flat}
whole, partial = [], 0
for name, n, total in Recording.reads:
  path = by_key[name]
  if placed[path].is_fully_replicated:
    continue
  if n == total:
    whole.append(name)
  partial += 1
print(json.dumps({
    "equal": all(np.array_equal(np.asarray(flat[p]), np.asarray(reference[p])) for p in flat),
    "placed": all(flat[p].sharding == placed[p] for p in flat),
    "sharded_params": sum(not s.is_fully_replicated for s in placed.values()),
    "reads_of_sharded_params": partial, "whole_reads_of_sharded_params": whole,
    "elements_read": sum(n for _, n, _ in Recording.reads),
    "elements_per_device_copy": sum(int(np.prod(placed[p].shard_shape(a.shape))) * 8
                                    for p, a in flat.items())}))
