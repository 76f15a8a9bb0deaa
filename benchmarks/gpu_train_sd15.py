"""GPU train-step benchmark at Stable Diffusion 1.5 size: the stage-2 (InstructPix2Pix)
step of ``configs/sd15_ip2p_tpu_pod.py`` on one device: SD 1.5 UNet with 8 input
channels, frozen SD VAE and CLIP ViT-L/14 text encoder inside the step, 256 px, bf16
compute with float32 master weights, AdamW + EMA. Random weights of the real shapes.

  python benchmarks/gpu_train_sd15.py [--batch 8 16 32] [--steps 10] [--remat]
  python benchmarks/gpu_train_sd15.py --tiny   # a CPU run of the same code, seconds

Reports steps/s, images/s and MFU against the device's published bf16 dense peak
(``--peak-tflops`` overrides the table below): "step" counts every FLOP XLA's
``cost_analysis`` gives for the compiled step (VAE and text encoders, UNet forward and
backward, rematerialisation when on, optimizer); "UNet" counts only the UNet's forward
and backward at this batch (``common.UnetFlops``: XLA's cost analysis of the UNet
lowered for a CPU, nothing compiled, attention counted as XLA's kernel), the number usually
quoted as training MFU. With PyTorch on CUDA and diffusers installed, the same step
in PyTorch (diffusers' models, bf16 autocast, SDPA, AdamW) runs on the same shapes for
the ratio.
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from common import (exclusive_device, host_random_params, machine, reference_seconds,
                    UnetFlops)

# Published dense bf16 peaks (TFLOP/s, without sparsity), by device_kind substring:
#   H100 SXM / H200: NVIDIA H100 and H200 datasheets, 989 TFLOP/s; H100 PCIe 756;
#   A100: NVIDIA A100 datasheet, 312.
PEAK_TFLOPS = (("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("A100", 312.0),
               ("L4", 121.0))


def peak_tflops(device_kind: str) -> float | None:
  for name, tflops in PEAK_TFLOPS:
    if name.lower() in device_kind.lower():
      return tflops
  return None


def build(tiny: bool, resolution: int, remat: bool):
  """``(config, job)`` of the SD 1.5 stage-2 step (or the tiny models for a CPU run)."""
  from configs import models, sd15_ip2p_tpu_pod
  from ip2p_jax.train import jobs
  config = sd15_ip2p_tpu_pod.get_config()
  config.distributed = False
  config.mesh.fsdp = 1
  config.mesh.data = -1
  config.model.remat = remat
  config.data.resolution = resolution
  if tiny:
    config.model.unet = models.TINY_IP2P_UNET
    config.model.vae = models.TINY_VAE
    config.model.text_encoder = models.TINY_CLIP_TEXT
  # the frozen encoders' random weights, drawn on the host and read back as folders
  import tempfile

  import jax.numpy as jnp

  from ip2p_jax.checkpoints import module_from_config, save_component
  for name, preset in (("vae", config.model.vae), ("text_encoder", config.model.text_encoder)):
    module = module_from_config(dict(preset), dtype=jnp.float32, param_dtype=jnp.float32)
    folder = tempfile.mkdtemp(prefix=f"bench_{name}_")
    save_component(folder, module, host_random_params(module, seed=1))
    config.model[f"{name}_from"] = folder
  return config, jobs.build(config)


def flops_of(program) -> float | None:
  """FLOPs of a compiled program from XLA's cost analysis, or None where the backend gives
  none (cuDNN's custom calls are not counted in it either)."""
  cost = program.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost["flops"]) if cost and "flops" in cost else None


def run_ours(config, job, batch_size: int, steps: int):
  """``(seconds per step, step FLOPs, UNet forward+backward FLOPs, compile s)``."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp

  from ip2p_jax import sharding
  from ip2p_jax import tokenizer as tokenizers
  from ip2p_jax.train import state as state_lib
  from ip2p_jax.train.step import make_step

  r = config.data.resolution
  latent = r // 2 ** (len(config.model.vae["block_out_channels"]) - 1)
  unet_flops = UnetFlops(config.model.unet.to_dict(), batch_size, latent, backward=True,
                         dtype=config.model.compute_dtype, param_dtype="float32")
  optimizer = state_lib.make_optimizer(config)
  schedule = state_lib.learning_rate_schedule(config)
  mesh = sharding.make_mesh(config.mesh.to_dict())
  rules = tuple(tuple(r) for r in config.logical_axis_rules)
  rng = np.random.default_rng(0)
  batch = {"input_image": rng.integers(0, 256, (batch_size, r, r, 3), dtype=np.uint8),
           "edited_image": rng.integers(0, 256, (batch_size, r, r, 3), dtype=np.uint8),
           "input_ids": tokenizers.tokenize(job.tokenizer, ["make it snowy"] * batch_size)}
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    started = time.perf_counter()
    params = host_random_params(job.module)
    print(f"# UNet initialised in {time.perf_counter() - started:.1f} s", flush=True)
    state = state_lib.create(params, optimizer, 0)
    step = jax.jit(make_step(job.loss, optimizer, schedule, ema_decay=config.ema_decay),
                   donate_argnums=(0,))
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    started = time.perf_counter()
    compiled = step.lower(state, job.frozen_params, batch).compile()
    compile_s = time.perf_counter() - started
    print(f"# batch {batch_size}: step compiled in {compile_s:.1f} s", flush=True)
    state, metrics = compiled(state, job.frozen_params, batch)
    jax.block_until_ready(metrics)
    with exclusive_device():
      started = time.perf_counter()
      for _ in range(steps):
        state, metrics = compiled(state, job.frozen_params, batch)
      jax.block_until_ready(metrics)
      seconds = (time.perf_counter() - started) / steps
    print(f"# ours, batch {batch_size}: {seconds:.4f} s/step, compile {compile_s:.0f} s",
          flush=True)

  return seconds, flops_of(compiled), unet_flops.value(), compile_s


def run_torch(config, batch_size: int, steps: int) -> float | None:
  """Seconds per step of the same step in PyTorch on CUDA (bf16 autocast, SDPA), or None
  without CUDA or diffusers."""
  try:
    import diffusers
    import torch
    import transformers
  except ImportError:
    return None
  if not torch.cuda.is_available():
    return None
  dev = torch.device("cuda")
  unet = diffusers.UNet2DConditionModel(**{k: v for k, v in config.model.unet.items()
                                            if not k.startswith("_")}).to(dev).train()
  vae = diffusers.AutoencoderKL(**{k: v for k, v in config.model.vae.items()
                                   if not k.startswith("_")}).to(dev).eval()
  text = transformers.CLIPTextModel(transformers.CLIPTextConfig(**{
      k: v for k, v in config.model.text_encoder.items()
      if k not in ("architectures", "model_type")})).to(dev).eval()
  opt = torch.optim.AdamW(unet.parameters(), lr=1e-4, weight_decay=1e-2)
  ac = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, device=dev) ** 2
  ac = torch.cumprod(1 - ac, 0)
  r = config.data.resolution
  images = torch.rand(2, batch_size, 3, r, r, device=dev) * 2 - 1
  ids = torch.randint(0, 49407, (batch_size, 77), device=dev)

  def step():
    with torch.autocast("cuda", dtype=torch.bfloat16):
      with torch.no_grad():
        latents = vae.encode(images[0]).latent_dist.sample() * 0.18215
        cond = vae.encode(images[1]).latent_dist.mode()
        states = text(ids)[0]
      noise = torch.randn_like(latents)
      t = torch.randint(0, 1000, (batch_size,), device=dev)
      a = ac[t].view(-1, 1, 1, 1)
      pred = unet(torch.cat([a.sqrt() * latents + (1 - a).sqrt() * noise, cond], 1), t,
                  states).sample
    torch.nn.functional.mse_loss(pred.float(), noise.float()).backward()
    torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)

  step()
  torch.cuda.synchronize()
  with exclusive_device():
    started = time.perf_counter()
    for _ in range(steps):
      step()
    torch.cuda.synchronize()
    return (time.perf_counter() - started) / steps


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--batch", type=int, nargs="+", default=[8, 16, 32])
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--resolution", type=int, default=256)
  p.add_argument("--remat", action="store_true", help="rematerialise UNet blocks (less memory)")
  p.add_argument("--peak-tflops", type=float, default=0.0)
  p.add_argument("--no-torch", action="store_true")
  p.add_argument("--tiny", action="store_true", help="tiny models, for a CPU check of the script")
  args = p.parse_args()

  import jax
  kind = jax.devices()[0].device_kind
  peak = args.peak_tflops or peak_tflops(kind)
  started = time.perf_counter()
  config, job = build(args.tiny, args.resolution, args.remat)
  print(f"# frozen encoders initialised in {time.perf_counter() - started:.1f} s", flush=True)
  print(f"machine: {machine()}; peak {peak or 'unknown'} TFLOP/s bf16")
  print(f"{'tiny' if args.tiny else 'SD 1.5'} stage-2 step, {args.resolution} px, "
        f"{config.model.compute_dtype} compute, float32 weights, remat={args.remat}")
  print("| batch | s/step | steps/s | images/s | step TFLOP | step MFU | UNet MFU | compile s "
        "| PyTorch s/step | ours / PyTorch |")
  print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
  for b in args.batch:
    seconds, flops, unet_flops, compile_s = run_ours(config, job, b, args.steps)
    theirs = None if args.no_torch else reference_seconds("PyTorch", run_torch, config, b,
                                                          args.steps)
    mfu = lambda f: f"{f / seconds / (peak * 1e12):.1%}" if peak and f else "-"
    ratio = f"{seconds / theirs:.2f}" if theirs else "-"
    print(f"| {b} | {seconds:.4f} | {1 / seconds:.2f} | {b / seconds:.1f} | {f'{flops / 1e12:.2f}' if flops else '-'} "
          f"| {mfu(flops)} | {mfu(unet_flops)} | {compile_s:.0f} "
          f"| {f'{theirs:.4f}' if theirs else '-'} | {ratio} |", flush=True)


if __name__ == "__main__":
  main()
