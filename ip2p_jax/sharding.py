"""Logical axis names for every parameter, declared once, and the rules that map
them onto a device mesh.

Model code only *names* the axes of its parameters (``nn.with_logical_partitioning``);
which mesh axis each name lands on is data (``DEFAULT_RULES`` or a config's
``logical_axis_rules``), in the style of maxtext/big_vision.

Glossary of logical names:
  EMBED        the model width a layer reads (input features of a Dense).
  MLP          the width a layer writes (output features of a Dense / feed-forward).
  HEADS        query/key/value projection outputs (heads x head_dim).
  KV           key/value inputs coming from another stream (cross-attention context).
  CONV_IN      input channels of a convolution kernel.
  CONV_OUT     output channels of a convolution kernel (and its bias).
  KERNEL_H, KERNEL_W  a convolution kernel's height and width.
  NORM         scale/offset of a normalisation layer.
  VOCAB        rows of a token-embedding table.
  POSITION     rows of a position-embedding table.

Mesh axes: ``data`` (batch), ``fsdp`` (parameters and batch), ``tensor``
(model-parallel widths).
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax

EMBED = "embed"
MLP = "mlp"
HEADS = "heads"
KV = "kv"
CONV_IN = "conv_in"
CONV_OUT = "conv_out"
KERNEL_H = "kernel_height"
KERNEL_W = "kernel_width"
NORM = "norm"
VOCAB = "vocab"
POSITION = "position"
# Activations.
BATCH = "batch"
LENGTH = "length"

MESH_AXES = ("data", "fsdp", "tensor")

# Editing/generation: the image batch over a one-axis "data" mesh, weights replicated.
INFERENCE_RULES: tuple[tuple[str, str | None], ...] = ((BATCH, "data"),)

DEFAULT_RULES: tuple[tuple[str, str | Sequence[str] | None], ...] = (
    (BATCH, ("data", "fsdp")),
    (EMBED, "fsdp"),
    (MLP, "tensor"),
    (HEADS, "tensor"),
    (KV, None),
    (CONV_IN, None),
    (CONV_OUT, "fsdp"),
    (KERNEL_H, None),
    (KERNEL_W, None),
    (NORM, None),
    (VOCAB, "tensor"),
    (POSITION, None),
    (LENGTH, None),
)


def partitioned(init_fn, axes: tuple[str | None, ...]):
  """Wraps a parameter initialiser so the parameter carries logical axis names."""
  return nn.with_logical_partitioning(init_fn, axes)


def make_mesh(shape, devices=None):
  """A ``jax.sharding.Mesh`` over ``MESH_AXES`` from ``{"data": -1, "fsdp": 4, ...}``;
  one axis may be -1 to take the remaining devices."""
  import numpy as np
  from jax.sharding import Mesh

  devices = list(jax.devices() if devices is None else devices)
  sizes = {axis: int(shape.get(axis, 1)) for axis in MESH_AXES}
  unknown = set(shape) - set(MESH_AXES)
  if unknown:
    raise ValueError(f"unknown mesh axes {sorted(unknown)}; use {MESH_AXES}")
  fill = [a for a, s in sizes.items() if s == -1]
  if len(fill) > 1:
    raise ValueError("at most one mesh axis may be -1")
  known = int(np.prod([s for s in sizes.values() if s != -1]))
  if fill:
    if len(devices) % known:
      raise ValueError(f"{len(devices)} devices are not divisible by {known}")
    sizes[fill[0]] = len(devices) // known
  if int(np.prod(list(sizes.values()))) != len(devices):
    raise ValueError(f"mesh {sizes} needs {int(np.prod(list(sizes.values())))} devices, "
                     f"have {len(devices)}")
  return Mesh(np.array(devices).reshape([sizes[a] for a in MESH_AXES]), MESH_AXES)


def shardings(boxed_abstract, mesh, rules):
  """NamedShardings for a pytree whose parameters carry logical axis names (as made by
  ``jax.eval_shape`` of an init); a dimension that does not divide its mesh axes is
  replicated instead."""
  from jax.sharding import NamedSharding, PartitionSpec

  specs = nn.get_partition_spec(boxed_abstract)
  mesh_specs = nn.logical_to_mesh(specs, rules)
  shapes = strip_boxes(boxed_abstract)

  def fit(spec, leaf):
    if not isinstance(spec, PartitionSpec):
      return NamedSharding(mesh, PartitionSpec())
    dims = []
    for size, axes in zip(leaf.shape, tuple(spec) + (None,) * (len(leaf.shape) - len(spec))):
      names = (axes,) if isinstance(axes, str) else tuple(axes or ())
      n = 1
      for name in names:
        n *= mesh.shape[name]
      dims.append(axes if n > 1 and size % n == 0 else None)
    return NamedSharding(mesh, PartitionSpec(*dims))
  return jax.tree.map(fit, mesh_specs, shapes,
                      is_leaf=lambda x: isinstance(x, PartitionSpec) or x is None)


def constrain(x, axes):
  """Constrains an activation's sharding by logical names (a no-op outside a mesh)."""
  return nn.with_logical_constraint(x, axes)


def strip_boxes(tree):
  """The values inside logical-partitioning boxes, without applying any sharding
  constraint (``nn.unbox`` would constrain under an active mesh)."""
  is_box = lambda x: isinstance(x, nn.Partitioned)
  return jax.tree.map(lambda x: x.value if is_box(x) else x, tree, is_leaf=is_box)
