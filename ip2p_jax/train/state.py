"""The train state, its optimizer and the EMA of the weights.

Only the trained model's parameters are in the state; frozen encoders (the VAE and
text encoder in stage 2) are passed to the step separately and never differentiated.
(Customization is the exception: its state holds the base UNet and the frozen base
kernels beside the adapter, labelled frozen; ``ip2p_jax.adapters.training``.)
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  ema_params: Any
  opt_state: Any
  rng: jax.Array  # raw uint32 key data, so orbax saves it like any array


def learning_rate_schedule(config) -> optax.Schedule:
  """Linear warmup to ``learning_rate`` then constant (the paper) or cosine decay."""
  warmup = optax.linear_schedule(0.0, config.learning_rate, max(1, config.warmup_steps))
  if config.lr_schedule == "constant":
    after = optax.constant_schedule(config.learning_rate)
  elif config.lr_schedule == "cosine":
    after = optax.cosine_decay_schedule(config.learning_rate,
                                        max(1, config.total_steps - config.warmup_steps))
  else:
    raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got {config.lr_schedule!r}")
  if config.warmup_steps <= 0:
    return after
  return optax.join_schedules([warmup, after], [config.warmup_steps])


def make_optimizer(config) -> optax.GradientTransformation:
  """AdamW with global-norm clipping (diffusers' IP2P recipe: lr 1e-4, betas (0.9, 0.999),
  weight decay 1e-2, clip 1.0). With ``config.customize`` (LoRA, Custom Diffusion) only
  the leaves its labels call "train" are updated; the rest get zero updates and keep no
  optimizer state (``optax.multi_transform``)."""
  adamw = optax.chain(
      optax.clip_by_global_norm(config.grad_clip_norm),
      optax.adamw(learning_rate_schedule(config), b1=config.adam_b1, b2=config.adam_b2,
                  eps=config.adam_eps, weight_decay=config.weight_decay),
  )
  from ip2p_jax.adapters.training import Customization
  custom = Customization.from_config(config)
  transforms = {"train": adamw, "frozen": optax.set_to_zero()}
  if custom is not None:
    return optax.multi_transform(transforms, custom.label_tree)
  if config.stage == "vae" and config.get("vae_train", "all") != "all":
    if config.vae_train != "decoder":
      raise ValueError(f"vae_train must be 'all' or 'decoder', got {config.vae_train!r}")
    return optax.multi_transform(transforms, vae_decoder_labels)
  return adamw


VAE_DECODER = ("decoder", "post_quant_conv")  # what vae_train = "decoder" trains


def vae_decoder_labels(params) -> Any:
  """"train" on the VAE's decoder and ``post_quant_conv``, "frozen" on the encoder and
  ``quant_conv`` (whose weights would otherwise still move by AdamW's weight decay)."""
  is_box = lambda x: isinstance(x, nn.Partitioned)  # a logical-axis box is one leaf
  return {name: jax.tree.map(lambda _, label=("train" if name in VAE_DECODER
                                                 else "frozen"): label, tree, is_leaf=is_box)
          for name, tree in params.items()}


def ema_decay(step: jax.Array, max_decay: float) -> jax.Array:
  """The original's EMA warmup: ``min(decay, (1 + n) / (10 + n))``."""
  n = step.astype(jnp.float32)
  return jnp.minimum(max_decay, (1.0 + n) / (10.0 + n))


def ema_update(ema, params, decay):
  return jax.tree.map(lambda e, p: (decay * e + (1.0 - decay) * p.astype(e.dtype)).astype(e.dtype),
                      ema, params)


def create(params, optimizer: optax.GradientTransformation, seed: int) -> TrainState:
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    ema_params=jax.tree.map(jnp.copy, params), opt_state=optimizer.init(params),
                    rng=jax.random.key_data(jax.random.key(seed)))
