"""Logical axis names for every parameter, declared once, and the rules that map
them onto a device mesh.

Model code only *names* the axes of its parameters (``partitioned``, this module's
box, in place of flax's ``nn.with_logical_partitioning``);
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

Mesh axes: ``dcn`` (batch, across the slices of a multi-slice pod), ``data`` (batch),
``fsdp`` (parameters and batch), ``tensor`` (model-parallel widths).
"""
from __future__ import annotations

from typing import Sequence

import functools

import flax
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

MESH_AXES = ("dcn", "data", "fsdp", "tensor")

# Editing/generation: the image batch over a one-axis "data" mesh, weights replicated.
INFERENCE_RULES: tuple[tuple[str, str | None], ...] = ((BATCH, "data"),)

DEFAULT_RULES: tuple[tuple[str, str | Sequence[str] | None], ...] = (
    (BATCH, ("dcn", "data", "fsdp")),
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


@flax.struct.dataclass
class Named(nn.LogicallyPartitioned):
  """A parameter with logical axis names that never constrains itself.

  Flax's box applies ``with_sharding_constraint`` from the names alone whenever it is
  unboxed under a mesh, so an init under ``jax.set_mesh`` fails on any dimension its
  mesh axes do not divide (a 3-channel VAE ``conv_out`` on ``fsdp=4``). Placement here
  is decided once, by :func:`shardings` (which replicates such dimensions and says
  so) and given to ``jax.jit``/``device_put``; the names are only data.
  """

  def unbox(self, apply_constraint=True):
    del apply_constraint
    return self.value


def partitioned(init_fn, axes: tuple[str | None, ...]):
  """Wraps a parameter initialiser so the parameter carries logical axis names."""
  @functools.wraps(init_fn)
  def init(*args, **kwargs):
    return Named(init_fn(*args, **kwargs), tuple(axes))
  return init


def mesh_sizes(shape, n: int | None = None) -> dict[str, int]:
  """``{"dcn": ., "data": ., "fsdp": ., "tensor": .}`` from a config's ``mesh`` for ``n``
  devices (all of them by default); one axis may be -1 to take what the others leave."""
  import numpy as np
  n = jax.device_count() if n is None else n
  unknown = set(shape) - set(MESH_AXES)
  if unknown:
    raise ValueError(f"unknown mesh axes {sorted(unknown)}; use {MESH_AXES}")
  sizes = {axis: int(shape.get(axis, 1)) for axis in MESH_AXES}
  fill = [a for a, s in sizes.items() if s == -1]
  if len(fill) > 1:
    raise ValueError("at most one mesh axis may be -1")
  known = int(np.prod([s for s in sizes.values() if s != -1]))
  if fill:
    if n % known:
      raise ValueError(f"{n} devices are not divisible by {known}")
    sizes[fill[0]] = n // known
  if int(np.prod(list(sizes.values()))) != n:
    raise ValueError(f"mesh {sizes} needs {int(np.prod(list(sizes.values())))} devices, "
                     f"have {n}")
  return sizes


def make_mesh(shape, devices=None):
  """A ``jax.sharding.Mesh`` over ``MESH_AXES`` from ``{"data": -1, "fsdp": 4, ...}``.

  Devices are laid out by ``jax.experimental.mesh_utils`` so that neighbours on a mesh
  axis are neighbours on the chips' interconnect (ICI). ``dcn`` > 1 is the across-slice
  axis of a multi-slice pod: ``create_hybrid_device_mesh`` puts it over the data-centre
  network and keeps ``data``/``fsdp``/``tensor`` inside each slice (on machines without
  slices, such as CPUs and GPUs, each process counts as one slice).
  """
  from jax.experimental import mesh_utils
  from jax.sharding import Mesh

  devices = list(jax.devices() if devices is None else devices)
  sizes = mesh_sizes(shape, len(devices))
  dcn = sizes["dcn"]
  ici = [1] + [sizes[a] for a in MESH_AXES[1:]]
  if dcn == 1:
    array = mesh_utils.create_device_mesh(ici, devices)
  else:
    array = mesh_utils.create_hybrid_device_mesh(
        ici, [dcn, 1, 1, 1], devices,
        process_is_granule=len({getattr(d, "slice_index", 0) for d in devices}) < dcn)
  return Mesh(array, MESH_AXES)


def _plan(boxed_abstract, mesh, rules):
  """Per leaf: the PartitionSpec actually used and what of the rules could not be
  followed (``[]`` when everything was)."""
  from jax.sharding import PartitionSpec

  table: dict[str, list] = {}
  for name, target in rules:
    table.setdefault(name, []).append(target)
  is_box = lambda x: isinstance(x, nn.Partitioned)

  def one(leaf):
    if not is_box(leaf):
      return PartitionSpec(), []
    shape = leaf.value.shape
    names = tuple(leaf.names) + (None,) * (len(shape) - len(leaf.names))
    used, dims, problems = set(), [], []
    for size, name in zip(shape, names):
      choice = None
      for target in table.get(name, [None]) if name is not None else [None]:
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        axes = tuple(a for a in axes if mesh.shape.get(a, 1) > 1)  # size-1 axes: nothing to do
        if not axes:
          break
        if used & set(axes):
          problems.append(f"{name} -> {'/'.join(axes)}: mesh axis already used by another "
                          "dimension")
          continue
        n = 1
        for a in axes:
          n *= mesh.shape[a]
        if size % n:
          problems.append(f"{name} ({size}) -> {'/'.join(axes)} ({n}): does not divide")
          continue
        choice = axes
        break
      if choice:
        used |= set(choice)
        dims.append(choice[0] if len(choice) == 1 else choice)
      else:
        dims.append(None)
    return PartitionSpec(*dims), problems

  return jax.tree.map(one, boxed_abstract, is_leaf=is_box)


def shardings(boxed_abstract, mesh, rules):
  """NamedShardings for a pytree whose parameters carry logical axis names (as made by
  ``jax.eval_shape`` of an init). A dimension whose mesh axes do not divide it, or whose
  mesh axis another dimension of the same array already took, is replicated instead
  (:func:`unshardable` lists those)."""
  from jax.sharding import NamedSharding
  plan = _plan(boxed_abstract, mesh, rules)
  return jax.tree.map(lambda p: NamedSharding(mesh, p[0]), plan,
                      is_leaf=lambda x: isinstance(x, tuple) and len(x) == 2
                      and isinstance(x[1], list))


def unshardable(boxed_abstract, mesh, rules) -> list[str]:
  """``"path shape: why"`` for every parameter not sharded as its rules ask."""
  plan = _plan(boxed_abstract, mesh, rules)
  flat = jax.tree_util.tree_flatten_with_path(
      plan, is_leaf=lambda x: isinstance(x, tuple) and len(x) == 2 and isinstance(x[1], list))[0]
  shapes = jax.tree.leaves(strip_boxes(boxed_abstract))
  out = []
  for (path, (_, problems)), leaf in zip(flat, shapes):
    if problems:
      out.append(f"{jax.tree_util.keystr(path, simple=True, separator='/')} "
                 f"{tuple(leaf.shape)}: {'; '.join(problems)}")
  return out


def constrain(x, axes):
  """Constrains an activation's sharding by logical names (a no-op outside a mesh)."""
  return nn.with_logical_constraint(x, axes)


def strip_boxes(tree):
  """The values inside logical-partitioning boxes, without applying any sharding
  constraint (``nn.unbox`` would constrain under an active mesh)."""
  is_box = lambda x: isinstance(x, nn.Partitioned)
  return jax.tree.map(lambda x: x.value if is_box(x) else x, tree, is_leaf=is_box)
