"""``ip2p_jax.metrics``: shapes-world success rules, PSNRs, aggregates, the paper's CLIP
metrics against transformers' PyTorch CLIP, and in-process evaluation."""
import dataclasses
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clip_fixtures import save_tiny_clip
from ip2p_jax import tokenizer as tokenizers
from ip2p_jax.data import shapes
from ip2p_jax.metrics import (ClipSimilarity, evaluate, heldout_examples, scalars, score_edit,
                              summarize)
from ip2p_jax.metrics import clip_similarity, shapes_scoring

PER_CASE = 6  # examples per (edit type, split, size): 11 * 2 * 2 * 6 = 264 in all


@pytest.fixture(scope="module")
def examples():
  out = []
  for edit_type in shapes.EDIT_TYPES:
    for split in ("train", "heldout"):
      for size in (64, 128):
        out += [shapes.generate(11, i, size, split, edit_types=(edit_type,))
                for i in range(PER_CASE)]
  return out


def test_exact_target_succeeds_for_every_edit_type(examples):
  scores = [score_edit(e, e.edited_image) for e in examples]
  failures = [(e.edit_type, e.instruction, s["detail"]) for e, s in zip(examples, scores)
              if not s["success"]]
  assert failures == []
  assert {e.edit_type for e in examples} == set(shapes.EDIT_TYPES)


def test_unedited_input_fails_for_every_edit_type(examples):
  different = [e for e in examples if not np.array_equal(e.input_image, e.edited_image)]
  # input == target happens only for a global edit that changes nothing (e.g. grayscale
  # of an all-gray scene); almost every example can tell the two apart.
  assert len(different) >= len(examples) - 5
  passed = [(e.edit_type, e.instruction) for e in different
            if score_edit(e, e.input_image)["success"]]
  assert passed == []


def test_wrong_recolor_fails(examples):
  checked = 0
  for e in (e for e in examples if e.edit_type == "recolor"):
    new = shapes_scoring.change(e).new
    for color in shapes.COLORS:
      if color == new.color:
        continue
      scene = dataclasses.replace(e.edited_scene, objects=tuple(
          dataclasses.replace(o, color=color) if o == new else o for o in e.edited_scene.objects))
      wrong = shapes.render(scene, e.edited_image.shape[0])[0]
      assert not score_edit(e, wrong)["success"], (e.instruction, color)
      checked += 1
  assert checked == 4 * PER_CASE * (len(shapes.COLORS) - 1)


def test_an_edit_that_loses_the_rest_of_the_picture_fails(examples):
  """The right colour on the object is not a success if everything else is painted
  over: a local edit must keep the untouched pixels (PSNR >= KEEP_DB vs the input)."""
  checked = 0
  for e in (e for e in examples if e.edit_type in shapes.LOCAL_EDITS):
    color = np.array(shapes.PALETTE[shapes_scoring.change(e).new.color]
                     if shapes_scoring.change(e).new else (128, 128, 128), np.uint8)
    flooded = np.where(e.edit_mask[..., None], e.edited_image, color)
    score = score_edit(e, flooded.astype(np.uint8))
    if score["psnr_outside"] < shapes_scoring.KEEP_DB:
      assert not score["success"], (e.instruction, score["detail"])
      checked += 1
  assert checked >= 10


def test_wrong_background_resize_and_global_edit_fail(examples):
  checked = 0
  for e in examples:
    size = e.edited_image.shape[0]
    if e.edit_type in ("grayscale", "invert", "darken", "flip"):  # another global edit
      for effect in {"grayscale", "invert", "darken", "flip"} - {e.edit_type}:
        wrong = shapes.render(dataclasses.replace(e.input_scene, effects=(effect,)), size)[0]
        if not np.array_equal(wrong, e.edited_image):
          assert not score_edit(e, wrong)["success"], (e.instruction, effect)
          checked += 1
    if e.edit_type == "background":
      for color in shapes.COLORS:
        if color != e.edited_scene.background:
          scene = dataclasses.replace(e.edited_scene, background=color)
          assert not score_edit(e, shapes.render(scene, size)[0])["success"], color
    if e.edit_type == "resize":  # the opposite size change, where there is one
      c = shapes_scoring.change(e)
      order = list(shapes.SIZES)
      other = 2 * order.index(c.old.size) - order.index(c.new.size)
      if 0 <= other < len(order):
        wrong = dataclasses.replace(c.old, size=order[other])
        scene = dataclasses.replace(e.input_scene, objects=tuple(
            wrong if o == c.old else o for o in e.input_scene.objects))
        assert not score_edit(e, shapes.render(scene, size)[0])["success"], e.instruction
  assert checked >= 4 * 4 * PER_CASE * 3 - 5


def test_psnr_values(examples):
  a = np.full((8, 8, 3), 100, np.uint8)
  assert shapes_scoring.psnr(a, a + 1) == pytest.approx(20 * np.log10(255), abs=1e-9)  # MSE 1
  assert shapes_scoring.psnr(a, a) == shapes_scoring.PSNR_CAP_DB
  for e in examples:
    s = score_edit(e, e.edited_image)
    assert s["psnr"] == shapes_scoring.PSNR_CAP_DB
    if e.edit_type in ("grayscale", "invert", "darken", "flip"):
      assert s["psnr_outside"] is None
    else:  # the exact target leaves everything outside the edit as it was
      assert s["psnr_outside"] == shapes_scoring.PSNR_CAP_DB
    assert s["held_out"] == (shapes.is_held_out(e.input_scene, e.edited_scene, e.edit_type,
                                                shapes_scoring.edit_target(e)))
  heldout = [e for e in examples if shapes_scoring.held_out(e)]
  assert len(heldout) == len(examples) // 2  # every "heldout" example, no "train" one


def test_summarize_and_scalars():
  def s(edit_type, success, psnr, outside, held_out=False, held_out_edit=False):
    return dict(edit_type=edit_type, success=success, psnr=psnr, psnr_outside=outside,
                held_out=held_out, held_out_edit=held_out_edit)
  scores = [s("recolor", True, 20.0, 30.0, True, True), s("recolor", True, 22.0, 32.0),
            s("recolor", False, 24.0, 34.0, True), s("flip", False, 10.0, None, True),
            s("remove", None, 16.0, 20.0)]
  summary = summarize(scores)
  assert summary["per_edit_type"]["recolor"] == dict(n=3, n_scored=3, success=2 / 3, psnr=22.0,
                                                     psnr_outside=32.0)
  assert summary["per_edit_type"]["flip"]["psnr_outside"] is None
  assert summary["per_edit_type"]["invert"] == dict(n=0, n_scored=0, success=None, psnr=None,
                                                    psnr_outside=None)
  assert summary["overall"]["n"] == 5 and summary["overall"]["success"] == 0.5  # 2 of 4 scored
  assert summary["held_out"]["n"] == 3 and summary["held_out"]["success"] == pytest.approx(1 / 3)
  assert summary["held_out_edit"] == dict(n=1, n_scored=1, success=1.0, psnr=20.0,
                                          psnr_outside=30.0)
  flat = scalars(summary)
  assert flat["eval/success/recolor"] == pytest.approx(2 / 3)
  assert flat["eval/held_out/success"] == pytest.approx(1 / 3)
  assert "eval/success/invert" not in flat and "eval/psnr_outside/flip" not in flat
  json.dumps(summary)


# -- CLIP ----------------------------------------------------------------------------

TOL = 1e-4


@pytest.mark.parametrize("in_shape,out_size", [((64, 48), 30), ((20, 20), 224), ((128, 128), 30)])
def test_bicubic_resize_matches_torch(in_shape, out_size):
  x = np.random.default_rng(0).random((2, *in_shape, 3)).astype(np.float32)
  ref = F.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), size=(out_size, out_size),
                      mode="bicubic", align_corners=False).permute(0, 2, 3, 1).numpy()
  ours = np.asarray(clip_similarity.resize_bicubic(x, out_size))
  np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("normalization", ["openai", "folder"])
def test_clip_metrics_match_transformers(tmp_path, normalization):
  """The four metrics of Brooks et al. 2023 computed as their ``ClipSimilarity`` does
  (torch bicubic resize, normalise, encode, L2-normalise, cosine similarities) with
  transformers' PyTorch CLIPModel, against ours. Tolerance: max abs diff <= 1e-4."""
  folder = tmp_path / "clip"
  ref = save_tiny_clip(folder)
  mean, std = clip_similarity.OPENAI_MEAN, clip_similarity.OPENAI_STD
  if normalization == "folder":
    mean, std = (0.5, 0.4, 0.3), (0.5, 0.6, 0.7)
    (folder / "preprocessor_config.json").write_text(json.dumps(
        {"image_mean": list(mean), "image_std": list(std)}))
  clip = ClipSimilarity(str(folder), batch_size=2)  # 3 images: a padded second batch
  rng = np.random.default_rng(0)
  images_0 = rng.integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
  images_1 = rng.integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
  texts_0 = ["a red circle on a blue background", "a star",
             "a small green star and a large red square on a white gradient background"]
  texts_1 = ["a blue circle on a blue background", "a large purple star, mirrored",
             "a small green star on a white gradient background"]
  ours = clip(images_0, images_1, texts_0, texts_1)

  def pixels(x):
    x = torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255
    x = F.interpolate(x, size=30, mode="bicubic", align_corners=False)
    return (x - torch.tensor(mean)[None, :, None, None]) / torch.tensor(std)[None, :, None, None]

  ids = lambda t: torch.from_numpy(tokenizers.tokenize(clip.tokenizer, t)).long()
  with torch.no_grad():
    out_0 = ref(input_ids=ids(texts_0), pixel_values=pixels(images_0))
    out_1 = ref(input_ids=ids(texts_1), pixel_values=pixels(images_1))
  cos = F.cosine_similarity
  expected = {
      "sim_0": cos(out_0.image_embeds, out_0.text_embeds),
      "sim_1": cos(out_1.image_embeds, out_1.text_embeds),
      "sim_direction": cos(out_1.image_embeds - out_0.image_embeds,
                           out_1.text_embeds - out_0.text_embeds),
      "sim_image": cos(out_0.image_embeds, out_1.image_embeds)}
  for key, value in expected.items():
    np.testing.assert_allclose(ours[key], value.numpy(), atol=TOL, rtol=0, err_msg=key)
  # Identical images and texts: direction similarity of zero vectors is 0, image similarity 1.
  same = clip(images_0, images_0, texts_0, texts_0)
  np.testing.assert_allclose(same["sim_image"], 1.0, atol=TOL)
  np.testing.assert_allclose(same["sim_direction"], 0.0, atol=TOL)


def test_clip_folder_must_hold_both_towers(tmp_path):
  import transformers
  from clip_fixtures import TEXT
  transformers.CLIPTextModel(transformers.CLIPTextConfig(**TEXT)).save_pretrained(tmp_path / "t")
  with pytest.raises(ValueError, match="CLIPModel"):
    ClipSimilarity(str(tmp_path / "t"))
  with pytest.raises(FileNotFoundError):
    ClipSimilarity(str(tmp_path / "missing"))


# -- evaluate ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pipe(model):
  from ip2p_jax import InstructPix2PixPipeline
  return InstructPix2PixPipeline.from_pretrained(model)


def test_evaluate_is_deterministic_and_independent_of_batching(pipe):
  size = pipe.unet.config.sample_size * pipe.vae_scale_factor  # the tiny model's 16 px
  examples = heldout_examples(5, size, seed=3)
  kw = dict(num_inference_steps=2, guidance_scale=7.5, image_guidance_scale=1.5, seed=0,
            scheduler=None)
  a = evaluate(pipe, examples, batch_size=2, **kw)
  b = evaluate(pipe, examples, batch_size=3, **kw)
  assert a["outputs"].shape == (5, size, size, 3) and a["outputs"].dtype == np.uint8
  # Same noise per example whatever the batch; XLA may round differently per batch shape.
  assert np.abs(a["outputs"].astype(int) - b["outputs"].astype(int)).max() <= 1
  assert a["overall"]["n"] == 5 and set(a["per_edit_type"]) == set(shapes.EDIT_TYPES)
  assert a["held_out"]["n"] == 5  # every held-out example holds a held-out combination
  assert [s["index"] for s in a["examples"]] == list(range(5))
  assert a["settings"]["num_inference_steps"] == 2
  # Each example is scored on its own output (scored on its input, or on its target, a
  # report would read 0% or 100% with these same fields), and the summary is theirs.
  from ip2p_jax.metrics import aggregate
  for example, output, score in zip(examples, a["outputs"], a["examples"]):
    assert score == {"index": score["index"], "instruction": example.instruction,
                     **score_edit(example, output)}
  assert {k: a[k] for k in ("overall", "per_edit_type", "held_out", "held_out_edit")} == \
      aggregate.summarize(a["examples"])
  json.dumps({k: v for k, v in a.items() if k != "outputs"})
  # Other parameters (a training run's EMA) through the same compiled sampler, and back.
  import jax
  original = pipe.params
  noisy = jax.tree.map(lambda p: p * 1.5, original)
  c = evaluate(pipe, examples, batch_size=2, params=noisy, **kw)
  assert np.abs(c["outputs"].astype(int) - a["outputs"].astype(int)).max() > 10
  d = evaluate(pipe, examples, batch_size=2, params=original, **kw)
  np.testing.assert_array_equal(d["outputs"], a["outputs"])


def test_evaluate_with_clip(pipe, tmp_path):
  save_tiny_clip(tmp_path / "clip")
  size = pipe.unet.config.sample_size * pipe.vae_scale_factor
  examples = heldout_examples(3, size, seed=4)
  clip = ClipSimilarity(str(tmp_path / "clip"))
  report = evaluate(pipe, examples, num_inference_steps=1, guidance_scale=7.5,
                    image_guidance_scale=1.5, seed=0, scheduler=None, batch_size=3, clip=clip)
  # Each example's values are CLIP's on (its input, this output) and (its captions), and
  # the summary is their mean.
  direct = clip(np.stack([e.input_image for e in examples]), report["outputs"],
                [e.input_caption for e in examples], [e.edited_caption for e in examples])
  for key in ("sim_0", "sim_1", "sim_direction", "sim_image"):
    np.testing.assert_allclose([s[key] for s in report["examples"]], direct[key], atol=1e-6,
                               err_msg=key)
    np.testing.assert_allclose(report["overall"][key], np.mean(direct[key]), atol=1e-6)
