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
  CONV_SPATIAL the kernel's height and width.
  NORM         scale/offset of a normalisation layer.
  VOCAB        rows of a token-embedding table.
  POSITION     rows of a position-embedding table.

Mesh axes: ``data`` (batch), ``fsdp`` (parameters and batch), ``tensor``
(model-parallel widths).
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn

EMBED = "embed"
MLP = "mlp"
HEADS = "heads"
KV = "kv"
CONV_IN = "conv_in"
CONV_OUT = "conv_out"
CONV_SPATIAL = "conv_spatial"
NORM = "norm"
VOCAB = "vocab"
POSITION = "position"
# Activations.
BATCH = "batch"
LENGTH = "length"

MESH_AXES = ("data", "fsdp", "tensor")

DEFAULT_RULES: tuple[tuple[str, str | Sequence[str] | None], ...] = (
    (BATCH, ("data", "fsdp")),
    (EMBED, "fsdp"),
    (MLP, "tensor"),
    (HEADS, "tensor"),
    (KV, None),
    (CONV_IN, None),
    (CONV_OUT, "fsdp"),
    (CONV_SPATIAL, None),
    (NORM, None),
    (VOCAB, "tensor"),
    (POSITION, None),
    (LENGTH, None),
)


def partitioned(init_fn, axes: tuple[str | None, ...]):
  """Wraps a parameter initialiser so the parameter carries logical axis names."""
  return nn.with_logical_partitioning(init_fn, axes)
