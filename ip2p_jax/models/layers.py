"""Building blocks shared by the UNet, the VAE and the CLIP encoders.

Everything is NHWC. Sub-module names follow diffusers/transformers so that
converting a PyTorch state dict is one short table (``checkpoints.formats``):
a PyTorch list entry ``resnets.0`` is the Flax module ``resnets_0``.

All attention in the package goes through :func:`dot_product_attention`, the
one place that picks the kernel (a C++ flash attention on CPU, cuDNN's on GPU,
XLA's otherwise) and, with ``upcast``, computes the scores in float32.
Attention projections keep diffusers' names (``to_q``, ``to_k``, ``to_v``,
``to_out_0``), so a state dict converts by a short table.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from ip2p_jax import sharding as ax
from ip2p_jax.kernels import build as kernels, cpu_attention, cpu_conv, cpu_norm

Dtype = Any

# Tiles of :func:`flash_attention`, (queries per tile as a fraction of the key length,
# score bytes up to which heads share a tile), forward and backward: measured with
# benchmarks/attention_benchmark.py on a 2-core Xeon (BENCHMARKS.md).
FLASH_FORWARD_TILES = (2, 2 ** 21)
FLASH_BACKWARD_TILES = (8, 2 ** 17)


def dense(features: int, axes: tuple[str, str], *, use_bias: bool = True,
          dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
          name: str | None = None) -> nn.Dense:
  """A Dense layer whose kernel ``(in, out)`` and bias ``(out,)`` carry logical axes."""
  return nn.Dense(
      features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
      kernel_init=ax.partitioned(nn.initializers.lecun_normal(), axes),
      bias_init=ax.partitioned(nn.initializers.zeros_init(), (axes[1],)),
      name=name)


def conv(features: int, kernel_size: int = 3, *, stride: int = 1,
         padding: str | Sequence[tuple[int, int]] | None = None, use_bias: bool = True,
         dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
         name: str | None = None) -> "Conv":
  """A 2-D convolution; ``padding`` defaults to PyTorch's symmetric ``k // 2``."""
  if padding is None:
    padding = ((kernel_size // 2,) * 2,) * 2
  return Conv(features, kernel_size, stride=stride, padding=padding, use_bias=use_bias,
              dtype=dtype, param_dtype=param_dtype, name=name)


class Conv(nn.Module):
  """A 2-D convolution of ``[batch, height, width, channels]`` input with flax
  ``nn.Conv``'s parameters (``kernel`` HWIO, ``bias``), initialisation and numerics,
  whose logical axes are declared here; ``padding`` is "SAME", "VALID" or a pair per
  spatial axis (what ``lax.conv_general_dilated`` takes).

  On CPU the float32 3x3 stride-1 layers run the C++ kernels of
  :mod:`ip2p_jax.kernels.cpu_conv` (:func:`~ip2p_jax.kernels.cpu_conv.plan`: both ways,
  1.5-3x XLA:CPU's speed, except where XLA's forward is as fast: layers writing more
  than 64 channels on an AVX2 build, output channels that are not a multiple of 8, or a
  few input channels fanning out to more than 64; there the gradients only). A 1x1
  stride-1 unpadded convolution is one product over the channels (``dot_general``:
  XLA:CPU ran those convolutions at a quarter of its products' speed; XLA turns such a
  convolution into this product on accelerators anyway); everything else runs
  ``lax.conv_general_dilated``. The kernels' layers differentiate in reverse mode once (a custom VJP), not forward mode: set
  ``IP2P_KERNELS=off`` for ``jax.jvp`` or higher derivatives."""
  features: int
  kernel_size: int
  stride: int = 1
  padding: str | Sequence[tuple[int, int]] = "SAME"
  use_bias: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    k = self.kernel_size
    kernel = self.param(
        "kernel", ax.partitioned(nn.initializers.lecun_normal(),
                                 (ax.KERNEL_H, ax.KERNEL_W, ax.CONV_IN, ax.CONV_OUT)),
        (k, k, x.shape[-1], self.features), self.param_dtype)
    x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
    strides = (self.stride, self.stride)
    plan = (cpu_conv.plan(x, kernel, strides, self.padding)
            if jax.default_backend() == "cpu" else None)
    if plan and kernels.load():
      y = cpu_conv.conv3x3(x, kernel, xla_forward=plan == "gradients")
    elif k == 1 and self.stride == 1 and _unpadded(self.padding):
      # A product over the channels: XLA:CPU ran 1x1 convolutions at 40-80 GFLOP/s,
      # its products at ~250 (a 10-step 128 px edit's largest conv_shortcut: 17.7 -> 6.3 ms).
      y = jax.lax.dot_general(x, kernel[0, 0], (((3,), (0,)), ((), ())))
    else:
      y = jax.lax.conv_general_dilated(x, kernel, strides, self.padding,
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"))
    if self.use_bias:
      bias = self.param("bias", ax.partitioned(nn.initializers.zeros_init(), (ax.CONV_OUT,)),
                        (self.features,), self.param_dtype)
      y = y + bias.astype(self.dtype)
    return y


def _unpadded(padding) -> bool:
  return padding in ("VALID", "SAME") or all(tuple(p) == (0, 0) for p in padding)


def group_norm(num_groups: int, epsilon: float, *, silu: bool = False,
               dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
               name: str | None = None) -> "GroupNorm":
  return GroupNorm(num_groups, epsilon, silu=silu, dtype=dtype, param_dtype=param_dtype,
                   name=name)


class GroupNorm(nn.Module):
  """GroupNorm (Wu & He 2018) over the last axis with two-pass variance (PyTorch's
  numerics, not E[x^2]-E[x]^2), statistics in float32; parameters ``scale`` and
  ``bias`` as flax's ``nn.GroupNorm``; ``silu``: followed by SiLU (``nn.silu``), as a
  resnet block's norms are.

  On CPU (float32, from ``cpu_norm.MIN_ELEMENTS``, the kernels built) it runs
  :mod:`ip2p_jax.kernels.cpu_norm`'s C++ kernel, forward and backward (reverse mode
  once, a custom VJP: ``IP2P_KERNELS=off`` for ``jax.jvp``). Elsewhere the statistics
  are summed per channel first and then per group, so the activation is only ever
  broadcast along its channel axis:
  flax's reshape to ``[..., groups, channels // groups]`` costs XLA:CPU index
  arithmetic on every element (this form ran 2-4x faster there; BENCHMARKS.md)."""
  num_groups: int
  epsilon: float
  silu: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    per_group = c // self.num_groups
    scale = self.param("scale", ax.partitioned(nn.initializers.ones_init(), (ax.NORM,)),
                       (c,), self.param_dtype)
    bias = self.param("bias", ax.partitioned(nn.initializers.zeros_init(), (ax.NORM,)),
                      (c,), self.param_dtype)
    x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    if x.ndim >= 2 and cpu_norm.takes(x, scale, self.num_groups):
      flat = x.reshape(x.shape[0], -1, c)
      y = cpu_norm.normalize(flat, scale, bias, self.num_groups, self.epsilon, self.silu)
      return y.reshape(x.shape).astype(self.dtype)
    axes = tuple(range(1, x.ndim - 1))
    count = per_group * math.prod(x.shape[1:-1])
    per_channel = (x.shape[0],) + (1,) * len(axes) + (c,)

    def group_mean(channel_sums):  # [batch, c] -> each channel's group mean, [batch, c]
      sums = channel_sums.reshape(-1, self.num_groups, per_group).sum(-1) / count
      return jnp.repeat(sums, per_group, axis=-1).reshape(per_channel)

    centered = x - group_mean(jnp.sum(x, axes))
    var = group_mean(jnp.sum(jnp.square(centered), axes))
    y = centered * (scale * jax.lax.rsqrt(var + self.epsilon)) + bias
    return (nn.silu(y) if self.silu else y).astype(self.dtype)


def layer_norm(epsilon: float, *, dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32, name: str | None = None) -> "LayerNorm":
  return LayerNorm(epsilon, dtype=dtype, param_dtype=param_dtype, name=name)


class LayerNorm(nn.Module):
  """LayerNorm (Ba et al. 2016) over the last axis, two-pass variance; the parameters,
  their init and numerics of flax's ``nn.LayerNorm(use_fast_variance=False)``. On CPU
  (float32, from ``cpu_norm.MIN_ELEMENTS``, the kernels built) the C++ kernel of
  :mod:`ip2p_jax.kernels.cpu_norm` (one group, one pixel a token; reverse mode once):
  XLA:CPU materialised the scale at the activation's size for every layer norm of a
  transformer block."""
  epsilon: float
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    scale = self.param("scale", ax.partitioned(nn.initializers.ones_init(), (ax.NORM,)),
                       (c,), self.param_dtype)
    bias = self.param("bias", ax.partitioned(nn.initializers.zeros_init(), (ax.NORM,)),
                      (c,), self.param_dtype)
    x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    if cpu_norm.takes(x, scale, 1):
      y = cpu_norm.normalize(x.reshape(-1, 1, c), scale, bias, 1, self.epsilon)
      return y.reshape(x.shape).astype(self.dtype)
    mean = jnp.mean(x, -1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), -1, keepdims=True)
    y = (x - mean) * (jax.lax.rsqrt(var + self.epsilon) * scale) + bias
    return y.astype(self.dtype)


def gelu(x: jax.Array) -> jax.Array:
  """Exact GELU (Hendrycks & Gimpel 2016) as PyTorch writes it, ``x (1 + erf(x / sqrt 2)) / 2``.
  ``jax.nn.gelu(approximate=False)`` uses ``erfc`` for the far negative tail, which
  XLA:CPU evaluates piecewise, 2.5x slower; the two agree within 1e-6 (float32)."""
  return 0.5 * x * (1 + jax.lax.erf(x * jnp.asarray(0.5 ** 0.5, x.dtype)))


def activation(name: str):
  """Activation functions by their diffusers/transformers config names."""
  table = {
      "silu": nn.silu,
      "swish": nn.silu,
      "gelu": gelu,
      "quick_gelu": lambda x: x * nn.sigmoid(1.702 * x),
  }
  if name not in table:
    raise ValueError(f"unsupported activation {name!r}; supported: {sorted(table)}")
  return table[name]


def dot_product_attention(query: jax.Array, key: jax.Array, value: jax.Array, *,
                          mask: jax.Array | None = None, is_causal: bool = False,
                          implementation: str | None = None, upcast: bool = False) -> jax.Array:
  """Softmax attention, ``[batch, length, heads, head_dim]`` in and out.

  The one attention function of the package. ``implementation``:
    * None: chosen per backend: on CPU without a mask "cpu_flash" where it takes the
      call (float32, head_dim a multiple of 8, the kernel built), "flash" otherwise;
      "cudnn" on an NVIDIA GPU where cuDNN's flash kernel takes the call
      (:func:`cudnn_takes`, then cuDNN's own checks of the call and of its
      differentiation, probed on abstract values: a refusal falls back to XLA); "xla"
      otherwise (masks on CPU, float32 on GPU, TPU);
    * "cpu_flash": :func:`ip2p_jax.kernels.cpu_attention.flash_attention`, FlashAttention
      in C++ through XLA's FFI (CPU only, float32; no masks);
    * "flash": :func:`flash_attention`, blocked in XLA, its backward recomputing the
      scores instead of keeping the probability matrix; no masks;
    * "xla" / "cudnn": ``jax.nn.dot_product_attention`` (XLA's one-shot softmax, or
      cuDNN's fused flash attention, bf16/fp16 only).
  ``upcast``: query and key (and so the scores and the softmax) in float32, the
  output in the input dtype (diffusers' ``upcast_attention``); not with "cudnn".

  No kernel hands out the attention probabilities. Code that reads or replaces them
  intercepts :meth:`Attention.attend`, which receives the projected query, key and
  value before any kernel runs (see there): the UNet's and CLIP's attention. The VAE's
  mid-block attention calls this function directly and cannot be intercepted.
  """
  chosen = implementation is None
  if chosen:
    if jax.default_backend() == "cpu":
      implementation = "flash" if mask is None and not is_causal else "xla"
      if (implementation == "flash" and cpu_attention.takes(query, key, value)
          and kernels.load()):
        implementation = "cpu_flash"
    else:
      implementation = "cudnn" if not upcast and cudnn_takes(query, key, value, mask) else "xla"
  dtype = query.dtype
  if upcast and dtype != jnp.float32:
    if implementation == "cudnn":
      raise ValueError("upcast attention computes scores in float32, which cuDNN's fused "
                       "kernel does not take; use implementation='xla' or None")
    query, key = query.astype(jnp.float32), key.astype(jnp.float32)
    if implementation != "flash":
      value = value.astype(jnp.float32)  # jax.nn's kernels take one dtype
  if implementation in ("flash", "cpu_flash"):
    if mask is not None or is_causal:
      raise ValueError("flash attention does not take masks; use implementation='xla'")
    kernel = cpu_attention.flash_attention if implementation == "cpu_flash" else flash_attention
    return kernel(query, key, value).astype(dtype)
  if implementation == "cudnn" and chosen:
    cudnn = functools.partial(jax.nn.dot_product_attention, mask=mask, is_causal=is_causal,
                              implementation="cudnn")
    try:
      # cuDNN checks shapes in its differentiation rule too (jax 0.11.2 refuses odd
      # lengths there: an H200 refused the training step's cross-attention, 1024 queries
      # against 77 keys). Under remat or scan that rule runs after this call returns, so
      # probe it now, on abstract values; XLA's kernel takes every shape.
      abstract = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (query, key, value)]
      jax.eval_shape(lambda q, k, v: jax.vjp(cudnn, q, k, v)[0], *abstract)
      return cudnn(query, key, value).astype(dtype)
    except NotImplementedError:
      implementation = "xla"
  return jax.nn.dot_product_attention(query, key, value, mask=mask, is_causal=is_causal,
                                      implementation=implementation).astype(dtype)


def cudnn_takes(query: jax.Array, key: jax.Array, value: jax.Array,
                mask: jax.Array | None = None) -> bool:
  """Whether cuDNN's flash attention runs these operands: an NVIDIA GPU of compute
  capability 8.0 or later, bf16/fp16, no mask, one head_dim, a multiple of 8 up to 128
  (256 from compute capability 9.0), as ``jax._src.cudnn`` checks."""
  device = jax.devices()[0]
  capability = getattr(device, "compute_capability", None)
  if device.platform != "gpu" or capability is None or mask is not None:
    return False
  major_minor = tuple(int(x) for x in str(capability).split(".")[:2])
  d = query.shape[-1]
  return (major_minor >= (8, 0)
          and query.dtype in (jnp.bfloat16, jnp.float16)
          and query.dtype == key.dtype == value.dtype
          and d == key.shape[-1] == value.shape[-1] and d % 8 == 0
          and d <= (256 if major_minor >= (9, 0) else 128))


def flash_attention(query: jax.Array, key: jax.Array, value: jax.Array, *,
                    forward_tiles: tuple[int, int] = FLASH_FORWARD_TILES,
                    backward_tiles: tuple[int, int] = FLASH_BACKWARD_TILES) -> jax.Array:
  """Softmax attention over tiles of queries whose backward recomputes the scores.

  FlashAttention (Dao et al. 2022, "FlashAttention: Fast and Memory-Efficient Exact
  Attention with IO-Awareness", Algorithms 1 and 2) shaped for a CPU. A tile is
  ``block`` queries of ``group`` heads against all their keys (:func:`flash_tiles`).
  As each tile sees all keys, FlashAttention's online softmax over key blocks reduces
  to one exact softmax per row. The forward keeps the output and each row's
  log-sum-exp only; the backward (a ``jax.custom_vjp``, in tiles of its own) recomputes
  each tile's probabilities from them, so neither pass holds the ``Lq x Lk``
  probability matrix. ``[batch, length, heads, head_dim]`` in and out; lengths need
  not be multiples of the block (the last block is padded). The loops run over
  ``batch x heads``: with the batch sharded over several CPU devices XLA gathers it
  first (correct, not partitioned); GPUs and TPUs take cuDNN's or XLA's kernel.
  """
  b, lq, h, d = query.shape
  lk = key.shape[1]
  heads_major = lambda x: jnp.transpose(x, (0, 2, 1, 3)).reshape(b * h, -1, d)
  q = heads_major(query * jnp.asarray(d ** -0.5, query.dtype))
  out = _flash(flash_tiles(b * h, lq, lk, *forward_tiles),
               flash_tiles(b * h, lq, lk, *backward_tiles), q, heads_major(key),
               heads_major(value))
  return jnp.transpose(out.reshape(b, h, lq, d), (0, 2, 1, 3))


def flash_tiles(heads: int, lq: int, lk: int, key_fraction: int,
                group_bytes: int) -> tuple[int, int]:
  """``(block, group)``: ``lk / key_fraction`` queries per tile (at least 128 and at
  most 16 MiB of scores), then as many heads as keep the tile within ``group_bytes``.
  XLA:CPU pays per loop iteration, so long keys want tall tiles; short keys want tiles
  that stay in a core's cache, the backward (which makes three score-sized arrays per
  tile) smaller ones than the forward."""
  row_bytes = 4 * lk
  block = min(lq, max(8, min(max(128, lk // key_fraction), 2 ** 24 // row_bytes)))
  group = max(g for g in range(1, heads + 1)
              if heads % g == 0 and (g == 1 or g * block * row_bytes <= group_bytes))
  return block, group


def _tile(x: jax.Array, block: int, group: int) -> jax.Array:
  """``[n, l, ...]`` -> ``[n / group, blocks, group, block, ...]``, the last block padded."""
  n, l = x.shape[:2]
  blocks = -(-l // block)
  x = jnp.pad(x, ((0, 0), (0, blocks * block - l)) + ((0, 0),) * (x.ndim - 2))
  x = x.reshape((n // group, group, blocks, block) + x.shape[2:])
  return jnp.swapaxes(x, 1, 2)


def _untile(x: jax.Array, length: int) -> jax.Array:
  """The inverse of :func:`_tile`."""
  x = jnp.swapaxes(x, 1, 2)
  return x.reshape((x.shape[0] * x.shape[1], -1) + x.shape[4:])[:, :length]


def _grouped(x: jax.Array, group: int) -> jax.Array:
  return x.reshape((x.shape[0] // group, group) + x.shape[1:])


def _map(f, xs):
  """``lax.map``, or a plain call when there is one element: a program of one tile has
  no loop to trace, compile or run."""
  if jax.tree.leaves(xs)[0].shape[0] > 1:
    return jax.lax.map(f, xs)
  return jax.tree.map(lambda y: y[None], f(jax.tree.map(lambda x: x[0], xs)))


def _scan(f, init, xs):
  """``lax.scan``, or a plain call when there is one element (see :func:`_map`)."""
  if jax.tree.leaves(xs)[0].shape[0] > 1:
    return jax.lax.scan(f, init, xs)
  carry, y = f(init, jax.tree.map(lambda x: x[0], xs))
  return carry, jax.tree.map(lambda t: t[None], y)


def _scores(q: jax.Array, k: jax.Array) -> jax.Array:
  return jnp.einsum("gqd,gkd->gqk", q, k, preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _flash(forward_tiles, backward_tiles, q, k, v):
  """``softmax(q k^T) v`` tile by tile; ``q [n, lq, d]`` (scaled), ``k, v [n, lk, d]``."""
  return _flash_forward(forward_tiles, backward_tiles, q, k, v)[0]


def _flash_forward(tiles, backward_tiles, q, k, v):
  del backward_tiles
  block, group = tiles

  def heads(xs):
    q_group, k_group, v_group = xs

    def tile(q_tile):
      s = _scores(q_tile, k_group)
      m = jnp.max(s, axis=-1, keepdims=True)
      p = jnp.exp(s - m)
      norm = jnp.sum(p, axis=-1, keepdims=True)
      o = jnp.einsum("gqk,gkd->gqd", p.astype(v.dtype), v_group,
                     preferred_element_type=jnp.float32) / norm
      return o.astype(q.dtype), (m + jnp.log(norm))[..., 0]

    return _map(tile, q_group)

  out, lse = _map(heads, (_tile(q, block, group), _grouped(k, group), _grouped(v, group)))
  out, lse = _untile(out, q.shape[1]), _untile(lse, q.shape[1])
  return out, (q, k, v, out, lse)


def _flash_backward(forward_tiles, tiles, residuals, d_out):
  """FlashAttention's backward (Algorithm 2 of Dao et al.): per tile
  ``P = exp(S - lse)``, ``dV += P^T dO``, ``dS = P * (dO V^T - rowsum(dO * O))``,
  ``dQ = dS K``, ``dK += dS^T Q``. The key and value gradients accumulate transposed,
  ``[group, d, lk]``, so that every product contracts a minor dimension (XLA:CPU runs
  them 2x faster than contracting the tile's query axis in place)."""
  del forward_tiles
  block, group = tiles
  q, k, v, out, lse = residuals
  delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)

  def heads(xs):
    q_group, k_group, v_group, do_group, lse_group, delta_group = xs

    def tile(carry, ys):
      dk_t, dv_t = carry
      q_tile, do_tile, lse_tile, delta_tile = ys
      p = jnp.exp(_scores(q_tile, k_group) - lse_tile[..., None])
      dv_t = dv_t + jnp.einsum("gqd,gqk->gdk", do_tile, p.astype(v.dtype),
                               preferred_element_type=jnp.float32)
      dp = jnp.einsum("gqd,gkd->gqk", do_tile, v_group, preferred_element_type=jnp.float32)
      ds = (p * (dp - delta_tile[..., None])).astype(q.dtype)
      dq = jnp.einsum("gqk,gkd->gqd", ds, k_group, preferred_element_type=jnp.float32)
      dk_t = dk_t + jnp.einsum("gqd,gqk->gdk", q_tile, ds, preferred_element_type=jnp.float32)
      return (dk_t, dv_t), dq.astype(q.dtype)

    lk, d = k_group.shape[1:]
    zeros = jnp.zeros((group, d, lk), jnp.float32)
    (dk_t, dv_t), dq = _scan(tile, (zeros, zeros),
                             (q_group, do_group, lse_group, delta_group))
    return dq, jnp.swapaxes(dk_t, -1, -2), jnp.swapaxes(dv_t, -1, -2)

  tiled = lambda x: _tile(x, block, group)
  dq, dk, dv = _map(heads, (tiled(q), _grouped(k, group), _grouped(v, group),
                            tiled(d_out), tiled(lse), tiled(delta)))
  return (_untile(dq, q.shape[1]), dk.reshape(k.shape).astype(k.dtype),
          dv.reshape(v.shape).astype(v.dtype))


_flash.defvjp(_flash_forward, _flash_backward)


class Attention(nn.Module):
  """Multi-head attention with separate q/k/v/out projections (diffusers' ``Attention``).

  Self-attention when ``context`` is None, cross-attention otherwise. The
  projection names default to diffusers' (``to_q``, ``to_k``, ``to_v``,
  ``to_out_0``); CLIP passes transformers' names.
  """
  heads: int
  head_dim: int
  out_features: int | None = None
  qkv_bias: bool = False
  names: tuple[str, str, str, str] = ("to_q", "to_k", "to_v", "to_out_0")
  implementation: str | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  upcast: bool = False  # scores in float32 (see dot_product_attention)

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array | None = None, *,
               mask: jax.Array | None = None, is_causal: bool = False) -> jax.Array:
    self_attention = context is None
    kv_axis = ax.EMBED if context is None else ax.KV
    context = x if context is None else context
    inner = self.heads * self.head_dim
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    q = dense(inner, (ax.EMBED, ax.HEADS), use_bias=self.qkv_bias, name=self.names[0], **kw)(x)
    k = dense(inner, (kv_axis, ax.HEADS), use_bias=self.qkv_bias, name=self.names[1], **kw)(context)
    v = dense(inner, (kv_axis, ax.HEADS), use_bias=self.qkv_bias, name=self.names[2], **kw)(context)
    split = lambda t: t.reshape(t.shape[:-1] + (self.heads, self.head_dim))
    out = self.attend(split(q), split(k), split(v), mask=mask, is_causal=is_causal,
                      self_attention=self_attention)
    out = out.reshape(out.shape[:-2] + (inner,))
    return dense(self.out_features or x.shape[-1], (ax.HEADS, ax.EMBED), name=self.names[3],
                 **kw)(out)

  def attend(self, query: jax.Array, key: jax.Array, value: jax.Array, *,
             mask: jax.Array | None = None, is_causal: bool = False,
             self_attention: bool = False) -> jax.Array:
    """The attention between the projections, ``[batch, length, heads, head_dim]``.

    A method of its own so that flax's ``nn.intercept_methods`` can observe or change
    its inputs from outside the model. With no interceptor installed nothing is added
    to the traced program. The kernels never hand out the probabilities
    ``softmax(q k^T / sqrt(d))``, so an interceptor works on what defines them:
      * to replace one image's probabilities by another's, pass that image's query
        and key on (Prompt-to-Prompt in ``ip2p_jax.synth`` does this): the kernel,
        flash included, then computes exactly those probabilities with its own values;
      * to read them, compute ``jax.nn.softmax(q k^T / sqrt(d))`` from the arguments
        in the interceptor (the one place they are materialised);
      * to edit them arbitrarily (reweighting a token), compute the attention itself
        from its arguments instead of calling the next function;
      * a ``mask`` reaches XLA's kernel (flash takes none), as does a causal one.
    All of these differentiate like any JAX code; only the uninterrupted path runs
    the flash kernel's custom backward."""
    del self_attention  # read by interceptors only
    return dot_product_attention(query, key, value, mask=mask, is_causal=is_causal,
                                 implementation=self.implementation, upcast=self.upcast)


class GEGLU(nn.Module):
  """Gated GELU (Shazeer 2020): ``proj`` writes value and gate, value * gelu(gate)."""
  inner: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    value, gate = _ValueAndGate(self.inner, dtype=self.dtype, param_dtype=self.param_dtype,
                                name="proj")(x)
    return value * gelu(gate)


class _ValueAndGate(nn.Module):
  """GEGLU's ``proj``: ``nn.Dense(2 inner)``'s parameters and init (diffusers' layout:
  value then gate along the output), applied as two products, one per half. One product
  and a split cost the backward a concatenation of the two halves' gradients at the
  activation's size (XLA:CPU: ~8% of a small UNet's feed-forward time)."""
  inner: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    kernel = self.param("kernel", ax.partitioned(nn.initializers.lecun_normal(),
                                                 (ax.EMBED, ax.MLP)),
                        (x.shape[-1], 2 * self.inner), self.param_dtype)
    bias = self.param("bias", ax.partitioned(nn.initializers.zeros_init(), (ax.MLP,)),
                      (2 * self.inner,), self.param_dtype)
    x, kernel, bias = (a.astype(self.dtype) for a in (x, kernel, bias))
    half = lambda k, b: jax.lax.dot_general(x, k, (((x.ndim - 1,), (0,)), ((), ()))) + b
    return (half(kernel[:, :self.inner], bias[:self.inner]),
            half(kernel[:, self.inner:], bias[self.inner:]))


class FeedForward(nn.Module):
  """diffusers' ``FeedForward`` with GEGLU: ``net_0`` (GEGLU) then ``net_2`` (Dense)."""
  mult: int = 4
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = GEGLU(self.mult * x.shape[-1], name="net_0", **kw)(x)
    return dense(x.shape[-1], (ax.MLP, ax.EMBED), name="net_2", **kw)(h)


class ResnetBlock2D(nn.Module):
  """GroupNorm-SiLU-conv twice, with an optional time embedding added in between."""
  out_channels: int
  groups: int = 32
  eps: float = 1e-6
  output_scale_factor: float = 1.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, temb: jax.Array | None = None) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = group_norm(self.groups, self.eps, silu=True, name="norm1", **kw)(x)
    h = conv(self.out_channels, 3, name="conv1", **kw)(h)
    if temb is not None:
      t = dense(self.out_channels, (ax.EMBED, ax.MLP), name="time_emb_proj", **kw)(nn.silu(temb))
      h = h + t[:, None, None, :]
    h = group_norm(self.groups, self.eps, silu=True, name="norm2", **kw)(h)
    h = conv(self.out_channels, 3, name="conv2", **kw)(h)
    if x.shape[-1] != self.out_channels:
      x = conv(self.out_channels, 1, name="conv_shortcut", **kw)(x)
    return (x + h) / self.output_scale_factor


class Downsample2D(nn.Module):
  """Stride-2 3x3 convolution. ``padding`` 1 is symmetric (UNet); 0 pads only the
  bottom/right edge by one pixel (the VAE encoder, as in diffusers)."""
  out_channels: int
  padding: int = 1
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    pad = ((1, 1), (1, 1)) if self.padding == 1 else ((0, 1), (0, 1))
    return conv(self.out_channels, 3, stride=2, padding=pad, dtype=self.dtype,
                param_dtype=self.param_dtype, name="conv")(x)


def nearest_resize(x: jax.Array, size: tuple[int, int]) -> jax.Array:
  """PyTorch ``interpolate(mode="nearest")``: source index = floor(dst * in / out)."""
  h, w = x.shape[1:3]
  rows = (jnp.arange(size[0]) * h) // size[0]
  cols = (jnp.arange(size[1]) * w) // size[1]
  return x[:, rows][:, :, cols]


class Upsample2D(nn.Module):
  """Nearest-neighbour upsampling (2x, or to ``size``) followed by a 3x3 convolution."""
  out_channels: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, size: tuple[int, int] | None = None) -> jax.Array:
    x = nearest_resize(x, size or (2 * x.shape[1], 2 * x.shape[2]))
    return conv(self.out_channels, 3, dtype=self.dtype, param_dtype=self.param_dtype,
                name="conv")(x)


def sinusoidal_embedding(timesteps: jax.Array, dim: int, *, flip_sin_to_cos: bool,
                         freq_shift: float, max_period: float = 10000.0) -> jax.Array:
  """Transformer sinusoidal timestep features (diffusers ``get_timestep_embedding``)."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift))
  args = timesteps.astype(jnp.float32)[:, None] * freqs[None, :]
  sin, cos = jnp.sin(args), jnp.cos(args)
  emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb
