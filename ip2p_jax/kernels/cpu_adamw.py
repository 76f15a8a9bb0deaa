"""AdamW with global-norm clipping and the parameters' EMA in one pass over memory, on
the CPU, as a C++ kernel behind XLA's FFI (``cpu_adamw.cc``).

XLA:CPU runs optax's chain (``clip_by_global_norm``, ``adamw``, ``apply_updates``) and
the EMA as several loop fusions per leaf (49 ms for the small UNet's 18M parameters on
two cores); the kernel streams each element's parameter, gradient, moments and EMA once
(21 ms), every leaf in one call, the outputs aliased to the inputs so that a donated train state is updated
in place. ``train.state.FusedAdamW`` uses it where :func:`takes` says.
Built and registered by :mod:`ip2p_jax.kernels.build`.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ip2p_jax.kernels import build

TARGET = "ip2p_adamw_ema"


def takes(leaves: Sequence[jax.Array] = ()) -> bool:
  """Whether the kernel updates these leaves (parameters and EMA): all float32, on the
  CPU backend with one device (an FFI call has no sharding rule: a sharded state would
  be gathered), the kernels loaded."""
  return (all(leaf.dtype == jnp.float32 for leaf in leaves) and jax.default_backend() == "cpu"
          and jax.device_count() == 1 and build.load())


def adamw_ema(params: Sequence[jax.Array], grads: Sequence[jax.Array], mu: Sequence[jax.Array],
              nu: Sequence[jax.Array], ema: Sequence[jax.Array], *, grad_norm: jax.Array,
              bias1: jax.Array, bias2: jax.Array, learning_rate: jax.Array,
              ema_decay: jax.Array, b1: float, b2: float, eps: float, eps_root: float,
              weight_decay: float, max_norm: float):
  """One step over lists of float32 leaves (one list per role, in the same order):
  ``g`` clipped as optax's ``clip_by_global_norm(max_norm)`` given ``grad_norm``;
  ``mu = (1 - b1) g + b1 mu``, ``nu = (1 - b2) g^2 + b2 nu``; ``p += -learning_rate (mu /
  bias1 / (sqrt(nu / bias2 + eps_root) + eps) + weight_decay p)``; ``ema = ema_decay ema +
  (1 - ema_decay) p``. ``bias1``, ``bias2`` are ``1 - b1^t``, ``1 - b2^t``. Returns the
  new ``(params, mu, nu, ema)`` lists. Raises RuntimeError if the kernels are not
  available, ValueError on leaves that differ in size or are not float32."""
  if not build.load():
    raise RuntimeError("the CPU kernels are not available (see the log, or IP2P_KERNELS)")
  lists = (params, grads, mu, nu, ema)
  if len({len(x) for x in lists}) != 1:
    raise ValueError(f"adamw_ema takes one leaf per role for each parameter; got "
                     f"{[len(x) for x in lists]} leaves")
  for i, group in enumerate(zip(*lists)):
    if len({a.shape for a in group}) != 1 or any(a.dtype != jnp.float32 for a in group):
      raise ValueError(f"leaf {i}: parameter, gradient, moments and EMA must be float32 of "
                       f"one shape; got {[(a.dtype, a.shape) for a in group]}")
  if not params:
    return [], [], [], []
  decay = jnp.asarray(ema_decay, jnp.float32)
  scalars = jnp.stack([jnp.asarray(x, jnp.float32) for x in
                       (grad_norm, bias1, bias2, -jnp.asarray(learning_rate, jnp.float32),
                        decay, 1.0 - decay)])
  operands = [a for group in zip(*lists) for a in group]
  results = [jax.ShapeDtypeStruct(a.shape, a.dtype) for group in zip(params, mu, nu, ema)
             for a in group]
  # Operand 1 + 5 l + (0, 2, 3, 4) (parameter, mu, nu, ema) -> result 4 l + (0, 1, 2, 3).
  aliases = {1 + 5 * l + k: 4 * l + j for l in range(len(params))
             for j, k in enumerate((0, 2, 3, 4))}
  call = jax.ffi.ffi_call(TARGET, results, input_output_aliases=aliases)
  f32 = np.float32
  out = call(scalars, *operands, b1=f32(b1), one_minus_b1=f32(1 - b1), b2=f32(b2),
             one_minus_b2=f32(1 - b2), eps=f32(eps), eps_root=f32(eps_root),
             weight_decay=f32(weight_decay), max_norm=f32(max_norm))
  return out[0::4], out[1::4], out[2::4], out[3::4]
