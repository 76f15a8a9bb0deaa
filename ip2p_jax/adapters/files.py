"""Adapter files: one small safetensors file.

LoRA adapters use the diffusers/peft layout, so a file diffusers' ``save_lora_weights``
writes for a UNet loads here and ours loads in diffusers' ``load_lora_weights``:

  * ``unet.<module>.lora_A.weight`` ``[r, in]`` (conv: ``[r, in, kh, kw]``) and
    ``unet.<module>.lora_B.weight`` ``[out, r]`` (conv: ``[out, r, 1, 1]``), ``<module>``
    the diffusers name (``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q``);
  * header metadata ``lora_adapter_metadata``: JSON of peft's ``LoraConfig`` keys with
    the ``unet.`` prefix (``unet.r``, ``unet.lora_alpha``, ``unet.target_modules``,
    ``unet.alpha_pattern``, ``unet.rank_pattern``). Files without it: alpha from
    ``<module>.alpha`` tensors if present, else alpha = rank (scaling 1), as diffusers reads them.

A LoRA file may also hold text-encoder layers, as diffusers writes them:
``text_encoder.<module>.lora_A.weight`` (``<module>`` e.g.
``encoder.layers.0.self_attn.q_proj``, as transformers 5 names CLIP's modules; the older
``text_model.encoder...`` names read too) with ``text_encoder.r`` etc. in the same
metadata; they merge into the text encoder's kernels. (Kohya-style ``lora_te_`` /
``lora_unet_`` files and SDXL's ``text_encoder_2`` are refused by name: convert them with
diffusers first.)

Custom Diffusion adapters store the kernel changes ``unet.<module>.delta_weight`` in the
PyTorch layout, and key/value token rows (``ip2p_jax.adapters.token_kv``) as
``unet.<module>.token_rows`` ``[n, inner]`` (``<module>`` a cross-attention ``to_k`` or
``to_v``; one row per new token, in the order of the token names). Either kind may add
tokens: ``text_encoder.new_token_embeddings`` ``[n, hidden]``, their names in our
metadata. Our metadata (``ip2p_jax``, JSON) also
records the method, the base UNet's shape and a fingerprint of the base kernels the
adapter changes, so an adapter for another base is refused by name.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any, Mapping

import numpy as np

from ip2p_jax.adapters import lora as lora_lib
from ip2p_jax.adapters import targets as targets_lib
from ip2p_jax.adapters.tokens import Tokens
from ip2p_jax.checkpoints import formats, safetensors

META_KEY = "ip2p_jax"
LORA_META_KEY = "lora_adapter_metadata"  # diffusers' key
TOKENS_KEY = "text_encoder.new_token_embeddings"
METHODS = ("lora", "custom_diffusion")
Path = tuple[str, ...]


class AdapterError(ValueError):
  """An adapter file cannot be read or does not fit the model."""


@dataclasses.dataclass
class Adapter:
  """What one file holds. ``lora`` for LoRA (the UNet's layers), ``text_lora`` (the
  text encoder's, LoRA files only), ``deltas`` (path -> kernel change, our layout) for
  Custom Diffusion, ``tokens`` for either; ``meta``: base description, training
  prompts, settings."""
  method: str
  lora: lora_lib.LoRA | None = None
  deltas: dict[Path, np.ndarray] | None = None
  tokens: Tokens | None = None
  meta: dict = dataclasses.field(default_factory=dict)
  text_lora: lora_lib.LoRA | None = None
  token_kv: dict[str, np.ndarray] | None = None  # "<our module path>" -> [tokens, inner]

  def paths(self) -> list[Path]:
    """The UNet module paths the adapter changes."""
    if self.lora is not None:
      return list(self.lora.weights)
    rows = [tuple(p.split("/")) for p in self.token_kv or {}]
    return list(self.deltas or {}) + [p for p in rows if p not in (self.deltas or {})]


def base_description(unet_module, unet_params, paths) -> dict:
  """What an adapter needs of its base: the UNet's shape and a fingerprint of the
  kernels it changes (values rounded to bfloat16, so a float32, float16 or bfloat16
  load of the same weights agrees)."""
  import ml_dtypes
  cfg = unet_module.config
  kernels = targets_lib.kernels(unet_params)
  h = hashlib.sha256()
  for p in sorted(paths):
    k = np.asarray(kernels[p], np.float32).astype(ml_dtypes.bfloat16)
    h.update("/".join(p).encode() + str(k.shape).encode() + k.tobytes())
  return {"in_channels": cfg.in_channels,
          "block_out_channels": list(cfg.block_out_channels),
          "cross_attention_dim": cfg.cross_attention_dim,
          "kernels": "sha256:" + h.hexdigest()[:16]}


def _module_path(name: str) -> Path:
  """diffusers module name -> our module path (the inverse of targets.torch_name)."""
  parts = name.split(".")
  out: list[str] = []
  for part in parts:
    if part.isdigit() and out:
      out[-1] = f"{out[-1]}_{part}"
    else:
      out.append(part)
  return tuple(out)


def _file_name(path: Path, prefix: str) -> str:
  """A layer's module name in a LoRA file. Text-encoder layers are named as diffusers
  (with transformers 5) names them, without CLIP's ``text_model.``."""
  name = targets_lib.torch_name(path)
  if prefix == "text_encoder" and name.startswith("text_model."):
    name = name[len("text_model."):]
  return name


def _our_path(name: str, prefix: str) -> Path:
  """The inverse of :func:`_file_name`; text-encoder names with or without ``text_model.``
  (older diffusers wrote it) both read."""
  path = _module_path(name)
  if prefix == "text_encoder" and path[0] != "text_model":
    path = ("text_model",) + path
  return path


def _save_lora(tensors: dict, prefix: str, part: lora_lib.LoRA, dtype) -> dict:
  """Writes one model's LoRA layers under ``prefix`` (``unet``, ``text_encoder``);
  returns its peft ``LoraConfig`` keys, prefixed, as diffusers records them."""
  ranks, alphas = {}, {}
  for p, w in part.weights.items():
    name = _file_name(p, prefix)
    a = np.asarray(w["lora_A"], np.float32)
    b = np.asarray(w["lora_B"], np.float32)
    tensors[f"{prefix}.{name}.lora_A.weight"] = formats.to_torch(("kernel",), a).astype(dtype)
    tensors[f"{prefix}.{name}.lora_B.weight"] = formats.to_torch(("kernel",), b).astype(dtype)
    ranks[name], alphas[name] = a.shape[-1], float(part.alphas[p])
  r = max(set(ranks.values()), key=list(ranks.values()).count)
  alpha = max(set(alphas.values()), key=list(alphas.values()).count)
  return {f"{prefix}.r": r, f"{prefix}.lora_alpha": alpha,
          f"{prefix}.target_modules": sorted(ranks),
          f"{prefix}.rank_pattern": {k: v for k, v in ranks.items() if v != r},
          f"{prefix}.alpha_pattern": {k: v for k, v in alphas.items() if v != alpha}}


def save(path: str, adapter: Adapter, dtype=np.float32) -> None:
  """Writes ``adapter`` to ``path`` (a ``.safetensors`` file)."""
  tensors: dict[str, np.ndarray] = {}
  meta: dict[str, str] = {"format": "pt"}
  if adapter.method == "lora":
    config = {}
    for prefix, part in (("unet", adapter.lora), ("text_encoder", adapter.text_lora)):
      if part is not None and part.weights:
        config.update(_save_lora(tensors, prefix, part, dtype))
    if not config:
      raise AdapterError("a LoRA adapter without layers")
    meta[LORA_META_KEY] = json.dumps(config, sort_keys=True)
  elif adapter.method == "custom_diffusion":
    for p, d in adapter.deltas.items():
      name = targets_lib.torch_name(p)
      tensors[f"unet.{name}.delta_weight"] = formats.to_torch(
          ("kernel",), np.asarray(d, np.float32)).astype(dtype)
    for p, rows in (adapter.token_kv or {}).items():
      name = targets_lib.torch_name(tuple(p.split("/")))
      tensors[f"unet.{name}.token_rows"] = np.asarray(rows, np.float32).astype(dtype)
  else:
    raise AdapterError(f"adapter method {adapter.method!r}: one of {METHODS}")
  own = dict(adapter.meta, method=adapter.method, format=1)
  if adapter.tokens is not None and adapter.tokens.names:
    tensors[TOKENS_KEY] = np.asarray(adapter.tokens.embeddings, np.float32)
    own["tokens"] = list(adapter.tokens.names)
  meta[META_KEY] = json.dumps(own, sort_keys=True)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  safetensors.save(path, tensors, meta)


def _alpha_for(name: str, config: Mapping[str, Any], rank: int, alpha_tensors: Mapping) -> float:
  if name in alpha_tensors:
    return float(np.asarray(alpha_tensors[name]).reshape(()))
  if not config:
    return float(rank)  # diffusers: no alpha recorded means scaling 1
  for pattern, value in (config.get("alpha_pattern") or {}).items():
    if name == pattern or name.endswith("." + pattern):
      return float(value)
  return float(config.get("lora_alpha", config.get("r", rank)))


def load(path: str) -> Adapter:
  """Reads an adapter file: ours, or a UNet LoRA in the diffusers/peft layout."""
  if not os.path.isfile(path):
    raise AdapterError(f"adapter {path}: no such file")
  if not path.endswith(".safetensors"):
    raise AdapterError(f"adapter {path}: only .safetensors adapter files are read")
  _, metadata, _ = safetensors.read_header(path)
  tensors = safetensors.load(path)
  own = json.loads(metadata[META_KEY]) if META_KEY in metadata else {}
  tokens = None
  if TOKENS_KEY in tensors:
    names = own.get("tokens") or []
    if len(names) != tensors[TOKENS_KEY].shape[0]:
      raise AdapterError(f"adapter {path}: {tensors[TOKENS_KEY].shape[0]} token embeddings "
                         f"but {len(names)} token names")
    tokens = Tokens(list(names), np.array(tensors[TOKENS_KEY], np.float32))
  foreign = sorted(k for k in tensors if k.startswith(("lora_te", "lora_unet", "te_",
                                                       "text_encoder_2.", "te2_")))
  if foreign:
    raise AdapterError(f"adapter {path}: {foreign[0]} is not in the diffusers/peft layout "
                       "(kohya-style or SDXL's second text encoder); load it with diffusers' "
                       "load_lora_weights and save it again with save_lora_weights")
  text = {k[len("text_encoder."):]: v for k, v in tensors.items()
          if k.startswith("text_encoder.") and k != TOKENS_KEY}
  unet = {k[len("unet."):] if k.startswith("unet.") else k: v for k, v in tensors.items()
          if k != TOKENS_KEY and not k.startswith("text_encoder.")}
  method = own.get("method") or (
      "lora" if any(".lora_A." in k for k in list(unet) + list(text)) else None)
  if text and method != "lora":
    raise AdapterError(f"adapter {path}: text-encoder layers ({sorted(text)[0]}, ...) "
                       "belong in LoRA files only")
  if method == "custom_diffusion":
    deltas, rows = {}, {}
    for key, value in unet.items():
      if key.endswith(".token_rows"):
        rows["/".join(_module_path(key[:-len(".token_rows")]))] = np.array(value, np.float32)
        continue
      if not key.endswith(".delta_weight"):
        raise AdapterError(f"adapter {path}: unexpected tensor {key}")
      p = _module_path(key[:-len(".delta_weight")])
      deltas[p] = formats.from_torch(("kernel",), np.array(value, np.float32))
    n = len(tokens.names) if tokens is not None else 0
    bad = [k for k, r in rows.items() if r.ndim != 2 or r.shape[0] != n]
    if bad:
      raise AdapterError(f"adapter {path}: {bad[0]} token rows have shape "
                         f"{rows[bad[0]].shape}; the file adds {n} tokens")
    return Adapter(method, deltas=deltas, tokens=tokens, meta=own, token_kv=rows or None)
  if method != "lora":
    raise AdapterError(f"adapter {path}: neither LoRA (lora_A/lora_B tensors) nor an "
                       "ip2p_jax adapter")
  config_raw = json.loads(metadata[LORA_META_KEY]) if LORA_META_KEY in metadata else {}
  unet_lora = _load_lora(path, unet, config_raw, "unet")
  text_lora = _load_lora(path, text, config_raw, "text_encoder") if text else None
  return Adapter("lora", lora=unet_lora, tokens=tokens, meta=own, text_lora=text_lora)


def _load_lora(path: str, tensors: Mapping, config_raw: Mapping, prefix: str
               ) -> lora_lib.LoRA:
  """One model's LoRA layers (``tensors`` keyed by module name, the prefix removed);
  ``config_raw``: diffusers' metadata, whose ``<prefix>.`` keys are this model's."""
  config = {k[len(prefix) + 1:]: v for k, v in config_raw.items() if k.startswith(prefix + ".")}
  alpha_tensors = {k[:-len(".alpha")]: v for k, v in tensors.items() if k.endswith(".alpha")}
  weights: dict[Path, dict] = {}
  for key, value in tensors.items():
    if key.endswith(".alpha"):
      continue
    for part in ("lora_A", "lora_B"):
      marker = f".{part}."
      if marker in key:
        name = key[:key.index(marker)]
        weights.setdefault(_our_path(name, prefix), {})[part] = formats.from_torch(
            ("kernel",), np.array(value, np.float32))
        break
    else:
      raise AdapterError(f"adapter {path}: unexpected tensor {key} (only lora_A/lora_B "
                         "layers are read)")
  alphas = {}
  for p, w in weights.items():
    name = _file_name(p, prefix)
    if set(w) != {"lora_A", "lora_B"}:
      raise AdapterError(f"adapter {path}: layer {name} lacks {({'lora_A', 'lora_B'} - set(w)).pop()}")
    if w["lora_B"].ndim == 4 and w["lora_B"].shape[:2] != (1, 1):
      raise AdapterError(f"adapter {path}: layer {name}: lora_B must be a 1x1 convolution")
    if w["lora_A"].shape[-1] != w["lora_B"].shape[-2]:
      raise AdapterError(f"adapter {path}: layer {name}: lora_A has rank "
                         f"{w['lora_A'].shape[-1]}, lora_B {w['lora_B'].shape[-2]}")
    alphas[p] = _alpha_for(name, config, w["lora_A"].shape[-1], alpha_tensors)
  return lora_lib.LoRA(weights, alphas)


def file_hash(path: str) -> str:
  """``"sha256:<16 hex>"`` of an adapter file's bytes (its name in edit records)."""
  h = hashlib.sha256()
  with open(path, "rb") as f:
    while chunk := f.read(1 << 20):
      h.update(chunk)
  return "sha256:" + h.hexdigest()[:16]
