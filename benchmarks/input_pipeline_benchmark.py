"""Throughput of the grain input pipeline on 64 px shapes-world triplets.

  python benchmarks/input_pipeline_benchmark.py [--num 2000] [--workers 0 2] [--batch 64]

Builds the dataset in a temporary folder, then times decode + paired crop/flip +
tokenization + batching. Goal: >= 500 examples/s on the 2-core CI machine.
"""
from __future__ import annotations

import argparse
import tempfile
import time

from common import machine


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--num", type=int, default=2000)
  p.add_argument("--size", type=int, default=64)
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--batches", type=int, default=40)
  p.add_argument("--workers", type=int, nargs="+", default=[0, 2])
  args = p.parse_args()
  from ip2p_jax.data import builders
  from ip2p_jax.data import input_pipeline as ip
  folder = tempfile.mkdtemp()
  t = time.perf_counter()
  path, _ = builders.build("shapes_world", folder, builders.ShapesWorldConfig(
      name="bench", size=args.size, num_train=args.num, num_heldout=0))
  print(f"machine: {machine()}")
  print(f"built {args.num} examples of {args.size} px in {time.perf_counter() - t:.1f} s")
  source = builders.open_split(path, "train", skip_decoding=("input_masks", "edited_masks",
                                                             "edit_mask"))
  for workers in args.workers:
    config = ip.PipelineConfig(resolution=args.size, batch_size=args.batch, worker_count=workers)
    it = iter(ip.make_loader(source, config))
    next(it)  # start-up (worker processes, first batch)
    t = time.perf_counter()
    for _ in range(args.batches):
      next(it)
    rate = args.batches * args.batch / (time.perf_counter() - t)
    print(f"workers={workers}: {rate:.0f} examples/s")
    del it


if __name__ == "__main__":
  main()
