"""GPU edit benchmark at Stable Diffusion 1.5 size: 512 px, bf16, 20 Euler-ancestral
steps, batch 1 and 8. Random weights of the real shapes (nothing downloaded).

  python benchmarks/gpu_edit_sd15.py [--batch 1 8] [--steps 20] [--peak-tflops 989]
  python benchmarks/gpu_edit_sd15.py --tiny   # a CPU run of the same code, seconds

Reports images/s and the UNet's model FLOPs utilisation: each step runs the UNet on
3 x batch latents (two-scale guidance); the FLOPs of one such UNet call come from
XLA's cost analysis of the same UNet lowered for a CPU (``common.UnetFlops``: nothing
compiled, attention counted as XLA's kernel), the peak from the device's published
bf16 dense number (``gpu_train_sd15.PEAK_TFLOPS``). With PyTorch on CUDA and diffusers
installed, diffusers' fp16 pipeline (SDPA) edits the same images with the same weights
(ours, saved in the diffusers layout) and the ratio is printed.
"""
from __future__ import annotations

import argparse
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from common import (exclusive_device, host_random_params, machine, reference_seconds,
                    UnetFlops)
from gpu_train_sd15 import peak_tflops


def unet_config(tiny: bool) -> dict:
  from configs import models as presets
  return dict(presets.TINY_IP2P_UNET if tiny else presets.IP2P_UNET)


def build_pipeline(dtype, tiny: bool):
  from configs import models as presets
  from ip2p_jax import InstructPix2PixPipeline
  from ip2p_jax import tokenizer as tokenizers
  from ip2p_jax.checkpoints import PipelineParts, module_from_config
  configs = ((unet_config(tiny), presets.TINY_VAE, presets.TINY_CLIP_TEXT) if tiny else
             (unet_config(tiny), presets.SD15_VAE, presets.CLIP_L14_TEXT))
  modules = {name: module_from_config(raw, dtype=dtype, param_dtype=dtype)
             for name, raw in zip(("unet", "vae", "text_encoder"), configs)}
  params = {name: host_random_params(m, seed=i) for i, (name, m) in enumerate(modules.items())}
  scheduler = {"_class_name": "EulerAncestralDiscreteScheduler", "beta_schedule": "scaled_linear",
               "beta_start": 0.00085, "beta_end": 0.012, "timestep_spacing": "leading",
               "steps_offset": 1}
  return InstructPix2PixPipeline(PipelineParts(modules, params, tokenizers.load(), scheduler, {}))


def diffusers_seconds(pipe, images, steps: int) -> float | None:
  """diffusers' fp16 pipeline on our weights, or None without CUDA or diffusers."""
  try:
    import diffusers
    import torch
  except ImportError:
    return None
  if not torch.cuda.is_available():
    return None
  folder = tempfile.mkdtemp()
  pipe.save_pretrained(folder)
  ref = diffusers.StableDiffusionInstructPix2PixPipeline.from_pretrained(
      folder, torch_dtype=torch.float16, safety_checker=None, requires_safety_checker=False,
      local_files_only=True).to("cuda")
  ref.set_progress_bar_config(disable=True)
  from PIL import Image
  pil = [Image.fromarray(x) for x in images]
  prompts = ["make it snowy"] * len(pil)
  with torch.no_grad():
    ref(prompts, image=pil, num_inference_steps=steps)
    torch.cuda.synchronize()
    with exclusive_device():
      started = time.perf_counter()
      ref(prompts, image=pil, num_inference_steps=steps)
      torch.cuda.synchronize()
      return time.perf_counter() - started


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
  p.add_argument("--steps", type=int, default=20)
  p.add_argument("--resolution", type=int, default=512)
  p.add_argument("--peak-tflops", type=float, default=0.0, help="device bf16 dense peak")
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--no-torch", action="store_true")
  p.add_argument("--tiny", action="store_true", help="tiny models, for a CPU check of the script")
  args = p.parse_args()
  peak = args.peak_tflops or peak_tflops(jax.devices()[0].device_kind)
  print(f"machine: {machine()}; peak {peak or 'unknown'} TFLOP/s bf16")
  started = time.perf_counter()
  pipe = build_pipeline(jnp.bfloat16, args.tiny)
  print(f"# random weights initialised in {time.perf_counter() - started:.1f} s", flush=True)
  latent = args.resolution // pipe.vae_scale_factor
  rng = np.random.default_rng(0)
  print("| batch | s/batch | images/s | UNet TFLOP per step | UNet MFU | compile+first s "
        "| diffusers fp16 s | ours / diffusers |")
  print("|---:|---:|---:|---:|---:|---:|---:|---:|")
  for b in args.batch:
    # one step: the UNet on 3 x b latents (the guidance batch), counted beside the compile
    unet_flops = UnetFlops(unet_config(args.tiny), 3 * b, latent, dtype="bfloat16",
                           param_dtype="bfloat16", backward=False)
    images = rng.integers(0, 256, (b, args.resolution, args.resolution, 3), dtype=np.uint8)
    run = lambda: pipe("make it snowy", images, num_inference_steps=args.steps,
                       output_type="np", progress_bar=False)
    t = time.perf_counter()
    run()
    first = time.perf_counter() - t
    print(f"# batch {b}: first call (compilation) {first:.1f} s", flush=True)
    times = []
    with exclusive_device():
      for _ in range(args.repeats):
        t = time.perf_counter()
        run()
        times.append(time.perf_counter() - t)
    warm = min(times)
    print(f"# ours, batch {b}: {warm:.3f} s warm, {first:.1f} s first", flush=True)
    flop = unet_flops.value()
    mfu = f"{flop * args.steps / warm / (peak * 1e12):.1%}" if peak else "-"
    theirs = None if args.no_torch else reference_seconds(
        "diffusers", diffusers_seconds, pipe, images, args.steps)
    print(f"| {b} | {warm:.3f} | {b / warm:.2f} | {flop / 1e12:.3f} | {mfu} | {first:.1f} "
          f"| {f'{theirs:.3f}' if theirs else '-'} | {f'{warm / theirs:.2f}' if theirs else '-'} |",
          flush=True)


if __name__ == "__main__":
  main()
