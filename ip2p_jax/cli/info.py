"""``ip2p info MODEL``: what a model folder holds, checked by loading it."""
from __future__ import annotations

import json
import math


def add_parser(sub) -> None:
  from ip2p_jax.cli.common import HelpFormatter
  p = sub.add_parser("info", help="describe a diffusers-format model folder",
                     formatter_class=HelpFormatter,
                     description="Load a model folder and list its components, parameter "
                     "counts and scheduler (and the sampler that runs by default).")
  p.add_argument("model", help="pipeline folder, component folder, or cached hub id")
  p.set_defaults(run=run)


def run(args) -> int:
  import os

  import jax

  from ip2p_jax.checkpoints import CheckpointError, load_component, resolve
  from ip2p_jax.cli.common import fail

  try:
    folder = resolve(args.model)
    names = (["unet", "vae", "text_encoder"]
             if os.path.isfile(os.path.join(folder, "model_index.json")) else [""])
    for name in names:
      module, params = load_component(os.path.join(folder, name))
      count = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
      print(f"{name or os.path.basename(folder)}: {type(module).__name__}, {count:,} parameters")
    sched = os.path.join(folder, "scheduler", "scheduler_config.json")
    if os.path.isfile(sched):
      from ip2p_jax.diffusion.schedules import sampler_of_scheduler_config
      with open(sched, encoding="utf-8") as f:
        raw = json.load(f)
      print(f"scheduler: {raw.get('_class_name')} (sampler {sampler_of_scheduler_config(raw)})")
  except (CheckpointError, ValueError) as e:
    return fail(str(e))
  return 0
