"""Key/value tokens: per cross-attention layer, a learned key row and value row for each
new token, added to that layer's keys and values where the token sits.

Textual inversion (Gal et al. 2022) learns one input embedding per new token; every
cross-attention layer then reads the token through its fixed ``to_k``/``to_v``, so one
64-number vector has to serve all of them. P+ (Voynov et al. 2023) showed that letting
each layer see its own token embedding is far more expressive, and Perfusion (Tewel et
al. 2023) edits the key and value a concept's token produces. Here, for cross-attention
layer ``l`` and new tokens ``1..T`` with rows ``R_k^l, R_v^l [T, inner]``::

    K_l = W_k^l c + M R_k^l,      V_l = W_v^l c + M R_v^l

with ``c`` the text encoder's states ``[L, width]`` and ``M [L, T]`` the one-hot of the new
tokens at each position. A prompt without the tokens has ``M = 0``: its keys and values,
hence its edit, are the base model's (to float32 rounding: the zero rows added change
XLA's fusions), and the UNet's weights are untouched.
Trained with the tokens' embedding rows (``config.customize.targets = "token_kv"``).

The rows live in the parameter tree under ``params["token_kv"] = {"ids": int32 [T],
"rows": {"down_blocks_0/.../attn2/to_k": [T, inner], ...}}``. The UNet applies them
through :func:`applied`, a flax method interceptor on the named ``to_k``/``to_v`` layers,
so the UNet module itself has no hook and pays nothing when no rows are loaded. The
pipelines carry ``M`` as ``T`` extra channels of the text states (:func:`with_mask`), so
guidance's concatenated conditionings keep each row's mask aligned; :func:`reading_mask`
wraps the UNet call to take them off and apply the rows.
"""
from __future__ import annotations

import contextlib
from typing import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ip2p_jax.adapters import targets as targets_lib

KEY = "token_kv"
PROJECTIONS = ("to_k", "to_v")


def layer_paths(unet_params: Mapping) -> dict[str, int]:
  """``"down_blocks_0/.../attn2/to_k" -> inner width`` of every cross-attention key and
  value projection, in tree order."""
  kernels = targets_lib.kernels(unet_params)
  return {"/".join(p): int(kernels[p].shape[-1])
          for p in targets_lib.select(unet_params, PROJECTIONS, cross_only=True)}


def init_rows(unet_params: Mapping, count: int) -> dict[str, jax.Array]:
  """Zero rows ``[count, inner]`` for every cross-attention key/value projection: the
  base model's keys and values until trained."""
  return {p: jnp.zeros((count, w), jnp.float32) for p, w in layer_paths(unet_params).items()}


def mask(ids: jax.Array, token_ids: jax.Array) -> jax.Array:
  """float32 ``[..., L, T]``: 1 where position ``l`` holds new token ``t``."""
  return (ids[..., None] == jnp.asarray(token_ids)).astype(jnp.float32)


@contextlib.contextmanager
def applied(rows: Mapping[str, jax.Array], token_mask: jax.Array):
  """Within this context (at trace time), every UNet ``apply`` adds ``token_mask @ rows``
  to the output of the projections ``rows`` names (module paths, ``/``-joined).
  ``token_mask [B, L, T]`` must match the batch of the context the UNet reads."""
  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if context.method_name != "__call__":
      return out
    row = rows.get("/".join(context.module.path))
    if row is None:
      return out
    return out + jnp.einsum("blt,td->bld", token_mask, row.astype(jnp.float32)).astype(out.dtype)
  with nn.intercept_methods(interceptor):
    yield


def with_mask(states: jax.Array, ids: jax.Array, token_ids: jax.Array) -> jax.Array:
  """Text states ``[B, L, width]`` -> ``[B, L, width + T]``: the tokens' mask appended."""
  return jnp.concatenate([states, mask(ids, token_ids).astype(states.dtype)], -1)


def reading_mask(network, rows: Mapping[str, jax.Array], count: int):
  """``network(x, t, context)`` for contexts made by :func:`with_mask`: the ``count``
  mask channels taken off, the rows applied where they mark the tokens."""
  def wrapped(x, t, context):
    states, token_mask = context[..., :-count], context[..., -count:].astype(jnp.float32)
    with applied(rows, token_mask):
      return network(x, t, states)
  return wrapped


def stack(row_sets: list[tuple[Mapping[str, np.ndarray], int]]) -> dict[str, np.ndarray]:
  """Several adapters' rows ``(rows, token count)`` as one set, their tokens in order; a
  layer an adapter leaves alone gets zero rows for its tokens."""
  widths = {p: np.shape(r)[-1] for rows, _ in row_sets for p, r in rows.items()}
  return {p: np.concatenate([np.asarray(rows.get(p, np.zeros((n, w), np.float32)), np.float32)
                             for rows, n in row_sets]) for p, w in widths.items()}


def check_shapes(rows: Mapping[str, np.ndarray], unet_params: Mapping, where: str) -> None:
  """ValueError naming the first row set that does not fit ``unet_params``."""
  ours = layer_paths(unet_params)
  for path, row in rows.items():
    if path not in ours:
      raise ValueError(f"{where}: the UNet has no cross-attention projection {path}")
    if row.shape[-1] != ours[path]:
      raise ValueError(f"{where}: {path} rows are {row.shape[-1]} wide; the UNet's "
                       f"projection gives {ours[path]}")
