"""The default model's training levers: Min-SNR weights, v-prediction targets, VAE crops,
the measured latent scaling factor and training from a latent cache."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import flax.linen as nn

from configs import tiny_ip2p, tiny_t2i, tiny_vae
from ip2p_jax.diffusion import schedules
from ip2p_jax.train import jobs, objectives
from ip2p_jax.train.loop import _loader, _source, train_and_evaluate


def _schedule(prediction_type):
  return schedules.ScheduleConfig(prediction_type=prediction_type, beta_schedule="scaled_linear",
                                  beta_start=0.00085, beta_end=0.012)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_min_snr_weights_match_closed_form(prediction_type):
  """Hang et al. 2023, Eq. (8)-(10): the weight makes every timestep count as
  min(SNR, gamma) in x0-space; gamma = 0 is plain MSE."""
  schedule = _schedule(prediction_type)
  t = jnp.array([0, 100, 500, 999])
  ac = schedules.alphas_cumprod(schedule)[np.asarray(t)]
  snr = ac / (1 - ac)
  expected = {"epsilon": np.minimum(snr, 5) / snr, "v_prediction": np.minimum(snr, 5) / (snr + 1),
              "sample": np.minimum(snr, 5)}[prediction_type]
  np.testing.assert_allclose(objectives.snr_weights(schedule, t, 5.0), expected, rtol=1e-5)
  np.testing.assert_array_equal(objectives.snr_weights(schedule, t, 0.0), np.ones(4))


def test_v_prediction_target_recovers_clean_latent():
  """v = sqrt(a) eps - sqrt(1 - a) x0 (Salimans & Ho 2022): x0 = sqrt(a) x_t - sqrt(1-a) v."""
  schedule = _schedule("v_prediction")
  x0, eps = jax.random.normal(jax.random.key(0), (2, 3, 4, 4, 2))
  t = jnp.array([10, 200, 700])
  noisy, v = objectives._noise_targets(schedule, x0, eps, t)
  ac = schedules.alphas_cumprod(schedule)[np.asarray(t)].reshape(-1, 1, 1, 1)
  np.testing.assert_allclose(np.sqrt(ac) * noisy - np.sqrt(1 - ac) * v, x0, atol=1e-5)


def test_random_crop_is_a_window_of_the_batch():
  images = jnp.arange(2 * 16 * 16 * 3, dtype=jnp.float32).reshape(2, 16, 16, 3)
  crop = np.asarray(objectives.random_crop(images, 8, jax.random.key(3)))
  assert crop.shape == (2, 8, 8, 3)
  y, x = np.argwhere(np.asarray(images[0, :, :, 0]) == crop[0, 0, 0, 0])[0]
  np.testing.assert_array_equal(crop, np.asarray(images[:, y:y + 8, x:x + 8]))
  assert objectives.random_crop(images, 0, jax.random.key(0)) is images


@pytest.fixture(scope="module")
def trained_vae(shapes_dataset, tmp_path_factory):
  """A tiny VAE trained 2 steps and exported: (config, export folder)."""
  c = tiny_vae.get_config()
  c.data.path, c.total_steps, c.vae_crop = shapes_dataset, 2, 16
  return c, train_and_evaluate(c, str(tmp_path_factory.mktemp("vae")))["export"]


def test_vae_export_measures_its_scaling_factor(trained_vae, shapes_dataset):
  """The exported VAE's scaling_factor is 1 / std of its posterior samples on the
  training images (latent diffusion's recipe), not SD's 0.18215."""
  c, export = trained_vae
  summary = {"export": export}
  with open(os.path.join(summary["export"], "vae", "config.json")) as f:
    scale = json.load(f)["scaling_factor"]
  from ip2p_jax.checkpoints import load_component
  from ip2p_jax.train.loop import _calibration_images
  vae, params = load_component(os.path.join(summary["export"], "vae"))
  images = _calibration_images(c, shapes_dataset)
  latents = np.concatenate([
      np.asarray(vae.apply({"params": params}, objectives.to_unit(images[i:i + 64]),
                           method="encode").sample(jax.random.key(i)))
      for i in range(0, len(images), 64)])
  assert scale != pytest.approx(0.18215)
  assert np.std(latents * scale) == pytest.approx(1.0, abs=1e-3)


def test_vae_decoder_fine_tune_keeps_the_encoder_bitwise(trained_vae, tmp_path):
  """``vae_train = "decoder"`` continues a trained VAE: its export's encoder,
  quant_conv and scaling_factor are the source's exactly (so latents cached and a UNet
  trained on them stay valid), while the decoder has learned."""
  from ip2p_jax.checkpoints import load_component
  base_config, base = trained_vae
  c = tiny_vae.get_config()
  c.data.path, c.total_steps, c.vae_crop = base_config.data.path, 3, 16
  c.model.vae_from, c.vae_train, c.learning_rate = os.path.join(base, "vae"), "decoder", 1e-2
  export = train_and_evaluate(c, str(tmp_path))["export"]
  _, before = load_component(os.path.join(base, "vae"))
  _, after = load_component(os.path.join(export, "vae"))
  for name in before:
    same = [np.array_equal(np.asarray(a), np.asarray(b))
            for a, b in zip(jax.tree.leaves(before[name]), jax.tree.leaves(after[name]))]
    if name in ("decoder", "post_quant_conv"):
      assert not all(same), f"{name} did not train"
    else:
      assert all(same), f"{name} changed"
  configs = [json.load(open(os.path.join(f, "vae", "config.json"))) for f in (base, export)]
  assert configs[0]["scaling_factor"] == configs[1]["scaling_factor"]


def test_vae_decoder_fine_tune_needs_a_trained_vae(shapes_dataset):
  c = tiny_vae.get_config()
  c.data.path, c.vae_train = shapes_dataset, "decoder"
  with pytest.raises(ValueError, match="vae_from"):
    jobs.build(c)


def test_object_weights_closed_form():
  """1 + w on the objects' cells, normalised to mean 1; an all-ones mask leaves the
  plain loss (all ones)."""
  mask = np.zeros((2, 4, 4), np.float32)
  mask[0, 1, 2] = 1.0
  mask[1] = 1.0
  w = np.asarray(objectives.object_weights(jnp.asarray(mask), 9.0))
  expected = np.where(mask[0] > 0, 10.0, 1.0) / ((10.0 + 15.0) / 16.0)
  np.testing.assert_allclose(w[0], expected, rtol=1e-6)
  np.testing.assert_allclose(w[1], 1.0, rtol=1e-6)
  np.testing.assert_allclose(w.mean((1, 2)), 1.0, rtol=1e-6)


@pytest.mark.parametrize("stage", ["instruct_pix2pix", "text_to_image"])
def test_cached_objective_equals_the_encoder_objective(stage, shapes_dataset, tmp_path):
  """The loss on a latent cache is the loss on images (same rng: same posterior sample,
  dropout, noise and timesteps) up to the cache's float16 text states."""
  from ip2p_jax.checkpoints import PipelineParts
  from ip2p_jax.data import builders, latent_cache
  module = tiny_ip2p if stage == "instruct_pix2pix" else tiny_t2i
  c = module.get_config()
  c.data.path, c.data.flip, c.data.max_resize = shapes_dataset, False, 1.0
  c.min_snr_gamma, c.conditioning_dropout, c.caption_dropout = 5.0, 0.3, 0.3
  job = jobs.build(c)
  parts = PipelineParts(job.frozen_modules, job.frozen_params, job.tokenizer, {}, {})
  source = builders.open_split(shapes_dataset, "train")
  path = str(tmp_path / "cache.arrayrecord")
  assert latent_cache.build(source, path, parts, resolution=32, batch_size=8) == 32
  cache = latent_cache.LatentCacheSource(path)
  records = [cache[i] for i in range(4)]
  cached = {k: np.stack([r[k] for r in records]) for k in records[0]}
  rows = [source[i] for i in range(4)]
  from ip2p_jax import tokenizer as tokenizers
  if stage == "instruct_pix2pix":
    images = {"input_image": np.stack([r["input_image"] for r in rows]),
              "edited_image": np.stack([r["edited_image"] for r in rows]),
              "input_ids": tokenizers.tokenize(job.tokenizer,
                                               [r["instruction"].decode() for r in rows])}
  else:
    images = {"image": np.stack([r["edited_image"] for r in rows]),
              "input_ids": tokenizers.tokenize(job.tokenizer,
                                               [r["edited_caption"].decode() for r in rows])}
  c.data.latents = path
  cached_job = jobs.build(c)
  params = jax.tree.map(jnp.asarray, nn.unbox(job.init_params(jax.random.key(0))))
  for seed in range(3):
    rng = jax.random.key(seed)
    reference, _ = job.loss(params, job.frozen_params, images, rng)
    ours, _ = cached_job.loss(params, None, cached, rng)
    np.testing.assert_allclose(float(ours), float(reference), rtol=2e-3)
  shuffled = {k: v[::-1] for k, v in cached.items()}
  assert abs(float(cached_job.loss(params, None, shuffled, rng)[0]) - float(reference)) > 1e-3


def test_training_from_a_latent_cache_runs_and_exports(shapes_dataset, tmp_path):
  from ip2p_jax.checkpoints import PipelineParts
  from ip2p_jax.data import builders, latent_cache
  c = tiny_ip2p.get_config()
  c.data.path, c.total_steps, c.batch_size = shapes_dataset, 3, 4
  job = jobs.build(c)
  path = str(tmp_path / "cache.arrayrecord")
  latent_cache.build(builders.open_split(shapes_dataset, "train"), path,
                     PipelineParts(job.frozen_modules, job.frozen_params, job.tokenizer, {}, {}),
                     resolution=32)
  c.data.latents = path
  batch = next(iter(_loader(c, _source(shapes_dataset, "train", c.stage), c.stage,
                            job.tokenizer)))
  vae = job.frozen_modules["vae"].config
  side = 32 // 2 ** (len(vae.block_out_channels) - 1)
  assert batch["image_latent"].shape == (4, side, side, vae.latent_channels)
  assert batch["text"].shape[:2] == (4, 77)
  # the objects per latent cell: the share of the cell's pixels an object of the input
  # or the edited image covers
  source = builders.open_split(shapes_dataset, "train")
  cache = latent_cache.LatentCacheSource(path)
  f = 32 // side
  for i in range(len(source)):
    pixels = ((np.asarray(source[i]["input_masks"]) > 0)
              | (np.asarray(source[i]["edited_masks"]) > 0))[..., 0]
    want = pixels.reshape(side, f, side, f).mean((1, 3))
    np.testing.assert_allclose(cache[i]["object_mask"].astype(np.float32), want, atol=1e-3)
    assert 0 < want.mean() < 1
  c.object_weight = 4.0  # the weighted objective trains from the cache
  assert c.sample_every == 0  # "0: only at the end" -- the end still gets its picture
  summary = train_and_evaluate(c, str(tmp_path / "run"))
  assert summary["step"] == 3 and np.isfinite(summary["metrics"]["loss"])
  assert os.listdir(tmp_path / "run" / "samples") == ["step_0000003.png"]
  from ip2p_jax import InstructPix2PixPipeline
  out = InstructPix2PixPipeline.from_pretrained(summary["export"])(
      "make it red", np.zeros((32, 32, 3), np.uint8), num_inference_steps=2, output_type="np")
  assert out.images.shape == (1, 32, 32, 3) and np.isfinite(out.images).all()
  assert np.abs(out.images).mean() > 1 / 255  # a picture, not the black input back


def test_eval_every_logs_held_out_success_per_edit_type(shapes_dataset, tmp_path):
  """``eval_every`` edits held-out shapes-world examples with the EMA model during
  training and logs success per edit type (a learning curve in metrics.jsonl). The last
  logged values are ``metrics.evaluate``'s on the exported (EMA) model."""
  from ip2p_jax import InstructPix2PixPipeline, metrics
  from ip2p_jax.data import shapes
  c = tiny_ip2p.get_config()
  c.data.path, c.total_steps, c.eval_every, c.eval_num, c.eval_steps = \
      shapes_dataset, 4, 2, 6, 2
  c.eval_batch_size = 3
  summary = train_and_evaluate(c, str(tmp_path))
  lines = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  evals = [l for l in lines if "eval/success" in l]
  assert [l["step"] for l in evals] == [2, 4]
  types = {shapes.generate(c.eval_seed, i, size=32, split="heldout").edit_type
           for i in range(6)}
  for record in evals:
    assert 0.0 <= record["eval/success"] <= 1.0
    assert all(f"eval/success/{t}" in record for t in types)
  assert sorted(os.listdir(tmp_path / "eval")) == ["step_0000002.png", "step_0000004.png"]
  again = metrics.scalars(metrics.evaluate(
      InstructPix2PixPipeline.from_pretrained(summary["export"]),
      metrics.heldout_examples(6, c.data.resolution, seed=c.eval_seed),
      num_inference_steps=2, seed=c.eval_seed, batch_size=3))
  assert again.keys() <= evals[1].keys() and "eval/psnr" in again
  for key, value in again.items():  # PSNRs too, so not only a 0% that any model scores
    assert evals[1][key] == pytest.approx(value, abs=0.05), key


def test_eval_every_in_stage_1_logs_how_often_captions_are_drawn(shapes_dataset, tmp_path):
  """Stage 1 with ``eval_every``: held-out captions drawn by the EMA model and judged by
  colour (``metrics.scene_match``), a learning curve of what the text-to-image model
  draws. The logged shares are the judge's on the exported (EMA) model's pictures."""
  from ip2p_jax import TextToImagePipeline
  from ip2p_jax.metrics import heldout_examples, scene_match
  c = tiny_t2i.get_config()
  c.data.path, c.total_steps, c.eval_every, c.eval_num, c.eval_steps = \
      shapes_dataset, 2, 2, 4, 2
  c.eval_batch_size = 4
  summary = train_and_evaluate(c, str(tmp_path))
  lines = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  evals = [l for l in lines if "eval/t2i/depicts" in l]
  assert [l["step"] for l in evals] == [2]
  assert os.listdir(tmp_path / "eval") == ["step_0000002.png"]
  scenes = [e.input_scene for e in heldout_examples(4, c.data.resolution, seed=c.eval_seed)]
  again = scene_match.text_to_image_match(
      TextToImagePipeline.from_pretrained(summary["export"]), scenes,
      num_inference_steps=2, seed=c.eval_seed, batch_size=4)
  for key in ("background", "colours", "depicts"):
    assert evals[0][f"eval/t2i/{key}"] == pytest.approx(again[key]), key


def test_the_gpu_recipe_builds_on_the_bundled_model():
  """``configs/default_model_gpu.py`` (``scripts/gpu_default_model.sh``): every stage
  takes its encoders from the bundled editor, ``cont`` continues the bundled UNet and
  matches its in/out channels, and the bigger UNet of the other stages is a valid
  InstructPix2Pix UNet (16 -> 8 channels; 8 -> 8 for stage 1) with cross-attention at
  all three levels, so the one GPU run cannot fail on a config."""
  import json
  import os

  import jax
  import jax.numpy as jnp

  from configs import default_model_gpu
  from ip2p_jax.checkpoints import module_from_config
  stages = {s: default_model_gpu.get_config(s) for s in default_model_gpu.STAGES}
  for stage, c in stages.items():
    for name in ("vae", "text_encoder", "tokenizer"):
      if (stage, name) != ("f4", "vae"):  # f4's VAE is trained here and carried (below)
        assert os.path.isdir(c.model[f"{name}_from"]), c.model[f"{name}_from"]
  bundled_unet = json.load(open(os.path.join(stages["cont"].model.init_from, "unet",
                                             "config.json")))
  assert (bundled_unet["in_channels"], bundled_unet["out_channels"]) == (16, 8)
  assert stages["wide"].model.init_from.endswith("wide_t2i/export")
  for stage, channels in (("wide_t2i", 8), ("wide_scratch", 16)):
    raw = dict(stages[stage].model.unet)
    assert raw["in_channels"] == channels and raw["out_channels"] == 8
    assert all(b.startswith("CrossAttn") for b in raw["down_block_types"] + raw["up_block_types"])
    module = module_from_config(raw, dtype=jnp.float32, param_dtype=jnp.float32)
    shapes = jax.eval_shape(lambda k: module.init(k, *module.dummy_inputs()), jax.random.key(0))
    assert 8e6 < sum(x.size for x in jax.tree.leaves(shapes)) < 16e6  # about 2x the default
  # f4: the 4x VAE's 128 px images are 32x32x8 latents, which its UNet maps back to
  # 32x32x8 (noisy + image latent in), attention only at 16x16 and 8x8 as in `scratch`
  from configs import default_model
  f4, scratch = stages["f4"], stages["scratch"]
  assert f4.model.vae_from == "runs/gpu/vae_f4" and f4.data.latents != scratch.data.latents
  vae = module_from_config(dict(default_model.get_config("vae_f4").model.vae))
  image = jax.ShapeDtypeStruct((1, 128, 128, 3), jnp.float32)
  latents = jax.eval_shape(
      lambda x: vae.init_with_output(jax.random.key(0), x, method="encode")[0].mode(), image)
  assert latents.shape == (1, 32, 32, 8)
  for stage, size in (("f4", 32), ("scratch", 16)):
    module = module_from_config(dict(stages[stage].model.unet))
    x = jax.ShapeDtypeStruct((2, size, size, 16), jnp.float32)
    t = jax.ShapeDtypeStruct((2,), jnp.int32)
    text = jax.ShapeDtypeStruct((2, 77, 64), jnp.float32)
    out = jax.eval_shape(lambda x, t, c: module.init_with_output(jax.random.key(0), x, t, c)[0],
                         x, t, text)
    assert getattr(out, "sample", out).shape == (2, size, size, 8)
  with pytest.raises(ValueError, match="stage must be one of"):
    default_model_gpu.get_config("ip2p")
