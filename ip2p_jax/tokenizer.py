"""The CLIP BPE tokenizer (transformers' ``CLIPTokenizer``) and batch tokenization.

A folder's own ``tokenizer/`` is used when it has one; otherwise the CLIP
vocabulary shipped with this package (``assets/clip_tokenizer``, converted from
OpenAI CLIP's ``bpe_simple_vocab_16e6.txt.gz``, MIT licence), so nothing is
downloaded at run time.
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np

ASSETS = os.path.join(os.path.dirname(__file__), "assets", "clip_tokenizer")
MAX_LENGTH = 77


def load(folder: str | None = None):
  """A ``CLIPTokenizer`` from ``folder`` (a diffusers ``tokenizer/``) or the packaged vocab."""
  from transformers import CLIPTokenizer
  if folder is not None:
    from ip2p_jax import paths  # transformers reads local folders only: a bucket's is copied
    return CLIPTokenizer.from_pretrained(paths.local_copy(folder))
  # transformers 5: vocab=/merges= (vocab_file= silently builds a 2-token tokenizer).
  return CLIPTokenizer(vocab=os.path.join(ASSETS, "vocab.json"),
                       merges=os.path.join(ASSETS, "merges.txt"), model_max_length=MAX_LENGTH)


def tokenize(tokenizer, prompts: str | Sequence[str], max_length: int | None = None) -> np.ndarray:
  """``[len(prompts), max_length]`` int32 ids, padded and truncated like diffusers does."""
  if isinstance(prompts, str):
    prompts = [prompts]
  max_length = max_length or min(tokenizer.model_max_length, MAX_LENGTH)
  ids = tokenizer(list(prompts), padding="max_length", max_length=max_length, truncation=True,
                  return_tensors="np").input_ids
  return ids.astype(np.int32)
