"""Building blocks shared by the UNet, the VAE and the CLIP encoders.

Everything is NHWC. Sub-module names follow diffusers/transformers so that
converting a PyTorch state dict is one short table (``checkpoints.formats``):
a PyTorch list entry ``resnets.0`` is the Flax module ``resnets_0``.

All attention in the package goes through :func:`dot_product_attention`, the
one place that picks the kernel (XLA, cuDNN flash attention on GPU, or a
chunked form for CPU) and, with ``upcast``, computes the scores in float32.
Attention projections keep diffusers' names (``to_q``, ``to_k``, ``to_v``,
``to_out_0``), so a state dict converts by a short table.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from ip2p_jax import sharding as ax

Dtype = Any


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
         name: str | None = None) -> nn.Conv:
  """A 2-D convolution; ``padding`` defaults to PyTorch's symmetric ``k // 2``."""
  if padding is None:
    padding = ((kernel_size // 2,) * 2,) * 2
  return nn.Conv(
      features, (kernel_size, kernel_size), strides=(stride, stride), padding=padding,
      use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
      kernel_init=ax.partitioned(nn.initializers.lecun_normal(),
                                 (ax.KERNEL_H, ax.KERNEL_W, ax.CONV_IN, ax.CONV_OUT)),
      bias_init=ax.partitioned(nn.initializers.zeros_init(), (ax.CONV_OUT,)),
      name=name)


def group_norm(num_groups: int, epsilon: float, *, dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32, name: str | None = None) -> nn.GroupNorm:
  """GroupNorm with two-pass variance (PyTorch's numerics, not E[x^2]-E[x]^2)."""
  return nn.GroupNorm(
      num_groups=num_groups, epsilon=epsilon, dtype=dtype, param_dtype=param_dtype,
      use_fast_variance=False,
      scale_init=ax.partitioned(nn.initializers.ones_init(), (ax.NORM,)),
      bias_init=ax.partitioned(nn.initializers.zeros_init(), (ax.NORM,)),
      name=name)


def layer_norm(epsilon: float, *, dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32, name: str | None = None) -> nn.LayerNorm:
  return nn.LayerNorm(
      epsilon=epsilon, dtype=dtype, param_dtype=param_dtype, use_fast_variance=False,
      scale_init=ax.partitioned(nn.initializers.ones_init(), (ax.NORM,)),
      bias_init=ax.partitioned(nn.initializers.zeros_init(), (ax.NORM,)),
      name=name)


def activation(name: str):
  """Activation functions by their diffusers/transformers config names."""
  table = {
      "silu": nn.silu,
      "swish": nn.silu,
      "gelu": lambda x: nn.gelu(x, approximate=False),
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
    * None: "chunked" on CPU for unmasked attention, else JAX's choice;
    * "xla" / "cudnn": ``jax.nn.dot_product_attention`` (cuDNN's fused flash
      kernel on NVIDIA GPUs, bf16/fp16 only);
    * "chunked": :func:`chunked_attention`.
  ``upcast``: query and key (and so the scores and the softmax) in float32, the
  output in the input dtype (diffusers' ``upcast_attention``); not with "cudnn".
  """
  if implementation is None:
    unmasked = mask is None and not is_causal
    implementation = "chunked" if unmasked and jax.default_backend() == "cpu" else None
  dtype = query.dtype
  if upcast and dtype != jnp.float32:
    if implementation == "cudnn":
      raise ValueError("upcast attention computes scores in float32, which cuDNN's fused "
                       "kernel does not take; use implementation='xla' or None")
    query, key = query.astype(jnp.float32), key.astype(jnp.float32)
    if implementation != "chunked":
      value = value.astype(jnp.float32)  # jax.nn's kernels take one dtype
  if implementation == "chunked":
    if mask is not None or is_causal:
      raise ValueError("chunked attention does not take masks; use implementation='xla'")
    return chunked_attention(query, key, value).astype(dtype)
  return jax.nn.dot_product_attention(query, key, value, mask=mask, is_causal=is_causal,
                                      implementation=implementation).astype(dtype)


def chunked_attention(query: jax.Array, key: jax.Array, value: jax.Array,
                      max_score_bytes: int = 16 * 2 ** 20) -> jax.Array:
  """Attention in [batch, heads, length, dim] layout over blocks of queries.

  Each block's score matrix stays within ``max_score_bytes`` (about a CPU's last-level
  cache) instead of materialising all ``Lq x Lk`` scores: 3-8x faster than the
  one-shot form on CPU for the UNet's long pixel sequences (benchmarks/BENCHMARKS.md).
  """
  b, lq, h, d = query.shape
  lk = key.shape[1]
  chunk = lq
  while chunk > 16 and chunk % 2 == 0 and b * h * chunk * lk * 4 > max_score_bytes:
    chunk //= 2
  q = jnp.transpose(query, (0, 2, 1, 3)) * jnp.asarray(d ** -0.5, query.dtype)
  k_t = jnp.transpose(key, (0, 2, 3, 1))   # [b, h, d, lk]
  v = jnp.transpose(value, (0, 2, 1, 3))   # [b, h, lk, d]

  def block(q_block):
    scores = jnp.matmul(q_block, k_t, preferred_element_type=jnp.float32)
    weights = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.matmul(weights, v)

  if chunk == lq:
    out = block(q)
  else:
    blocks = jnp.moveaxis(q.reshape(b, h, lq // chunk, chunk, d), 2, 0)
    out = jnp.moveaxis(jax.lax.map(block, blocks), 0, 2).reshape(b, h, lq, d)
  return jnp.transpose(out, (0, 2, 1, 3))


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
    its inputs from outside the model (Prompt-to-Prompt in ``ip2p_jax.synth`` replaces
    one image's self-attention query and key by another's). With no interceptor
    installed nothing is added to the traced program."""
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
    h = dense(2 * self.inner, (ax.EMBED, ax.MLP), dtype=self.dtype,
              param_dtype=self.param_dtype, name="proj")(x)
    value, gate = jnp.split(h, 2, axis=-1)
    return value * nn.gelu(gate, approximate=False)


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
    h = nn.silu(group_norm(self.groups, self.eps, name="norm1", **kw)(x))
    h = conv(self.out_channels, 3, name="conv1", **kw)(h)
    if temb is not None:
      t = dense(self.out_channels, (ax.EMBED, ax.MLP), name="time_emb_proj", **kw)(nn.silu(temb))
      h = h + t[:, None, None, :]
    h = nn.silu(group_norm(self.groups, self.eps, name="norm2", **kw)(h))
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
