"""CLIP text and vision encoders (Radford et al. 2021), transformers' layout.

The text encoder conditions the UNet (its ``last_hidden_state``; ``hidden_states``
holds every layer's, should a caller want an earlier one); both towers together give
the image-text similarities the paper filters data and evaluates with. Images are NHWC, CLIP-normalised.

    out = CLIPTextModel(cfg).apply({"params": p}, input_ids)
    out.last_hidden_state, out.pooler_output, out.hidden_states, out.text_embeds
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
from ip2p_jax.models.configuration import parse_config, to_dict

Dtype = Any

# Generic transformers PretrainedConfig keys that do not change the forward pass.
_IGNORED = frozenset({
    "architectures", "model_type", "transformers_version", "torch_dtype", "dtype",
    "initializer_range", "initializer_factor", "attention_dropout", "dropout",
    "bos_token_id", "pad_token_id", "return_dict", "output_hidden_states",
    "output_attentions", "use_bfloat16", "tie_word_embeddings", "is_encoder_decoder",
    "id2label", "label2id", "problem_type", "tokenizer_class", "torchscript",
    "pruned_heads", "chunk_size_feed_forward", "finetuning_task", "task_specific_params",
    "prefix", "is_decoder", "add_cross_attention", "cross_attention_hidden_size",
    "decoder_start_token_id", "sep_token_id", "tf_legacy_loss", "use_cache",
    "max_length", "min_length", "do_sample", "early_stopping", "num_beams", "num_beam_groups",
    "diversity_penalty", "temperature", "top_k", "top_p", "typical_p", "repetition_penalty",
    "length_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size", "bad_words_ids",
    "num_return_sequences", "output_scores", "return_dict_in_generate", "forced_bos_token_id",
    "forced_eos_token_id", "remove_invalid_values", "exponential_decay_length_penalty",
    "suppress_tokens", "begin_suppress_tokens", "text_config_dict", "vision_config_dict",
})
_UNSUPPORTED = {"interpolate_pos_encoding": False}


class _TowerConfig:
  """from_dict/to_dict shared by the two towers' configs (transformers' layout)."""

  @classmethod
  def from_dict(cls, raw: Mapping[str, Any], with_projection: bool = False):
    config = parse_config(cls, raw, component=cls.NAME, unsupported=_UNSUPPORTED,
                          ignored=_IGNORED)
    layers.activation(config.hidden_act)
    return dataclasses.replace(config, with_projection=with_projection)

  def to_dict(self) -> dict[str, Any]:
    d = to_dict(self)
    d.pop("with_projection")
    arch = self.NAME + ("WithProjection" if self.with_projection else "")
    return {"architectures": [arch], "model_type": self.MODEL_TYPE, **d}


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig(_TowerConfig):
  vocab_size: int = 49408
  hidden_size: int = 768
  intermediate_size: int = 3072
  projection_dim: int = 768
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  max_position_embeddings: int = 77
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  eos_token_id: int = 49407
  with_projection: bool = False  # CLIPTextModelWithProjection

  NAME, MODEL_TYPE = "CLIPTextModel", "clip_text_model"


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig(_TowerConfig):
  hidden_size: int = 1024
  intermediate_size: int = 4096
  projection_dim: int = 768
  num_hidden_layers: int = 24
  num_attention_heads: int = 16
  num_channels: int = 3
  image_size: int = 224
  patch_size: int = 14
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  with_projection: bool = False  # CLIPVisionModelWithProjection

  NAME, MODEL_TYPE = "CLIPVisionModel", "clip_vision_model"


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
  """Both towers and the learned temperature (transformers ``CLIPModel``)."""
  text_config: CLIPTextConfig = CLIPTextConfig()
  vision_config: CLIPVisionConfig = CLIPVisionConfig()
  projection_dim: int = 768
  logit_scale_init_value: float = 2.6592

  @classmethod
  def from_dict(cls, raw: Mapping[str, Any]) -> "CLIPConfig":
    raw = dict(raw)
    text = CLIPTextConfig.from_dict(raw.pop("text_config", {}) or {})
    vision = CLIPVisionConfig.from_dict(raw.pop("vision_config", {}) or {})
    config = parse_config(cls, raw, component="CLIPModel", unsupported=_UNSUPPORTED,
                          ignored=_IGNORED)
    return dataclasses.replace(config, text_config=text, vision_config=vision)

  def to_dict(self) -> dict[str, Any]:
    strip = lambda d: {k: v for k, v in d.items() if k not in ("architectures",)}
    return {"architectures": ["CLIPModel"], "model_type": "clip",
            "text_config": strip(self.text_config.to_dict()),
            "vision_config": strip(self.vision_config.to_dict()),
            "projection_dim": self.projection_dim,
            "logit_scale_init_value": self.logit_scale_init_value}


@flax.struct.dataclass
class CLIPTextOutput:
  last_hidden_state: jax.Array        # [B, L, D] after the final layer norm
  pooler_output: jax.Array            # [B, D] at the end-of-text token
  hidden_states: tuple[jax.Array, ...]  # embeddings, then each layer (no final norm)
  text_embeds: jax.Array | None = None  # [B, P] when projected


@flax.struct.dataclass
class CLIPVisionOutput:
  last_hidden_state: jax.Array        # [B, 1 + patches, D]
  pooler_output: jax.Array            # [B, D]: post-layer-normed class token
  hidden_states: tuple[jax.Array, ...]
  image_embeds: jax.Array | None = None


class CLIPEncoderLayer(nn.Module):
  heads: int
  intermediate_size: int
  hidden_act: str
  eps: float
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, mask=None, is_causal=False):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    d = x.shape[-1]
    h = layers.layer_norm(self.eps, name="layer_norm1", **kw)(x)
    x = x + layers.Attention(self.heads, d // self.heads, qkv_bias=True,
                             names=("q_proj", "k_proj", "v_proj", "out_proj"),
                             name="self_attn", **kw)(h, mask=mask, is_causal=is_causal)
    h = layers.layer_norm(self.eps, name="layer_norm2", **kw)(x)
    return x + _MLP(self.intermediate_size, self.hidden_act, name="mlp", **kw)(h)


class _MLP(nn.Module):
  intermediate_size: int
  hidden_act: str
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = layers.dense(self.intermediate_size, (ax.EMBED, ax.MLP), name="fc1", **kw)(x)
    h = layers.activation(self.hidden_act)(h)
    return layers.dense(x.shape[-1], (ax.MLP, ax.EMBED), name="fc2", **kw)(h)


class CLIPEncoder(nn.Module):
  num_layers: int
  heads: int
  intermediate_size: int
  hidden_act: str
  eps: float
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, mask=None, is_causal=False):
    states = [x]
    for i in range(self.num_layers):
      x = CLIPEncoderLayer(self.heads, self.intermediate_size, self.hidden_act, self.eps,
                           self.dtype, self.param_dtype, name=f"layers_{i}")(x, mask, is_causal)
      states.append(x)
    return x, tuple(states)


def _embed(num: int, features: int, axes, param_dtype, name):
  return nn.Embed(num, features, param_dtype=param_dtype, name=name,
                  embedding_init=ax.partitioned(nn.initializers.normal(0.02), axes))


class CLIPTextTransformer(nn.Module):
  config: CLIPTextConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, input_ids, attention_mask=None):
    cfg = self.config
    emb = _Embeddings(cfg, self.param_dtype, name="embeddings")(input_ids).astype(self.dtype)
    mask = None if attention_mask is None else attention_mask[:, None, None, :].astype(bool)
    x, states = CLIPEncoder(cfg.num_hidden_layers, cfg.num_attention_heads, cfg.intermediate_size,
                            cfg.hidden_act, cfg.layer_norm_eps, self.dtype, self.param_dtype,
                            name="encoder")(emb, mask, True)
    x = layers.layer_norm(cfg.layer_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype,
                          name="final_layer_norm")(x)
    if cfg.eos_token_id == 2:
      # Configs written before transformers PR #24773 carry eos_token_id=2: the
      # end-of-text token is then the largest id in the row.
      eos = jnp.argmax(input_ids, axis=-1)
    else:
      eos = jnp.argmax(input_ids == cfg.eos_token_id, axis=-1)
    pooled = jnp.take_along_axis(x, eos[:, None, None], axis=1)[:, 0]
    return x, pooled, states


class _Embeddings(nn.Module):
  config: CLIPTextConfig
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, input_ids):
    cfg = self.config
    tokens = _embed(cfg.vocab_size, cfg.hidden_size, (ax.VOCAB, ax.EMBED), self.param_dtype,
                    "token_embedding")(input_ids)
    positions = _embed(cfg.max_position_embeddings, cfg.hidden_size, (ax.POSITION, ax.EMBED),
                       self.param_dtype, "position_embedding")(jnp.arange(input_ids.shape[-1]))
    return tokens + positions[None]


class CLIPTextModel(nn.Module):
  """CLIP text tower: ``input_ids [B, L] -> CLIPTextOutput``; projected when
  ``config.with_projection`` (``text_embeds``)."""
  config: CLIPTextConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> CLIPTextOutput:
    x, pooled, states = CLIPTextTransformer(self.config, self.dtype, self.param_dtype,
                                            name="text_model")(input_ids, attention_mask)
    embeds = None
    if self.config.with_projection:
      embeds = layers.dense(self.config.projection_dim, (ax.EMBED, ax.MLP), use_bias=False,
                            dtype=self.dtype, param_dtype=self.param_dtype,
                            name="text_projection")(pooled)
    return CLIPTextOutput(x, pooled, states, embeds)

  def dummy_inputs(self, batch: int = 1):
    return (jnp.zeros((batch, self.config.max_position_embeddings), jnp.int32),)


class _VisionEmbeddings(nn.Module):
  config: CLIPVisionConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, pixels):
    cfg = self.config
    p = cfg.patch_size
    patches = layers.conv(cfg.hidden_size, p, stride=p, padding="VALID", use_bias=False,
                          dtype=self.dtype, param_dtype=self.param_dtype,
                          name="patch_embedding")(pixels.astype(self.dtype))
    b = patches.shape[0]
    patches = patches.reshape(b, -1, cfg.hidden_size)
    cls = self.param("class_embedding", ax.partitioned(nn.initializers.normal(0.02), (ax.EMBED,)),
                     (cfg.hidden_size,), self.param_dtype)
    x = jnp.concatenate([jnp.broadcast_to(cls.astype(self.dtype), (b, 1, cfg.hidden_size)), patches], 1)
    num_positions = (cfg.image_size // p) ** 2 + 1
    pos = _embed(num_positions, cfg.hidden_size, (ax.POSITION, ax.EMBED), self.param_dtype,
                 "position_embedding")(jnp.arange(num_positions))
    return x + pos[None].astype(self.dtype)


class CLIPVisionTransformer(nn.Module):
  config: CLIPVisionConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, pixels):
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = _VisionEmbeddings(cfg, name="embeddings", **kw)(pixels)
    x = layers.layer_norm(cfg.layer_norm_eps, name="pre_layrnorm", **kw)(x)  # sic, transformers' name
    x, states = CLIPEncoder(cfg.num_hidden_layers, cfg.num_attention_heads, cfg.intermediate_size,
                            cfg.hidden_act, cfg.layer_norm_eps, name="encoder", **kw)(x)
    pooled = layers.layer_norm(cfg.layer_norm_eps, name="post_layernorm", **kw)(x[:, 0])
    return x, pooled, states


class CLIPVisionModel(nn.Module):
  """CLIP ViT: ``pixel_values [B, H, W, 3] -> CLIPVisionOutput``; projected when
  ``config.with_projection`` (``image_embeds``)."""
  config: CLIPVisionConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, pixel_values: jax.Array) -> CLIPVisionOutput:
    x, pooled, states = CLIPVisionTransformer(self.config, self.dtype, self.param_dtype,
                                              name="vision_model")(pixel_values)
    embeds = None
    if self.config.with_projection:
      embeds = layers.dense(self.config.projection_dim, (ax.EMBED, ax.MLP), use_bias=False,
                            dtype=self.dtype, param_dtype=self.param_dtype,
                            name="visual_projection")(pooled)
    return CLIPVisionOutput(x, pooled, states, embeds)

  def dummy_inputs(self, batch: int = 1):
    s = self.config.image_size
    return (jnp.zeros((batch, s, s, self.config.num_channels), self.dtype),)


@flax.struct.dataclass
class CLIPOutput:
  logits_per_image: jax.Array  # [B_img, B_txt] = exp(logit_scale) * cos similarity
  text_embeds: jax.Array       # L2-normalised
  image_embeds: jax.Array      # L2-normalised


class CLIPModel(nn.Module):
  """Both towers, their projections and the temperature (transformers ``CLIPModel``)."""
  config: CLIPConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.text_model = CLIPTextTransformer(cfg.text_config, **kw)
    self.vision_model = CLIPVisionTransformer(cfg.vision_config, **kw)
    self.text_projection = layers.dense(cfg.projection_dim, (ax.EMBED, ax.MLP), use_bias=False, **kw)
    self.visual_projection = layers.dense(cfg.projection_dim, (ax.EMBED, ax.MLP), use_bias=False,
                                          **kw)
    self.logit_scale = self.param(
        "logit_scale", ax.partitioned(nn.initializers.constant(cfg.logit_scale_init_value), ()),
        (), self.param_dtype)

  def get_text_features(self, input_ids, attention_mask=None):
    return self.text_projection(self.text_model(input_ids, attention_mask)[1])

  def get_image_features(self, pixel_values):
    return self.visual_projection(self.vision_model(pixel_values)[1])

  def __call__(self, input_ids, pixel_values, attention_mask=None) -> CLIPOutput:
    normalize = lambda e: e / jnp.linalg.norm(e, axis=-1, keepdims=True)
    text = normalize(self.get_text_features(input_ids, attention_mask))
    image = normalize(self.get_image_features(pixel_values))
    logits = jnp.exp(self.logit_scale) * image @ text.T
    return CLIPOutput(logits, text, image)

  def dummy_inputs(self, batch: int = 1):
    s = self.config.vision_config.image_size
    return (jnp.zeros((batch, self.config.text_config.max_position_embeddings), jnp.int32),
            jnp.zeros((batch, s, s, self.config.vision_config.num_channels), self.dtype))
