"""The KL autoencoder of latent diffusion (diffusers ``AutoencoderKL``).

Images are NHWC in [-1, 1]; latents are NHWC with ``latent_channels``::

    posterior = vae.apply({"params": p}, images, method="encode")  # DiagonalGaussian
    images = vae.apply({"params": p}, latents, method="decode")

Diffusion runs on ``scaling_factor * posterior.sample(key)``; InstructPix2Pix
conditions on ``posterior.mode()`` *unscaled* (Brooks et al. 2023; diffusers'
``StableDiffusionInstructPix2PixPipeline.prepare_image_latents`` does the same).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from ip2p_jax import sharding as ax
from ip2p_jax.models import layers
from ip2p_jax.models.configuration import ConfigError, parse_config, to_dict

Dtype = Any


@dataclasses.dataclass(frozen=True)
class VAEConfig:
  in_channels: int = 3
  out_channels: int = 3
  down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",) * 4
  up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",) * 4
  block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
  layers_per_block: int = 2
  latent_channels: int = 4
  norm_num_groups: int = 32
  sample_size: int = 512
  scaling_factor: float = 0.18215
  shift_factor: float | None = None
  latents_mean: tuple[float, ...] | None = None
  latents_std: tuple[float, ...] | None = None
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True
  mid_block_add_attention: bool = True

  UNSUPPORTED = {"act_fn": "silu"}
  IGNORED = frozenset({"force_upcast"})

  @classmethod
  def from_dict(cls, raw: Mapping[str, Any]) -> "VAEConfig":
    config = parse_config(cls, raw, component="AutoencoderKL", unsupported=cls.UNSUPPORTED,
                          ignored=cls.IGNORED)
    for key, kinds, allowed in (("down_block_types", config.down_block_types, "DownEncoderBlock2D"),
                                ("up_block_types", config.up_block_types, "UpDecoderBlock2D")):
      if any(k != allowed for k in kinds) or len(kinds) != len(config.block_out_channels):
        raise ConfigError(f"AutoencoderKL: config key {key!r} = {list(kinds)} is not supported "
                          f"(one {allowed!r} per entry of block_out_channels)")
    return config

  def to_dict(self) -> dict[str, Any]:
    return {"_class_name": "AutoencoderKL", "act_fn": "silu", **to_dict(self)}


@flax.struct.dataclass
class DiagonalGaussian:
  """The encoder's posterior N(mean, exp(logvar)), per latent element."""
  mean: jax.Array
  logvar: jax.Array

  @classmethod
  def from_moments(cls, moments: jax.Array) -> "DiagonalGaussian":
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return cls(mean, jnp.clip(logvar, -30.0, 20.0))

  @property
  def std(self) -> jax.Array:
    return jnp.exp(0.5 * self.logvar)

  def mode(self) -> jax.Array:
    return self.mean

  def sample(self, key: jax.Array) -> jax.Array:
    return self.mean + self.std * jax.random.normal(key, self.mean.shape, self.mean.dtype)

  def kl(self) -> jax.Array:
    """KL(q || N(0, I)) summed over each example's latent elements."""
    kl = 0.5 * (jnp.square(self.mean) + jnp.exp(self.logvar) - 1.0 - self.logvar)
    return jnp.sum(kl, axis=tuple(range(1, kl.ndim)))


class VAEAttention(nn.Module):
  """Single-head spatial self-attention with GroupNorm and residual (VAE mid block)."""
  groups: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, h, w, c = x.shape
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    y = layers.group_norm(self.groups, 1e-6, name="group_norm", **kw)(x).reshape(b, h * w, 1, c)
    q, k, v = (layers.dense(c, (ax.EMBED, ax.HEADS), name=n, **kw)(y)
               for n in ("to_q", "to_k", "to_v"))
    y = layers.dot_product_attention(q, k, v).reshape(b, h * w, c)
    y = layers.dense(c, (ax.HEADS, ax.EMBED), name="to_out_0", **kw)(y)
    return x + y.reshape(b, h, w, c)


class MidBlock(nn.Module):
  groups: int
  add_attention: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    c = x.shape[-1]
    x = layers.ResnetBlock2D(c, self.groups, 1e-6, name="resnets_0", **kw)(x)
    if self.add_attention:
      x = VAEAttention(self.groups, name="attentions_0", **kw)(x)
    return layers.ResnetBlock2D(c, self.groups, 1e-6, name="resnets_1", **kw)(x)


class Encoder(nn.Module):
  config: VAEConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = layers.conv(cfg.block_out_channels[0], 3, name="conv_in", **kw)(x)
    for i, c in enumerate(cfg.block_out_channels):
      last = i == len(cfg.block_out_channels) - 1
      x = _ResnetStack(c, cfg.layers_per_block, cfg.norm_num_groups, None if last else "down",
                       name=f"down_blocks_{i}", **kw)(x)
    x = MidBlock(cfg.norm_num_groups, cfg.mid_block_add_attention, name="mid_block", **kw)(x)
    x = layers.group_norm(cfg.norm_num_groups, 1e-6, silu=True, name="conv_norm_out",
                          **kw)(x)
    return layers.conv(2 * cfg.latent_channels, 3, name="conv_out", **kw)(x)


class _ResnetStack(nn.Module):
  """``num_layers`` resnets, then an optional resampler: diffusers' DownEncoderBlock2D
  (``resample="down"``, bottom/right padding) and UpDecoderBlock2D (``"up"``)."""
  out_channels: int
  num_layers: int
  groups: int
  resample: str | None  # "down", "up" or None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    for i in range(self.num_layers):
      x = layers.ResnetBlock2D(self.out_channels, self.groups, 1e-6, name=f"resnets_{i}", **kw)(x)
    if self.resample == "down":
      x = layers.Downsample2D(self.out_channels, padding=0, name="downsamplers_0", **kw)(x)
    elif self.resample == "up":
      x = layers.Upsample2D(self.out_channels, name="upsamplers_0", **kw)(x)
    return x


class Decoder(nn.Module):
  config: VAEConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, z):
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    channels = tuple(reversed(cfg.block_out_channels))
    x = layers.conv(channels[0], 3, name="conv_in", **kw)(z)
    x = MidBlock(cfg.norm_num_groups, cfg.mid_block_add_attention, name="mid_block", **kw)(x)
    for i, c in enumerate(channels):
      last = i == len(channels) - 1
      x = _ResnetStack(c, cfg.layers_per_block + 1, cfg.norm_num_groups, None if last else "up",
                       name=f"up_blocks_{i}", **kw)(x)
    x = layers.group_norm(cfg.norm_num_groups, 1e-6, silu=True, name="conv_norm_out",
                          **kw)(x)
    return layers.conv(cfg.out_channels, 3, name="conv_out", **kw)(x)


class AutoencoderKL(nn.Module):
  """Encoder -> ``quant_conv`` -> DiagonalGaussian; ``post_quant_conv`` -> Decoder."""
  config: VAEConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.encoder = Encoder(cfg, **kw)
    self.decoder = Decoder(cfg, **kw)
    self.quant_conv = (layers.conv(2 * cfg.latent_channels, 1, **kw)
                       if cfg.use_quant_conv else None)
    self.post_quant_conv = (layers.conv(cfg.latent_channels, 1, **kw)
                            if cfg.use_post_quant_conv else None)

  def encode(self, images: jax.Array) -> DiagonalGaussian:
    moments = self.encoder(images.astype(self.dtype))
    if self.quant_conv is not None:
      moments = self.quant_conv(moments)
    return DiagonalGaussian.from_moments(moments.astype(jnp.float32))

  def decode(self, latents: jax.Array) -> jax.Array:
    z = latents.astype(self.dtype)
    if self.post_quant_conv is not None:
      z = self.post_quant_conv(z)
    return self.decoder(z)

  def __call__(self, images: jax.Array, key: jax.Array | None = None):
    """Reconstruction through a posterior sample (or the mode when ``key`` is None)."""
    posterior = self.encode(images)
    z = posterior.mode() if key is None else posterior.sample(key)
    return self.decode(z), posterior

  def dummy_inputs(self, batch: int = 1):
    size = 2 ** len(self.config.block_out_channels)
    return (jnp.zeros((batch, size, size, self.config.in_channels), self.dtype),)
