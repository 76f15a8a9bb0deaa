"""3x3 convolutions (stride 1, padding 1) on the CPU as C++ kernels behind XLA's FFI
(``cpu_conv.cc``).

XLA:CPU's convolutions run at 60-80 GFLOP/s on two AVX2 cores where a layer writes 64
channels or fewer, about half of PyTorch's (oneDNN), and their gradients slower still;
these run at 125-150 there. Where a layer writes 128 channels or more XLA's forward is as
fast or faster on AVX2 and these kernels' gradients still faster; built for AVX-512 (16
floats a vector) they run at 210-290 GFLOP/s, 0.5-0.9 of XLA's forward time at every
width (benchmarks/conv_benchmark.py, BENCHMARKS.md). So :func:`plan` gives a layer the
kernel both ways, except where XLA's forward is as fast, which keeps XLA's forward with
the kernels' gradients: on an 8-float build a layer writing more than
:data:`MAX_OUT_CHANNELS_8` channels; on any build output channels that are not a
multiple of 8, or input channels that are not (zero-padded) fanning out to more than
:data:`MAX_OUT_CHANNELS_8`. The input
gradient is the convolution kernel on the flipped, transposed filter; the filter
gradient is a kernel of its own. Built and registered by :mod:`ip2p_jax.kernels.build`.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from ip2p_jax.kernels import build

CONV, FILTER = "ip2p_conv3x3", "ip2p_conv3x3_filter"
# Wider, XLA's forward is as fast or faster than an 8-float (AVX2) build's (BENCHMARKS.md).
MAX_OUT_CHANNELS_8 = 64


def plan(x: jax.Array, kernel: jax.Array, strides, padding) -> str | None:
  """How a convolution runs: "kernel" (these kernels forward and backward), "gradients"
  (XLA's forward, these kernels' gradients) or None (XLA's, both ways). These kernels
  take NHWC float32 input, a 3x3 HWIO float32 kernel, stride 1, padding 1 on every side;
  nothing empty. Channels that are not multiples of 8 (an image's 3, a latent's 4) are
  padded with zeros to the next one by :func:`conv3x3`."""
  if (isinstance(padding, str) or x.ndim != 4 or kernel.shape[:2] != (3, 3)
      or min(x.shape + kernel.shape) == 0):
    return None
  cin, cout = kernel.shape[-2:]
  if not (x.shape[-1] == cin and x.dtype == kernel.dtype == jnp.float32
          and tuple(strides) == (1, 1) and tuple(map(tuple, padding)) == ((1, 1), (1, 1))):
    return None
  # Where XLA's forward is as fast (measured, BENCHMARKS.md): layers writing many
  # channels on an 8-float build, or a few channels in (padded to 8) and many out, or
  # output channels that are not a multiple of 8 (padded, the kernel does 2-8x the work).
  wide = cout > MAX_OUT_CHANNELS_8 and (build.vector_width() < 16 or cin % 8)
  return "gradients" if wide or cout % 8 else "kernel"


def conv3x3(x: jax.Array, kernel: jax.Array, *, xla_forward: bool = False) -> jax.Array:
  """``x [N, H, W, Cin]`` convolved with ``kernel [3, 3, Cin, Cout]``, stride 1, zero
  padding 1 (no bias), by the C++ kernel (``xla_forward``: by XLA's, the gradients still
  by the kernels); differentiable once (its own VJP), batched under ``vmap`` (images and
  kernels both). Channels in or out that are not multiples of 8 are padded with zero
  channels for the kernel (which add nothing) and cut off after: a VAE's 3-channel
  ``conv_in`` runs ~4x XLA's speed that way. Raises RuntimeError if the kernels are not
  available (:func:`build.load`), ValueError for other dtypes or kernel shapes."""
  if not build.load():
    raise RuntimeError("the CPU kernels are not available (see the log, or IP2P_KERNELS)")
  if x.dtype != jnp.float32 or kernel.dtype != jnp.float32 or kernel.shape[:2] != (3, 3) \
      or x.shape[-1] != kernel.shape[2] or min(kernel.shape) == 0:
    raise ValueError(f"the CPU convolution takes float32 and a 3x3 kernel with the image's "
                     f"channels in; got {x.dtype} {x.shape}, {kernel.dtype} {kernel.shape}")
  return _conv(xla_forward, x, kernel)


def _xla(x, kernel):
  return jax.lax.conv_general_dilated(x, kernel, (1, 1), ((1, 1), (1, 1)),
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _up8(n: int) -> int:
  return n + -n % 8


def _pad8(x, axes=(-1,)):
  """``x`` with zeros appended along ``axes`` up to multiples of 8 (channels the kernel
  takes; the zeros add nothing)."""
  widths = [(0, 0)] * x.ndim
  for axis in axes:
    widths[axis] = (0, -x.shape[axis] % 8)
  return jnp.pad(x, widths)


def _call(x, kernel, flip=False):
  """The kernel's convolution; ``flip``: with ``kernel`` flipped and its channels swapped
  (the input gradient), rearranged inside the call. Channels are padded to multiples of
  8 around the call."""
  out_channels = kernel.shape[-2 if flip else -1]
  x = _pad8(x)
  out = jax.ShapeDtypeStruct(x.shape[:-1] + (_up8(out_channels),), x.dtype)
  y = jax.ffi.ffi_call(CONV, out, vmap_method="broadcast_all")(x, _pad8(kernel, (-2, -1)),
                                                                flip=flip)
  return y[..., :out_channels]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _conv(xla_forward, x, kernel):
  return _xla(x, kernel) if xla_forward else _call(x, kernel)


def _conv_forward(xla_forward, x, kernel):
  return _conv(xla_forward, x, kernel), (x, kernel)


def _conv_backward(xla_forward, residuals, dy):
  del xla_forward
  x, kernel = residuals
  cin, cout = kernel.shape[-2:]
  padded = jax.ShapeDtypeStruct(kernel.shape[:-2] + (_up8(cin), _up8(cout)), kernel.dtype)
  dw = jax.ffi.ffi_call(FILTER, padded, vmap_method="broadcast_all")(_pad8(x), _pad8(dy))
  return _call(dy, kernel, flip=True), dw[..., :cin, :cout]


_conv.defvjp(_conv_forward, _conv_backward)
