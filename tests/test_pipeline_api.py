"""The pipeline arguments a diffusers user expects, on the tiny model (float32, Euler):
negative_prompt and num_images_per_prompt against diffusers (max abs <= 2e-3),
prompt_embeds, output_type="latent", the per-step callbacks under jit (``callback`` and
``callback_on_step_end``, with diffusers' latents at diffusers' steps), the progress bar,
paths as images with the CLI's preparation (Python and ``ip2p edit`` give the same
pixels), torch_dtype, one default step count, the compilation cache."""
import inspect
import os
import subprocess
import sys

import diffusers
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import nchw
from ip2p_jax import InstructPix2PixPipeline
from helpers.xla_env import without_shared_cache
from ip2p_jax.cli import build_parser, main

TOL = 2e-3
STEPS = 3


@pytest.fixture(scope="module")
def pipes(model):
  ref = diffusers.StableDiffusionInstructPix2PixPipeline.from_pretrained(
      model, safety_checker=None, local_files_only=True)
  ref.scheduler = diffusers.EulerDiscreteScheduler.from_config(ref.scheduler.config)
  ref.set_progress_bar_config(disable=True)
  ours = InstructPix2PixPipeline.from_pretrained(model, compilation_cache=False)
  return ref, ours


@pytest.fixture(scope="module")
def image():
  rng = np.random.default_rng(3)
  return Image.fromarray(rng.integers(0, 256, (24, 40, 3), dtype=np.uint8))


def test_negative_prompt_and_images_per_prompt_match_diffusers(pipes, image):
  ref, ours = pipes
  latents = np.random.default_rng(4).standard_normal((2, 12, 20, 4)).astype(np.float32)
  kw = dict(negative_prompt="a blurry photo", num_images_per_prompt=2, num_inference_steps=STEPS)
  want = ref("turn the sky red", image=image, latents=torch.from_numpy(nchw(latents)),
             output_type="np", **kw).images
  got = ours("turn the sky red", image, latents=latents, scheduler="euler", output_type="np",
             progress_bar=False, **kw).images
  assert got.shape == want.shape == (2, 24, 40, 3)
  assert np.abs(got - want).max() <= TOL
  assert np.abs(got[0] - got[1]).max() > 10 * TOL  # two edits, two noises
  plain = ours("turn the sky red", image, latents=latents, scheduler="euler", output_type="np",
               progress_bar=False, num_images_per_prompt=2, num_inference_steps=STEPS).images
  assert np.abs(plain - got).max() > 10 * TOL  # the negative prompt is used


def test_prompt_embeds_latents_and_callback(pipes, image):
  _, ours = pipes
  kw = dict(num_inference_steps=STEPS, scheduler="euler", seed=5, progress_bar=False)
  by_text = ours("add a boat", image, output_type="latent", **kw).images
  embeds = ours.encode_prompt(["add a boat"])
  assert embeds.shape[:2] == (1, 77)
  by_embeds = ours(prompt_embeds=embeds, image=image, output_type="latent", **kw).images
  np.testing.assert_array_equal(by_embeds, by_text)
  assert by_text.shape == (1, 12, 20, 4)  # NHWC latents, 24x40 / 2
  decoded = ours("add a boat", image, output_type="np", **kw).images
  np.testing.assert_allclose(ours.decode_latents(by_text), decoded, atol=1e-5)

  seen = []
  out = ours("add a boat", image, output_type="latent",
             callback=lambda step, t, z: seen.append((step, t, z)), **kw).images
  assert [s for s, _, _ in seen] == list(range(STEPS))  # every step, in order, under jit
  levels = ours.sampler_and_levels("euler", STEPS)[2]
  np.testing.assert_allclose([t for _, t, _ in seen], levels.timesteps, rtol=1e-6)
  np.testing.assert_allclose(seen[-1][2], out, atol=1e-6)  # the last step's state is the result


def test_callbacks_see_diffusers_latents_at_diffusers_steps(pipes, image):
  """``callback`` (with ``callback_steps``) and ``callback_on_step_end`` are called at the
  steps diffusers calls them, with diffusers' intermediate latents (NHWC here)."""
  ref, ours = pipes
  latents = np.random.default_rng(7).standard_normal((1, 12, 20, 4)).astype(np.float32)
  want, want_steps = [], []

  def on_end(pipe, i, t, kwargs):
    want.append(kwargs["latents"].numpy().transpose(0, 2, 3, 1))
    return kwargs
  ref("add a boat", image=image, latents=torch.from_numpy(nchw(latents)), output_type="latent",
      num_inference_steps=STEPS, callback_on_step_end=on_end)
  ref("add a boat", image=image, latents=torch.from_numpy(nchw(latents)), output_type="latent",
      num_inference_steps=STEPS, callback=lambda i, t, z: want_steps.append(i), callback_steps=2)

  got, calls = [], []

  def ours_on_end(pipe, i, t, kwargs):
    assert pipe is ours and set(kwargs) == {"latents"}
    got.append(kwargs["latents"])
    calls.append(i)
    return kwargs
  steps = []
  ours("add a boat", image, latents=latents, scheduler="euler", num_inference_steps=STEPS,
       output_type="latent", progress_bar=False, callback_on_step_end=ours_on_end,
       callback=lambda i, t, z: steps.append(i), callback_steps=2)
  assert calls == list(range(STEPS)) and len(want) == STEPS
  for g, w in zip(got, want):
    assert np.abs(g - w).max() <= TOL
  assert steps == want_steps == [0, 2]  # diffusers: i % callback_steps == 0


def test_callback_errors_are_clear(pipes, image):
  _, ours = pipes
  kw = dict(num_inference_steps=STEPS, scheduler="euler", output_type="latent",
            progress_bar=False)

  def replace(pipe, i, t, kwargs):
    return {"latents": kwargs["latents"] * 0}
  with pytest.raises(ValueError, match="returned changed latents.*compiled"):
    ours("x", image, callback_on_step_end=replace, **kw)
  with pytest.raises(ValueError, match=r"\['prompt_embeds'\] are not available"):
    ours("x", image, callback_on_step_end=lambda *a: None,
         callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"], **kw)
  with pytest.raises(ValueError, match="callback_steps must be a positive integer"):
    ours("x", image, callback=print, callback_steps=0, **kw)

  def broken(step, t, z):
    raise RuntimeError(f"my bug at step {step}")
  with pytest.raises(RuntimeError, match="my bug at step 0"):  # the user's own exception
    ours("x", image, callback=broken, **kw)
  ours("x", image, callback_on_step_end=lambda *a: None, **kw)  # None: nothing to replace


def test_progress_bar_on_by_default_and_off(pipes, image, capfd):
  _, ours = pipes
  kw = dict(num_inference_steps=STEPS, scheduler="euler", output_type="latent")
  ours("x", image, **kw)
  assert f"{STEPS}/{STEPS}" in capfd.readouterr().err
  ours.set_progress_bar_config(disable=True)
  try:
    ours("x", image, **kw)
    assert f"{STEPS}/{STEPS}" not in capfd.readouterr().err
  finally:
    ours.set_progress_bar_config(disable=False)


def test_a_path_is_an_image_and_python_matches_the_cli(pipes, model, tmp_path):
  """A 38x26 photo (no multiple of 4): padded for the model, cropped back; the Python
  call with the CLI's resolution and the file's noise id gives the CLI's pixels."""
  from ip2p_jax.editing import noise_id
  _, ours = pipes
  rng = np.random.default_rng(6)
  Image.fromarray(rng.integers(0, 256, (26, 38, 3), dtype=np.uint8)).save(tmp_path / "p.png")
  out = ours("make it blue", str(tmp_path / "p.png"), resolution=20, num_inference_steps=STEPS,
             scheduler="euler", image_ids=[noise_id("p.png")], progress_bar=False).images[0]
  assert main(["edit", str(tmp_path / "p.png"), "-p", "make it blue", "-o", str(tmp_path / "o"),
               "--model", model, "--steps", str(STEPS), "--sampler", "euler", "--resolution",
               "20", "--no-compilation-cache"]) == 0
  cli = np.asarray(Image.open(tmp_path / "o" / "p.png"))
  from ip2p_jax import images
  left, top, right, bottom = images.prepare(Image.open(tmp_path / "p.png"), 20, "fit",
                                            ours.size_multiple).content_box
  assert out.size == (right - left, bottom - top) == (18, 12)  # padded to 20x12 and back
  assert cli.shape == (12, 18, 3)
  assert np.abs(np.asarray(out).astype(int) - cli).max() <= 1
  given = np.asarray(Image.open(tmp_path / "p.png").resize(out.size), np.int16)
  assert np.abs(np.asarray(out, np.int16) - given).mean() > 1.0  # an edit, not the input
  same = ours("make it blue", Image.open(tmp_path / "p.png"), num_inference_steps=STEPS,
              scheduler="euler", progress_bar=False).images[0]
  assert same.size == (38, 26)  # no resolution: the photo's own size, padded and cropped back
  photo = np.asarray(Image.open(tmp_path / "p.png"), np.int16)
  assert np.abs(np.asarray(same, np.int16) - photo).mean() > 1.0  # edited there too


def test_one_default_step_count():
  """Python, ``ip2p edit`` (whose --steps resolves per step, for chains) and ``ip2p eval``."""
  from ip2p_jax.cli import edit as edit_cli
  default = inspect.signature(InstructPix2PixPipeline.__call__).parameters
  edit = build_parser().parse_args(["edit", "a.png", "-p", "x", "-o", "out"])
  (step,), _ = edit_cli._steps(edit)
  evaluate = build_parser().parse_args(["eval"])
  assert default["num_inference_steps"].default == step.steps == evaluate.steps == 50


def test_torch_dtype_is_an_alias_of_dtype(model):
  import jax.numpy as jnp
  pipe = InstructPix2PixPipeline.from_pretrained(model, torch_dtype="torch.bfloat16",
                                                 compilation_cache=False)
  assert pipe.unet.dtype == jnp.bfloat16
  leaf = pipe.params["unet"]["conv_in"]["kernel"]
  assert leaf.dtype == jnp.bfloat16
  with pytest.raises(ValueError, match="not both"):
    InstructPix2PixPipeline.from_pretrained(model, torch_dtype=jnp.bfloat16, dtype=jnp.float32)


@pytest.mark.parametrize("how,expected", [("default", "cache"), ("off_env", None),
                                          ("off_arg", None)])
def test_compilation_cache_is_on_for_library_users(model, tmp_path, how, expected):
  code = ("import jax\nfrom ip2p_jax import InstructPix2PixPipeline\n"
          f"InstructPix2PixPipeline.from_pretrained({model!r}, "
          f"compilation_cache={how != 'off_arg'})\nprint(jax.config.jax_compilation_cache_dir)\n")
  env = {**without_shared_cache(os.environ),
         "IP2P_COMPILATION_CACHE": "off" if how == "off_env" else str(tmp_path)}
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.strip() == (str(tmp_path) if expected else "None")
