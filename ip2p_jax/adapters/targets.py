"""Which UNet layers an adapter touches, and pytree surgery on them.

A *module path* is the tuple of names above a layer's ``kernel`` in our parameter tree,
``("down_blocks_0", "attentions_0", "transformer_blocks_0", "attn2", "to_k")``; its
diffusers/peft name is :func:`torch_name` (``down_blocks.0.attentions.0.transformer_blocks.0.
attn2.to_k``). Target names, as a config lists them:

  * ``to_q``, ``to_k``, ``to_v``, ``to_out_0``: attention projections (``attn1`` self- and
    ``attn2`` cross-attention; Custom Diffusion takes ``attn2`` only);
  * ``ff``: the feed-forward layers (``ff.net.0.proj``, ``ff.net.2``);
  * ``conv``: the convolutions of the resnets, samplers and 1x1 ``proj_in``/``proj_out``
    (``conv_in``/``conv_out`` excluded: the editor's ``conv_in`` reads its own channels).
"""
from __future__ import annotations

from typing import Iterable, Mapping

from flax import traverse_util

from ip2p_jax.checkpoints import formats

ATTENTION = ("to_q", "to_k", "to_v", "to_out_0")
TARGETS = ATTENTION + ("ff", "conv")


def parse(targets: str | Iterable[str], allow_none: bool = False) -> tuple[str, ...]:
  """``"to_k,to_v"`` (or a sequence) -> ``("to_k", "to_v")``, checked against TARGETS.
  ``"none"`` -> ``()`` where ``allow_none`` (Custom Diffusion training only its new
  tokens: textual inversion)."""
  names = [t.strip() for t in (targets.split(",") if isinstance(targets, str) else targets)]
  names = [n for n in names if n]
  if allow_none and names == ["none"]:
    return ()
  bad = [n for n in names if n not in TARGETS]
  if bad or not names:
    raise ValueError(f"adapter targets {bad or names!r}: choose from {', '.join(TARGETS)}")
  return tuple(dict.fromkeys(names))


def kernels(unet_params: Mapping) -> dict[tuple[str, ...], object]:
  """Module path -> kernel of every layer that has one."""
  flat = traverse_util.flatten_dict(unet_params)
  return {path[:-1]: leaf for path, leaf in flat.items() if path[-1] == "kernel"}


def _is_target(path: tuple[str, ...], ndim: int, targets: tuple[str, ...],
               cross_only: bool) -> bool:
  if path[-1] in ATTENTION and len(path) >= 2:
    return path[-1] in targets and (path[-2] == "attn2" or (path[-2] == "attn1"
                                                             and not cross_only))
  if path[-3:] == ("ff", "net_0", "proj") or path[-2:] == ("ff", "net_2"):
    return "ff" in targets
  return "conv" in targets and ndim == 4 and len(path) > 1


def select(unet_params: Mapping, targets: tuple[str, ...], cross_only: bool = False
           ) -> list[tuple[str, ...]]:
  """The module paths of ``unet_params`` that ``targets`` name, in tree order."""
  shapes = {p: getattr(k, "shape", None) for p, k in kernels(unet_params).items()}
  return [p for p, s in shapes.items() if _is_target(p, len(s), targets, cross_only)]


def torch_name(path: tuple[str, ...]) -> str:
  """Our module path -> its diffusers/peft module name."""
  return formats.torch_key(path + ("kernel",))[:-len(".weight")]


def _add(tree: Mapping, path: tuple[str, ...], delta) -> dict:
  new = dict(tree)
  if not path:
    new["kernel"] = tree["kernel"] + delta.astype(tree["kernel"].dtype)
  else:
    new[path[0]] = _add(tree[path[0]], path[1:], delta)
  return new


def add_to_kernels(unet_params: Mapping, deltas: Mapping[tuple[str, ...], object]) -> dict:
  """``unet_params`` with ``deltas[path]`` added to each named kernel; every other
  leaf is the same object (only the small dicts along each path are copied)."""
  out = unet_params
  for path, delta in deltas.items():
    out = _add(out, path, delta)
  return dict(out)
