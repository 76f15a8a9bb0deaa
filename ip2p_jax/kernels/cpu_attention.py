"""FlashAttention on the CPU as a C++ kernel behind XLA's FFI (``cpu_attention.cc``).

XLA:CPU runs the blocked attention of :func:`ip2p_jax.models.layers.flash_attention` with
each tile's scores going through memory between its fused products, and its tile loops on
one thread (BENCHMARKS.md, "Attention"). This kernel keeps a block of scores in cache from
``Q K^T`` to ``P V``, uses register-blocked products, and splits heads and query blocks
over XLA's intra-op thread pool; its backward recomputes the probabilities from the saved
log-sum-exp (Dao et al. 2022, Algorithm 2). Built and registered by
:mod:`ip2p_jax.kernels.build` on first use.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ip2p_jax.kernels import build

FORWARD, BACKWARD = "ip2p_flash_forward", "ip2p_flash_backward"


def takes(query: jax.Array, key: jax.Array, value: jax.Array) -> bool:
  """Whether the kernel runs these operands: ``[..., length, heads, head_dim]`` with the
  same leading axes and heads, float32, one head_dim, a multiple of 8, nothing empty."""
  d = query.shape[-1]
  return (query.ndim == key.ndim == value.ndim >= 3
          and query.dtype == key.dtype == value.dtype == jnp.float32
          and query.shape[:-3] == key.shape[:-3] and key.shape == value.shape
          and query.shape[-2:] == key.shape[-2:] and d % 8 == 0
          and min(query.shape + key.shape) > 0)


def flash_attention(query: jax.Array, key: jax.Array, value: jax.Array) -> jax.Array:
  """``softmax(q k^T / sqrt(d)) v`` by the C++ kernel; ``[batch, length, heads,
  head_dim]`` in and out, float32 (:func:`takes`). Differentiable once (a custom VJP
  whose backward is the kernel's); under ``vmap`` the mapped axis joins the batch.
  Raises RuntimeError if the kernels are not available (:func:`build.load`)."""
  if not build.load():
    raise RuntimeError("the CPU kernels are not available (see the log, or IP2P_KERNELS); "
                       "use implementation='flash' or None")
  if not takes(query, key, value):
    raise ValueError(f"the CPU attention kernel takes float32 [..., length, heads, head_dim] "
                     f"with the same leading axes and heads, head_dim a multiple of 8; got "
                     f"{query.dtype} {query.shape}, {key.dtype} {key.shape}, {value.dtype} "
                     f"{value.shape}")
  return _attention(query, key, value)


def _scale(query: jax.Array) -> np.float32:
  return np.float32(query.shape[-1] ** -0.5)


def _forward_call(query, key, value):
  *batch, length, heads, _ = query.shape
  lse = jax.ShapeDtypeStruct((*batch, heads, length), jnp.float32)
  call = jax.ffi.ffi_call(FORWARD, (jax.ShapeDtypeStruct(query.shape, query.dtype), lse),
                          vmap_method="broadcast_all")
  return call(query, key, value, scale=_scale(query))


@jax.custom_vjp
def _attention(query, key, value):
  return _forward_call(query, key, value)[0]


def _attention_forward(query, key, value):
  out, lse = _forward_call(query, key, value)
  return out, (query, key, value, out, lse)


def _attention_backward(residuals, d_out):
  query, key, value, out, lse = residuals
  shapes = tuple(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (query, key, value))
  call = jax.ffi.ffi_call(BACKWARD, shapes, vmap_method="broadcast_all")
  return call(query, key, value, out, lse, d_out.astype(out.dtype), scale=_scale(query))


_attention.defvjp(_attention_forward, _attention_backward)
