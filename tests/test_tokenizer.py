"""Our CLIP tokenizer against transformers' ``CLIPTokenizer`` (the oracle): the same ids
for every text, on folders of both on-disk forms, with added tokens, and after a round trip
through our ``save_pretrained``; and ``ip2p edit``'s path never imports transformers."""
import copy
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from ip2p_jax import tokenizer as tokenizers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TEXTS = [
    "make the circle blue", "Make The CIRCLE Blue", "A photo of a CAT!!  on   a mat",
    "Turn it into a Van Gogh painting, 1889 style.", "héllo wörld naïve café Ångström",
    "it's what we'll do, they've said I'm sure you'd", "<|startoftext|> odd <|endoftext|> tokens",
    "", "   ", "x" * 300, " ".join(["word"] * 100),
    "emoji \U0001f642 \U0001f44d\U0001f3fd 中文字符",
    "tab\tand\nnewline\r\n", "numbers 12345 3.14 1e-5", "CamelCaseWord snake_case_word",
    "e\u0301 composed vs \u00e9", "--- ??? !!! ...", "a <new1> cat",
    "make it <NEW1>",
]
ADDED = ["<new1>", "<new2>"]


def _reference(folder):
  return tokenizers.transformers_tokenizer(folder)


def _assert_same_ids(ours, ref):
  for text in TEXTS:
    assert ours(text).input_ids == ref(text).input_ids, text
    assert ours.encode(text, add_special_tokens=False) == ref.encode(
        text, add_special_tokens=False), text
  kw = dict(padding="max_length", max_length=77, truncation=True, return_tensors="np")
  np.testing.assert_array_equal(ours(TEXTS, **kw).input_ids, ref(TEXTS, **kw).input_ids)
  np.testing.assert_array_equal(ours(TEXTS, **kw).attention_mask, ref(TEXTS, **kw).attention_mask)
  for kw in (dict(padding=True), dict(padding="longest", truncation=True, max_length=9),
             dict(padding="max_length", max_length=12, truncation=True)):
    a, b = ours(TEXTS[:6], **kw), ref(TEXTS[:6], **kw)
    assert a.input_ids == [list(r) for r in b.input_ids], kw
    assert a.attention_mask == [list(r) for r in b.attention_mask], kw
  assert len(ours) == len(ref)
  assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id, ours.unk_token_id) == (
      ref.bos_token_id, ref.eos_token_id, ref.pad_token_id, ref.unk_token_id)
  assert ours.model_max_length == ref.model_max_length
  assert ours.get_vocab() == ref.get_vocab()


@pytest.fixture(scope="module")
def vocab_folder(tmp_path_factory):
  """SD 2's layout: vocab.json + merges.txt, "!" as the pad token, a token added after
  training in added_tokens.json (as transformers 4 saved textual inversions)."""
  folder = tmp_path_factory.mktemp("sd2_tokenizer")
  for f in ("vocab.json", "merges.txt"):
    shutil.copy(os.path.join(tokenizers.ASSETS, f), folder / f)
  (folder / "tokenizer_config.json").write_text(json.dumps({
      "model_max_length": 77, "pad_token": "!", "tokenizer_class": "CLIPTokenizer"}))
  (folder / "special_tokens_map.json").write_text(json.dumps({
      "pad_token": "!", "bos_token": {"content": "<|startoftext|>", "lstrip": False,
                                      "normalized": True, "rstrip": False, "single_word": False}}))
  (folder / "added_tokens.json").write_text(json.dumps({"<new1>": 49408}))
  return str(folder)


def test_the_packaged_vocab_gives_transformers_ids():
  _assert_same_ids(tokenizers.load(), tokenizers.transformers_tokenizer())


def test_a_tokenizer_json_folder_gives_transformers_ids():
  folder = os.path.join(ROOT, "ip2p_jax", "assets", "default_model", "tokenizer")
  assert os.path.isfile(os.path.join(folder, "tokenizer.json"))
  _assert_same_ids(tokenizers.load(folder), _reference(folder))


def test_a_vocab_and_merges_folder_with_its_pad_and_added_token(vocab_folder):
  ours, ref = tokenizers.load(vocab_folder), _reference(vocab_folder)
  assert ours.pad_token_id == 0 and ours.convert_tokens_to_ids("<new1>") == 49408
  _assert_same_ids(ours, ref)
  assert tokenizers.tokenize(ours, "a")[0, -1] == 0  # padded with "!", not the end token


def test_added_tokens_and_a_saved_copy_match_transformers(vocab_folder, tmp_path):
  """Tokens added on both sides get the same ids and split text alike; our saved folder
  reads back the same in transformers and in ours; the copy leaves the original as is."""
  ours, ref = copy.deepcopy(tokenizers.load(vocab_folder)), _reference(vocab_folder)
  assert ours.add_tokens(ADDED[1:]) == ref.add_tokens(ADDED[1:]) == 1
  assert len(tokenizers.load(vocab_folder)) == len(ours) - 1
  _assert_same_ids(ours, ref)
  assert ours.convert_tokens_to_ids(ADDED + ["nope-not-a-token"]) == ref.convert_tokens_to_ids(
      ADDED + ["nope-not-a-token"])
  ours.save_pretrained(str(tmp_path / "saved"))
  _assert_same_ids(tokenizers.load(str(tmp_path / "saved")), ref)
  _assert_same_ids(_reference(str(tmp_path / "saved")), ref)


def test_bad_folders_and_arguments_are_named_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="no tokenizer.json and no vocab.json"):
    tokenizers.load(str(tmp_path))
  tok = tokenizers.load()
  with pytest.raises(ValueError, match="return_tensors"):
    tok("a", return_tensors="pt")
  with pytest.raises(ValueError, match="padding"):
    tok(["a", "b c"], return_tensors="np")


def test_a_special_token_missing_from_the_vocabulary_is_appended_like_transformers(tmp_path):
  """A folder whose config names a pad token the vocabulary lacks (a fine-tune's "<pad>")."""
  folder = tmp_path / "tok"
  tokenizers.transformers_tokenizer().save_pretrained(str(folder))
  config = json.loads((folder / "tokenizer_config.json").read_text())
  (folder / "tokenizer_config.json").write_text(json.dumps({**config, "pad_token": "<pad>"}))
  ours, ref = tokenizers.load(str(folder)), _reference(str(folder))
  assert ours.pad_token_id == ref.pad_token_id == 49408
  _assert_same_ids(ours, ref)


def test_an_edit_never_imports_transformers(tmp_path):
  """``ip2p edit`` with the bundled model: transformers (1.2-2 s of every start) stays out."""
  from PIL import Image
  Image.new("RGB", (128, 128), (200, 40, 40)).save(tmp_path / "in.png")
  probe = ("import sys\nfrom ip2p_jax.cli import main\n"
           "code = main(['edit', sys.argv[1], '-p', 'make it blue', '-o', sys.argv[2],"
           " '--steps', '2'])\n"
           "print(code, 'transformers' in sys.modules, 'torch' in sys.modules)\n")
  r = subprocess.run([sys.executable, "-c", probe, str(tmp_path / "in.png"),
                      str(tmp_path / "out")], capture_output=True, text=True, cwd=ROOT)
  assert r.returncode == 0, r.stderr[-3000:]
  assert r.stdout.split()[-3:] == ["0", "False", "False"], r.stdout + r.stderr[-3000:]
  assert os.path.isfile(tmp_path / "out" / "in.png")
