"""``scripts/diagnose_latents.py`` (the README's latent measurements) on the tiny random
model: its whole-image round trip is ``metrics.vae_psnr``, and an edit whose target is
its input makes the linear prediction, the copy and the ceiling one and the same."""
import dataclasses
import importlib.util
import os

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def diagnose():
  spec = importlib.util.spec_from_file_location(
      "diagnose_latents", os.path.join(ROOT, "scripts", "diagnose_latents.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_round_trip_and_linear_edits(model, diagnose):
  from ip2p_jax import InstructPix2PixPipeline
  from ip2p_jax.metrics import heldout_examples, vae_psnr
  pipe = InstructPix2PixPipeline.from_pretrained(model)
  latents = diagnose.Latents.of_pipeline(pipe)
  examples = heldout_examples(4, latents.size, 3)
  regions = diagnose.round_trip(latents, examples)
  # the VAE folder alone (--vae) measures what the editor's VAE does
  alone = diagnose.Latents.of_folder(os.path.join(model, "vae"))
  x = np.stack([e.input_image for e in examples]).astype(np.float32)
  assert alone.factor == latents.factor
  np.testing.assert_array_equal(alone.encode(x), latents.encode(x))
  assert set(regions) == {"object interiors", "object edges", "background", "whole"}
  want = vae_psnr(pipe, np.stack([e.input_image for e in examples]))
  # one fused program there, two here: a pixel may round the other way
  assert regions["whole"] == pytest.approx(want, abs=0.01)
  for kind in ("background", "recolor"):
    edits = heldout_examples(3, latents.size, 3, edit_types=[kind])
    scores = diagnose.linear_edits(latents, edits, kind)
    assert all(np.isfinite(v) for v in scores.values()), scores
    # No edit at all (target = input): zero shift, so all three decode the same latents.
    # (A background edit's shift comes from the scenes, a recolour's from the images; a
    # recolour keeps its scene, which names the object the rule scores.)
    scene = lambda e: e.input_scene if kind == "background" else e.edited_scene
    unedited = [dataclasses.replace(e, edited_image=e.input_image, edited_scene=scene(e))
                for e in edits]
    same = diagnose.linear_edits(latents, unedited, kind)
    assert same["linear"] == pytest.approx(same["copy"], abs=1e-9)
    assert same["ceiling"] == pytest.approx(same["copy"], abs=1e-9)
    assert same["linear"] != pytest.approx(scores["linear"])  # a real edit moves it
    assert same["linear success"] == same["copy success"] == same["ceiling success"]


def test_the_linear_prediction_in_an_identity_latent_space(diagnose):
  """With pixels as the latents (an identity "VAE", one pixel per cell) the background
  prediction is exact: every pixel no object touches takes the target's colour, and every
  pixel an object touches keeps the input's."""
  from ip2p_jax.data import shapes
  from ip2p_jax.metrics import heldout_examples
  size = 32
  identity = object.__new__(diagnose.Latents)
  identity.size, identity.factor = size, 1
  identity.encode = identity.decode = lambda x: np.asarray(x, np.float32)
  examples = heldout_examples(4, size, 5, edit_types=["background"])
  predicted, z_in, z_target, _, _ = diagnose.predict_linear(identity, examples, "background")
  for k, e in enumerate(examples):
    cover = np.zeros((size, size))
    for obj in e.input_scene.objects:
      cover = np.maximum(cover, shapes.coverage(obj, size))
    free, touched = cover == 0, e.input_masks > 0
    assert free.any() and touched.any()
    np.testing.assert_array_equal(predicted[k][free & ~touched], z_target[k][free & ~touched])
    np.testing.assert_array_equal(predicted[k][touched], z_in[k][touched])
    assert not np.array_equal(z_in[k][free], z_target[k][free])  # the background did change


def test_a_perfect_unet_scores_what_the_rule_gives_the_vae_round_trip(model, diagnose):
  """An identity "VAE" passes the exact targets through untouched: every edit succeeds,
  with nothing changed outside the edit; the tiny random VAE's round trips (noise) do not."""
  from ip2p_jax import InstructPix2PixPipeline
  from ip2p_jax.metrics import heldout_examples
  size = 32
  identity = object.__new__(diagnose.Latents)
  identity.size, identity.factor = size, 1
  identity.encode = identity.decode = lambda x: np.asarray(x, np.float32)
  exact = diagnose.perfect_unet(identity, heldout_examples(24, size, 0), batch=5)
  assert exact["overall"]["n"] == 24 and exact["overall"]["success"] == 1.0
  assert exact["overall"]["psnr_outside"] == 100.0  # psnr caps an exact match at 100 dB
  latents = diagnose.Latents.of_pipeline(InstructPix2PixPipeline.from_pretrained(model))
  noisy = diagnose.perfect_unet(latents, heldout_examples(24, latents.size, 0))
  assert noisy["overall"]["success"] < 0.5 and noisy["overall"]["psnr_outside"] < 20


def test_the_sheet_draws_each_column_in_its_place(model, diagnose, tmp_path):
  """``--sheet``: one row per edit (a background edit, then a recolour), one column per
  measurement; the cells hold the images they are named after."""
  from PIL import Image

  from ip2p_jax import InstructPix2PixPipeline
  from ip2p_jax.metrics import heldout_examples
  pipe = InstructPix2PixPipeline.from_pretrained(model)
  other = diagnose.Latents.of_folder(os.path.join(model, "vae"))
  path = str(tmp_path / "sheet.png")
  diagnose.write_sheet(path, pipe, [other], per_kind=1, seed=4)
  sheet = np.asarray(Image.open(path).convert("RGB"))
  tile, header, gap = 128, 30, 4
  assert sheet.shape[1] == 6 * (tile + gap) + gap  # input, target, VAE, 2 linear, editor
  size = diagnose.Latents.of_pipeline(pipe).size
  for row, kind in enumerate(("background", "recolor")):
    example = heldout_examples(1, size, 4, edit_types=[kind])[0]
    y = header + row * (tile + gap + 16) + 14
    for column, want in ((0, example.input_image), (1, example.edited_image)):
      x = gap + column * (tile + gap)
      cell = np.asarray(Image.fromarray(want).resize((tile, tile), Image.NEAREST))
      np.testing.assert_array_equal(sheet[y:y + tile, x:x + tile], cell)
