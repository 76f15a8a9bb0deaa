"""Customization adapters: LoRA and Custom Diffusion, for the editor and the
text-to-image UNet.

    from ip2p_jax import adapters
    adapter = adapters.load("concept.safetensors")       # ours, or a diffusers UNet LoRA
    parts = adapters.apply(parts, adapter, scale=0.8)     # PipelineParts -> PipelineParts
    pipe.load_adapter("concept.safetensors", scale=0.8)   # the same on a pipeline

Applying merges the adapter into the UNet kernels (``W + scale * dW``; several adapters
add) and appends its tokens to the tokenizer and the text encoder's table; key/value
token rows (``token_kv``, Custom Diffusion with ``targets="token_kv"``) are not weights:
they go to ``params["token_kv"]``, which the pipelines apply where the tokens sit. Training:
``config.customize`` (``ip2p_jax.adapters.training``) and ``ip2p customize``
(``ip2p_jax.adapters.runner``).
"""
from __future__ import annotations

import dataclasses

from ip2p_jax.adapters import custom_diffusion, lora, targets, token_kv, tokens
from ip2p_jax.adapters.files import Adapter, AdapterError, base_description, load, save

__all__ = ["Adapter", "AdapterError", "apply", "load", "save", "load_into", "lora",
           "merge_custom_diffusion",
           "custom_diffusion", "targets", "token_kv", "tokens"]

_EDITOR = "an InstructPix2Pix editor"
_T2I = "a text-to-image model"


def _kind(in_channels: int, latent_channels: int | None) -> str:
  if latent_channels is None:
    return f"in_channels {in_channels}"
  return _EDITOR if in_channels == 2 * latent_channels else _T2I


def check(adapter: Adapter, parts, where: str = "adapter", check_base: bool = True,
          base_unet=None) -> None:
  """One-line :class:`AdapterError` when ``adapter`` does not fit ``parts``: another kind
  of model (editor vs text-to-image), another architecture, other kernel shapes, or
  (``check_base``) other base weights than it was trained on (``base_unet``: the UNet
  before other adapters were merged in; default ``parts``' own)."""
  unet_module, unet_params = parts.modules["unet"], parts.params["unet"]
  cfg = unet_module.config
  latent = getattr(parts.modules.get("vae"), "config", None)
  latent = getattr(latent, "latent_channels", None)
  base = adapter.meta.get("base") or {}
  if base:
    if base["in_channels"] != cfg.in_channels:
      raise AdapterError(
          f"{where} was made for {_kind(base['in_channels'], latent)} (UNet in_channels "
          f"{base['in_channels']}); this is {_kind(cfg.in_channels, latent)} (in_channels "
          f"{cfg.in_channels})")
    for key in ("block_out_channels", "cross_attention_dim"):
      ours = list(cfg.block_out_channels) if key == "block_out_channels" else cfg.cross_attention_dim
      if base[key] != ours:
        raise AdapterError(f"{where} was made for a UNet with {key} {base[key]}; this "
                           f"model's is {ours}")
  try:
    if adapter.lora is not None:
      lora.check_shapes(adapter.lora, unet_params, where)
    else:
      kernels = targets.kernels(unet_params)
      for p, d in (adapter.deltas or {}).items():
        name = targets.torch_name(p)
        if p not in kernels:
          raise ValueError(f"{where}: adapter layer {name} is not in this model's UNet")
        if tuple(d.shape) != tuple(kernels[p].shape):
          raise ValueError(f"{where}: adapter layer {name} has shape "
                           f"{lora._torch_shape(tuple(d.shape))}, this model's is "
                           f"{lora._torch_shape(tuple(kernels[p].shape))}")
    if adapter.token_kv:
      count = len(adapter.tokens.names) if adapter.tokens is not None else 0
      if any(r.shape[0] != count for r in adapter.token_kv.values()):
        raise ValueError(f"{where}: its key/value token rows need one row per new token "
                         f"({count} tokens)")
      token_kv.check_shapes(adapter.token_kv, unet_params, where)
  except ValueError as e:
    raise AdapterError(str(e)) from None
  if adapter.text_lora is not None:
    try:
      lora.check_shapes(adapter.text_lora, parts.params["text_encoder"], where,
                        model="text encoder")
    except ValueError as e:
      raise AdapterError(str(e)) from None
  if adapter.tokens is not None:
    hidden = parts.modules["text_encoder"].config.hidden_size
    if adapter.tokens.embeddings.shape[1] != hidden:
      raise AdapterError(f"{where}: its token embeddings are {adapter.tokens.embeddings.shape[1]}"
                         f" wide, this model's text encoder {hidden}")
  if check_base and base.get("kernels"):
    ours = base_description(unet_module, unet_params if base_unet is None else base_unet,
                            adapter.paths())["kernels"]
    if ours != base["kernels"]:
      raise AdapterError(f"{where} was trained on another base model (its base kernels "
                         f"{base['kernels']}, this model's {ours}); pass check_base=False to "
                         "apply it anyway")


def apply(parts, adapter: Adapter | str, scale: float = 1.0, *, check_base: bool = True,
          where: str | None = None, base_unet=None):
  """``parts`` (``PipelineParts``) with ``adapter`` (or an adapter file) applied at
  ``scale``: kernels ``W + scale * dW`` (the UNet's, and the text encoder's for a LoRA
  file with text-encoder layers), new tokens added. ``scale`` 0 leaves every weight's
  value as it was."""
  if isinstance(adapter, str):
    where = where or f"adapter {adapter}"
    adapter = load(adapter)
  where = where or "adapter"
  check(adapter, parts, where, check_base, base_unet)
  unet = parts.params["unet"]
  if adapter.lora is not None:
    unet = lora.merge(unet, [(adapter.lora, scale)])
  else:
    unet = custom_diffusion.merge(unet, [(adapter.deltas, scale)])
  params = {**parts.params, "unet": unet}
  if adapter.text_lora is not None and adapter.text_lora.weights:
    params["text_encoder"] = lora.merge(parts.params["text_encoder"],
                                        [(adapter.text_lora, scale)])
  modules, tokenizer = parts.modules, parts.tokenizer
  if adapter.tokens is not None and adapter.tokens.names:
    try:
      tokenizer, text, params["text_encoder"] = tokens.apply(
          parts.tokenizer, parts.modules["text_encoder"], parts.params["text_encoder"],
          adapter.tokens)
    except ValueError as e:
      raise AdapterError(f"{where}: {e}") from None
    modules = {**modules, "text_encoder": text}
  if adapter.token_kv:
    params[token_kv.KEY] = _stack_rows(params.get(token_kv.KEY), adapter, tokenizer, scale)
  return dataclasses.replace(parts, modules=modules, params=params, tokenizer=tokenizer)


def _stack_rows(loaded: dict | None, adapter: Adapter, tokenizer, scale: float) -> dict:
  """``params["token_kv"]`` with ``adapter``'s key/value token rows (times ``scale``)
  after those already loaded; a layer one adapter leaves alone gets zero rows there."""
  import numpy as np
  ids = np.asarray(tokenizer.convert_tokens_to_ids(list(adapter.tokens.names)), np.int32)
  new = ({p: scale * np.asarray(r, np.float32) for p, r in adapter.token_kv.items()}, len(ids))
  if loaded is None:
    return {"ids": ids, "rows": token_kv.stack([new])}
  old = (loaded["rows"], len(loaded["ids"]))
  return {"ids": np.concatenate([np.asarray(loaded["ids"]), ids]),
          "rows": token_kv.stack([old, new])}


def load_into(pipe, path: str, scale: float = 1.0, check_base: bool = True) -> None:
  """Applies the adapter file ``path`` to a pipeline in place (``pipe.load_adapter``)."""
  parts = dataclasses.replace(pipe.parts, params=pipe.params, tokenizer=pipe.tokenizer,
                              modules={**pipe.parts.modules, "text_encoder": pipe.text_encoder})
  if getattr(pipe, "_adapter_base_unet", None) is None:
    pipe._adapter_base_unet = pipe.params["unet"]
  new = apply(parts, path, scale, check_base=check_base, base_unet=pipe._adapter_base_unet)
  text_changed = new.modules["text_encoder"] is not parts.modules["text_encoder"]
  pipe.parts = new
  pipe.tokenizer = new.tokenizer
  pipe.text_encoder = new.modules["text_encoder"]
  if text_changed:  # compiled functions close over the text module
    pipe._compiled.clear()
  pipe.set_params(new.params)


def _prompt_features(parts, prompts: list[str], token_names: list[str] = ()):
  """The text encoder's last hidden states of ``prompts`` that the cross-attention keys
  and values read, stacked ``[rows, hidden]``: per prompt the rows up to and including
  its end token, from its first modifier token in ``token_names`` on when it has one
  (CLIP's text encoder is causal: the rows before that token are the same as without
  the concept, so they are not the concept's to claim)."""
  import numpy as np
  from ip2p_jax import tokenizer as tokenizers
  ids = tokenizers.tokenize(parts.tokenizer, prompts)
  states = np.asarray(parts.modules["text_encoder"].apply(
      {"params": parts.params["text_encoder"]}, ids).last_hidden_state, np.float64)
  eos = parts.tokenizer.eos_token_id
  concept = set(parts.tokenizer.convert_tokens_to_ids(list(token_names))) if token_names else set()
  rows = []
  for s, i in zip(states, ids):
    end = int(np.argmax(i == eos)) + 1
    marks = [k for k in range(end) if int(i[k]) in concept]
    rows.append(s[marks[0] if marks else 0:end])
  return np.concatenate(rows)


def merge_custom_diffusion(parts, concepts: list, reg_prompts: list[str] | None = None
                           ) -> Adapter:
  """One Custom Diffusion adapter from several trained apart (paths or ``Adapter``s):
  their tokens together and, per kernel, the constrained merge of Kumari et al. 2023
  (``custom_diffusion.merge_concepts``). Each concept's features are the text states of
  the prompts it was trained on (recorded in its file) from its modifier token on; the
  regularisation features are ``reg_prompts``' (default: those prompts with the modifier
  tokens removed, and "")."""
  loaded = [load(c) if isinstance(c, str) else c for c in concepts]
  if any(a.method != "custom_diffusion" for a in loaded):
    raise AdapterError("merge_custom_diffusion merges Custom Diffusion adapters only")
  if any(not a.meta.get("prompts") for a in loaded):
    raise AdapterError("an adapter without recorded training prompts cannot be merged")
  with_tokens = parts
  for a in loaded:
    check(a, parts)
    with_tokens = apply(with_tokens, a, 0.0, base_unet=parts.params["unet"])
  features = [_prompt_features(with_tokens, a.meta["prompts"],
                               a.tokens.names if a.tokens else ()) for a in loaded]
  if reg_prompts is None:
    names = [n for a in loaded for n in (a.tokens.names if a.tokens else [])]
    plain = []
    for a in loaded:
      for p in a.meta["prompts"]:
        for n in names:
          p = p.replace(n, "")
        plain.append(" ".join(p.split()))
    reg_prompts = list(dict.fromkeys(plain + [""]))
  reg = _prompt_features(with_tokens, list(reg_prompts))
  deltas = custom_diffusion.merge_concepts(parts.params["unet"], [a.deltas for a in loaded],
                                           features, reg)
  toks = [a.tokens for a in loaded if a.tokens is not None and a.tokens.names]
  merged_tokens = None
  if toks:
    import numpy as np
    merged_tokens = tokens.Tokens([n for t in toks for n in t.names],
                                  np.concatenate([t.embeddings for t in toks]))
  rows = None
  if any(a.token_kv for a in loaded):  # each adapter's rows for its own tokens, in order
    rows = token_kv.stack([(a.token_kv or {}, len(a.tokens.names)) for a in loaded
                           if a.tokens is not None and a.tokens.names])
  meta = {"base": base_description(parts.modules["unet"], parts.params["unet"], list(deltas)),
          "prompts": [p for a in loaded for p in a.meta["prompts"]],
          "merged_from": len(loaded)}
  return Adapter("custom_diffusion", deltas=deltas, tokens=merged_tokens, meta=meta,
                 token_kv=rows)
