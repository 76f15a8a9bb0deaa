"""Group normalisation (with a fused SiLU, as resnet blocks use it) and layer
normalisation on the CPU as a C++ kernel behind XLA's FFI (``cpu_norm.cc``).

XLA:CPU computes a normalisation as separate reductions, broadcasts and elementwise
passes over the activation, and a layer norm's scale it materialises at the
activation's size before its product; the kernel makes three passes forward (channel
sums, centred squares, output) and three backward per sample (one more each with the
SiLU), samples split over XLA's intra-op pool, with a two-pass variance (PyTorch's
numerics) whose sums run in float over 64-pixel blocks and in double across.
``models.layers.GroupNorm`` and ``LayerNorm`` call it on CPU for float32 (:func:`takes`).
Built and registered by :mod:`ip2p_jax.kernels.build`.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from ip2p_jax.kernels import build

FORWARD, BACKWARD = "ip2p_norm_forward", "ip2p_norm_backward"


# Below this many elements XLA's fused normalisation is faster: a call into the kernel
# and its pool cost ~0.05 ms forward and backward (8x4x4x256 GroupNorm: 0.12 ms against
# XLA's 0.06; 8x16x16x64: 0.25 against 0.49).
MIN_ELEMENTS = 1 << 16


def takes(x: jax.Array, scale: jax.Array, groups: int) -> bool:
  """Whether the kernel runs this normalisation: float32 ``x [..., C]`` of at least
  :data:`MIN_ELEMENTS` and ``scale [C]``, C split evenly into ``groups``, the kernels
  loaded."""
  return (x.dtype == scale.dtype == jnp.float32 and x.ndim >= 1 and x.size >= MIN_ELEMENTS
          and scale.shape == x.shape[-1:] and x.shape[-1] % groups == 0
          and jax.default_backend() == "cpu" and build.load())


def normalize(x: jax.Array, scale: jax.Array, bias: jax.Array, groups: int,
              eps: float, silu: bool = False) -> jax.Array:
  """``x [..., P, C]`` normalised over each leading index's P pixels and each group of
  C / ``groups`` channels, then ``* scale + bias`` per channel, then SiLU if ``silu``.
  GroupNorm of NHWC images is ``x`` reshaped to ``[N, H W, C]``; LayerNorm is
  ``[..., 1, C]`` with one group. Differentiable once (its own VJP); under ``vmap`` the
  mapped axis joins the leading ones. Raises RuntimeError if the kernels are not
  available."""
  if not build.load():
    raise RuntimeError("the CPU kernels are not available (see the log, or IP2P_KERNELS)")
  if x.ndim < 2 or x.shape[-1] % groups or scale.shape != x.shape[-1:] \
      or bias.shape != scale.shape or not x.dtype == scale.dtype == bias.dtype == jnp.float32:
    raise ValueError(f"normalize takes float32 x [..., P, C] with C a multiple of groups and "
                     f"scale, bias [C]; got {x.dtype} {x.shape}, {scale.dtype} {scale.shape}, "
                     f"{bias.dtype} {bias.shape}, {groups} groups")
  return _normalize((groups, bool(silu)), np.float32(eps), x, scale, bias)


def _forward_call(options, eps, x, scale, bias):
  groups, silu = options
  stats = jax.ShapeDtypeStruct(x.shape[:-2] + (groups,), jnp.float32)
  call = jax.ffi.ffi_call(FORWARD, (jax.ShapeDtypeStruct(x.shape, x.dtype), stats, stats),
                          vmap_method="broadcast_all")
  return call(x, scale, bias, groups=np.int64(groups), eps=eps, silu=silu)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _normalize(options, eps, x, scale, bias):
  return _forward_call(options, eps, x, scale, bias)[0]


def _normalize_forward(options, eps, x, scale, bias):
  y, mean, rstd = _forward_call(options, eps, x, scale, bias)
  return y, (x, scale, bias, mean, rstd)


def _normalize_backward(options, eps, residuals, dy):
  del eps
  groups, silu = options
  x, scale, bias, mean, rstd = residuals
  shapes = tuple(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in (x, scale, bias))
  call = jax.ffi.ffi_call(BACKWARD, shapes, vmap_method="broadcast_all")
  return call(x, scale, bias, mean, rstd, dy.astype(x.dtype), groups=np.int64(groups),
              silu=silu)


_normalize.defvjp(_normalize_forward, _normalize_backward)
