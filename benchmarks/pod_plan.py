"""The pod plan: per-step cost of the SD 1.5 stage-2 (InstructPix2Pix) train step, from
an AOT-compiled step on a simulated 8-device CPU mesh, scaled to TPU pods.

  python benchmarks/pod_plan.py [--per-device-batch 16] [--devices 8] [--json out.json]

No weights are needed: parameters, optimizer state and frozen encoders are
``jax.eval_shape`` structures; the step of ``configs/sd15_ip2p_tpu_pod.py`` (bf16 compute,
fp32 master weights, remat, FSDP over every device, VAE and CLIP-L run inside the step) is
lowered and compiled for ``--devices`` CPU devices with the pod's per-device batch
(1024 / 64 chips = 16). XLA's ``cost_analysis`` gives the per-device FLOPs and bytes
accessed of the partitioned program, ``memory_analysis`` its per-device memory, and the
compiled HLO's all-gather / reduce-scatter / all-reduce ops give the collective bytes.
Under FSDP a device's FLOPs depend on its batch, not on the device count, so the FLOPs
carry over to a pod; the collective bytes per device are ~2x the sharded weights
whatever the count. Step time on a chip = FLOPs / (peak x MFU), reported at the peak and
at an assumed MFU; it is an estimate, not a measurement on a TPU.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

# Published per-chip peaks (bf16 dense) and interconnect, from Google Cloud's TPU pages:
#   v5e: https://cloud.google.com/tpu/docs/v5e  (197 TFLOP/s, 16 GB HBM at 819 GB/s,
#        bidirectional ICI 400 GB/s per chip; v5e-64 = 64 chips, one TensorCore each)
#   v5p: https://cloud.google.com/tpu/docs/v5p  (459 TFLOP/s, 95 GiB HBM at 2,765 GB/s,
#        bidirectional ICI 1,200 GB/s per chip; v5p-128 = 4x4x4 = 128 TensorCores = 64 chips)
PODS = {
    "v5e-64": dict(chips=64, tflops=197.0, hbm_gib=16, hbm_gbps=819, ici_gbps=400),
    "v5p-128": dict(chips=64, tflops=459.0, hbm_gib=95, hbm_gbps=2765, ici_gbps=1200),
}
ASSUMED_MFU = 0.4  # a diffusion UNet at 256 px in bf16 with remat; an assumption, see BENCHMARKS.md


def _collective_bytes(hlo: str) -> dict[str, int]:
  """Bytes produced by each kind of collective in an HLO module's text."""
  sizes = {"bf16": 2, "f16": 2, "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u8": 1,
           "s8": 1, "pred": 1}
  out: dict[str, int] = {}
  pattern = re.compile(r"=\s*(\(?[^=]*?\)?)\s+(all-gather|reduce-scatter|all-reduce|"
                       r"all-to-all|collective-permute)(?:-start)?\(")
  for line in hlo.splitlines():
    m = pattern.search(line)
    if not m:
      continue
    total = 0
    for dtype, dims in re.findall(r"(\w+)\[([\d,]*)\]", m.group(1)):
      if dtype in sizes:
        n = 1
        for d in filter(None, dims.split(",")):
          n *= int(d)
        total += n * sizes[dtype]
    out[m.group(2)] = out.get(m.group(2), 0) + total
  return out


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--devices", type=int, default=8)
  p.add_argument("--per-device-batch", type=int, default=16)
  p.add_argument("--resolution", type=int, default=256)
  p.add_argument("--json", default="")
  args = p.parse_args()
  os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec as P

  from configs import sd15_ip2p_tpu_pod
  from ip2p_jax import sharding
  from ip2p_jax.train import jobs
  from ip2p_jax.train import state as state_lib
  from ip2p_jax.train.step import make_step

  config = sd15_ip2p_tpu_pod.get_config()
  config.data.resolution = args.resolution
  config.batch_size = args.per_device_batch * args.devices
  # Abstract encoders: shapes only, nothing allocated or initialised.
  jobs._random_params = lambda m, k: sharding.strip_boxes(jax.eval_shape(
      lambda: m.init(k, *m.dummy_inputs()))["params"])
  mesh = sharding.make_mesh(config.mesh.to_dict())
  rules = tuple(tuple(r) for r in config.logical_axis_rules)
  optimizer, schedule = state_lib.make_optimizer(config), state_lib.learning_rate_schedule(config)
  started = time.time()
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    job = jobs.build(config)
    boxed = jax.eval_shape(lambda k: job.module.init(k, *job.module.dummy_inputs())["params"],
                           jax.random.key(0))
    abstract = jax.eval_shape(lambda p: state_lib.create(p, optimizer, 0), boxed)
    state_sh = sharding.shardings(abstract, mesh, rules)
    frozen_boxed = {n: jax.eval_shape(lambda m=m: m.init(jax.random.key(0), *m.dummy_inputs())
                                      ["params"]) for n, m in job.frozen_modules.items()}
    frozen_sh = sharding.shardings(frozen_boxed, mesh, rules)
    as_input = lambda tree, sh: jax.tree.map(
        lambda s, h: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=h),
        sharding.strip_boxes(tree), sh)
    state, frozen = as_input(abstract, state_sh), as_input(frozen_boxed, frozen_sh)
    batch_sh = NamedSharding(mesh, P(("dcn", "data", "fsdp")))
    b, r = config.batch_size, config.data.resolution
    batch = {"input_image": jax.ShapeDtypeStruct((b, r, r, 3), jnp.uint8, sharding=batch_sh),
             "edited_image": jax.ShapeDtypeStruct((b, r, r, 3), jnp.uint8, sharding=batch_sh),
             "input_ids": jax.ShapeDtypeStruct((b, 77), jnp.int32, sharding=batch_sh)}
    step = jax.jit(make_step(job.loss, optimizer, schedule, ema_decay=config.ema_decay),
                   in_shardings=(state_sh, frozen_sh, batch_sh),
                   out_shardings=(state_sh, None), donate_argnums=(0,))
    lowered = step.lower(state, frozen, batch)
    compiled = lowered.compile()
  compile_s = time.time() - started
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  memory = compiled.memory_analysis()
  collectives = _collective_bytes(compiled.as_text())
  unet_params = sum(x.size for x in jax.tree.leaves(sharding.strip_boxes(boxed)))
  frozen_params = sum(x.size for x in jax.tree.leaves(sharding.strip_boxes(frozen_boxed)))
  flops = float(cost["flops"])
  result = {
      "devices": args.devices, "per_device_batch": args.per_device_batch,
      "resolution": args.resolution, "global_batch_simulated": config.batch_size,
      "unet_params": int(unet_params), "frozen_params": int(frozen_params),
      "flops_per_device_step": flops,
      "flops_per_example": flops / args.per_device_batch,
      "bytes_accessed_per_device_step": float(cost.get("bytes accessed", 0.0)),
      "collective_bytes_per_device_step": collectives,
      "memory_per_device": {k: int(getattr(memory, k)) for k in (
          "argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
          "generated_code_size_in_bytes", "alias_size_in_bytes") if hasattr(memory, k)},
      "compile_s": compile_s, "device_kind": jax.devices()[0].device_kind,
      "assumed_mfu": ASSUMED_MFU, "pods": {},
  }
  state_bytes = 4 * unet_params * 4 + 4 * frozen_params  # params, EMA, Adam mu/nu (fp32); frozen fp32
  for name, pod in PODS.items():
    peak = pod["tflops"] * 1e12
    at_peak = flops / peak
    gather = 2 * 4 * (unet_params + frozen_params)  # FSDP: all-gather fwd (+remat) and reduce-scatter, fp32
    result["pods"][name] = {
        "chips": pod["chips"], "global_batch": args.per_device_batch * pod["chips"],
        "step_s_at_peak": at_peak, "step_s_at_assumed_mfu": at_peak / ASSUMED_MFU,
        "steps_per_s_at_assumed_mfu": ASSUMED_MFU / at_peak,
        "examples_per_s_at_assumed_mfu": ASSUMED_MFU / at_peak * args.per_device_batch * pod["chips"],
        "fsdp_collective_s_lower_bound": gather / (pod["ici_gbps"] * 1e9),
        "train_state_gib_per_chip": state_bytes / pod["chips"] / 2**30,
        "hours_for_10k_steps_at_assumed_mfu": 10_000 * at_peak / ASSUMED_MFU / 3600,
    }
  text = json.dumps(result, indent=2)
  print(text)
  if args.json:
    with open(args.json, "w") as f:
      f.write(text + "\n")


if __name__ == "__main__":
  main()
