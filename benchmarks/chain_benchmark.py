"""A folder through a 2-step edit chain (`ip2p edit -p A -p B`) against two `ip2p edit`
runs, one per instruction (the second edits the first one's outputs), on the bundled
default model: wall time of the commands as a user runs them, with JAX's persistent
compilation cache already filled for both (a warm-up run first), and a check that both
ways give the same pixels.

  python benchmarks/chain_benchmark.py --num 100 --steps 10 --batch-size 8
  # or one part at a time (e.g. each under `quiet`), the files kept in a folder:
  for p in setup first second chain report; do
    python benchmarks/chain_benchmark.py --workdir /tmp/chain_bench --phase $p; done
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import machine  # noqa: E402

A, B = "make the circle blue", "make it night"


def make_inputs(folder: str, num: int) -> None:
  """``num`` 128 px shapes-world scenes (held-out split, seed 0) as PNGs."""
  from ip2p_jax.data import shapes
  os.makedirs(folder, exist_ok=True)
  for k in range(num):
    example = shapes.generate(seed=0, index=k, size=128, split="heldout")
    Image.fromarray(example.input_image).save(os.path.join(folder, f"{k:03d}.png"))


def timed(args: list[str], env: dict) -> float:
  start = time.perf_counter()
  subprocess.run([sys.executable, "-m", "ip2p_jax.cli", "edit", *args], check=True, env=env,
                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  return time.perf_counter() - start


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--num", type=int, default=100)
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--batch-size", type=int, default=8)
  parser.add_argument("--workdir", help="keep inputs, outputs and times here; with --phase, "
                      "run one part at a time (each under its own `quiet`)")
  parser.add_argument("--phase", choices=["setup", "first", "second", "chain", "report"],
                      help="setup: inputs and warm-up; first, second: the two runs; chain: "
                           "the chain run; report: the table (default: all, in one process)")
  args = parser.parse_args()
  if args.workdir:
    os.makedirs(args.workdir, exist_ok=True)
    run(args, args.workdir, [args.phase] if args.phase else ["setup", "first", "second", "chain", "report"])
  else:
    with tempfile.TemporaryDirectory() as tmp:
      run(args, tmp, ["setup", "first", "second", "chain", "report"])


def run(args, tmp: str, phases: list[str]) -> None:
  import json
  inputs = os.path.join(tmp, "in")
  env = dict(os.environ, IP2P_COMPILATION_CACHE=os.path.join(tmp, "xla"))
  common = ["--steps", str(args.steps), "--batch-size", str(args.batch_size), "--overwrite"]
  out = lambda name: os.path.join(tmp, name)
  times_path = out("times.json")
  times = json.load(open(times_path)) if os.path.exists(times_path) else {}
  if "setup" in phases:
    make_inputs(inputs, args.num)
    # Warm-up: both batch shapes of a run (full and the last, partial) into the cache.
    warm = out("warm_in")
    os.makedirs(warm, exist_ok=True)
    for f in sorted(os.listdir(inputs))[:args.batch_size + args.num % args.batch_size]:
      if not os.path.exists(os.path.join(warm, f)):
        os.link(os.path.join(inputs, f), os.path.join(warm, f))
    timed([warm, "-p", A, "-o", out("warm"), *common], env)
  if "first" in phases:
    times["first"] = timed([inputs, "-p", A, "-o", out("a"), *common], env)
  if "second" in phases:
    times["second"] = timed([out("a"), "-p", B, "-o", out("ab"), *common], env)
  if "chain" in phases:
    times["chain"] = timed([inputs, "-p", A, "-p", B, "-o", out("chain"), *common], env)
  with open(times_path, "w") as f:
    json.dump(times, f)
  if "report" not in phases:
    return
  names = sorted(f for f in os.listdir(inputs) if f.endswith(".png"))
  same = all(np.array_equal(np.asarray(Image.open(os.path.join(out("ab"), f))),
                            np.asarray(Image.open(os.path.join(out("chain"), f))))
             for f in names)
  first, second, chain = times["first"], times["second"], times["chain"]
  two = first + second
  print(f"machine: {machine()}")
  print(f"{args.num} images, 128 px, {args.steps} Euler-ancestral steps, batch size "
        f"{args.batch_size}, compilation cache warm")
  print("| two runs: -p A (s) | -p B on its outputs (s) | sum (s) | chain -p A -p B (s) | "
        "chain / two runs | same pixels |")
  print(f"| {first:.1f} | {second:.1f} | {two:.1f} | {chain:.1f} | **{chain / two:.2f}** | "
        f"{'yes' if same else 'NO'} |")


if __name__ == "__main__":
  main()
