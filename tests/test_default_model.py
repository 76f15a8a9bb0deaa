"""The bundled default model: both pipelines load with no argument, the editor loads in
diffusers' PyTorch pipeline and makes the same edit there, and it really edits held-out
scenes (a regression test of the shipped weights, scored from exact ground truth)."""
import diffusers
import numpy as np
import pytest
import torch

from conftest import nchw
from ip2p_jax import InstructPix2PixPipeline, TextToImagePipeline, bundled
from ip2p_jax.metrics import heldout_examples, score_edit

STEPS = 10


@pytest.fixture(scope="module")
def editor():
  return InstructPix2PixPipeline.from_pretrained()


@pytest.fixture(scope="module")
def recolor_examples():
  """Held-out recolour edits (colour/shape pairs never seen in training)."""
  pool = heldout_examples(120, 128)
  return [e for e in pool if e.edit_type == "recolor"][:6]


def test_both_bundled_pipelines_load_and_share_encoders(editor):
  t2i = TextToImagePipeline.from_pretrained()
  for name in ("vae", "text_encoder"):
    a, b = editor.params[name], t2i.params[name]
    assert all(np.array_equal(x, y) for x, y in zip(jax_leaves(a), jax_leaves(b)))
  latent = editor.vae.config.latent_channels
  assert editor.unet.config.in_channels == 2 * latent and t2i.unet.config.in_channels == latent
  out = t2i("a large red circle on a blue background", height=128, width=128,
            num_inference_steps=STEPS, output_type="np").images[0]
  # the circle is red and the background blue, as the caption says
  centre, corner = out[48:80, 48:80].mean((0, 1)), out[:12, :12].mean((0, 1))
  assert centre[0] > centre[2] + 0.2 and corner[2] > corner[0] + 0.2


def jax_leaves(tree):
  import jax
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_bundled_editor_gives_the_same_edit_in_diffusers(editor, recolor_examples):
  ref = diffusers.StableDiffusionInstructPix2PixPipeline.from_pretrained(
      bundled.DEFAULT_MODEL, safety_checker=None, requires_safety_checker=False,
      local_files_only=True)
  ref.scheduler = diffusers.EulerDiscreteScheduler.from_config(ref.scheduler.config)
  ref.set_progress_bar_config(disable=True)
  examples = recolor_examples[:2]
  prompts = [e.instruction for e in examples]
  images = [e.input_image for e in examples]
  latent = editor.vae.config.latent_channels
  latents = np.random.default_rng(0).standard_normal((2, 16, 16, latent)).astype(np.float32)
  from PIL import Image
  want = ref(prompts, image=[Image.fromarray(i) for i in images], num_inference_steps=STEPS,
             guidance_scale=7.5, image_guidance_scale=1.5,
             latents=torch.from_numpy(nchw(latents)), output_type="np").images
  got = editor(prompts, np.stack(images), num_inference_steps=STEPS, guidance_scale=7.5,
               image_guidance_scale=1.5, latents=latents, scheduler="euler",
               output_type="np").images
  err = np.abs(got - want).max()
  print(f"bundled editor vs diffusers: max abs {err:.2e}")
  assert err <= 2e-3
  # and it is an edit, not the input given back
  assert np.abs(got * 255 - np.stack(images)).mean() > 2.0


def test_bundled_editor_recolours_held_out_objects(editor, recolor_examples):
  """With the CLI's defaults (Euler ancestral, 50 steps, scales 7.5 / 1.5), at least 5 of
  6 held-out recolour edits succeed: the object's colour is nearest the named one."""
  out = editor([e.instruction for e in recolor_examples],
               np.stack([e.input_image for e in recolor_examples]), num_inference_steps=50,
               output_type="np").images
  outputs = (out * 255).round().astype(np.uint8)
  scores = [score_edit(e, o) for e, o in zip(recolor_examples, outputs)]
  assert sum(s["success"] for s in scores) >= 5, [s["detail"] for s in scores]
  # ... and the unedited inputs fail the same check
  assert not any(score_edit(e, e.input_image)["success"] for e in recolor_examples)
