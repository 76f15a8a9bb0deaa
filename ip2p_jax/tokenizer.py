"""The CLIP BPE tokenizer and batch tokenization, without importing transformers.

:class:`ClipTokenizer` runs CLIP's byte-level BPE (lower-cased, whitespace-collapsed, split
on CLIP's word pattern, ``</w>`` ending each word) on the ``tokenizers`` library, the same
pipeline transformers' ``CLIPTokenizer`` builds there, so ids equal transformers' (a test
compares them on folders of both on-disk forms). Importing transformers cost 1.2-1.7 s of
every ``ip2p edit`` start; importing ``tokenizers`` costs ~0.05 s.

It reads a diffusers ``tokenizer/`` folder in either form: ``tokenizer.json`` (what
transformers 5 writes) or ``vocab.json`` + ``merges.txt`` (SD 1.5's, with
``added_tokens.json`` or ``tokenizer_config.json``'s ``added_tokens_decoder`` for added
tokens), and writes the first form, which transformers reads back. Without a folder it uses
the CLIP vocabulary shipped with this package (``assets/clip_tokenizer``, converted from
OpenAI CLIP's ``bpe_simple_vocab_16e6.txt.gz``, MIT licence), so nothing is downloaded at
run time. The methods this package and diffusers-style code use are kept with
transformers' names and meaning: calling it (``padding``, ``max_length``, ``truncation``,
``return_tensors="np"``), ``encode``, ``get_vocab``, ``convert_tokens_to_ids``,
``add_tokens``, ``len()``, ``save_pretrained`` and the special tokens' ids.
"""
from __future__ import annotations

import json
import os
from typing import Sequence

import numpy as np

ASSETS = os.path.join(os.path.dirname(__file__), "assets", "clip_tokenizer")
MAX_LENGTH = 77
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# CLIP's word pattern (OpenAI's simple_tokenizer): the special tokens, English
# contractions, runs of letters, single digits, runs of other non-space characters.
WORD_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
# CLIP's special tokens where a folder names none (pad and unknown are the end token).
DEFAULT_SPECIALS = {"bos_token": BOS, "eos_token": EOS, "pad_token": EOS, "unk_token": EOS}
SPECIAL_NAMES = tuple(DEFAULT_SPECIALS)


class ClipTokenizer:
  """CLIP's tokenizer: a ``tokenizers.Tokenizer`` plus the special tokens and the length
  limit of its folder's ``tokenizer_config.json``."""

  def __init__(self, backend, *, model_max_length: int = MAX_LENGTH, bos_token: str = BOS,
               eos_token: str = EOS, pad_token: str = EOS, unk_token: str = EOS):
    self._backend = backend
    self._backend.no_padding()
    self._backend.no_truncation()
    self.model_max_length = int(model_max_length)
    self.bos_token, self.eos_token = bos_token, eos_token
    self.pad_token, self.unk_token = pad_token, unk_token
    missing = [t for t in self._specials().values() if self._backend.token_to_id(t) is None]
    if missing:  # as transformers does: appended to the vocabulary
      from tokenizers import AddedToken
      self._backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                        for t in dict.fromkeys(missing)])

  # -- building ------------------------------------------------------------------

  @classmethod
  def from_vocab_and_merges(cls, vocab: str, merges: str, **specials) -> ClipTokenizer:
    """CLIP's pipeline over a ``vocab.json`` and ``merges.txt`` (OpenAI's format)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers
    from tokenizers import pre_tokenizers, processors
    from tokenizers.models import BPE
    names = {n: specials.get(n, default) for n, default in DEFAULT_SPECIALS.items()}
    backend = Tokenizer(BPE.from_file(vocab, merges, continuing_subword_prefix="",
                                      end_of_word_suffix="</w>", fuse_unk=False,
                                      unk_token=names["unk_token"]))
    backend.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(WORD_PATTERN), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t in dict.fromkeys(names.values())])
    bos, eos = names["bos_token"], names["eos_token"]
    backend.post_processor = processors.RobertaProcessing(
        (eos, backend.token_to_id(eos)), (bos, backend.token_to_id(bos)),
        trim_offsets=False, add_prefix_space=False)
    return cls(backend, **{**specials, **names})

  @classmethod
  def from_pretrained(cls, folder: str) -> ClipTokenizer:
    """A diffusers ``tokenizer/`` folder (local or a bucket's)."""
    from ip2p_jax import paths
    folder = paths.local_copy(folder)
    config = _read_json(os.path.join(folder, "tokenizer_config.json"))
    config.update(_read_json(os.path.join(folder, "special_tokens_map.json")))
    specials = {n: _content(config[n]) for n in SPECIAL_NAMES if config.get(n) is not None}
    max_length = config.get("model_max_length", MAX_LENGTH)
    if os.path.isfile(os.path.join(folder, "tokenizer.json")):
      from tokenizers import Tokenizer
      tok = cls(Tokenizer.from_file(os.path.join(folder, "tokenizer.json")),
                model_max_length=max_length, **specials)
    else:
      files = [os.path.join(folder, f) for f in ("vocab.json", "merges.txt")]
      missing = [f for f in files if not os.path.isfile(f)]
      if missing:
        raise FileNotFoundError(f"{folder} is not a tokenizer folder: it has no tokenizer.json "
                                f"and no {os.path.basename(missing[0])}")
      tok = cls.from_vocab_and_merges(*files, model_max_length=max_length, **specials)
      tok._add_saved_tokens(folder, config)
    return tok

  def _add_saved_tokens(self, folder: str, config: dict) -> None:
    """Tokens added after training, as transformers 4 saved them beside a vocab: ids must
    continue the vocabulary."""
    added = {t: int(i) for t, i in _read_json(os.path.join(folder, "added_tokens.json")).items()}
    for i, entry in config.get("added_tokens_decoder", {}).items():
      added.setdefault(_content(entry), int(i))
    for token, i in sorted(added.items(), key=lambda kv: kv[1]):
      if self._backend.token_to_id(token) is None:
        if i != len(self):
          raise ValueError(f"{folder}: added token {token!r} has id {i}, but the next free "
                           f"id is {len(self)}")
        self.add_tokens([token])

  def save_pretrained(self, folder: str) -> None:
    """``tokenizer.json`` and ``tokenizer_config.json``, as transformers 5 writes them."""
    from ip2p_jax.atomic import atomic_write
    os.makedirs(folder, exist_ok=True)
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": self.model_max_length,
              **self._specials()}
    for name, text in (("tokenizer.json", self._backend.to_str(pretty=True)),
                       ("tokenizer_config.json", json.dumps(config, indent=2))):
      with atomic_write(os.path.join(folder, name), "w", encoding="utf-8") as f:
        f.write(text)

  def __deepcopy__(self, memo) -> ClipTokenizer:
    from tokenizers import Tokenizer
    return ClipTokenizer(Tokenizer.from_str(self._backend.to_str()),
                         model_max_length=self.model_max_length, **self._specials())

  def _specials(self) -> dict[str, str]:
    return {n: getattr(self, n) for n in SPECIAL_NAMES}

  # -- vocabulary ----------------------------------------------------------------

  def __len__(self) -> int:
    return self._backend.get_vocab_size(with_added_tokens=True)

  def get_vocab(self) -> dict[str, int]:
    return self._backend.get_vocab(with_added_tokens=True)

  def add_tokens(self, tokens: Sequence[str]) -> int:
    """New tokens (whole words, matched after lower-casing like transformers' added tokens),
    given the next ids; returns how many were new."""
    from tokenizers import AddedToken
    return self._backend.add_tokens([AddedToken(t, special=False, normalized=True)
                                     for t in tokens])

  def convert_tokens_to_ids(self, tokens: str | Sequence[str]):
    unk = self.unk_token_id
    if isinstance(tokens, str):
      i = self._backend.token_to_id(tokens)
      return unk if i is None else i
    return [self.convert_tokens_to_ids(t) for t in tokens]

  @property
  def bos_token_id(self) -> int:
    return self._backend.token_to_id(self.bos_token)

  @property
  def eos_token_id(self) -> int:
    return self._backend.token_to_id(self.eos_token)

  @property
  def pad_token_id(self) -> int:
    return self._backend.token_to_id(self.pad_token)

  @property
  def unk_token_id(self) -> int:
    return self._backend.token_to_id(self.unk_token)

  # -- encoding ------------------------------------------------------------------

  def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
    return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

  def __call__(self, text: str | Sequence[str], padding: bool | str = False,
               max_length: int | None = None, truncation: bool = False,
               return_tensors: str | None = None, add_special_tokens: bool = True) -> dict:
    """``{"input_ids", "attention_mask"}`` like transformers: ``padding`` False, True /
    "longest" (to the batch's longest) or "max_length" (to ``max_length``, else
    ``model_max_length``); ``truncation`` cuts to that length keeping the end token;
    ``return_tensors`` None (lists) or "np" (int64 arrays)."""
    if padding not in (False, True, "longest", "max_length", "do_not_pad"):
      raise ValueError(f"padding must be False, True, 'longest' or 'max_length', got {padding!r}")
    if return_tensors not in (None, "np"):
      raise ValueError(f"return_tensors must be None or 'np' (this tokenizer makes no torch "
                       f"tensors), got {return_tensors!r}")
    single = isinstance(text, str)
    texts = [text] if single else list(text)
    limit = max_length if max_length is not None else self.model_max_length
    encoded = self._backend.encode_batch(texts, add_special_tokens=add_special_tokens)
    rows = [e.ids for e in encoded]
    if truncation:
      end = [self.eos_token_id] if add_special_tokens else []
      rows = [r if len(r) <= limit else r[:limit - len(end)] + end for r in rows]
    masks = [[1] * len(r) for r in rows]
    if padding in (True, "longest", "max_length"):
      width = limit if padding == "max_length" else max(map(len, rows), default=0)
      pad = self.pad_token_id
      masks = [m + [0] * (width - len(r)) for r, m in zip(rows, masks)]
      rows = [r + [pad] * (width - len(r)) for r in rows]
    if return_tensors == "np":
      if len({len(r) for r in rows}) > 1:
        raise ValueError("rows of different lengths: pass padding to make an array")
      rows, masks = np.asarray(rows, np.int64), np.asarray(masks, np.int64)
    elif single:
      rows, masks = rows[0], masks[0]
    return Encoding(input_ids=rows, attention_mask=masks)


class Encoding(dict):
  """The result of calling a tokenizer: a dict with attribute access (``.input_ids``)."""

  def __getattr__(self, name):
    try:
      return self[name]
    except KeyError:
      raise AttributeError(name) from None


def _read_json(path: str) -> dict:
  if not os.path.isfile(path):
    return {}
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def _content(token) -> str:
  """A special token as transformers writes it: a string or ``{"content": ...}``."""
  return token["content"] if isinstance(token, dict) else str(token)


def load(folder: str | None = None) -> ClipTokenizer:
  """The tokenizer of ``folder`` (a diffusers ``tokenizer/``) or the packaged vocab."""
  if folder is not None:
    return ClipTokenizer.from_pretrained(folder)
  return ClipTokenizer.from_vocab_and_merges(os.path.join(ASSETS, "vocab.json"),
                                             os.path.join(ASSETS, "merges.txt"))


def transformers_tokenizer(folder: str | None = None):
  """transformers' ``CLIPTokenizer`` of ``folder`` or the packaged vocab: what a diffusers
  pipeline is built with, and the reference the tests compare :class:`ClipTokenizer` to."""
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
