"""The map between our parameter pytrees and diffusers/transformers state dicts.

Our module names are the PyTorch ones with list indices joined by ``_``
(``down_blocks.0.resnets.1.conv1.weight`` <-> ``down_blocks_0/resnets_1/conv1/kernel``),
so the whole conversion is this table:

  * list containers in ``_LISTS``: ``name_N`` <-> ``name.N``;
  * leaves: ``kernel``/``scale``/``embedding`` <-> ``weight``;
  * kernels are transposed: Dense ``(in, out)`` <-> ``(out, in)``,
    Conv ``(kh, kw, in, out)`` <-> ``(out, in, kh, kw)``;
  * per component, a few aliases accepted on load (old diffusers VAE attention
    names; transformers 5 writing CLIPTextModel without the ``text_model.`` prefix)
    and buffers that are not parameters (``position_ids``).
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Mapping

import numpy as np

from ip2p_jax.models import clip, unet, vae
from ip2p_jax.models.configuration import ConfigError

_LISTS = re.compile(r"^(down_blocks|up_blocks|resnets|attentions|transformer_blocks|downsamplers|"
                    r"upsamplers|to_out|net|layers)_(\d+)$")
_LEAVES = {"kernel": "weight", "scale": "weight", "embedding": "weight"}


def torch_key(path: tuple[str, ...]) -> str:
  """``("down_blocks_0", "resnets_1", "conv1", "kernel")`` -> ``down_blocks.0.resnets.1.conv1.weight``."""
  parts = [_LISTS.sub(r"\1.\2", p) for p in path[:-1]]
  parts.append(_LEAVES.get(path[-1], path[-1]))
  return ".".join(parts)


def from_torch(path: tuple[str, ...], tensor: np.ndarray) -> np.ndarray:
  """A PyTorch tensor in our layout for the parameter at ``path``."""
  if path[-1] == "kernel":
    if tensor.ndim == 4:
      return np.transpose(tensor, (2, 3, 1, 0))
    if tensor.ndim == 2:
      return tensor.T
  return tensor


def to_torch(path: tuple[str, ...], array: np.ndarray) -> np.ndarray:
  if path[-1] == "kernel":
    if array.ndim == 4:
      return np.transpose(array, (3, 2, 0, 1))
    if array.ndim == 2:
      return array.T
  return array


@dataclasses.dataclass(frozen=True)
class ComponentKind:
  """How one on-disk class maps to our module."""
  class_name: str
  library: str          # "diffusers" or "transformers"
  weights_name: str     # file stem: diffusion_pytorch_model / model
  build: Callable[[Mapping[str, Any]], Any]  # config dict -> config dataclass
  module: Callable[..., Any]                  # (config, dtype=, param_dtype=) -> nn.Module
  aliases: Callable[[str], list[str]] = lambda key: []
  buffers: frozenset[str] = frozenset()


def _vae_aliases(key: str) -> list[str]:
  """diffusers < 0.14 named the VAE mid-block attention query/key/value/proj_attn."""
  old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
  for new, legacy in old.items():
    marker = f".attentions.0.{new}."
    if marker in key:
      return [key.replace(marker, f".attentions.0.{legacy}.")]
  return []


def _strip_prefix(prefix: str) -> Callable[[str], list[str]]:
  """transformers 5 saves CLIPTextModel/CLIPVisionModel without the tower prefix."""
  return lambda key: [key[len(prefix):]] if key.startswith(prefix) else []


KINDS: dict[str, ComponentKind] = {
    "UNet2DConditionModel": ComponentKind(
        "UNet2DConditionModel", "diffusers", "diffusion_pytorch_model",
        unet.UNetConfig.from_dict, unet.UNet2DConditionModel),
    "AutoencoderKL": ComponentKind(
        "AutoencoderKL", "diffusers", "diffusion_pytorch_model",
        vae.VAEConfig.from_dict, vae.AutoencoderKL, aliases=_vae_aliases),
    "CLIPTextModel": ComponentKind(
        "CLIPTextModel", "transformers", "model",
        clip.CLIPTextConfig.from_dict, clip.CLIPTextModel,
        aliases=_strip_prefix("text_model."),
        buffers=frozenset({"text_model.embeddings.position_ids", "embeddings.position_ids"})),
    "CLIPTextModelWithProjection": ComponentKind(
        "CLIPTextModelWithProjection", "transformers", "model",
        lambda raw: clip.CLIPTextConfig.from_dict(raw, with_projection=True), clip.CLIPTextModel,
        aliases=_strip_prefix("text_model."),
        buffers=frozenset({"text_model.embeddings.position_ids"})),
    "CLIPVisionModel": ComponentKind(
        "CLIPVisionModel", "transformers", "model",
        clip.CLIPVisionConfig.from_dict, clip.CLIPVisionModel,
        aliases=_strip_prefix("vision_model."),
        buffers=frozenset({"vision_model.embeddings.position_ids", "embeddings.position_ids"})),
    "CLIPVisionModelWithProjection": ComponentKind(
        "CLIPVisionModelWithProjection", "transformers", "model",
        lambda raw: clip.CLIPVisionConfig.from_dict(raw, with_projection=True), clip.CLIPVisionModel,
        aliases=_strip_prefix("vision_model."),
        buffers=frozenset({"vision_model.embeddings.position_ids"})),
    "CLIPModel": ComponentKind(
        "CLIPModel", "transformers", "model", clip.CLIPConfig.from_dict, clip.CLIPModel,
        buffers=frozenset({"text_model.embeddings.position_ids",
                           "vision_model.embeddings.position_ids"})),
}


def kind_of_config(raw: Mapping[str, Any], where: str = "config.json") -> ComponentKind:
  """The component kind a config.json describes (diffusers ``_class_name`` or
  transformers ``architectures``/``model_type``)."""
  name = raw.get("_class_name")
  if name is None and raw.get("architectures"):
    name = raw["architectures"][0]
  if name is None:
    name = {"clip_text_model": "CLIPTextModel", "clip_vision_model": "CLIPVisionModel",
            "clip": "CLIPModel"}.get(raw.get("model_type"))
  if name not in KINDS:
    raise ConfigError(f"{where}: component class {name!r} is not supported; supported: "
                      f"{sorted(KINDS)}")
  return KINDS[name]


def kind_of_config_object(config: Any, module: Any) -> ComponentKind:
  """The on-disk class for one of our (config, module) pairs, for saving."""
  if isinstance(config, unet.UNetConfig):
    return KINDS["UNet2DConditionModel"]
  if isinstance(config, vae.VAEConfig):
    return KINDS["AutoencoderKL"]
  if isinstance(config, clip.CLIPTextConfig):
    return KINDS["CLIPTextModelWithProjection" if config.with_projection else "CLIPTextModel"]
  if isinstance(config, clip.CLIPVisionConfig):
    return KINDS["CLIPVisionModelWithProjection" if config.with_projection else "CLIPVisionModel"]
  if isinstance(config, clip.CLIPConfig):
    return KINDS["CLIPModel"]
  raise TypeError(f"no on-disk format for {type(module).__name__}")
