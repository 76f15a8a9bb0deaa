"""New modifier tokens (``<new1>``, ...): added to the tokenizer, their rows appended to
the text encoder's token-embedding table. Custom Diffusion (Kumari et al. 2023, Sec. 3.1)
initialises each from the embedding of a given word and trains only those rows."""
from __future__ import annotations

import copy
import dataclasses

import jax.numpy as jnp
import numpy as np

EMBEDDING = ("text_model", "embeddings", "token_embedding", "embedding")


@dataclasses.dataclass
class Tokens:
  names: list[str]
  embeddings: np.ndarray  # [len(names), hidden]


def embedding_table(text_params):
  node = text_params
  for name in EMBEDDING:
    node = node[name]
  return node


def with_table(text_params, table) -> dict:
  """``text_params`` with the token-embedding table replaced (the other leaves shared)."""
  def put(node, path):
    new = dict(node)
    new[path[0]] = table if len(path) == 1 else put(node[path[0]], path[1:])
    return new
  return put(text_params, EMBEDDING)


def initial_rows(tokenizer, text_params, words: list[str]) -> np.ndarray:
  """One row per word: its token embedding (the mean of its BPE pieces' rows when the
  tokenizer splits it)."""
  table = np.asarray(embedding_table(text_params), np.float32)
  rows = []
  for word in words:
    ids = tokenizer.encode(word, add_special_tokens=False)
    if not ids:
      raise ValueError(f"initializer word {word!r} has no tokens")
    rows.append(table[ids].mean(axis=0))
  return np.stack(rows)


def check_new(tokenizer, text_config, names: list[str]) -> None:
  """New tokens must be new, and the table must end where the tokenizer's ids do."""
  if len(set(names)) != len(names):
    raise ValueError(f"modifier tokens {names} repeat a name")
  vocab = tokenizer.get_vocab()
  taken = [n for n in names if n in vocab]
  if taken:
    raise ValueError(f"token {taken[0]!r} is already in the tokenizer (another adapter "
                     "added it?): give this concept other modifier tokens")
  if len(tokenizer) != text_config.vocab_size:
    raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the text encoder's "
                     f"table {text_config.vocab_size} rows: new token ids would not line up")


def extend_tokenizer(tokenizer, names: list[str]):
  """A copy of ``tokenizer`` with ``names`` added (ids ``len(tokenizer) + i``)."""
  tok = copy.deepcopy(tokenizer)
  tok.add_tokens(list(names))
  return tok


def extend_text_module(module, count: int):
  """The text encoder module with ``count`` more rows in its token table."""
  config = dataclasses.replace(module.config, vocab_size=module.config.vocab_size + count)
  return module.clone(config=config)


def extend_text_params(text_params, rows) -> dict:
  table = embedding_table(text_params)
  return with_table(text_params, jnp.concatenate([table, jnp.asarray(rows, table.dtype)]))


def apply(tokenizer, text_module, text_params, tokens: Tokens):
  """(tokenizer, text module, text params) with ``tokens`` added."""
  check_new(tokenizer, text_module.config, tokens.names)
  return (extend_tokenizer(tokenizer, tokens.names),
          extend_text_module(text_module, len(tokens.names)),
          extend_text_params(text_params, tokens.embeddings))
