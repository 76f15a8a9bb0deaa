"""The bundled default model: both pipelines load with no argument, the editor loads in
diffusers' PyTorch pipeline and makes the same edit there, and the shipped weights do
what README.md's model card says they do (regression tests scored from exact ground
truth: the stage-1 model paints the caption's background, the editor darkens scenes and
keeps what it does not edit; it does not do local edits reliably, and no test claims it
does)."""
import diffusers
import numpy as np
import pytest
import torch

from conftest import nchw
from ip2p_jax import InstructPix2PixPipeline, TextToImagePipeline, bundled
from ip2p_jax.metrics import heldout_examples, score_edit
from ip2p_jax.metrics.shapes_scoring import nearest_color

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
  backgrounds = ["blue", "green", "purple", "orange", "pink", "gray"]
  objects = ["red", "yellow", "white", "blue", "black", "green"]
  captions = [f"a small {o} circle on a {b} background" for o, b in zip(objects, backgrounds)]
  out = t2i(captions, height=128, width=128, num_inference_steps=20, output_type="np").images
  border = lambda o: np.concatenate([o[:10].reshape(-1, 3), o[-10:].reshape(-1, 3)]).mean(0)
  painted = [nearest_color(border(o) * 255) for o in out]
  # 11 palette colours: 5 of 6 right by chance has probability ~1e-5 (the shipped stage-1
  # model, 3200 steps, gets 6; its 600-step predecessor got 4)
  assert sum(p == b for p, b in zip(painted, backgrounds)) >= 5, painted
  # ... and draws the circle's colour too (``scene_match.depicts``: background and the
  # object's colour over half a small circle's area) in 3 of 6 (600 steps: 1 of 6)
  from ip2p_jax.data import shapes
  from ip2p_jax.metrics import scene_match
  drawn = [scene_match.depicts((o * 255).round().astype(np.uint8),
                               shapes.Scene(b, objects=(shapes.Obj("circle", c, "small", .5, .5),)))
           for o, c, b in zip(out, objects, backgrounds)]
  assert sum(d["ok"] for d in drawn) >= 2, drawn


def jax_leaves(tree):
  import jax
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_bundled_editor_gives_the_same_edit_in_diffusers(editor, recolor_examples):
  ref = diffusers.StableDiffusionInstructPix2PixPipeline.from_pretrained(
      bundled.DEFAULT_MODEL, safety_checker=None, requires_safety_checker=False,
      torch_dtype=torch.float32,
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


def _darken_examples():
  examples = [e for e in heldout_examples(80, 128, seed=1) if e.edit_type == "darken"][:4]
  assert len(examples) == 4
  return examples


def test_bundled_editor_darkens_held_out_scenes(editor):
  """With the CLI's defaults (Euler ancestral, 50 steps, scales 7.5 / 1.5) at least 3 of
  4 held-out "make it night" edits succeed (``ip2p eval``: 83% of 12), and the
  unedited inputs fail the same check."""
  examples = _darken_examples()
  out = editor([e.instruction for e in examples], np.stack([e.input_image for e in examples]),
               num_inference_steps=50, output_type="np").images
  outputs = (out * 255).round().astype(np.uint8)
  scores = [score_edit(e, o) for e, o in zip(examples, outputs)]
  assert sum(s["success"] for s in scores) >= 3, [s["detail"] for s in scores]
  assert not any(score_edit(e, e.input_image)["success"] for e in examples)


def _local_examples():
  pool = heldout_examples(60, 128, seed=2)
  examples = [e for e in pool if e.edit_type in ("reshape", "resize", "recolor")][:4]
  assert len(examples) == 4
  return examples


def _edit(editor, examples, **kw):
  out = editor([e.instruction for e in examples], np.stack([e.input_image for e in examples]),
               output_type="np", **kw).images
  return (out * 255).round().astype(np.uint8)


def _psnr_outside_and_change(editor, examples, **kw):
  """PSNR outside each edited region, and the mean absolute change (8-bit levels) of
  each output from its input: an editor that handed the input back would score the
  PSNR cap and change 0."""
  outputs = _edit(editor, examples, **kw)
  change = [np.abs(o.astype(np.int16) - e.input_image).mean() for e, o in zip(examples, outputs)]
  return [score_edit(e, o)["psnr_outside"] for e, o in zip(examples, outputs)], change


def test_bundled_editor_keeps_what_it_does_not_edit(editor):
  """Local edits at the CLI's defaults keep the rest of the picture: mean PSNR outside the
  edited region >= 15 dB over 4 held-out scenes (``ip2p eval``: 21.0 dB over 200; the
  model trained on SD's schedule, which drew from the text, 11.7 dB). This does not say
  the edit is right (the darkening test above checks that edits succeed), but each
  output must differ from its input (mean change >= 1 level of 255)."""
  outside, change = _psnr_outside_and_change(editor, _local_examples(), num_inference_steps=50)
  assert np.mean(outside) >= 15.0, outside
  assert min(change) >= 1.0, change


def test_bundled_editor_with_ddim_keeps_what_it_does_not_edit(editor):
  """Switching the bundled editor to DDIM gives a picture, not noise: its scheduler
  config says ``clip_sample: false`` (as the original's does), so DDIM does not clip the
  predicted latent to [-1, 1] as diffusers' class default would. Before that key was
  written, ``ip2p eval --sampler ddim`` measured 9.1 dB outside the edit (4% success);
  with it, the same threshold as Euler ancestral's above holds, the outputs differ from
  their inputs, and DDIM's "make it night" edits succeed as Euler ancestral's do (at least
  3 of 4 held-out scenes, the inputs themselves failing that check above)."""
  outside, change = _psnr_outside_and_change(editor, _local_examples(), num_inference_steps=20,
                                             scheduler="ddim")
  assert np.mean(outside) >= 15.0, outside
  assert min(change) >= 1.0, change
  examples = _darken_examples()
  outputs = _edit(editor, examples, num_inference_steps=20, scheduler="ddim")
  scores = [score_edit(e, o) for e, o in zip(examples, outputs)]
  assert sum(s["success"] for s in scores) >= 3, [s["detail"] for s in scores]
