"""Parameter-efficient fine-tuning as config data (``config.customize``): which leaves
train, how the trained tree becomes the UNet and text-encoder parameters the objective
reads, and the adapter file it exports.

The train state's parameters are one tree (no copied model)::

    {"unet": the base UNet,                       # Custom Diffusion trains its selected kernels
     "lora": {"down_blocks_0/.../to_q": {"lora_A", "lora_B"}, ...},   # LoRA only
     "tokens": [n, hidden],                       # new token rows, when tokens are added
     "token_kv": {"down_blocks_0/.../attn2/to_k": [n, inner], ...},   # targets "token_kv"
     "base_kernels": {...}}                       # Custom Diffusion: the selected kernels'
                                                  # base values, frozen (for the delta)

and the optimizer is ``optax.multi_transform`` over labels from :func:`label_tree`: the
"frozen" partition gets ``optax.set_to_zero`` (no optimizer state, no weight decay) and
its gradients are stopped, so every frozen leaf stays bitwise equal.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ip2p_jax.adapters import custom_diffusion as cd
from ip2p_jax.adapters import files
from ip2p_jax.adapters import lora as lora_lib
from ip2p_jax.adapters import targets as targets_lib
from ip2p_jax.adapters import token_kv as token_kv_lib
from ip2p_jax.adapters import tokens as tokens_lib

METHODS = ("custom_diffusion", "lora")
DEFAULT_TARGETS = {"custom_diffusion": "to_k,to_v", "lora": "to_q,to_k,to_v,to_out_0"}


def _split(text: str) -> list[str]:
  return [t.strip() for t in (text or "").split(",") if t.strip()]


@dataclasses.dataclass(frozen=True)
class Customization:
  """``config.customize`` parsed: method, targets, LoRA rank/alpha, new tokens and the
  words that initialise them, the prior-preservation loss weight. ``token_kv``: the
  target "token_kv" (Custom Diffusion only): key/value rows of the new tokens per
  cross-attention layer (``ip2p_jax.adapters.token_kv``)."""
  method: str
  targets: tuple[str, ...]
  rank: int = 4
  alpha: float = 4.0
  token_names: tuple[str, ...] = ()
  initializer_words: tuple[str, ...] = ()
  prior_weight: float = 1.0
  token_kv: bool = False

  @classmethod
  def from_config(cls, config) -> "Customization | None":
    c = config.get("customize") if hasattr(config, "get") else None
    if c is None or not c.get("method"):
      return None
    method = c.method
    if method not in METHODS:
      raise ValueError(f"customize.method must be one of {METHODS} (or '' for none), "
                       f"got {method!r}")
    names_given = _split(c.get("targets") or DEFAULT_TARGETS[method])
    token_kv = token_kv_lib.KEY in names_given
    if token_kv and method != "custom_diffusion":
      raise ValueError("customize.targets 'token_kv' belongs to custom_diffusion")
    rest = [n for n in names_given if n != token_kv_lib.KEY]
    targets = targets_lib.parse(rest or "none", allow_none=method == "custom_diffusion")
    if method == "custom_diffusion":
      cd.select({}, targets)  # raises on non-attention targets
    names, words = tuple(_split(c.get("tokens", ""))), tuple(_split(c.get("initializer", "")))
    if not targets and not names:
      raise ValueError("customize.targets 'none' trains only new tokens (textual inversion, "
                       "Gal et al. 2022): give customize.tokens")
    if token_kv and not names:
      raise ValueError("customize.targets 'token_kv' trains key/value rows of new tokens: "
                       "give customize.tokens")
    if names and len(words) not in (1, len(names)):
      raise ValueError(f"customize.initializer: one word, or one per token ({len(names)}); "
                       f"got {list(words)}")
    if names and not words:
      raise ValueError("customize.tokens needs customize.initializer: the word whose "
                       "embedding each new token starts from")
    words = words * len(names) if len(words) == 1 else words
    if c.get("rank", 4) < 1:
      raise ValueError(f"customize.rank must be >= 1, got {c.rank}")
    return cls(method, targets, int(c.get("rank", 4)), float(c.get("alpha", 4.0)), names,
               words, float(c.get("prior_weight", 1.0)), token_kv)

  # -- which leaves train -----------------------------------------------------------

  def is_trained(self, path: tuple[str, ...], ndim: int) -> bool:
    """Whether the leaf at ``path`` (keys of the trained tree) trains."""
    if path[0] in ("lora", "tokens", token_kv_lib.KEY):
      return True
    if path[0] != "unet" or self.method != "custom_diffusion" or path[-1] != "kernel":
      return False
    return targets_lib._is_target(path[1:-1], ndim, self.targets, cross_only=True)

  def label_tree(self, params) -> Any:
    """"train"/"frozen" per leaf (a logical-axis box counts as one leaf)."""
    is_box = lambda x: isinstance(x, nn.Partitioned)

    def label(path, leaf):
      keys = tuple(getattr(k, "key", str(k)) for k in path)
      value = leaf.value if is_box(leaf) else leaf
      return "train" if self.is_trained(keys, len(value.shape)) else "frozen"
    return jax.tree_util.tree_map_with_path(label, params, is_leaf=is_box)

  def stop_frozen(self, params):
    labels = self.label_tree(params)
    return jax.tree.map(lambda l, p: p if l == "train" else jax.lax.stop_gradient(p),
                        labels, params)

  # -- building the job -------------------------------------------------------------

  def prepare_text(self, frozen_modules: dict, frozen_params: dict, tokenizer):
    """Adds the new tokens: tokenizer, text-encoder module (more rows) and frozen text
    parameters (their rows initialised from the initializer words)."""
    if not self.token_names:
      return frozen_modules, frozen_params, tokenizer
    text, text_params = frozen_modules["text_encoder"], frozen_params["text_encoder"]
    rows = tokens_lib.initial_rows(tokenizer, text_params, list(self.initializer_words))
    tok, module, params = tokens_lib.apply(tokenizer, text, text_params,
                                           tokens_lib.Tokens(list(self.token_names), rows))
    return ({**frozen_modules, "text_encoder": module},
            {**frozen_params, "text_encoder": params}, tok)

  def trainable_tree(self, unet_params, frozen_params, key) -> dict:
    """The trained tree (module docstring) around base UNet parameters (boxed or not)."""
    plain = nn.unbox(unet_params) if _has_boxes(unet_params) else unet_params
    tree = {"unet": unet_params}
    if self.method == "lora":
      paths = targets_lib.select(plain, self.targets)
      tree["lora"] = {"/".join(p): w for p, w in
                      lora_lib.init(plain, paths, self.rank, key).items()}
    else:
      kernels = targets_lib.kernels(plain)
      tree["base_kernels"] = {"/".join(p): jnp.array(kernels[p])
                              for p in cd.select(plain, self.targets)}
    if self.token_names:
      table = tokens_lib.embedding_table(frozen_params["text_encoder"])
      tree["tokens"] = jnp.array(table[-len(self.token_names):])
    if self.token_kv:
      tree[token_kv_lib.KEY] = token_kv_lib.init_rows(plain, len(self.token_names))
    return tree

  def merged(self, params, frozen):
    """``(unet_params, frozen)`` the objective and samplers read: LoRA merged at scale 1,
    the trained token rows in the text encoder's table."""
    unet = params["unet"]
    if self.method == "lora":
      weights = {tuple(k.split("/")): w for k, w in params["lora"].items()}
      scaling = self.alpha / self.rank
      unet = targets_lib.add_to_kernels(
          unet, lora_lib.deltas(weights, {p: scaling for p in weights}))
    if self.token_names:
      text = frozen["text_encoder"]
      table = tokens_lib.embedding_table(text)
      new = jnp.concatenate([table[:-len(self.token_names)],
                             params["tokens"].astype(table.dtype)])
      frozen = {**frozen, "text_encoder": tokens_lib.with_table(text, new)}
    return unet, frozen

  def wrap_loss(self, loss: Callable) -> Callable:
    """The objective on the trained tree; a batch with a ``"prior"`` sub-batch adds its
    loss times ``prior_weight`` (prior preservation, Ruiz et al. 2023 / Kumari et al.
    2023: regularisation examples keep the base model's behaviour)."""
    def wrapped(params, frozen, batch, rng):
      params = self.stop_frozen(params)
      rows = self.token_rows(params, frozen)
      unet, frozen = self.merged(params, frozen)

      def objective(examples, key):  # key/value token rows where the batch's ids hold them
        if rows is None:
          return loss(unet, frozen, examples, key)
        with token_kv_lib.applied(rows[0], token_kv_lib.mask(examples["input_ids"], rows[1])):
          return loss(unet, frozen, examples, key)
      if "prior" not in batch:
        return objective(batch, rng)
      k_inst, k_prior = jax.random.split(rng)
      instance = {k: v for k, v in batch.items() if k != "prior"}
      l_inst, _ = objective(instance, k_inst)
      l_prior, _ = objective(batch["prior"], k_prior)
      total = l_inst + self.prior_weight * l_prior
      return total, {"loss": total, "instance_loss": l_inst, "prior_loss": l_prior}
    return wrapped

  def token_rows(self, params, frozen) -> tuple[dict, jax.Array] | None:
    """``(rows, token ids)`` of the key/value token rows being trained, or None: what a
    sampler passes to ``token_kv.applied`` (the ids are the table's last rows)."""
    if not self.token_kv:
      return None
    n = len(self.token_names)
    vocab = tokens_lib.embedding_table(frozen["text_encoder"]).shape[0]
    return params[token_kv_lib.KEY], jnp.arange(vocab - n, vocab)

  def wrap_job(self, job):
    """``job`` training the trained tree instead of the whole UNet."""
    init_unet, load_unet = job.init_params, job.load_params
    frozen = job.frozen_params
    init = lambda key: self.trainable_tree(init_unet(key), frozen, jax.random.fold_in(key, 7))
    load = None
    if load_unet is not None:
      load = lambda: self.trainable_tree(load_unet(), frozen, jax.random.key(7))
    return dataclasses.replace(job, init_params=init, load_params=load,
                               loss=self.wrap_loss(job.loss), customization=self)

  # -- the adapter ----------------------------------------------------------------------

  def adapter(self, module, params, frozen, meta: dict | None = None) -> files.Adapter:
    """The adapter file's content from trained parameters (host or device arrays)."""
    params = jax.device_get(params)
    unet = params["unet"]
    tokens = None
    if self.token_names:
      tokens = tokens_lib.Tokens(list(self.token_names),
                                 np.asarray(params["tokens"], np.float32))
    info = dict(meta or {}, targets=list(self.targets))
    if self.method == "lora":
      weights = {tuple(k.split("/")): {n: np.asarray(v, np.float32) for n, v in w.items()}
                 for k, w in params["lora"].items()}
      info.update(rank=self.rank, alpha=self.alpha,
                  base=files.base_description(module, unet, list(weights)))
      return files.Adapter("lora", lora=lora_lib.LoRA(weights, {p: self.alpha for p in weights}),
                           tokens=tokens, meta=info)
    base = {tuple(k.split("/")): v for k, v in params["base_kernels"].items()}
    trained = targets_lib.kernels(unet)
    deltas = {p: np.asarray(trained[p], np.float32) - np.asarray(v, np.float32)
              for p, v in base.items()}
    rows = None
    if self.token_kv:
      rows = {p: np.asarray(r, np.float32) for p, r in params[token_kv_lib.KEY].items()}
      info["targets"] = info["targets"] + [token_kv_lib.KEY]
    paths = list(base) + [tuple(p.split("/")) for p in rows or {}]
    info.update(base=files.base_description(module, _base_of(unet, base),
                                            list(dict.fromkeys(paths))))
    return files.Adapter("custom_diffusion", deltas=deltas, tokens=tokens, meta=info,
                         token_kv=rows)


def _base_of(unet, base_kernels: dict) -> dict:
  """``unet`` with the selected kernels put back to their base values (exactly)."""
  out = unet
  for path, value in base_kernels.items():
    out = _set(out, path, value)
  return out


def _set(tree, path, value):
  new = dict(tree)
  if not path:
    new["kernel"] = value
  else:
    new[path[0]] = _set(tree[path[0]], path[1:], value)
  return new


def _has_boxes(tree) -> bool:
  return any(isinstance(x, nn.Partitioned) for x in
             jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, nn.Partitioned)))
