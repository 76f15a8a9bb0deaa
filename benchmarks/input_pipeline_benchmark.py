"""Throughput of the grain input pipeline on 64 px shapes-world triplets, or of the
latent-cache loader on a cache file (record by record, then held in memory).

  python benchmarks/input_pipeline_benchmark.py [--num 2000] [--workers 0 2] [--batch 64]
  python benchmarks/input_pipeline_benchmark.py --latents runs/default/latents/train.arrayrecord \
      --batch 256

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
  p.add_argument("--latents", help="a latent cache file (scripts/build_latent_cache.py)")
  args = p.parse_args()
  if args.latents:
    return latent_loader(args.latents, args.batch, args.batches)
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


def latent_loader(path: str, batch: int, batches: int):
  """Examples/s of the training loop's latent loader, reading each record from the file
  and from memory (the default for caches up to ``latent_cache.IN_MEMORY_BYTES``)."""
  from ip2p_jax.data import latent_cache
  print(f"machine: {machine()}")
  for in_memory in (False, True):
    t = time.perf_counter()
    source = latent_cache.LatentCacheSource(path, in_memory=in_memory)
    opened = time.perf_counter() - t
    it = iter(latent_cache.make_loader(
        source, latent_cache.LatentLoaderConfig(batch_size=batch), shard_index=0, shard_count=1))
    next(it)
    t = time.perf_counter()
    for _ in range(batches):
      next(it)
    rate = batches * batch / (time.perf_counter() - t)
    print(f"in_memory={in_memory}: opened in {opened:.1f} s, {rate:.0f} examples/s "
          f"({len(source)} records, batch {batch})")
    del it


if __name__ == "__main__":
  main()
