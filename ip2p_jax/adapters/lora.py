"""LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models"): a frozen
kernel ``W`` gains a rank-``r`` update ``(alpha / r) * A @ B``; ``B`` starts at zero, so
training starts from the base model exactly.

Our layout, chosen so that ``A`` and ``B`` convert to peft's ``lora_A``/``lora_B`` as
kernels do (``checkpoints.formats.to_torch``):

  * Dense ``W [in, out]``: ``A [in, r]``, ``B [r, out]``;
  * Conv ``W [kh, kw, in, out]``: ``A [kh, kw, in, r]`` (peft's ``lora_A`` is a conv with
    the layer's kernel size), ``B [1, 1, r, out]`` (peft's 1x1 ``lora_B``).

The update of every layer is ``A`` contracted with ``B`` on the rank axis, the shape of
``W``. Applying adapters *merges* them into the kernels (``W + sum_i s_i * dW_i``), which
is what a jitted UNet runs with no extra cost per step.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from ip2p_jax.adapters import targets as targets_lib

Path = tuple[str, ...]


@dataclasses.dataclass
class LoRA:
  """One LoRA adapter: ``weights[path] = {"lora_A": A, "lora_B": B}`` and the ``alpha``
  of each path (its scaling is ``alpha / rank``)."""
  weights: dict[Path, dict]
  alphas: dict[Path, float]

  def rank(self, path: Path) -> int:
    return int(self.weights[path]["lora_A"].shape[-1])

  def scaling(self, path: Path) -> float:
    return float(self.alphas[path]) / self.rank(path)


def delta(a, b):
  """The kernel update of one layer: ``A`` contracted with ``B`` over the rank axis."""
  b = b.reshape(b.shape[-2:])
  return jnp.tensordot(a, b, axes=1)


def init(unet_params: Mapping, paths: list[Path], rank: int, key: jax.Array) -> dict:
  """Trainable LoRA weights for ``paths``: ``A`` as PyTorch initialises a layer (Kaiming
  uniform, bound ``1 / sqrt(fan_in)``, peft's default), ``B`` zero."""
  kernels = targets_lib.kernels(unet_params)
  out = {}
  for i, path in enumerate(paths):
    shape = kernels[path].shape
    fan_in = int(np.prod(shape[:-1]))
    bound = 1.0 / np.sqrt(fan_in)
    a = jax.random.uniform(jax.random.fold_in(key, i), shape[:-1] + (rank,), jnp.float32,
                           -bound, bound)
    b_shape = (rank, shape[-1]) if len(shape) == 2 else (1, 1, rank, shape[-1])
    out[path] = {"lora_A": a, "lora_B": jnp.zeros(b_shape, jnp.float32)}
  return out


def deltas(weights: Mapping[Path, dict], scalings: Mapping[Path, float],
           scale: float = 1.0) -> dict[Path, jax.Array]:
  """``path -> scale * scaling * A @ B`` (float32)."""
  return {p: (scale * scalings[p]) * delta(w["lora_A"].astype(jnp.float32),
                                           w["lora_B"].astype(jnp.float32))
          for p, w in weights.items()}


def merge(unet_params: Mapping, adapters: list[tuple[LoRA, float]]) -> dict:
  """``unet_params`` with every ``(adapter, scale)`` merged in: ``W + sum_i s_i dW_i``.
  Stacked adapters add; a layer no adapter names is the same array as before."""
  total: dict[Path, jax.Array] = {}
  for adapter, scale in adapters:
    scalings = {p: adapter.scaling(p) for p in adapter.weights}
    for p, d in deltas(adapter.weights, scalings, scale).items():
      total[p] = total[p] + d if p in total else d
  return targets_lib.add_to_kernels(unet_params, total)


def check_shapes(adapter: LoRA, params: Mapping, where: str, model: str = "UNet") -> None:
  """A one-line error naming the first layer the adapter does not fit (``params``: the
  ``model``'s parameters, the UNet's or the text encoder's)."""
  kernels = targets_lib.kernels(params)
  for path, w in adapter.weights.items():
    name = targets_lib.torch_name(path)
    if path not in kernels:
      raise ValueError(f"{where}: adapter layer {name} is not in this model's {model} "
                       "(an adapter for another architecture?)")
    want = tuple(kernels[path].shape)
    got = tuple(w["lora_A"].shape[:-1]) + (w["lora_B"].shape[-1],)
    if got != want:
      raise ValueError(f"{where}: adapter layer {name} updates a kernel of shape "
                       f"{_torch_shape(got)}, this model's is {_torch_shape(want)} "
                       "(an adapter for another base model)")


def _torch_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
  """Kernel shapes as PyTorch writes them ([out, in] / [out, in, kh, kw])."""
  if len(shape) == 4:
    return (shape[3], shape[2], shape[0], shape[1])
  return tuple(reversed(shape))
