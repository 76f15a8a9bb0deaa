"""Attention alone: ``layers.dot_product_attention`` vs PyTorch's
``scaled_dot_product_attention`` on the same float32 shapes, forward and
forward+backward (gradients of q, k and v), in one run.

  python benchmarks/attention_benchmark.py --shape 3 4096 8 40

The default shape is Stable Diffusion 1.5's first UNet level at 512 px (batch 3 for
two-scale guidance, 64x64 = 4096 pixels, 8 heads of 40). ``--implementation`` picks
ours ("default" = what the UNet gets on this backend); ``--forward-tiles`` and
``--backward-tiles`` set the flash kernel's tiles (the sweep behind
``layers.FLASH_FORWARD_TILES`` / ``FLASH_BACKWARD_TILES``: queries per tile as a
fraction of the key length, score bytes up to which heads share a tile).
Reports the best of ``--repeats`` after one warm-up call and ours/PyTorch.
"""
from __future__ import annotations

import argparse
import functools
import time

import numpy as np

from common import best_of, machine


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--shape", type=int, nargs=4, default=[3, 4096, 8, 40],
                 metavar=("BATCH", "LENGTH", "HEADS", "HEAD_DIM"))
  p.add_argument("--kv-length", type=int, default=0, help="key length (0: = LENGTH)")
  p.add_argument("--implementation", nargs="+", default=["default"],
                 choices=["default", "cpu_flash", "flash", "xla"])
  p.add_argument("--forward-tiles", type=int, nargs=2, metavar=("KEY_FRACTION", "BYTES"))
  p.add_argument("--backward-tiles", type=int, nargs=2, metavar=("KEY_FRACTION", "BYTES"))
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                 help="cpu: process CPU seconds (run under `taskset -c 0` for one thread)")
  p.add_argument("--no-torch", action="store_true")
  args = p.parse_args()

  import jax
  import jax.numpy as jnp

  from ip2p_jax.models import layers

  b, lq, h, d = args.shape
  lk = args.kv_length or lq
  rng = np.random.default_rng(0)
  q, g = (rng.standard_normal((b, lq, h, d)).astype(np.float32) for _ in range(2))
  k, v = (rng.standard_normal((b, lk, h, d)).astype(np.float32) for _ in range(2))
  print(f"machine: {machine()}")
  print(f"shape (batch, length, heads, head_dim) = {(b, lq, h, d)}, key length {lk}, float32; "
        f"{args.clock} seconds, best of {args.repeats}")

  clock = time.process_time if args.clock == "cpu" else time.perf_counter
  timed = lambda fn: best_of(fn, args.repeats, clock)
  rows = []
  for impl in args.implementation:
    attend = functools.partial(layers.dot_product_attention,
                               implementation=None if impl == "default" else impl)
    label = impl
    if args.forward_tiles or args.backward_tiles:
      tiles = dict(forward_tiles=tuple(args.forward_tiles or layers.FLASH_FORWARD_TILES),
                   backward_tiles=tuple(args.backward_tiles or layers.FLASH_BACKWARD_TILES))
      attend = functools.partial(layers.flash_attention, **tiles)
      label = f"flash {tiles}"
    fwd = jax.jit(attend)
    fwd_bwd = jax.jit(lambda q, k, v, g, attend=attend: jax.vjp(attend, q, k, v)[1](g))
    args_j = [jnp.asarray(x) for x in (q, k, v, g)]
    times = []
    for fn, a in ((fwd, args_j[:3]), (fwd_bwd, args_j)):
      jax.block_until_ready(fn(*a))
      times.append(timed(lambda fn=fn, a=a: jax.block_until_ready(fn(*a))))
    rows.append((label, *times))

  if not args.no_torch:
    import torch
    import torch.nn.functional as F
    tq, tk, tv, tg = (torch.from_numpy(x).permute(0, 2, 1, 3).contiguous() for x in (q, k, v, g))

    def torch_fwd():
      with torch.no_grad():
        F.scaled_dot_product_attention(tq, tk, tv)

    def torch_fwd_bwd():
      qq, kk, vv = (x.detach().requires_grad_() for x in (tq, tk, tv))
      F.scaled_dot_product_attention(qq, kk, vv).backward(tg)

    for fn in (torch_fwd, torch_fwd_bwd):
      fn()
    theirs = (timed(torch_fwd), timed(torch_fwd_bwd))
    print(f"PyTorch {torch.__version__} SDPA ({torch.get_num_threads()} threads): "
          f"forward {theirs[0]:.3f} s, forward+backward {theirs[1]:.3f} s")
  print("ours | forward s | forward+backward s" + ("" if args.no_torch else
                                                    " | fwd / PyTorch | fwd+bwd / PyTorch"))
  for label, fwd_s, both_s in rows:
    ratios = "" if args.no_torch else f" | {fwd_s / theirs[0]:.2f} | {both_s / theirs[1]:.2f}"
    print(f"{label} | {fwd_s:.3f} | {both_s:.3f}{ratios}")


if __name__ == "__main__":
  main()
