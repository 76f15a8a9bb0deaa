"""`ip2p edit` of one 128 px image on the bundled default model, default settings
(Euler ancestral, 50 steps, scales 7.5 / 1.5), against diffusers' PyTorch pipeline on
the same weights and the same work.

  cold: a fresh `ip2p edit` process with an empty compilation cache and no built CPU
        kernels (import, kernel build, model load, compile, edit, write), wall time
  warm (CLI): the same command again, the persistent compilation cache now filled
  warm (in process): a second edit in one Python process (a notebook or a server)

  python benchmarks/default_model_edit_benchmark.py
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import machine  # noqa: E402

INSTRUCTION = "make the circle blue"
IMAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                     "examples", "shapes_128.png")


def cli_seconds(cache: str, kernels: str, out: str) -> float:
  env = dict(os.environ, IP2P_COMPILATION_CACHE=cache, IP2P_KERNELS=kernels)
  start = time.perf_counter()
  subprocess.run([sys.executable, "-m", "ip2p_jax.cli", "edit", IMAGE, "-p", INSTRUCTION,
                  "-o", out, "--overwrite"], check=True, env=env, capture_output=True)
  return time.perf_counter() - start


def best_of(fn, n: int = 3) -> float:
  times = []
  for _ in range(n):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return min(times)


def main():
  from PIL import Image
  with tempfile.TemporaryDirectory() as tmp:
    cache, kernels = os.path.join(tmp, "xla"), os.path.join(tmp, "kernels")
    cold = cli_seconds(cache, kernels, os.path.join(tmp, "out1"))
    warm_cli = cli_seconds(cache, kernels, os.path.join(tmp, "out2"))

  from ip2p_jax import InstructPix2PixPipeline, bundled
  image = np.asarray(Image.open(IMAGE).convert("RGB"))
  pipe = InstructPix2PixPipeline.from_pretrained()
  edit = lambda: pipe(INSTRUCTION, image, num_inference_steps=50, output_type="np")
  edit()
  ours = best_of(edit)

  import diffusers
  import torch
  torch.set_num_threads(os.cpu_count())
  ref = diffusers.StableDiffusionInstructPix2PixPipeline.from_pretrained(
      bundled.DEFAULT_MODEL, safety_checker=None, requires_safety_checker=False,
      torch_dtype=torch.float32,
      local_files_only=True)
  ref.set_progress_bar_config(disable=True)
  pil = Image.fromarray(image)
  theirs = best_of(lambda: ref(INSTRUCTION, image=pil, num_inference_steps=50,
                               generator=torch.Generator().manual_seed(0), output_type="np"))
  print(f"machine: {machine()}")
  print(f"image {image.shape[1]}x{image.shape[0]}, 50 Euler-ancestral steps")
  print(f"| cold CLI (s) | warm CLI (s) | warm in process, ours (s) | diffusers (s) | ratio |")
  print(f"| {cold:.2f} | {warm_cli:.2f} | {ours:.3f} | {theirs:.3f} | {ours / theirs:.2f} |")


if __name__ == "__main__":
  main()
