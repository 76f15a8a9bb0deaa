"""Customization adapters (issue 11) on tiny random models: only the selected parameters
train, only the new token rows change, files are small, scale 0 is the base, adapters
stack, LoRA files round-trip with diffusers/peft, and a misfit adapter is one clear error;
key/value token rows (``targets="token_kv"``) match moving the token's text state through
every layer, and leave prompts without the token as the base edits them.

Run alone: ``python -m pytest -q tests/test_adapters.py`` (each training run compiles one
tiny train step; the UNet comparisons compile one tiny forward).
"""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from PIL import Image

import pipeline_fixtures
from ip2p_jax import adapters
from ip2p_jax.adapters import custom_diffusion, files, lora, runner, targets, tokens
from ip2p_jax.checkpoints import load_pipeline

RES = 16  # the tiny UNet's native size (sample_size 8, VAE factor 2)


def _write_examples(folder, n: int, seed: int, instruction: str):
  os.makedirs(folder, exist_ok=True)
  rng = np.random.default_rng(seed)
  with open(os.path.join(folder, "metadata.jsonl"), "w", encoding="utf-8") as f:
    for i in range(n):
      a = rng.integers(0, 256, (RES, RES, 3), dtype=np.uint8)
      Image.fromarray(a).save(os.path.join(folder, f"in{i}.png"))
      Image.fromarray(255 - a).save(os.path.join(folder, f"out{i}.png"))
      f.write(json.dumps({"input_image": f"in{i}.png", "edited_image": f"out{i}.png",
                          "instruction": instruction}) + "\n")
  return str(folder)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  path = tmp_path_factory.mktemp("ip2p")
  pipeline_fixtures.save_ip2p(str(path))
  return str(path)


@pytest.fixture(scope="module")
def base(folder):
  return load_pipeline(folder)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  root = tmp_path_factory.mktemp("data")
  return (_write_examples(root / "concept", 3, 0, "make it <new1>"),
          _write_examples(root / "prior", 2, 1, "make it red"))


@pytest.fixture(scope="module")
def trained_cd(folder, data, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("cd") / "cd.safetensors")
  settings = runner.Settings("custom_diffusion", steps=2, learning_rate=1e-2,
                             tokens=("<new1>",), initializer=("red",))
  return out, runner.customize(folder, data[0], out, settings, prior=data[1], progress=False)


@pytest.fixture(scope="module")
def trained_lora(folder, data, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("lora") / "lora.safetensors")
  settings = runner.Settings("lora", steps=2, learning_rate=1e-2, rank=2, alpha=4.0)
  # two folders: two concepts trained jointly into one adapter
  return out, runner.customize(folder, list(data), out, settings, progress=False)


def _flat(tree):
  return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(jax.device_get(tree)).items()}


def test_custom_diffusion_changes_only_cross_attention_kv_and_new_token_rows(trained_cd, base):
  out, result = trained_cd
  params = result["state"].params
  selected = set(custom_diffusion.select(base.params["unet"]))
  assert selected and all(p[-2] == "attn2" and p[-1] in ("to_k", "to_v") for p in selected)
  before, after = _flat(base.params["unet"]), _flat(params["unet"])
  assert before.keys() == after.keys()
  for key in before:
    if key[:-1] in selected and key[-1] == "kernel":
      assert not np.array_equal(before[key], after[key]), key
    else:
      assert np.array_equal(before[key], after[key]), key  # bitwise
  # The text encoder's table: the old rows bitwise, the new row trained away from "red".
  _, frozen = result["job"].customization.merged(params, result["job"].frozen_params)
  old = np.asarray(tokens.embedding_table(base.params["text_encoder"]))
  new = np.asarray(tokens.embedding_table(frozen["text_encoder"]))
  assert new.shape == (old.shape[0] + 1, old.shape[1])
  assert np.array_equal(new[:-1], old)
  red = tokens.initial_rows(base.tokenizer, base.params["text_encoder"], ["red"])[0]
  assert not np.array_equal(new[-1], red)
  assert np.isfinite(result["loss"])


def test_custom_diffusion_with_targets_none_trains_only_its_token(folder, data, base, tmp_path):
  """``targets="none"``: textual inversion (Gal et al. 2022) inside Custom Diffusion. The
  UNet is bitwise the base's, the file holds the token row and no layer, and a prompt
  without the token edits exactly as the base does, with the adapter loaded; a prompt
  with it edits differently (its row trained away from the initializer's)."""
  from ip2p_jax import InstructPix2PixPipeline
  out = str(tmp_path / "ti.safetensors")
  settings = runner.Settings("custom_diffusion", steps=2, learning_rate=1e-1, targets="none",
                             tokens=("<new1>",), initializer=("red",))
  result = runner.customize(folder, data[0], out, settings, progress=False)
  before, after = _flat(base.params["unet"]), _flat(result["state"].params["unet"])
  assert before.keys() == after.keys()
  assert all(np.array_equal(before[k], after[k]) for k in before)
  adapter = files.load(out)
  assert adapter.paths() == [] and adapter.tokens.names == ["<new1>"]
  red = tokens.initial_rows(base.tokenizer, base.params["text_encoder"], ["red"])[0]
  assert not np.allclose(adapter.tokens.embeddings[0], red)
  pipe = InstructPix2PixPipeline.from_pretrained(folder, compilation_cache=False)
  pipe.set_progress_bar_config(disable=True)
  image = np.random.default_rng(3).integers(0, 256, (RES, RES, 3), dtype=np.uint8)
  kw = dict(num_inference_steps=2, seed=0, output_type="np")
  base_plain = pipe("make it red", image, **kw).images
  base_token = pipe("make it red <new1>", image, **kw).images
  pipe.load_adapter(out)
  np.testing.assert_array_equal(pipe("make it red", image, **kw).images, base_plain)
  assert not np.array_equal(pipe("make it red <new1>", image, **kw).images, base_token)
  with pytest.raises(ValueError, match="trains only new tokens"):
    runner.customize(folder, data[0], str(tmp_path / "x.safetensors"),
                     runner.Settings("custom_diffusion", steps=1, targets="none"),
                     progress=False)


def test_lora_changes_only_its_adapters(trained_lora, base):
  _, result = trained_lora
  params = result["state"].params
  before, after = _flat(base.params["unet"]), _flat(params["unet"])
  assert all(np.array_equal(before[k], after[k]) for k in before)  # the whole UNet bitwise
  paths = targets.select(base.params["unet"], targets.ATTENTION)
  assert sorted(params["lora"]) == sorted("/".join(p) for p in paths)
  assert all(np.abs(np.asarray(w["lora_B"])).max() > 0 for w in params["lora"].values())
  assert set(params) == {"unet", "lora"}


def test_adapter_files_are_small_and_hold_their_tokens(trained_cd, trained_lora, folder, base):
  unet_bytes = os.path.getsize(os.path.join(folder, "unet", "diffusion_pytorch_model.safetensors"))
  for path, _ in (trained_cd, trained_lora):
    assert os.path.getsize(path) <= 0.05 * unet_bytes, (os.path.getsize(path), unet_bytes)
  cd = files.load(trained_cd[0])
  assert cd.method == "custom_diffusion" and cd.tokens.names == ["<new1>"]
  assert cd.meta["prompts"] == ["make it <new1>"]
  # The file's deltas are exactly what training changed, one per key/value kernel.
  trained = targets.kernels(jax.device_get(trained_cd[1]["state"].params["unet"]))
  start = targets.kernels(base.params["unet"])
  assert set(cd.deltas) == set(custom_diffusion.select(base.params["unet"]))
  for p, d in cd.deltas.items():
    np.testing.assert_array_equal(d, np.asarray(trained[p]) - np.asarray(start[p]))
  lo = files.load(trained_lora[0])
  assert lo.method == "lora" and lo.tokens is None
  assert {lo.lora.scaling(p) for p in lo.lora.weights} == {2.0}  # alpha 4 / rank 2


@pytest.fixture(scope="module")
def unet_fn():
  return jax.jit(lambda module, params, x, t, c: module.apply({"params": params}, x, t, c),
                 static_argnums=0)


def _inputs(in_channels: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  return (rng.standard_normal((1, RES // 2, RES // 2, in_channels)).astype(np.float32),
          np.array([500], np.int32), rng.standard_normal((1, 77, 32)).astype(np.float32))


def test_scale_zero_is_the_base_and_adapters_compose(trained_cd, trained_lora, base, unet_fn):
  cd, lo = files.load(trained_cd[0]), files.load(trained_lora[0])
  zero = adapters.apply(base, lo, 0.0)
  x, t, c = _inputs(8)
  ref = np.asarray(unet_fn(base.modules["unet"], base.params["unet"], x, t, c))
  np.testing.assert_array_equal(np.asarray(unet_fn(base.modules["unet"],
                                                   zero.params["unet"], x, t, c)), ref)
  # Both adapters at their scales: every kernel is base + s1 dW1 + s2 dW2 (either order).
  first = base.params["unet"]  # later adapters check their base against the unmerged UNet
  both = adapters.apply(adapters.apply(base, cd, 0.5), lo, 0.7, base_unet=first)
  other = adapters.apply(adapters.apply(base, lo, 0.7), cd, 0.5, base_unet=first)
  k0, k1, k2 = (targets.kernels(p.params["unet"]) for p in (base, both, other))
  lora_d = lora.deltas(lo.lora.weights, {p: lo.lora.scaling(p) for p in lo.lora.weights})
  for p in k0:
    want = np.asarray(k0[p], np.float64) + 0.5 * cd.deltas.get(p, 0.0)
    want = want + 0.7 * np.asarray(lora_d.get(p, 0.0))
    np.testing.assert_allclose(k1[p], want, rtol=0, atol=1e-6, err_msg=str(p))
    np.testing.assert_allclose(k1[p], k2[p], rtol=0, atol=1e-6)
  assert both.tokenizer.convert_tokens_to_ids("<new1>") == len(base.tokenizer)
  out = np.asarray(unet_fn(base.modules["unet"], both.params["unet"], x, t, c))
  assert np.abs(out - ref).max() > 1e-5  # the adapters do something
  with pytest.raises(adapters.AdapterError, match="already in the tokenizer"):
    adapters.apply(both, cd, 1.0, check_base=False)


def test_pipeline_load_adapter_scale_zero_reproduces_the_base_edit(folder, trained_lora):
  from ip2p_jax import InstructPix2PixPipeline
  pipe = InstructPix2PixPipeline.from_pretrained(folder, compilation_cache=False)
  pipe.set_progress_bar_config(disable=True)
  image = np.random.default_rng(3).integers(0, 256, (RES, RES, 3), dtype=np.uint8)
  kw = dict(num_inference_steps=2, seed=0, output_type="np")
  ref = pipe("make it <new1>", image, **kw).images
  pipe.load_adapter(trained_lora[0], scale=0.0)
  np.testing.assert_array_equal(pipe("make it <new1>", image, **kw).images, ref)
  full = InstructPix2PixPipeline.from_pretrained(folder, compilation_cache=False)
  full.set_progress_bar_config(disable=True)
  full.load_adapter(trained_lora[0], scale=1.0)  # and at scale 1 it changes the edit
  assert np.abs(full("make it <new1>", image, **kw).images - ref).max() > 1e-4


def test_misfit_adapters_are_one_line_errors(tmp_path, trained_lora, base):
  lo = files.load(trained_lora[0])
  # An editor's adapter on a text-to-image model.
  t2i_dir = str(tmp_path / "sd")
  pipeline_fixtures.save_sd(t2i_dir)
  t2i = load_pipeline(t2i_dir)
  with pytest.raises(adapters.AdapterError, match="InstructPix2Pix editor.*text-to-image") as e:
    adapters.apply(t2i, lo)
  assert "\n" not in str(e.value)
  # Same architecture, other weights.
  with pytest.raises(adapters.AdapterError, match="another base model"):
    adapters.apply(load_pipeline(t2i_dir), files.Adapter(
        "lora", lora=lo.lora, meta={**lo.meta, "base": {**lo.meta["base"], "in_channels": 4}}))
  # Shapes that do not fit: name the layer and both shapes.
  path = next(iter(lo.lora.weights))
  bad = {path: {"lora_A": np.zeros((7, 2), np.float32), "lora_B": np.zeros((2, 5), np.float32)}}
  with pytest.raises(adapters.AdapterError, match=targets.torch_name(path).replace(".", r"\.")
                     + r".*\(5, 7\)"):
    adapters.apply(base, files.Adapter("lora", lora=lora.LoRA(bad, {path: 2.0})))


def test_constrained_merge_keeps_each_concept_and_stays_near_the_base():
  """Kumari et al. Eq. 4 on random features: each concept's outputs on its own text
  features are kept (to 1e-4 relative), and on regularisation features the merged
  kernel is closer to the base than the sum of the two deltas."""
  rng = np.random.default_rng(0)
  d, out = 16, 12
  w0 = rng.standard_normal((d, out))
  ws = [w0 + 0.3 * rng.standard_normal((d, out)) for _ in range(2)]
  feats = [rng.standard_normal((3, d)) for _ in range(2)]
  reg = rng.standard_normal((40, d))
  merged = custom_diffusion.constrained_merge(w0, ws, feats, reg)
  for w, f in zip(ws, feats):
    np.testing.assert_allclose(f @ merged, f @ w, rtol=1e-4, atol=1e-4 * np.abs(f @ w).max())
  naive = w0 + (ws[0] - w0) + (ws[1] - w0)
  assert np.linalg.norm(reg @ (merged - w0)) < np.linalg.norm(reg @ (naive - w0))


def _random_lora(unet_params, names, rank, key):
  paths = targets.select(unet_params, names)
  weights = lora.init(unet_params, paths, rank, key)
  for i, p in enumerate(paths):  # B random too, so every layer's update is visible
    b = weights[p]["lora_B"]
    weights[p]["lora_B"] = 0.3 * jax.random.normal(jax.random.fold_in(key, 100 + i), b.shape)
  return lora.LoRA({p: {k: np.asarray(v) for k, v in w.items()} for p, w in weights.items()},
                   {p: 3.0 for p in paths})


def _torch_unet_out(unet, x, t, c):
  import torch
  with torch.no_grad():
    y = unet(torch.from_numpy(np.transpose(x, (0, 3, 1, 2))), torch.from_numpy(t),
             encoder_hidden_states=torch.from_numpy(c)).sample
  return np.transpose(y.numpy(), (0, 2, 3, 1))


def test_our_lora_loads_in_diffusers_with_the_same_result(folder, base, tmp_path, unet_fn):
  import diffusers
  adapter = files.Adapter("lora", lora=_random_lora(base.params["unet"], targets.TARGETS, 2,
                                                    jax.random.key(1)))
  path = str(tmp_path / "ours.safetensors")
  files.save(path, adapter)
  pipe = diffusers.StableDiffusionInstructPix2PixPipeline.from_pretrained(folder)
  x, t, c = _inputs(8, seed=1)
  before = _torch_unet_out(pipe.unet, x, t, c)
  pipe.load_lora_weights(str(tmp_path), weight_name="ours.safetensors")
  theirs = _torch_unet_out(pipe.unet, x, t, c)
  ours = np.asarray(unet_fn(base.modules["unet"],
                            adapters.apply(base, adapter).params["unet"], x, t, c))
  assert np.abs(theirs - before).max() > 1e-2  # diffusers applied it
  np.testing.assert_allclose(ours, theirs, rtol=0, atol=2e-4)


def test_a_lora_diffusers_saves_loads_here_with_the_same_result(folder, base, tmp_path, unet_fn):
  import diffusers
  import torch
  from peft import LoraConfig
  from peft.utils import get_peft_model_state_dict
  pipe = diffusers.StableDiffusionInstructPix2PixPipeline.from_pretrained(folder)
  config = LoraConfig(r=4, lora_alpha=2, init_lora_weights=False,
                      target_modules=["to_q", "to_k", "to_v", "to_out.0", "conv1", "proj_in"])
  torch.manual_seed(0)
  pipe.unet.add_adapter(config)
  x, t, c = _inputs(8, seed=2)
  theirs = _torch_unet_out(pipe.unet, x, t, c)
  diffusers.StableDiffusionInstructPix2PixPipeline.save_lora_weights(
      str(tmp_path), unet_lora_layers=get_peft_model_state_dict(pipe.unet),
      unet_lora_adapter_metadata=config.to_dict())
  adapter = files.load(str(tmp_path / "pytorch_lora_weights.safetensors"))
  assert {adapter.lora.scaling(p) for p in adapter.lora.weights} == {0.5}
  assert any(w["lora_A"].ndim == 4 for w in adapter.lora.weights.values())  # convs came too
  ours = np.asarray(unet_fn(base.modules["unet"],
                            adapters.apply(base, adapter).params["unet"], x, t, c))
  base_out = np.asarray(unet_fn(base.modules["unet"], base.params["unet"], x, t, c))
  assert np.abs(theirs - base_out).max() > 1e-2
  np.testing.assert_allclose(ours, theirs, rtol=0, atol=2e-4)


def test_cli_customize_and_edit_adapter_arguments(tmp_path):
  from ip2p_jax.cli import build_parser, edit, main
  args = build_parser().parse_args(["edit", "x.png", "-p", "p", "-o", "o", "--adapter",
                                    "a.safetensors:0.5", "--adapter", "b.safetensors"])
  assert args.adapter == [("a.safetensors", 0.5), ("b.safetensors", 1.0)]
  assert edit._adapter("C:/x.safetensors") == ("C:/x.safetensors", 1.0)
  empty = tmp_path / "empty"
  empty.mkdir()
  assert main(["customize", "--data", str(empty), "--method", "lora",
               "--out", str(tmp_path / "a.safetensors")]) == 2
  (empty / "metadata.jsonl").write_text("")
  assert main(["customize", "--data", str(empty), "--method", "lora", "--diffusers-dir",
               str(tmp_path / "d"), "--out", str(tmp_path / "a.safetensors")]) == 2


def test_ip2p_edit_applies_the_adapter_at_its_scale(folder, trained_lora, tmp_path):
  """``ip2p edit --adapter FILE:0.5`` writes the library's edit with that adapter loaded at
  0.5 (same noise: the file name's), which differs from the base model's edit and from
  the adapter at scale 1: the flag is applied, at the scale given."""
  from ip2p_jax import InstructPix2PixPipeline, editing
  from ip2p_jax.cli import main
  rng = np.random.default_rng(9)
  Image.fromarray(rng.integers(0, 256, (RES, RES, 3), dtype=np.uint8)).save(tmp_path / "x.png")
  lora_file = trained_lora[0]

  def cli(out, *adapter):
    assert main(["edit", str(tmp_path / "x.png"), "-p", "make it red", "-o", str(out),
                 "--model", folder, "--steps", "3", *adapter]) == 0
    return np.asarray(Image.open(out / "x.png").convert("RGB"), np.int16)

  def library(scale):
    pipe = InstructPix2PixPipeline.from_pretrained(folder, compilation_cache=False)
    if scale:
      pipe.load_adapter(lora_file, scale)
    step = editing.Step("make it red", steps=3)
    (image,) = editing.edit_images(pipe, [Image.open(tmp_path / "x.png")], [step],
                                   [editing.noise_id("x.png")], resolution=RES)
    return np.asarray(image.convert("RGB"), np.int16)

  half = cli(tmp_path / "half", "--adapter", f"{lora_file}:0.5")
  base = cli(tmp_path / "base")
  np.testing.assert_array_equal(half, library(0.5))
  np.testing.assert_array_equal(base, library(0))
  # the adapter moved the pixels, and 0.5 is not 1 (measured: 2.0 and 2.2 levels)
  assert np.abs(half - base).mean() > 1.0
  assert np.abs(half - library(1.0)).mean() > 0.5


def test_merged_custom_diffusion_concepts_keep_each_concepts_keys_and_values(trained_cd, base):
  """Two concepts trained apart, merged by the closed form: on each concept's own prompt
  features the merged kernels give that concept's keys/values (to 1e-3 of their scale)."""
  first = files.load(trained_cd[0])
  rng = np.random.default_rng(5)
  second = files.Adapter(
      "custom_diffusion",
      deltas={p: 0.05 * rng.standard_normal(d.shape).astype(np.float32)
              for p, d in first.deltas.items()},
      # A token of its own (one near <new1> would ask the same rows for other keys).
      tokens=tokens.Tokens(["<new2>"], rng.standard_normal((1, 32)).astype(np.float32)),
      meta={**first.meta, "prompts": ["make it <new2>"]})
  merged = adapters.merge_custom_diffusion(base, [first, second])
  assert merged.tokens.names == ["<new1>", "<new2>"]
  # every cross-attention key/value kernel, so the loop below checks each one
  every = set(custom_diffusion.select(base.params["unet"]))
  assert set(merged.deltas) == set(first.deltas) == every
  both = adapters.apply(adapters.apply(base, first, 0.0), second, 0.0,
                        base_unet=base.params["unet"])
  w0 = targets.kernels(base.params["unet"])
  for concept in (first, second):
    f = adapters._prompt_features(both, concept.meta["prompts"], concept.tokens.names)
    for p, d in merged.deltas.items():
      want = f @ (np.asarray(w0[p], np.float64) + concept.deltas[p])
      got = f @ (np.asarray(w0[p], np.float64) + d)
      np.testing.assert_allclose(got, want, rtol=0, atol=1e-3 * np.abs(want).max())
  merged_applied = adapters.apply(base, merged)  # a merged adapter applies like any other
  assert merged_applied.tokenizer.convert_tokens_to_ids("<new2>") == len(base.tokenizer) + 1


def test_text_to_image_custom_diffusion_through_the_training_loop(shapes_dataset, tmp_path):
  """``config.customize`` in the ordinary training run (stage 1, tiny random models):
  the optimizer updates only the cross-attention to_k/to_v kernels and the token row,
  the run writes its sample picture, and the export is the adapter file."""
  from configs import tiny_t2i
  from ip2p_jax import sharding
  from ip2p_jax.train import jobs
  from ip2p_jax.train.loop import train_and_evaluate
  c = tiny_t2i.get_config()
  c.data.path = shapes_dataset
  c.total_steps, c.num_samples, c.sample_steps = 2, 2, 2
  c.learning_rate, c.ema_decay = 1e-2, 0.0
  c.customize.method, c.customize.tokens, c.customize.initializer = (
      "custom_diffusion", "<new1>", "red")
  summary = train_and_evaluate(c, str(tmp_path))
  assert summary["step"] == 2 and os.listdir(tmp_path / "samples") == ["step_0000002.png"]
  job = jobs.build(c)
  start = jax.jit(lambda k: sharding.strip_boxes(job.init_params(k)))(jax.random.key(c.seed))
  trained = jax.device_get(summary["state"].params)
  selected = set(custom_diffusion.select(start["unet"]))
  before, after = _flat(start["unet"]), _flat(trained["unet"])
  for key in before:
    same = np.array_equal(before[key], after[key])
    assert same != (key[:-1] in selected and key[-1] == "kernel"), key
  adapter = files.load(os.path.join(summary["export"], "adapter.safetensors"))
  assert adapter.tokens.names == ["<new1>"] and set(adapter.deltas) == selected



def _torch_text_out(text_encoder, ids):
  import torch
  with torch.no_grad():
    return text_encoder(torch.from_numpy(ids.astype(np.int64)))[0].numpy()


def test_text_encoder_lora_round_trips_with_diffusers(folder, base, tmp_path):
  """A LoRA file with text-encoder layers (what most SD 1.5 LoRAs hold): the one
  diffusers saves changes our text encoder's states as it changes diffusers', and ours,
  saved again, loads in diffusers' load_lora_weights with the same states."""
  import diffusers
  import torch
  from peft import LoraConfig, inject_adapter_in_model
  from peft.utils import get_peft_model_state_dict
  from ip2p_jax import tokenizer as tokenizers
  ids = tokenizers.tokenize(base.tokenizer, ["make the circle red", ""])
  text = jax.jit(lambda p, i: base.modules["text_encoder"].apply({"params": p}, i)
                 .last_hidden_state)
  before = np.asarray(text(base.params["text_encoder"], ids))
  pipe = diffusers.StableDiffusionInstructPix2PixPipeline.from_pretrained(folder)
  te_config = LoraConfig(r=2, lora_alpha=6, init_lora_weights=False,
                         target_modules=["q_proj", "k_proj", "v_proj", "out_proj", "fc1"])
  unet_config = LoraConfig(r=2, lora_alpha=2, init_lora_weights=False, target_modules=["to_k"])
  torch.manual_seed(0)
  # (peft's own injection: transformers' text_encoder.add_adapter wants a newer peft)
  inject_adapter_in_model(te_config, pipe.text_encoder)
  pipe.unet.add_adapter(unet_config)
  theirs = _torch_text_out(pipe.text_encoder, ids)
  np.testing.assert_allclose(before, _torch_text_out(
      diffusers.StableDiffusionInstructPix2PixPipeline.from_pretrained(folder).text_encoder, ids),
      rtol=0, atol=1e-4)  # the two base text encoders agree
  diffusers.StableDiffusionInstructPix2PixPipeline.save_lora_weights(
      str(tmp_path / "theirs"), unet_lora_layers=get_peft_model_state_dict(pipe.unet),
      text_encoder_lora_layers=get_peft_model_state_dict(pipe.text_encoder),
      unet_lora_adapter_metadata=unet_config.to_dict(),
      text_encoder_lora_adapter_metadata=te_config.to_dict())
  adapter = files.load(str(tmp_path / "theirs" / "pytorch_lora_weights.safetensors"))
  assert {adapter.text_lora.scaling(p) for p in adapter.text_lora.weights} == {3.0}
  assert {adapter.lora.scaling(p) for p in adapter.lora.weights} == {1.0}
  ours = np.asarray(text(adapters.apply(base, adapter).params["text_encoder"], ids))
  assert np.abs(theirs - before).max() > 1e-2
  np.testing.assert_allclose(ours, theirs, rtol=0, atol=2e-4)
  # Ours -> diffusers.
  files.save(str(tmp_path / "ours.safetensors"), adapter)
  fresh = diffusers.StableDiffusionInstructPix2PixPipeline.from_pretrained(folder)
  fresh.load_lora_weights(str(tmp_path), weight_name="ours.safetensors")
  np.testing.assert_allclose(_torch_text_out(fresh.text_encoder, ids), theirs, rtol=0,
                             atol=2e-4)
  # Scale 0 keeps the base text encoder exactly; a misfit layer is named.
  zero = adapters.apply(base, adapter, 0.0)
  np.testing.assert_array_equal(np.asarray(text(zero.params["text_encoder"], ids)), before)
  path = next(iter(adapter.text_lora.weights))
  bad = files.Adapter("lora", lora=lora.LoRA({}, {}), text_lora=lora.LoRA(
      {path + ("x",): adapter.text_lora.weights[path]}, {path + ("x",): 1.0}))
  with pytest.raises(adapters.AdapterError, match="not in this model's text encoder"):
    adapters.apply(base, bad)


def test_custom_diffusion_in_diffusers_layout_both_ways(trained_cd, folder, base, tmp_path):
  """Our Custom Diffusion adapter written in diffusers' layout (whole to_k/to_v kernels,
  a textual-inversion file per token) gives diffusers' CustomDiffusionAttnProcessor UNet
  and text encoder the outputs ours give; read back, it is the same adapter."""
  import diffusers
  import safetensors.torch
  import torch
  from ip2p_jax import tokenizer as tokenizers
  from ip2p_jax.adapters import diffusers_format
  cd = files.load(trained_cd[0])
  written = diffusers_format.save(str(tmp_path), cd, base)
  assert [os.path.basename(w) for w in written] == [diffusers_format.WEIGHT_NAME,
                                                     "<new1>.safetensors"]
  pipe = diffusers.StableDiffusionInstructPix2PixPipeline.from_pretrained(folder)
  sd = safetensors.torch.load_file(written[0])
  sd.update({n: {} for n in pipe.unet.attn_processors if n.endswith("attn1.processor")})
  pipe.unet.load_attn_procs(sd, _pipeline=pipe)
  assert {type(p).__name__ for p in pipe.unet.attn_processors.values()} == {
      "CustomDiffusionAttnProcessor"}
  pipe.load_textual_inversion(str(tmp_path), weight_name="<new1>.safetensors")
  ours = adapters.apply(base, cd)
  ids = tokenizers.tokenize(ours.tokenizer, ["make it <new1>"])
  assert list(pipe.tokenizer("make it <new1>").input_ids) == [
      int(i) for i in ids[0][:len(pipe.tokenizer("make it <new1>").input_ids)]]
  text = np.asarray(ours.modules["text_encoder"].apply({"params": ours.params["text_encoder"]},
                                                       ids).last_hidden_state)
  theirs_text = _torch_text_out(pipe.text_encoder, ids)
  np.testing.assert_allclose(text, theirs_text, rtol=0, atol=1e-4)
  x, t, _ = _inputs(8, seed=4)
  theirs = _torch_unet_out(pipe.unet, x, t, theirs_text)
  mine = np.asarray(jax.jit(lambda p: base.modules["unet"].apply({"params": p}, x, t, text))(
      ours.params["unet"]))
  np.testing.assert_allclose(mine, theirs, rtol=0, atol=2e-4)
  back = diffusers_format.load(written[0], base, written[1:])
  assert set(back.deltas) == set(cd.deltas) and back.tokens.names == ["<new1>"]
  assert set(cd.deltas) == set(custom_diffusion.select(base.params["unet"]))
  for p, d in cd.deltas.items():
    np.testing.assert_allclose(back.deltas[p], d, rtol=0, atol=1e-6)
  np.testing.assert_array_equal(back.tokens.embeddings, cd.tokens.embeddings)


def test_prior_preservation_adds_the_regularisation_loss_at_its_weight():
  """A batch with a "prior" sub-batch: loss = instance + prior_weight * prior, both
  reported, and the gradient reaches the trained leaves through both terms."""
  from ip2p_jax.adapters.training import Customization
  custom = Customization("custom_diffusion", ("to_k", "to_v"), prior_weight=0.25)
  params = {"unet": {"attn2": {"to_k": {"kernel": jnp.ones((2, 2))}},
                     "conv": {"kernel": jnp.ones((2, 2))}}}

  def loss(unet, frozen, batch, rng):  # the objective's signature: (loss, metrics)
    w = unet["attn2"]["to_k"]["kernel"] + unet["conv"]["kernel"]
    return jnp.mean((batch["x"] @ w) ** 2), {}

  wrapped = custom.wrap_loss(loss)
  a, b = jnp.full((1, 2), 1.0), jnp.full((1, 2), 3.0)
  total, metrics = wrapped(params, {}, {"x": a, "prior": {"x": b}}, jax.random.key(0))
  inst, prior = loss(params["unet"], {}, {"x": a}, None)[0], loss(params["unet"], {}, {"x": b},
                                                                  None)[0]
  np.testing.assert_allclose(total, inst + 0.25 * prior, rtol=1e-6)
  np.testing.assert_allclose(metrics["prior_loss"], prior, rtol=1e-6)
  grads = jax.grad(lambda p: wrapped(p, {}, {"x": a, "prior": {"x": b}}, jax.random.key(0))[0])(
      params)
  only_instance = jax.grad(lambda p: wrapped(p, {}, {"x": a}, jax.random.key(0))[0])(params)
  assert not np.allclose(grads["unet"]["attn2"]["to_k"]["kernel"],
                         only_instance["unet"]["attn2"]["to_k"]["kernel"])
  assert not np.any(grads["unet"]["conv"]["kernel"])  # frozen: no gradient at all


def test_several_data_folders_train_one_adapter_jointly(trained_lora):
  out, result = trained_lora
  assert result["examples"] == 5  # 3 + 2 examples from two folders
  assert files.load(out).meta["prompts"] == ["make it <new1>", "make it red"]


def test_token_kv_rows_equal_moving_the_token_state_through_every_layer(base, unet_fn):
  """Oracle for ``token_kv.applied``: rows ``R = W delta`` in every cross-attention key and
  value projection give exactly the UNet output of the text states with ``delta`` added
  at the masked positions (``W (c + delta) + b = W c + b + W delta``), and nothing where
  the mask is empty (to float32 rounding: the added zero rows change XLA's fusions; 2e-6,
  a few units in the last place of outputs of order 1)."""
  from ip2p_jax.adapters import token_kv
  module, params = base.modules["unet"], base.params["unet"]
  x, t, c = _inputs(8)
  c = np.concatenate([c, c[:, ::-1]])  # two rows: the token at position 3, then nowhere
  x, t = np.concatenate([x, x]), np.concatenate([t, t])
  delta = np.random.default_rng(5).standard_normal(c.shape[-1]).astype(np.float32)
  kernels = targets.kernels(params)
  rows = {p: jnp.asarray(delta @ np.asarray(kernels[tuple(p.split("/"))]))[None]
          for p in token_kv.layer_paths(params)}
  assert len(rows) == 2 * len([p for p in kernels if p[-1] == "to_k" and p[-2] == "attn2"])
  ids = np.zeros((2, 77), np.int32)
  ids[0, 3] = 99
  mask = token_kv.mask(jnp.asarray(ids), jnp.asarray([99]))

  @jax.jit
  def with_rows(x, t, c, mask):
    with token_kv.applied(rows, mask):
      return module.apply({"params": params}, x, t, c)
  moved = c.copy()
  moved[0, 3] += delta
  np.testing.assert_allclose(np.asarray(with_rows(x, t, c, mask)),
                             np.asarray(unet_fn(module, params, x, t, moved)),
                             rtol=0, atol=1e-5)
  np.testing.assert_allclose(np.asarray(with_rows(x, t, c, mask))[1],
                             np.asarray(unet_fn(module, params, x, t, c))[1], rtol=0, atol=2e-6)


@pytest.fixture(scope="module")
def trained_token_kv(folder, data, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("tkv") / "tkv.safetensors")
  settings = runner.Settings("custom_diffusion", steps=3, learning_rate=1e-1,
                             targets="token_kv", tokens=("<new1>",), initializer=("red",))
  return out, runner.customize(folder, data[0], out, settings, progress=False)


def test_token_kv_trains_only_its_token_and_rows(trained_token_kv, base):
  """``targets="token_kv"``: the UNet stays bitwise, the file holds the token's
  embedding and one key/value row per cross-attention projection (no kernel change),
  small, and it round-trips."""
  from ip2p_jax.adapters import token_kv
  out, result = trained_token_kv
  params = result["state"].params
  before, after = _flat(base.params["unet"]), _flat(params["unet"])
  assert all(np.array_equal(before[k], after[k]) for k in before)
  adapter = files.load(out)
  assert adapter.deltas == {} and adapter.tokens.names == ["<new1>"]
  widths = token_kv.layer_paths(base.params["unet"])
  assert sorted(adapter.token_kv) == sorted(widths)
  for p, r in adapter.token_kv.items():
    assert r.shape == (1, widths[p])
    np.testing.assert_array_equal(r, np.asarray(params["token_kv"][p]))
  assert any(np.abs(r).max() > 0 for r in adapter.token_kv.values())  # they trained
  assert "token_kv" in adapter.meta["targets"]
  unet_bytes = sum(np.asarray(v).nbytes for v in before.values())
  assert os.path.getsize(out) <= 0.05 * unet_bytes


def test_token_kv_adapter_in_the_pipeline(folder, trained_token_kv, tmp_path):
  """Loaded in a pipeline: a prompt without the token edits as the base does (to float32
  rounding, 1e-5: the program differs by the zero rows it adds); with it the edit
  differs; at scale 0 the rows add nothing (the token's embedding is still the
  trained one, so compare against textual inversion alone); two adapters stack; the
  pipeline refuses to save rows into a model folder."""
  from ip2p_jax import InstructPix2PixPipeline
  out, _ = trained_token_kv
  pipe = InstructPix2PixPipeline.from_pretrained(folder, compilation_cache=False)
  pipe.set_progress_bar_config(disable=True)
  image = np.random.default_rng(3).integers(0, 256, (RES, RES, 3), dtype=np.uint8)
  kw = dict(num_inference_steps=2, seed=0, output_type="np")
  base_plain = pipe("make it red", image, **kw).images
  plain_states = pipe.encode_prompt(["make it red"])  # [1, 77, width]
  pipe.load_adapter(out)
  np.testing.assert_allclose(pipe("make it red", image, **kw).images, base_plain,
                             rtol=0, atol=1e-5)
  # Embeddings computed without the adapter (no mask channels) get an empty mask.
  assert pipe.encode_prompt(["make it red"]).shape[-1] == plain_states.shape[-1] + 1
  np.testing.assert_allclose(pipe(image=image, prompt_embeds=plain_states, **kw).images,
                             base_plain, rtol=0, atol=1e-5)
  adapted = pipe("make it <new1>", image, **kw).images
  assert np.abs(adapted - base_plain).max() > 1e-3
  # Scale 0: the same as an adapter of the token alone (textual inversion).
  adapter = files.load(out)
  ti_only = str(tmp_path / "ti.safetensors")
  files.save(ti_only, files.Adapter("custom_diffusion", deltas={}, tokens=adapter.tokens))
  zero = InstructPix2PixPipeline.from_pretrained(folder, compilation_cache=False)
  zero.set_progress_bar_config(disable=True)
  zero.load_adapter(out, scale=0.0)
  ti = InstructPix2PixPipeline.from_pretrained(folder, compilation_cache=False)
  ti.set_progress_bar_config(disable=True)
  ti.load_adapter(ti_only)
  np.testing.assert_allclose(zero("make it <new1>", image, **kw).images,
                             ti("make it <new1>", image, **kw).images, rtol=0, atol=1e-6)
  # A second concept stacks: its own token, its rows after the first's.
  second = str(tmp_path / "second.safetensors")
  files.save(second, files.Adapter(
      "custom_diffusion", deltas={},
      tokens=tokens.Tokens(["<new2>"], adapter.tokens.embeddings[::-1].copy()),
      meta=adapter.meta, token_kv={p: -r for p, r in adapter.token_kv.items()}))
  pipe.load_adapter(second)
  ids = pipe.tokenizer.convert_tokens_to_ids(["<new1>", "<new2>"])
  assert pipe.params["token_kv"]["ids"].tolist() == list(ids)
  np.testing.assert_allclose(pipe("make it red", image, **kw).images, base_plain,
                             rtol=0, atol=1e-5)
  np.testing.assert_allclose(pipe("make it <new1>", image, **kw).images, adapted,
                             rtol=0, atol=1e-6)
  with pytest.raises(ValueError, match="key/value-token adapter"):
    pipe.save_pretrained(str(tmp_path / "saved"))


def test_token_kv_misfits_are_clear_errors(trained_token_kv, base, folder, data, tmp_path):
  from ip2p_jax.adapters import diffusers_format
  out, _ = trained_token_kv
  adapter = files.load(out)
  path = next(iter(adapter.token_kv))
  wrong = dict(adapter.token_kv, **{path: np.zeros((1, 3), np.float32)})
  with pytest.raises(adapters.AdapterError, match="rows are 3 wide"):
    adapters.apply(base, files.Adapter("custom_diffusion", deltas={}, tokens=adapter.tokens,
                                       meta={}, token_kv=wrong))
  with pytest.raises(adapters.AdapterError, match="one row per new token"):
    adapters.apply(base, files.Adapter("custom_diffusion", deltas={}, meta={},
                                       token_kv=adapter.token_kv))
  with pytest.raises(adapters.AdapterError, match="no key/value token rows"):
    diffusers_format.save(str(tmp_path / "d"), adapter, base)
  with pytest.raises(ValueError, match="give customize.tokens"):
    runner.customize(folder, data[0], str(tmp_path / "x.safetensors"),
                     runner.Settings("custom_diffusion", steps=1, targets="token_kv"),
                     progress=False)
  with pytest.raises(ValueError, match="belongs to custom_diffusion"):
    runner.customize(folder, data[0], str(tmp_path / "x.safetensors"),
                     runner.Settings("lora", steps=1, targets="token_kv",
                                     tokens=("<n>",), initializer=("red",)), progress=False)


def test_text_to_image_token_kv_in_its_pipeline(tmp_path):
  """Key/value token rows on a text-to-image base (classifier-free guidance batches the
  negative and the prompt): a caption without the token draws as the base does, with
  it the drawing depends on the rows (scale 1 vs scale 0)."""
  from ip2p_jax import TextToImagePipeline
  folder = str(tmp_path / "sd")
  pipeline_fixtures.save_sd(folder)
  data = tmp_path / "captions"
  os.makedirs(data)
  rng = np.random.default_rng(0)
  with open(data / "metadata.jsonl", "w", encoding="utf-8") as f:
    for i in range(3):
      Image.fromarray(rng.integers(0, 256, (RES, RES, 3), dtype=np.uint8)).save(data / f"{i}.png")
      f.write(json.dumps({"image": f"{i}.png", "caption": "a <new1> square"}) + "\n")
  out = str(tmp_path / "tkv.safetensors")
  settings = runner.Settings("custom_diffusion", steps=3, learning_rate=1e-1,
                             targets="token_kv", tokens=("<new1>",), initializer=("red",))
  runner.customize(folder, str(data), out, settings, progress=False)
  kw = dict(num_inference_steps=2, seed=0, output_type="np")
  pipes = []
  for scale in (None, 1.0, 0.0):
    pipe = TextToImagePipeline.from_pretrained(folder, compilation_cache=False)
    pipe.set_progress_bar_config(disable=True)
    if scale is not None:
      pipe.load_adapter(out, scale=scale)
    pipes.append(pipe)
  base, full, zero = pipes
  np.testing.assert_allclose(full("a red square", **kw).images, base("a red square", **kw).images,
                             rtol=0, atol=1e-5)
  assert np.abs(full("a <new1> square", **kw).images
                - zero("a <new1> square", **kw).images).max() > 1e-4


def test_token_kv_through_the_training_loop_samples_with_its_rows(tmp_path):
  """``config.customize.targets = "token_kv"`` in the ordinary training run (stage 1):
  the UNet stays bitwise, the rows move from where they started, the run writes its
  sample picture (its sampler compiled with the rows in the parameters), and the
  exported adapter holds the trained rows."""
  from configs import tiny_t2i
  from ip2p_jax import sharding
  from ip2p_jax.adapters import token_kv
  from ip2p_jax.train import jobs
  from ip2p_jax.train.loop import train_and_evaluate
  from ip2p_jax.data import builders
  captions = tmp_path / "captions"  # captions that name the token, so its rows train
  captions.mkdir()
  rng = np.random.default_rng(3)
  for i in range(4):
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(captions / f"{i}.png")
    (captions / f"{i}.txt").write_text("a <new1> square")
  dataset, _ = builders.build("image_captions", str(tmp_path / "data"), builders.SourceConfig(
      name="tkv", source=str(captions), format="folder"))
  c = tiny_t2i.get_config()
  c.data.path = dataset
  c.total_steps, c.num_samples, c.sample_steps, c.batch_size = 2, 2, 2, 2
  c.learning_rate, c.ema_decay, c.warmup_steps = 1e-2, 0.0, 0
  c.customize.method, c.customize.targets = "custom_diffusion", "token_kv"
  c.customize.tokens, c.customize.initializer = "<new1>", "red"
  summary = train_and_evaluate(c, str(tmp_path))
  assert os.listdir(tmp_path / "samples") == ["step_0000002.png"]
  trained = jax.device_get(summary["state"].params)
  adapter = files.load(os.path.join(summary["export"], "adapter.safetensors"))
  assert adapter.deltas == {} and sorted(adapter.token_kv) == sorted(
      token_kv.layer_paths(trained["unet"]))
  for p, r in adapter.token_kv.items():
    np.testing.assert_array_equal(r, np.asarray(trained["token_kv"][p]))
  start = sharding.strip_boxes(jobs.build(c).init_params(jax.random.key(c.seed)))
  before, after = _flat(start["unet"]), _flat(trained["unet"])
  assert before.keys() == after.keys()
  for key in before:
    np.testing.assert_array_equal(before[key], after[key], err_msg=str(key))
  moved = [np.abs(np.asarray(trained["token_kv"][p]) - np.asarray(start["token_kv"][p])).max()
           for p in adapter.token_kv]
  assert min(moved) > 0, moved


def test_merged_concepts_keep_each_concepts_token_rows(trained_token_kv, base):
  """Merging two key/value-token concepts (``merge_custom_diffusion``): the merged file
  holds both tokens, and each token's rows are its own concept's, in the same order."""
  out, _ = trained_token_kv
  first = files.load(out)
  second = files.Adapter(
      "custom_diffusion", deltas={}, meta=first.meta,
      tokens=tokens.Tokens(["<new2>"], first.tokens.embeddings + 1.0),
      token_kv={p: 2.0 * r + 1.0 for p, r in first.token_kv.items()})
  merged = adapters.merge_custom_diffusion(base, [first, second])
  assert merged.tokens.names == ["<new1>", "<new2>"]
  for p, r in first.token_kv.items():
    np.testing.assert_array_equal(merged.token_kv[p], np.concatenate([r, 2.0 * r + 1.0]))


def test_token_only_runs_get_their_own_default_learning_rate(folder):
  """Without --lr, a run that trains only tokens (textual inversion) or tokens with their
  key/value rows gets the rate the shapes-world example measured (5e-3, 2e-2), not
  Custom Diffusion's 1e-5 for kernels, which would leave a token where it started."""
  rates = {}
  for targets in ("none", "token_kv", "to_k,to_v"):
    settings = runner.Settings("custom_diffusion", targets=targets, tokens=("<new1>",),
                               initializer=("red",))
    rates[targets] = runner.config_for(folder, settings, "instruct_pix2pix", RES).learning_rate
  assert rates == {"none": 5e-3, "token_kv": 2e-2, "to_k,to_v": 1e-5}
  given = runner.Settings("custom_diffusion", learning_rate=0.3, targets="token_kv")
  assert runner.config_for(folder, given, "instruct_pix2pix", RES).learning_rate == 0.3
