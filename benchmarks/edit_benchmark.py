"""Edit benchmark: ip2p_jax vs diffusers' StableDiffusionInstructPix2PixPipeline (PyTorch)
on the same random weights, image size, steps, batch and sampler, in one run.

  python benchmarks/edit_benchmark.py --size small --resolution 128 --steps 10 --batch 1 4

Compile time is reported apart; the warm times are the best of --repeats runs, ours and
diffusers' alternating.
Prints ours/diffusers (< 1 means we are faster).
"""
from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np

from common import SIZES, best_of_both, diffusers_ip2p, machine


def setup(size: str):
  """A random diffusers pipeline and ours on the same weights."""
  from ip2p_jax import InstructPix2PixPipeline
  ref = diffusers_ip2p(size)
  folder = tempfile.mkdtemp()
  ref.save_pretrained(folder)
  return ref, InstructPix2PixPipeline.from_pretrained(folder)


def random_images(resolution: int, batch: int) -> list:
  from PIL import Image
  rng = np.random.default_rng(0)
  return [Image.fromarray(rng.integers(0, 256, (resolution, resolution, 3), dtype=np.uint8))
          for _ in range(batch)]


def our_edit(pipe, resolution: int, batch: int, steps: int):
  """``run()``: one edit of ``batch`` random images (Euler ancestral, two-scale guidance)."""
  images = random_images(resolution, batch)
  prompts = ["make it look like winter"] * batch
  return lambda: pipe(prompts, images, num_inference_steps=steps, output_type="np",
                      progress_bar=False)


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--size", choices=sorted(SIZES), default="small")
  p.add_argument("--resolution", type=int, default=128)
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--batch", type=int, nargs="+", default=[1, 4])
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
  args = p.parse_args()

  import torch
  if args.threads:
    torch.set_num_threads(args.threads)
  ref, ours = setup(args.size)
  ref.set_progress_bar_config(disable=True)
  print(f"machine: {machine()}; torch {torch.__version__} ({torch.get_num_threads()} threads)")
  print(f"size={args.size} resolution={args.resolution} steps={args.steps} sampler=euler_ancestral")
  print("batch | ours warm s | diffusers warm s | ratio ours/diffusers | ours compile s")
  for b in args.batch:
    run_ours = our_edit(ours, args.resolution, b, args.steps)
    t = time.perf_counter()
    run_ours()
    first = time.perf_counter() - t
    images = random_images(args.resolution, b)

    def run_ref():
      with torch.no_grad():
        ref(["make it look like winter"] * b, image=images, num_inference_steps=args.steps,
            output_type="np")
    run_ref()
    warm, theirs = best_of_both(run_ours, run_ref, args.repeats)
    print(f"{b:5d} | {warm:11.3f} | {theirs:16.3f} | {warm / theirs:20.2f} | {first - warm:14.1f}")


if __name__ == "__main__":
  main()
