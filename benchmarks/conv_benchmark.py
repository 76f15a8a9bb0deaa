"""3x3 convolutions alone (stride 1, padding 1, float32): the C++ kernel of
``ip2p_jax.kernels.cpu_conv``, XLA's ``lax.conv_general_dilated`` and PyTorch's
``conv2d`` on the same shapes, forward and forward+backward (gradients of the input and
the kernel), in one run.

  python benchmarks/conv_benchmark.py --shape 8 16 16 64 64 --shape 3 32 32 192 64

Shapes are ``N H W CIN COUT``, NHWC for ours (PyTorch's NCHW tensors; its channels-last
layout measured the same). The default list is the small models' layers (UNet at 64 px
training and 128 px editing, the VAE encoder at 64 px) and a few larger ones. Reports
the best of ``--repeats`` after one warm-up call, GFLOP/s, and ours / XLA and
ours / PyTorch; ``layers.Conv`` uses the kernel where it writes at most 64 channels.
"""
from __future__ import annotations

import argparse

from common import best_of, machine

DEFAULT = [(16, 64, 64, 32, 32), (16, 32, 32, 64, 64), (8, 16, 16, 64, 64),
           (3, 32, 32, 64, 64), (3, 32, 32, 192, 64), (8, 8, 8, 128, 128),
           (3, 16, 16, 128, 128), (3, 8, 8, 256, 256), (8, 4, 4, 512, 256),
           (8, 8, 8, 384, 256)]


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--shape", type=int, nargs=5, action="append",
                 metavar=("N", "H", "W", "CIN", "COUT"))
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--no-torch", action="store_true")
  args = p.parse_args()

  import jax
  import jax.numpy as jnp
  import numpy as np

  from ip2p_jax.kernels import build, cpu_conv

  if not build.load():
    raise SystemExit("the CPU kernels are not available (see the warning above)")
  lax_conv = lambda x, w: jax.lax.conv_general_dilated(
      x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))
  print(f"machine: {machine()}")
  print(f"float32, wall seconds, best of {args.repeats}; FLOPs 2 N H W CIN COUT 9 forward, "
        "twice that backward")
  header = "N H W CIN COUT | ours fwd ms (GFLOP/s) | XLA fwd ms | ours fwd+bwd ms | XLA fwd+bwd ms"
  if not args.no_torch:
    import torch
    import torch.nn.functional as F
    header += " | PyTorch fwd ms | PyTorch fwd+bwd ms | ours/XLA fwd, fwd+bwd | ours/PyTorch fwd, fwd+bwd"
  print(header)
  rng = np.random.default_rng(0)
  for n, h, w, cin, cout in args.shape or DEFAULT:
    x = rng.standard_normal((n, h, w, cin)).astype(np.float32)
    k = (rng.standard_normal((3, 3, cin, cout)) / np.sqrt(9 * cin)).astype(np.float32)
    g = rng.standard_normal((n, h, w, cout)).astype(np.float32)
    xj, kj, gj = (jnp.asarray(a) for a in (x, k, g))
    times = []
    for conv in (cpu_conv.conv3x3, lax_conv):
      fwd = jax.jit(conv)
      both = jax.jit(lambda x, k, g, conv=conv: jax.vjp(conv, x, k)[1](g))
      jax.block_until_ready(fwd(xj, kj))
      jax.block_until_ready(both(xj, kj, gj))
      times.append(best_of(lambda: jax.block_until_ready(fwd(xj, kj)), args.repeats))
      times.append(best_of(lambda: jax.block_until_ready(both(xj, kj, gj)), args.repeats))
    flops = 2 * n * h * w * cin * cout * 9
    row = (f"{n} {h} {w} {cin} {cout} | {times[0] * 1e3:.2f} ({flops / times[0] / 1e9:.0f}) | "
           f"{times[2] * 1e3:.2f} | {times[1] * 1e3:.2f} | {times[3] * 1e3:.2f}")
    if not args.no_torch:
      tx = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
      tk = torch.from_numpy(k).permute(3, 2, 0, 1).contiguous()
      tg = torch.from_numpy(g).permute(0, 3, 1, 2).contiguous()

      def torch_fwd():
        with torch.no_grad():
          F.conv2d(tx, tk, padding=1)

      def torch_both():
        a, b = tx.detach().requires_grad_(), tk.detach().requires_grad_()
        F.conv2d(a, b, padding=1).backward(tg)

      torch_fwd(), torch_both()
      theirs = (best_of(torch_fwd, args.repeats), best_of(torch_both, args.repeats))
      row += (f" | {theirs[0] * 1e3:.2f} | {theirs[1] * 1e3:.2f} | "
              f"{times[0] / times[2]:.2f}, {times[1] / times[3]:.2f} | "
              f"{times[0] / theirs[0]:.2f}, {times[1] / theirs[1]:.2f}")
    print(row, flush=True)


if __name__ == "__main__":
  main()
