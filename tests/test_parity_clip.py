"""CLIP text/vision parity with transformers (PyTorch) on tiny random weights, float32.

Hidden states of every layer (clip skip), the final hidden state, pooled outputs
and projections; both load directions. Tolerance: max abs error <= 1e-4.
"""
import jax
import numpy as np
import pytest
import torch
import transformers as tf

from conftest import nchw, perturb_params, randomize_
from ip2p_jax.checkpoints import load_component, save_component

TOL = 1e-4
TEXT = dict(vocab_size=1000, hidden_size=32, intermediate_size=37, num_hidden_layers=3,
            num_attention_heads=4, max_position_embeddings=16, projection_dim=12,
            bos_token_id=998, pad_token_id=999)
VISION = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
              image_size=30, patch_size=10, projection_dim=12)


def _ids(eos: int, legacy: bool):
  rng = np.random.default_rng(5)
  ids = rng.integers(1, 900, (3, 16))
  ids[:, 0] = 998
  for row, end in enumerate((5, 9, 15)):  # end-of-text positions, then padding
    ids[row, end:] = eos
    if legacy:
      ids[row, end + 1:] = 0
  return ids.astype(np.int32)


VARIANTS = {
    # SD1.5's text encoder: no projection, eos_token_id=2 in config (argmax pooling).
    "text_legacy_eos": dict(cls=tf.CLIPTextModel, config=tf.CLIPTextConfig(
        eos_token_id=2, **TEXT), ids=_ids(999, legacy=True), mask=False),
    # Projection, gelu, first-eos pooling and a padding attention mask.
    "text_projection": dict(cls=tf.CLIPTextModelWithProjection, config=tf.CLIPTextConfig(
        eos_token_id=999, hidden_act="gelu", **TEXT), ids=_ids(999, legacy=False), mask=True),
    "vision_projection": dict(cls=tf.CLIPVisionModelWithProjection,
                              config=tf.CLIPVisionConfig(**VISION)),
    "vision": dict(cls=tf.CLIPVisionModel, config=tf.CLIPVisionConfig(**VISION)),
}


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def variant(request, tmp_path_factory):
  spec = VARIANTS[request.param]
  torch.manual_seed(0)
  ref = randomize_(spec["cls"](spec["config"]).eval())
  folder = tmp_path_factory.mktemp(request.param) / "model"
  ref.save_pretrained(folder)
  module, params = load_component(str(folder))
  if "ids" in spec:
    ids = spec["ids"]
    mask = (np.arange(16)[None] <= np.array([5, 9, 15])[:, None]).astype(np.int32) \
        if spec["mask"] else None
    inputs = (ids, mask)
  else:
    inputs = (np.random.default_rng(6).standard_normal((2, 30, 30, 3)).astype(np.float32),)
  return dict(ref=ref, module=module, params=params, inputs=inputs, name=request.param,
              apply=jax.jit(lambda p, *x: module.apply({"params": p}, *x)))


def torch_outputs(ref, inputs):
  with torch.no_grad():
    if len(inputs) == 2:
      ids, mask = inputs
      out = ref(input_ids=torch.from_numpy(ids).long(),
                attention_mask=None if mask is None else torch.from_numpy(mask).long(),
                output_hidden_states=True)
    else:
      out = ref(pixel_values=torch.from_numpy(nchw(inputs[0])), output_hidden_states=True)
  return out


def compare(v, params, ref):
  ours = v["apply"](params, *v["inputs"])
  out = torch_outputs(ref, v["inputs"])
  check = lambda a, b: np.testing.assert_allclose(np.asarray(a), b.numpy(), atol=TOL, rtol=0)
  if hasattr(out, "text_embeds"):
    check(ours.text_embeds, out.text_embeds)
  elif hasattr(out, "image_embeds"):
    check(ours.image_embeds, out.image_embeds)
  else:
    check(ours.pooler_output, out.pooler_output)
  check(ours.last_hidden_state, out.last_hidden_state)
  assert len(ours.hidden_states) == len(out.hidden_states) == ref.config.num_hidden_layers + 1
  for a, b in zip(ours.hidden_states, out.hidden_states):
    check(a, b)
  return ours


def test_loaded_from_transformers_matches(variant):
  ours = compare(variant, variant["params"], variant["ref"])
  if variant["name"] == "text_legacy_eos":
    # Pooled output is the final-normed state at the end-of-text token ("clip skip" users
    # take hidden_states[-2] instead).
    eos = np.argmax(variant["inputs"][0], axis=-1)
    np.testing.assert_allclose(np.asarray(ours.pooler_output),
                               np.asarray(ours.last_hidden_state)[np.arange(3), eos])


def test_saved_by_us_loads_in_transformers(variant, tmp_path):
  params = perturb_params(variant["params"], seed=7, scale=0.02)
  save_component(str(tmp_path / "model"), variant["module"], params)
  ref = type(variant["ref"]).from_pretrained(tmp_path / "model").eval()
  compare(variant, params, ref)


@pytest.fixture(scope="module")
def clip_pair(tmp_path_factory):
  torch.manual_seed(0)
  config = tf.CLIPConfig(text_config={**TEXT, "eos_token_id": 999},
                         vision_config=VISION, projection_dim=12)
  ref = randomize_(tf.CLIPModel(config).eval())
  folder = tmp_path_factory.mktemp("clip")
  ref.save_pretrained(folder)
  module, params = load_component(str(folder))
  return ref, module, params


def test_clip_model_similarities_match(clip_pair, tmp_path):
  ref, module, params = clip_pair
  ids = _ids(999, legacy=False)[:2]
  pixels = np.random.default_rng(8).standard_normal((3, 30, 30, 3)).astype(np.float32)
  for p, model in ((params, ref), (perturb_params(params, seed=9, scale=0.02), None)):
    if model is None:  # reverse direction: saved by us, loaded by transformers
      save_component(str(tmp_path / "clip"), module, p)
      model = tf.CLIPModel.from_pretrained(tmp_path / "clip").eval()
    ours = module.apply({"params": p}, ids, pixels)
    with torch.no_grad():
      out = model(input_ids=torch.from_numpy(ids).long(), pixel_values=torch.from_numpy(nchw(pixels)))
    np.testing.assert_allclose(np.asarray(ours.logits_per_image), out.logits_per_image.numpy(),
                               atol=TOL * 10, rtol=1e-5)  # logits are scaled by exp(2.66) ~ 14
    np.testing.assert_allclose(np.asarray(ours.text_embeds), out.text_embeds.numpy(), atol=TOL)
    np.testing.assert_allclose(np.asarray(ours.image_embeds), out.image_embeds.numpy(), atol=TOL)
