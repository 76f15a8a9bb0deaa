"""Custom Diffusion in diffusers' own layout, both ways.

diffusers' Custom Diffusion (``examples/custom_diffusion/train_custom_diffusion.py``,
``CustomDiffusionAttnProcessor``) stores *whole* replacement kernels, not changes:

  * ``pytorch_custom_diffusion_weights.safetensors``: for each cross-attention layer
    ``<module>.processor.to_k_custom_diffusion.weight`` and ``to_v_custom_diffusion.weight``
    (PyTorch ``[out, in]``), and, when the queries and output were trained too,
    ``to_q_custom_diffusion.weight``, ``to_out_custom_diffusion.0.weight`` and ``.bias``;
    ``<module>`` e.g. ``down_blocks.0.attentions.0.transformer_blocks.0.attn2``;
  * one textual-inversion file per modifier token, ``<new1>.safetensors`` holding
    ``{"<new1>": embedding}`` (``pipe.load_textual_inversion``).

So writing needs the base kernels (``W0 + dW``) and reading gives ``dW = W - W0`` against
the base the file is applied to. diffusers reads the weights with
``pipe.unet.load_attn_procs``; its safetensors branch (0.42) drops the self-attention
layers' empty entries and then refuses the processor count, so pass it the state dict
with those entries (what the ``.bin`` file of the training script holds)::

    sd = safetensors.torch.load_file(".../pytorch_custom_diffusion_weights.safetensors")
    sd.update({name: {} for name in pipe.unet.attn_processors if name.endswith("attn1.processor")})
    pipe.unet.load_attn_procs(sd, _pipeline=pipe)
"""
from __future__ import annotations

import os

import numpy as np

from ip2p_jax.adapters import targets as targets_lib
from ip2p_jax.adapters import tokens as tokens_lib
from ip2p_jax.adapters.files import Adapter, AdapterError, _module_path, base_description
from ip2p_jax.checkpoints import formats, safetensors

WEIGHT_NAME = "pytorch_custom_diffusion_weights.safetensors"  # diffusers' file name
_SUFFIX = {"to_k": "to_k_custom_diffusion.weight", "to_v": "to_v_custom_diffusion.weight",
           "to_q": "to_q_custom_diffusion.weight", "to_out_0": "to_out_custom_diffusion.0.weight"}
_OUT_BIAS = "to_out_custom_diffusion.0.bias"


def _torch(kernel) -> np.ndarray:
  return formats.to_torch(("kernel",), np.asarray(kernel, np.float32))


def save(folder: str, adapter: Adapter | str, parts) -> list[str]:
  """Writes a Custom Diffusion adapter (ours, or a path) for ``parts``' UNet in
  diffusers' layout under ``folder``; returns the files written."""
  from ip2p_jax import adapters
  if isinstance(adapter, str):
    adapter = adapters.load(adapter)
  if adapter.method != "custom_diffusion":
    raise AdapterError("diffusers' Custom Diffusion layout holds Custom Diffusion adapters; "
                       "a LoRA file is already in diffusers' LoRA layout")
  if adapter.token_kv:
    raise AdapterError("diffusers has no key/value token rows (ip2p_jax.adapters.token_kv): "
                       "this adapter is ip2p_jax's own")
  adapters.check(adapter, parts, "adapter")
  unet = parts.params["unet"]
  kernels = targets_lib.kernels(unet)
  attns = sorted({p[:-1] for p in adapter.deltas})
  if any(a[-1] != "attn2" for a in attns):
    raise AdapterError("diffusers' Custom Diffusion adapts cross-attention (attn2) layers only")
  tensors = {}
  for attn in attns:
    name = targets_lib.torch_name(attn) + ".processor"
    q_out = any(attn + (t,) in adapter.deltas for t in ("to_q", "to_out_0"))
    for t in ("to_k", "to_v") + (("to_q", "to_out_0") if q_out else ()):
      w = np.asarray(kernels[attn + (t,)], np.float32)
      tensors[f"{name}.{_SUFFIX[t]}"] = _torch(w + adapter.deltas.get(attn + (t,), 0.0))
    if q_out:
      node = unet
      for key in attn + ("to_out_0",):
        node = node[key]
      tensors[f"{name}.{_OUT_BIAS}"] = np.asarray(node["bias"], np.float32)
  os.makedirs(folder, exist_ok=True)
  written = [os.path.join(folder, WEIGHT_NAME)]
  safetensors.save(written[0], tensors, {"format": "pt"})
  if adapter.tokens is not None:
    for name, row in zip(adapter.tokens.names, adapter.tokens.embeddings):
      path = os.path.join(folder, f"{name}.safetensors")
      safetensors.save(path, {name: np.asarray(row, np.float32)}, {"format": "pt"})
      written.append(path)
  return written


def load(path: str, parts, token_files: tuple[str, ...] | list[str] = ()) -> Adapter:
  """A diffusers Custom Diffusion weight file (and textual-inversion token files) as our
  adapter for ``parts``' UNet: ``dW = W_file - W0``."""
  if not os.path.isfile(path) or not path.endswith(".safetensors"):
    raise AdapterError(f"{path}: not a .safetensors file (save the .bin of diffusers' "
                       "training script with safetensors first)")
  unet = parts.params["unet"]
  kernels = targets_lib.kernels(unet)
  by_suffix = {v: k for k, v in _SUFFIX.items()}
  deltas = {}
  for key, value in safetensors.load(path).items():
    if key.endswith(_OUT_BIAS):
      continue  # the base's bias (only kernels are trained here)
    head, sep, suffix = key.partition(".processor.")
    if not sep or suffix not in by_suffix:
      raise AdapterError(f"{path}: unexpected tensor {key} (not diffusers' Custom Diffusion "
                         "layout)")
    p = _module_path(head) + (by_suffix[suffix],)
    if p not in kernels:
      raise AdapterError(f"{path}: layer {head} is not in this model's UNet")
    w = formats.from_torch(("kernel",), np.array(value, np.float32))
    if w.shape != tuple(kernels[p].shape):
      raise AdapterError(f"{path}: layer {head}.{by_suffix[suffix]} has shape "
                         f"{tuple(value.shape)}, this model's is "
                         f"{tuple(_torch(kernels[p]).shape)} (a file for another base)")
    delta = w - np.asarray(kernels[p], np.float32)
    if np.any(delta):
      deltas[p] = delta
  names, rows = [], []
  for file in token_files:
    for name, value in safetensors.load(file).items():
      names.append(name)
      rows.append(np.asarray(value, np.float32).reshape(-1))
  toks = tokens_lib.Tokens(names, np.stack(rows)) if names else None
  meta = {"base": base_description(parts.modules["unet"], unet, list(deltas)),
          "source": "diffusers custom diffusion"}
  return Adapter("custom_diffusion", deltas=deltas, tokens=toks, meta=meta)
