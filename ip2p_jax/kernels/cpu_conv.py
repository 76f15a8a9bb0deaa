"""3x3 convolutions (stride 1, padding 1) on the CPU as C++ kernels behind XLA's FFI
(``cpu_conv.cc``).

XLA:CPU's convolutions run at 60-80 GFLOP/s on two cores where a layer writes 64 channels
or fewer, about half of PyTorch's (oneDNN), and their gradients slower still; these run
at 100-110. Where a layer writes 128 channels or more XLA's forward is faster (BENCHMARKS.md,
"Convolutions"). So :func:`takes` accepts float32 3x3 convolutions with at most
:data:`MAX_OUT_CHANNELS` out. The input gradient is the same kernel on the flipped, transposed filter; the filter
gradient is a kernel of its own. Built and registered by :mod:`ip2p_jax.kernels.build`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from ip2p_jax.kernels import build

CONV, FILTER = "ip2p_conv3x3", "ip2p_conv3x3_filter"
MAX_OUT_CHANNELS = 64  # above it XLA's own convolution is faster (BENCHMARKS.md)


def takes(x: jax.Array, kernel: jax.Array, strides, padding) -> bool:
  """Whether the kernel runs this convolution (and is faster than XLA's there): NHWC
  float32 input, a 3x3 HWIO float32 kernel, stride 1, padding 1 on every side, channels
  in and out multiples of 8, at most :data:`MAX_OUT_CHANNELS` out."""
  if isinstance(padding, str):
    return False
  cin, cout = kernel.shape[-2:]
  return (x.ndim == 4 and kernel.shape[:2] == (3, 3) and x.shape[-1] == cin
          and x.dtype == kernel.dtype == jnp.float32
          and tuple(strides) == (1, 1) and tuple(map(tuple, padding)) == ((1, 1), (1, 1))
          and cin % 8 == 0 and cout % 8 == 0 and cout <= MAX_OUT_CHANNELS)


def conv3x3(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """``x [N, H, W, Cin]`` convolved with ``kernel [3, 3, Cin, Cout]``, stride 1, zero
  padding 1 (no bias), by the C++ kernel; differentiable once (its own VJP), batched
  under ``vmap`` (images and kernels both). Raises RuntimeError if the kernels are not
  available (:func:`build.load`), ValueError for channels that are not multiples of 8."""
  if not build.load():
    raise RuntimeError("the CPU kernels are not available (see the log, or IP2P_KERNELS)")
  if x.dtype != jnp.float32 or kernel.dtype != jnp.float32 or kernel.shape[:2] != (3, 3) \
      or x.shape[-1] != kernel.shape[2] or kernel.shape[2] % 8 or kernel.shape[3] % 8:
    raise ValueError(f"the CPU convolution takes float32, a 3x3 kernel and channels that "
                     f"are multiples of 8; got {x.dtype} {x.shape}, {kernel.dtype} "
                     f"{kernel.shape}")
  return _conv(x, kernel)


def _call(x, kernel):
  out = jax.ShapeDtypeStruct(x.shape[:-1] + kernel.shape[-1:], x.dtype)
  return jax.ffi.ffi_call(CONV, out, vmap_method="broadcast_all")(x, kernel)


@jax.custom_vjp
def _conv(x, kernel):
  return _call(x, kernel)


def _conv_forward(x, kernel):
  return _call(x, kernel), (x, kernel)


def _conv_backward(residuals, dy):
  x, kernel = residuals
  dx = _call(dy, jnp.swapaxes(jnp.flip(kernel, (0, 1)), 2, 3))
  dw = jax.ffi.ffi_call(FILTER, jax.ShapeDtypeStruct(kernel.shape, kernel.dtype),
                        vmap_method="broadcast_all")(x, dy)
  return dx, dw


_conv.defvjp(_conv_forward, _conv_backward)
