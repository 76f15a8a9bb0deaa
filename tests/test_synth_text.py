"""The data engine's text side and its filter: instruction generation (the built-in
grammar, and a causal LM in the original's prompt format on a tiny GPT-2 made here),
and CLIP-filter decisions on hand-made embeddings."""
import collections

import numpy as np
import pytest

from ip2p_jax.data import shapes
from ip2p_jax.synth import instructions
from ip2p_jax.synth.clip_filter import decide, similarities_from_embeddings
from ip2p_jax.synth.config import FilterConfig


def _shapes_captions(n):
  return [shapes.caption(shapes.random_scene(np.random.default_rng(i))) for i in range(n)]


def test_builtin_edits_every_shapes_caption_into_another_shapes_caption():
  gen = instructions.BuiltinGenerator(seed=0)
  kinds = collections.Counter()
  for i, caption in enumerate(_shapes_captions(200)):
    assert instructions.parse_shapes_caption(caption) is not None, caption
    p = gen(caption, i)
    assert p.rejected is None, (caption, p)
    edited = instructions.parse_shapes_caption(p.edited_caption)
    assert edited is not None and p.edited_caption != caption, (caption, p)
    kinds[p.kind] += 1
    assert gen(caption, i) == p  # deterministic in (seed, index)
  # every edit but "move" (captions carry no places) occurs among 200 captions
  assert set(kinds) == set(shapes.EDIT_TYPES) - {"move"}, kinds


def test_builtin_generic_edits():
  """One edit of each kind that applies (the random choices fixed by the generator)."""
  edits = instructions.generic_edits("a red car parked by a river with a dog",
                                     np.random.default_rng(0))
  assert edits == [
      ("make the red car gold", "a gold car parked by a river with a dog", "color"),
      ("turn the river into a road", "a red car parked by a road with a dog", "swap"),
      ("remove the dog", "a red car parked by a river", "remove"),
      ("make it a pencil sketch", "a red car parked by a river with a dog, as a pencil sketch",
       "style"),
      ("make it autumn", "a red car parked by a river with a dog in autumn", "season"),
      ("add fireworks", "a red car parked by a river with a dog and fireworks", "add")]
  gen = instructions.BuiltinGenerator(seed=0)
  for i, caption in enumerate(["two people talking", "a photo of a mountain at dawn"]):
    p = gen(caption, i)
    assert p.rejected is None and p.edited_caption != caption
  assert instructions.parse_shapes_caption("a red car on a blue background") is None


@pytest.mark.parametrize("instruction,edited,reason", [
    ("make it red", "a red cat", None),
    ("make it red", "A cat.", "unchanged"),       # case, spaces and a final period ignored
    ("make it red", "  a  cat ", "unchanged"),
    ("", "a red cat", "empty"),
    ("make it red", "a red\ncat", "malformed"),
    ("make it ## red", "a red cat", "malformed"),
    ("make it red", "x" * 301, "too long"),
])
def test_rejection_rules(instruction, edited, reason):
  assert instructions.check("a cat", instruction, edited) == reason


def test_completion_parsing_follows_the_original_format():
  ok = instructions.parse_completion("a cat", "make it a dog\n%%\na dog\nEND\ngarbage")
  assert (ok.instruction, ok.edited_caption, ok.rejected) == ("make it a dog", "a dog", None)
  for bad in ("make it a dog\n%%\na dog", "make it a dog\na dog\nEND",
              "a\n%%\nb\n%%\nc\nEND"):
    assert instructions.parse_completion("a cat", bad).rejected == "malformed"
  assert instructions.parse_completion("a cat", "nothing\n%%\na cat\nEND").rejected == "unchanged"
  assert instructions.lm_prompt(" a cat ") == "a cat\n##\n"
  with pytest.raises(ValueError, match="builtin"):
    instructions.make_generator("gpt")


# -- the language-model backend on a tiny GPT-2 ------------------------------------------

EXAMPLES = {  # caption -> the completion the tiny model memorises
    "a small red circle on a blue background":
        "make the circle green\n%%\na small green circle on a blue background\nEND",
    "a photo of a cat": "nothing happens\n%%\na photo of a cat\nEND",  # unchanged: rejected
}


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
  """A 2-layer GPT-2 made here (nothing downloaded), fitted until it reproduces EXAMPLES
  from their prompts."""
  from lm_fixtures import save_tiny_lm
  return save_tiny_lm(tmp_path_factory.mktemp("tiny_gpt2"), EXAMPLES)


def test_language_model_generator_in_the_original_prompt_format(tiny_lm):
  gen = instructions.make_generator(f"lm:{tiny_lm}", seed=0)
  assert gen.temperature == 0.7
  caption = "a small red circle on a blue background"
  p = gen(caption, 0)
  assert (p.instruction, p.edited_caption, p.rejected) == (
      "make the circle green", "a small green circle on a blue background", None)
  assert gen.complete(caption, 0).startswith(EXAMPLES[caption])
  # The same rejection rules: the memorised edit of this caption leaves it unchanged.
  assert gen("a photo of a cat", 1).rejected == "unchanged"


def test_an_untrained_language_model_is_rejected_not_trusted(tiny_lm, tmp_path):
  import transformers
  config = transformers.AutoConfig.from_pretrained(tiny_lm)
  transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path)
  transformers.AutoTokenizer.from_pretrained(tiny_lm).save_pretrained(tmp_path)
  gen = instructions.LanguageModelGenerator(str(tmp_path), max_new_tokens=24, tries=2)
  p = gen("a small red circle on a blue background", 0)
  assert p.rejected == "malformed"  # random text has no "\nEND"


# -- the CLIP filter -------------------------------------------------------------------

# Hand-made embeddings in 3-D: captions txt0 = e_x, txt1 = e_y; the images chosen so
# that each sample fails one threshold (values to 3 decimals, checked below).
BASE = [0.5, 0.3, 1.0]
CASES = {  # name: (img0, img1, sim_0, sim_1, sim_direction, sim_image)
    "good_a": (BASE, [0.3, 0.5, 1.0], 0.432, 0.432, 1.000, 0.970),
    "good_b": (BASE, [0.4, 0.45, 1.0], 0.432, 0.386, 0.984, 0.988),
    "good_c": (BASE, [0.45, 0.4, 1.0], 0.432, 0.343, 0.959, 0.995),
    "low_dir": (BASE, [0.7, 0.5, 1.0], 0.432, 0.379, 0.080, 0.982),
    "low_image": (BASE, [-0.5, 1.3, 0.5], 0.432, 0.878, 0.878, 0.374),
    "low_1": ([0.5, 0.0, 1.0], [0.45, 0.1, 1.0], 0.447, 0.091, 0.918, 0.995),
    "low_0": ([0.1, 0.3, 1.0], [0.0, 0.4, 1.0], 0.095, 0.371, 0.980, 0.991),
}


@pytest.fixture(scope="module")
def sims():
  img0 = np.array([c[0] for c in CASES.values()])
  img1 = np.array([c[1] for c in CASES.values()])
  n = len(CASES)
  out = similarities_from_embeddings(img0, img1, np.tile([1.0, 0, 0], (n, 1)),
                                     np.tile([0.0, 1, 0], (n, 1)))
  for k, name in enumerate(("sim_0", "sim_1", "sim_direction", "sim_image")):
    np.testing.assert_allclose(out[name], [c[2 + k] for c in CASES.values()], atol=1e-3)
  return out


def test_filter_applies_each_of_the_original_thresholds(sims):
  d = decide(sims, FilterConfig())
  names = list(CASES)
  assert [names[i] for i in np.flatnonzero(d.kept)] == ["good_a", "good_b", "good_c"]
  assert {names[i]: d.reasons(i) for i in range(len(names)) if not d.kept[i]} == {
      "low_dir": ["sim_direction"], "low_image": ["sim_image"], "low_1": ["sim_1"],
      "low_0": ["sim_0"]}


def test_filter_keeps_the_best_k_by_direction_and_thresholds_are_configurable(sims):
  names = list(CASES)
  d = decide(sims, FilterConfig(keep=2))
  assert [names[i] for i in np.flatnonzero(d.kept)] == ["good_a", "good_b"]
  assert d.reasons(names.index("good_c")) == ["outranked"]
  # the original script's default image threshold (0.7) still rejects low_image (0.374);
  # 0.3 lets it in, and then it outranks good_c by direction (0.878 < 0.959: it does not)
  d = decide(sims, FilterConfig(min_sim_image=0.3, keep=4))
  assert [names[i] for i in np.flatnonzero(d.kept)] == ["good_a", "good_b", "good_c",
                                                        "low_image"]
  # a threshold equal to a value keeps it (>=)
  d = decide(sims, FilterConfig(min_sim_1=float(sims["sim_1"][names.index("good_c")])))
  assert d.kept[names.index("good_c")] and not d.kept[names.index("low_1")]
  assert not decide(sims, FilterConfig(keep=0)).kept.any()
