"""The jitted train step: gradient (accumulated over micro-batches with ``lax.scan``),
AdamW update, EMA, metrics. Built once from an objective; no config branching inside."""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from ip2p_jax.kernels import cpu_adamw
from ip2p_jax.train import state as state_lib


def make_step(loss_fn: Callable, optimizer: optax.GradientTransformation,
              schedule: optax.Schedule, *, ema_decay: float, grad_accum_steps: int = 1,
              fused: state_lib.FusedAdamW | None = None):
  """``step(state, frozen, batch) -> (state, metrics)``; the batch's leading axis is
  the global batch, split into ``grad_accum_steps`` micro-batches. The update is
  ``optimizer``'s, or ``fused``'s (the same AdamW as one CPU pass) where it is given and
  its kernel takes the parameters and their EMA (float32)."""
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  generic = state_lib.optax_update(optimizer)

  def update(grads, state, decay):
    takes = fused is not None and cpu_adamw.takes(
        jax.tree.leaves(state.params) + jax.tree.leaves(state.ema_params))
    return (fused.update if takes else generic)(grads, state, decay)

  def step(state: state_lib.TrainState, frozen, batch):
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    if grad_accum_steps == 1:
      (_, metrics), grads = grad_fn(state.params, frozen, batch, rng)
    else:
      micro = jax.tree.map(
          lambda x: x.reshape((grad_accum_steps, x.shape[0] // grad_accum_steps) + x.shape[1:]),
          batch)

      def accumulate(carry, inputs):
        i, mb = inputs
        (_, m), g = grad_fn(state.params, frozen, mb, jax.random.fold_in(rng, i))
        return jax.tree.map(jnp.add, carry, (g, m)), None

      zeros = jax.eval_shape(lambda: grad_fn(state.params, frozen,
                                             jax.tree.map(lambda x: x[0], micro), rng))
      init = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (zeros[1], zeros[0][1]))
      (grads, metrics), _ = jax.lax.scan(accumulate, init,
                                         (jnp.arange(grad_accum_steps), micro))
      grads, metrics = jax.tree.map(lambda x: x / grad_accum_steps, (grads, metrics))
    params, opt_state, ema = update(grads, state, state_lib.ema_decay(state.step, ema_decay))
    metrics = dict(metrics, grad_norm=optax.tree.norm(grads), lr=schedule(state.step))
    new = state.replace(step=state.step + 1, params=params, ema_params=ema, opt_state=opt_state)
    return new, metrics

  return step
