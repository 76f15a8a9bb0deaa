"""The Stable Diffusion 1.x/2.x conditional UNet (diffusers ``UNet2DConditionModel``).

Text enters through cross-attention in the ``CrossAttn*`` blocks; InstructPix2Pix
uses the same network with ``in_channels=8`` (noisy latent first, then the source
image latent, concatenated on channels). NHWC in and out::

    eps = UNet2DConditionModel(config).apply({"params": p}, sample, timesteps, context)

Attention scores are computed in float32 when the config says
``upcast_attention`` (Stable Diffusion 2.x does), as diffusers does.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from ip2p_jax import sharding as ax
from ip2p_jax.models import layers
from ip2p_jax.models.configuration import ConfigError, parse_config, to_dict

Dtype = Any

DOWN_BLOCKS = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCKS = ("CrossAttnUpBlock2D", "UpBlock2D")


@dataclasses.dataclass(frozen=True)
class UNetConfig:
  """diffusers' UNet2DConditionModel config keys that this implementation reads."""
  sample_size: int | None = 64
  in_channels: int = 4
  out_channels: int = 4
  center_input_sample: bool = False
  flip_sin_to_cos: bool = True
  freq_shift: int = 0
  down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
  mid_block_type: str = "UNetMidBlock2DCrossAttn"
  up_block_types: tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
  only_cross_attention: bool | tuple[bool, ...] = False
  block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
  layers_per_block: int | tuple[int, ...] = 2
  downsample_padding: int = 1
  mid_block_scale_factor: float = 1.0
  norm_num_groups: int = 32
  norm_eps: float = 1e-5
  cross_attention_dim: int = 768
  transformer_layers_per_block: int | tuple[int, ...] = 1
  attention_head_dim: int | tuple[int, ...] = 8  # diffusers' name; it is the number of heads
  use_linear_projection: bool = False
  upcast_attention: bool = False  # attention scores and softmax in float32
  conv_in_kernel: int = 3
  conv_out_kernel: int = 3

  # Options of other model families (SDXL, LCM, Kandinsky, ...), only at their defaults.
  UNSUPPORTED = {
      "dropout": 0.0, "act_fn": "silu", "reverse_transformer_layers_per_block": None,
      "encoder_hid_dim": None, "encoder_hid_dim_type": None, "num_attention_heads": None,
      "dual_cross_attention": False, "class_embed_type": None, "addition_embed_type": None,
      "addition_time_embed_dim": None, "num_class_embeds": None,
      "resnet_time_scale_shift": "default", "resnet_skip_time_act": False,
      "resnet_out_scale_factor": 1.0, "time_embedding_type": "positional",
      "time_embedding_dim": None, "time_embedding_act_fn": None, "timestep_post_act": None,
      "time_cond_proj_dim": None, "projection_class_embeddings_input_dim": None,
      "attention_type": "default", "class_embeddings_concat": False,
      "mid_block_only_cross_attention": None, "cross_attention_norm": None,
  }
  IGNORED = frozenset({"addition_embed_type_num_heads"})

  @classmethod
  def from_dict(cls, raw: Mapping[str, Any]) -> "UNetConfig":
    config = parse_config(cls, raw, component="UNet2DConditionModel",
                          unsupported=cls.UNSUPPORTED, ignored=cls.IGNORED)
    config.validate()
    return config

  def to_dict(self) -> dict[str, Any]:
    return {"_class_name": "UNet2DConditionModel", **to_dict(self)}

  def validate(self) -> None:
    n = len(self.block_out_channels)
    if len(self.down_block_types) != n or len(self.up_block_types) != n:
      raise ValueError("UNet2DConditionModel: down_block_types, up_block_types and "
                       "block_out_channels must have the same length")
    for key, kinds, allowed in (("down_block_types", self.down_block_types, DOWN_BLOCKS),
                                ("up_block_types", self.up_block_types, UP_BLOCKS)):
      bad = [k for k in kinds if k not in allowed]
      if bad:
        raise ConfigError(f"UNet2DConditionModel: config key {key!r} has unsupported "
                          f"block types {bad}; supported: {list(allowed)}")
    if self.mid_block_type != "UNetMidBlock2DCrossAttn":
      raise ConfigError(f"UNet2DConditionModel: config key 'mid_block_type' = "
                        f"{self.mid_block_type!r} is not supported (only 'UNetMidBlock2DCrossAttn')")

  def per_block(self, value) -> tuple:
    """An int-or-list option expanded to one value per down block."""
    return tuple(value) if isinstance(value, tuple) else (value,) * len(self.block_out_channels)


class Transformer2DModel(nn.Module):
  """Spatial transformer: GroupNorm, ``proj_in`` (1x1 conv or linear), ``depth``
  BasicTransformerBlocks over the flattened pixels, ``proj_out``, residual."""
  heads: int
  head_dim: int
  depth: int = 1
  groups: int = 32
  use_linear_projection: bool = False
  only_cross_attention: bool = False
  attention_implementation: str | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  upcast: bool = False  # attention scores in float32

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    b, h, w, c = x.shape
    inner = self.heads * self.head_dim
    y = layers.group_norm(self.groups, 1e-6, name="norm", **kw)(x)
    if self.use_linear_projection:
      y = layers.dense(inner, (ax.EMBED, ax.MLP), name="proj_in", **kw)(y.reshape(b, h * w, c))
    else:
      y = layers.conv(inner, 1, name="proj_in", **kw)(y).reshape(b, h * w, inner)
    for i in range(self.depth):
      y = BasicTransformerBlock(self.heads, self.head_dim, self.only_cross_attention,
                                self.attention_implementation, upcast=self.upcast,
                                name=f"transformer_blocks_{i}", **kw)(y, context)
    if self.use_linear_projection:
      y = layers.dense(c, (ax.MLP, ax.EMBED), name="proj_out", **kw)(y).reshape(b, h, w, c)
    else:
      y = layers.conv(c, 1, name="proj_out", **kw)(y.reshape(b, h, w, inner))
    return y + x


class BasicTransformerBlock(nn.Module):
  """Pre-norm self-attention, cross-attention to the text, GEGLU feed-forward."""
  heads: int
  head_dim: int
  only_cross_attention: bool = False
  attention_implementation: str | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  upcast: bool = False  # attention scores in float32

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    attn = dict(heads=self.heads, head_dim=self.head_dim,
                implementation=self.attention_implementation, upcast=self.upcast, **kw)
    h = layers.layer_norm(1e-5, name="norm1", **kw)(x)
    x = x + layers.Attention(name="attn1", **attn)(
        h, context if self.only_cross_attention else None)
    h = layers.layer_norm(1e-5, name="norm2", **kw)(x)
    x = x + layers.Attention(name="attn2", **attn)(h, context)
    h = layers.layer_norm(1e-5, name="norm3", **kw)(x)
    return x + layers.FeedForward(name="ff", **kw)(h)


def _resnet_cls(remat: bool):
  return nn.remat(layers.ResnetBlock2D) if remat else layers.ResnetBlock2D


def _transformer_cls(remat: bool):
  return nn.remat(Transformer2DModel) if remat else Transformer2DModel


class DownBlock(nn.Module):
  """``num_layers`` x (resnet [+ transformer]) then an optional stride-2 downsampler.
  Returns the output and every intermediate state for the skip connections."""
  out_channels: int
  num_layers: int
  heads: int | None  # None: no attention (DownBlock2D)
  depth: int
  add_downsample: bool
  config: UNetConfig
  only_cross_attention: bool = False
  attention_implementation: str | None = None
  remat: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, temb, context):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    cfg = self.config
    states = []
    for i in range(self.num_layers):
      x = _resnet_cls(self.remat)(self.out_channels, cfg.norm_num_groups, cfg.norm_eps,
                                  name=f"resnets_{i}", **kw)(x, temb)
      if self.heads is not None:
        x = _transformer_cls(self.remat)(
            self.heads, self.out_channels // self.heads, self.depth, cfg.norm_num_groups,
            cfg.use_linear_projection, self.only_cross_attention, self.attention_implementation,
            upcast=cfg.upcast_attention, name=f"attentions_{i}", **kw)(x, context)
      states.append(x)
    if self.add_downsample:
      x = layers.Downsample2D(self.out_channels, cfg.downsample_padding,
                              name="downsamplers_0", **kw)(x)
      states.append(x)
    return x, states


class UpBlock(nn.Module):
  """``num_layers`` x (concat skip, resnet [+ transformer]) then an optional upsampler."""
  out_channels: int
  num_layers: int
  heads: int | None
  depth: int
  add_upsample: bool
  config: UNetConfig
  only_cross_attention: bool = False
  attention_implementation: str | None = None
  remat: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, skips, temb, context, upsample_size=None):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    cfg = self.config
    for i in range(self.num_layers):
      x = jnp.concatenate([x, skips[-1 - i]], axis=-1)
      x = _resnet_cls(self.remat)(self.out_channels, cfg.norm_num_groups, cfg.norm_eps,
                                  name=f"resnets_{i}", **kw)(x, temb)
      if self.heads is not None:
        x = _transformer_cls(self.remat)(
            self.heads, self.out_channels // self.heads, self.depth, cfg.norm_num_groups,
            cfg.use_linear_projection, self.only_cross_attention, self.attention_implementation,
            upcast=cfg.upcast_attention, name=f"attentions_{i}", **kw)(x, context)
    if self.add_upsample:
      x = layers.Upsample2D(self.out_channels, name="upsamplers_0", **kw)(x, upsample_size)
    return x


class MidBlock(nn.Module):
  """resnet, transformer, resnet at the lowest resolution."""
  heads: int
  depth: int
  config: UNetConfig
  attention_implementation: str | None = None
  remat: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, temb, context):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    cfg = self.config
    c = x.shape[-1]
    resnet = lambda i: _resnet_cls(self.remat)(c, cfg.norm_num_groups, cfg.norm_eps,
                                               cfg.mid_block_scale_factor, name=f"resnets_{i}", **kw)
    x = resnet(0)(x, temb)
    x = _transformer_cls(self.remat)(
        self.heads, c // self.heads, self.depth, cfg.norm_num_groups, cfg.use_linear_projection,
        False, self.attention_implementation, upcast=cfg.upcast_attention, name="attentions_0",
        **kw)(x, context)
    return resnet(1)(x, temb)


class TimestepEmbedding(nn.Module):
  """Two Dense layers with SiLU between, on the sinusoidal timestep features."""
  features: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = layers.dense(self.features, (ax.EMBED, ax.MLP), name="linear_1", **kw)(x)
    return layers.dense(self.features, (ax.MLP, ax.EMBED), name="linear_2", **kw)(nn.silu(x))


class UNet2DConditionModel(nn.Module):
  """Conditional UNet: ``(sample [B,H,W,C_in], timesteps [B] or scalar,
  encoder_hidden_states [B,L,D]) -> [B,H,W,C_out]``."""
  config: UNetConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_implementation: str | None = None
  remat: bool = False  # rematerialise resnets/transformers in the backward pass

  @nn.compact
  def __call__(self, sample: jax.Array, timesteps: jax.Array,
               encoder_hidden_states: jax.Array) -> jax.Array:
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    blocks = dict(config=cfg, attention_implementation=self.attention_implementation,
                  remat=self.remat, **kw)
    channels = cfg.block_out_channels
    heads = cfg.per_block(cfg.attention_head_dim)
    depths = cfg.per_block(cfg.transformer_layers_per_block)
    num_layers = cfg.per_block(cfg.layers_per_block)
    only_cross = cfg.per_block(cfg.only_cross_attention)
    batch = sample.shape[0]
    context = encoder_hidden_states.astype(self.dtype)

    if cfg.center_input_sample:
      sample = 2 * sample - 1.0
    t = jnp.broadcast_to(jnp.asarray(timesteps), (batch,))
    t_features = layers.sinusoidal_embedding(t, channels[0], flip_sin_to_cos=cfg.flip_sin_to_cos,
                                             freq_shift=cfg.freq_shift)
    emb = TimestepEmbedding(4 * channels[0], name="time_embedding", **kw)(t_features.astype(self.dtype))

    # Activations are constrained (batch over the data axes) only at block boundaries.
    boundary = lambda h: ax.constrain(h, (ax.BATCH, None, None, None))
    x = boundary(layers.conv(channels[0], cfg.conv_in_kernel, name="conv_in", **kw)(
        sample.astype(self.dtype)))
    skips = [x]
    for i, kind in enumerate(cfg.down_block_types):
      x, states = DownBlock(
          channels[i], num_layers[i], heads[i] if kind.startswith("CrossAttn") else None,
          depths[i], i < len(channels) - 1, only_cross_attention=only_cross[i],
          name=f"down_blocks_{i}", **blocks)(x, emb, context)
      x = boundary(x)
      skips.extend(states)

    x = boundary(MidBlock(heads[-1], depths[-1], name="mid_block", **blocks)(x, emb, context))

    rev = lambda seq: tuple(reversed(seq))
    for i, kind in enumerate(cfg.up_block_types):
      n = rev(num_layers)[i] + 1
      block_skips, skips = skips[-n:], skips[:-n]
      is_last = i == len(channels) - 1
      x = UpBlock(
          rev(channels)[i], n, rev(heads)[i] if kind.startswith("CrossAttn") else None,
          rev(depths)[i], not is_last, only_cross_attention=rev(only_cross)[i],
          name=f"up_blocks_{i}", **blocks)(
              x, block_skips, emb, context, None if is_last else skips[-1].shape[1:3])
      x = boundary(x)

    x = layers.group_norm(cfg.norm_num_groups, cfg.norm_eps, silu=True, name="conv_norm_out",
                          **kw)(x)
    return layers.conv(cfg.out_channels, cfg.conv_out_kernel, name="conv_out", **kw)(x)

  def dummy_inputs(self, batch: int = 1, text_length: int = 77):
    """Smallest valid inputs, for ``init``/``eval_shape``."""
    size = 2 ** len(self.config.block_out_channels)
    return (jnp.zeros((batch, size, size, self.config.in_channels), self.dtype),
            jnp.zeros((batch,), jnp.int32),
            jnp.zeros((batch, text_length, self.config.cross_attention_dim), self.dtype))
