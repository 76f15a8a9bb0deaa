"""The train state, its optimizer and the EMA of the weights.

Only the trained model's parameters are in the state; frozen encoders (the VAE and
text encoder in stage 2) are passed to the step separately and never differentiated.
(Customization is the exception: its state holds the base UNet and the frozen base
kernels beside the adapter, labelled frozen; ``ip2p_jax.adapters.training``.)
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

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


# (grads, state, ema decay) -> (params, opt_state, ema_params): the step's update.
Update = Callable[[Any, TrainState, jax.Array], tuple[Any, Any, Any]]


def optax_update(optimizer: optax.GradientTransformation) -> Update:
  """``optimizer.update``, ``optax.apply_updates``, then :func:`ema_update`."""
  def update(grads, state: TrainState, decay):
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    return params, opt_state, ema_update(state.ema_params, params, decay)
  return update


@dataclasses.dataclass(frozen=True)
class FusedAdamW:
  """:func:`make_optimizer`'s plain chain (clip_by_global_norm -> adamw) with the EMA as
  one pass over memory on the CPU (:mod:`ip2p_jax.kernels.cpu_adamw`): the same
  arithmetic in optax's order, the same optimizer state (checkpoints move between the
  two); the small UNet's 18M parameters: 21 ms against 49 for XLA's fusions of optax's
  chain (BENCHMARKS.md)."""
  max_norm: float
  b1: float
  b2: float
  eps: float
  weight_decay: float
  schedule: optax.Schedule

  @classmethod
  def of(cls, config) -> FusedAdamW | None:
    """The fused update for ``config``, or None where it does not apply: customization
    or a VAE decoder run (their optimizer is a ``multi_transform``), or no CPU kernel
    for this backend (another backend, several devices, kernels off)."""
    from ip2p_jax.adapters.training import Customization
    from ip2p_jax.kernels import cpu_adamw
    if Customization.from_config(config) is not None or (
        config.stage == "vae" and config.get("vae_train", "all") != "all"):
      return None
    if not cpu_adamw.takes([]):
      return None
    return cls(config.grad_clip_norm, config.adam_b1, config.adam_b2, config.adam_eps,
               config.weight_decay, learning_rate_schedule(config))

  def update(self, grads, state: TrainState, decay):
    """:data:`Update` on ``make_optimizer(config)``'s state: ``(clip, (adam, decayed
    weights, schedule))``."""
    from ip2p_jax.kernels import cpu_adamw
    opt = state.opt_state
    if not (isinstance(opt, tuple) and len(opt) == 2 and isinstance(opt[1], tuple)
            and len(opt[1]) == 3 and isinstance(opt[1][0], optax.ScaleByAdamState)
            and isinstance(opt[1][2], optax.ScaleByScheduleState)):
      raise TypeError("FusedAdamW updates make_optimizer's clip -> adamw(schedule) state; "
                      f"got {type(opt).__name__}")
    clip_state, (adam, decayed, scheduled) = opt
    leaves, tree = jax.tree.flatten(state.params)
    count = _safe_increment(adam.count)
    params, mu, nu, ema = cpu_adamw.adamw_ema(
        leaves, jax.tree.leaves(grads), jax.tree.leaves(adam.mu), jax.tree.leaves(adam.nu),
        jax.tree.leaves(state.ema_params), grad_norm=optax.tree.norm(grads),
        bias1=1 - self.b1 ** count, bias2=1 - self.b2 ** count,
        learning_rate=self.schedule(scheduled.count), ema_decay=decay, b1=self.b1, b2=self.b2,
        eps=self.eps, eps_root=0.0, weight_decay=self.weight_decay, max_norm=self.max_norm)
    like = lambda t, values: jax.tree.unflatten(jax.tree.structure(t), values)
    adam = adam._replace(count=count, mu=like(adam.mu, mu), nu=like(adam.nu, nu))
    scheduled = scheduled._replace(count=_safe_increment(scheduled.count))
    return (jax.tree.unflatten(tree, params), (clip_state, (adam, decayed, scheduled)),
            like(state.ema_params, ema))


def _safe_increment(count: jax.Array) -> jax.Array:
  """optax's step counter: + 1, saturating at the dtype's maximum."""
  top = jnp.array(jnp.iinfo(count.dtype).max, count.dtype)
  return jnp.where(count < top, count + jnp.array(1, count.dtype), top)


def create(params, optimizer: optax.GradientTransformation, seed: int) -> TrainState:
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    ema_params=jax.tree.map(jnp.copy, params), opt_state=optimizer.init(params),
                    rng=jax.random.key_data(jax.random.key(seed)))
