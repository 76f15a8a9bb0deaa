"""GPU edit benchmark at Stable Diffusion 1.5 size: 512 px, bf16, 20 Euler-ancestral
steps, batch 1 and 8. Random weights of the real shapes (nothing downloaded).

  python benchmarks/gpu_edit_sd15.py [--batch 1 8] [--steps 20] [--peak-tflops 989]

Reports images/s and the UNet's model FLOPs utilisation: each step runs the UNet on
3 x batch latents (two-scale guidance), 0.80 TFLOP per 64x64 forward (REFERENCE.md).
If PyTorch with CUDA and diffusers are installed, runs diffusers' fp16 pipeline on the
same shapes too and prints the ratio.
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from common import machine

UNET_TFLOP_PER_FORWARD = 0.80


def build_pipeline(dtype):
  from configs import models as presets
  from ip2p_jax import InstructPix2PixPipeline
  from ip2p_jax import tokenizer as tokenizers
  from ip2p_jax.checkpoints import PipelineParts, module_from_config
  modules = {
      "unet": module_from_config(presets.IP2P_UNET, dtype=dtype, param_dtype=dtype,
                                 attention_implementation=None),
      "vae": module_from_config(presets.SD15_VAE, dtype=dtype, param_dtype=dtype),
      "text_encoder": module_from_config(presets.CLIP_L14_TEXT, dtype=dtype, param_dtype=dtype),
  }
  params = {}
  for i, (name, m) in enumerate(modules.items()):
    init = jax.jit(lambda k, m=m: m.init(k, *m.dummy_inputs()))
    params[name] = jax.tree.map(lambda x: x.unbox() if hasattr(x, "unbox") else x,
                                init(jax.random.key(i))["params"],
                                is_leaf=lambda x: hasattr(x, "unbox"))
  scheduler = {"_class_name": "EulerAncestralDiscreteScheduler", "beta_schedule": "scaled_linear",
               "beta_start": 0.00085, "beta_end": 0.012, "timestep_spacing": "leading",
               "steps_offset": 1}
  return InstructPix2PixPipeline(PipelineParts(modules, params, tokenizers.load(), scheduler, {}))


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
  p.add_argument("--steps", type=int, default=20)
  p.add_argument("--resolution", type=int, default=512)
  p.add_argument("--peak-tflops", type=float, default=989.0, help="device bf16 dense peak")
  p.add_argument("--repeats", type=int, default=3)
  args = p.parse_args()
  print(f"machine: {machine()}")
  pipe = build_pipeline(jnp.bfloat16)
  rng = np.random.default_rng(0)
  for b in args.batch:
    images = rng.integers(0, 256, (b, args.resolution, args.resolution, 3), dtype=np.uint8)
    run = lambda: pipe("make it snowy", images, num_inference_steps=args.steps, output_type="np")
    t = time.perf_counter()
    run()
    compile_s = time.perf_counter() - t
    times = []
    for _ in range(args.repeats):
      t = time.perf_counter()
      run()
      times.append(time.perf_counter() - t)
    warm = min(times)
    latent = args.resolution // 8
    flop = UNET_TFLOP_PER_FORWARD * (latent / 64) ** 2 * 3 * b * args.steps
    print(f"ours bf16 batch {b}: {warm:.3f} s/batch, {b / warm:.2f} images/s, "
          f"{args.steps * b / warm:.1f} it/s-images, UNet MFU {flop / warm / args.peak_tflops:.1%}"
          f" (compile+first {compile_s - warm:.1f} s)")
    try:
      import torch
      if not torch.cuda.is_available():
        continue
      from common import diffusers_ip2p
      ref = diffusers_ip2p("sd15").to("cuda", torch.float16)
      ref.set_progress_bar_config(disable=True)
      from PIL import Image
      pil = [Image.fromarray(x) for x in images]
      with torch.no_grad():
        ref(["make it snowy"] * b, image=pil, num_inference_steps=args.steps)
        torch.cuda.synchronize()
        t = time.perf_counter()
        ref(["make it snowy"] * b, image=pil, num_inference_steps=args.steps)
        torch.cuda.synchronize()
      theirs = time.perf_counter() - t
      print(f"diffusers fp16 batch {b}: {theirs:.3f} s/batch; ours/diffusers = {warm / theirs:.2f}")
    except ImportError:
      pass


if __name__ == "__main__":
  main()
