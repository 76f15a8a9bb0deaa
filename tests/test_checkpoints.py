"""Checkpoint I/O: whole pipeline folders, fp16 and sharded files, and every kind of
bad input giving an error that names the problem."""
import json
import os
import shutil

import jax
import numpy as np
import pytest
import torch

from configs import models as presets
from ip2p_jax import tokenizer as tokenizers
from ip2p_jax.checkpoints import (CheckpointError, UnsafeWeightsError, load_component,
                                  load_pipeline, module_from_config, safetensors, save_component,
                                  save_pipeline)
from ip2p_jax.models import ConfigError
from conftest import nchw, nhwc, perturb_params, randomize_


def _torch_unet(**overrides):
  from diffusers import UNet2DConditionModel
  cfg = {k: v for k, v in presets.TINY_UNET.items() if not k.startswith("_")}
  torch.manual_seed(0)
  return randomize_(UNet2DConditionModel(**{**cfg, **overrides}).eval())


@pytest.fixture(scope="module")
def unet_folder(tmp_path_factory):
  folder = tmp_path_factory.mktemp("unet")
  _torch_unet().save_pretrained(folder)
  return folder


@pytest.fixture
def unet_copy(unet_folder, tmp_path):
  return shutil.copytree(unet_folder, tmp_path / "unet")


def _unet_inputs():
  rng = np.random.default_rng(0)
  return (rng.standard_normal((1, 8, 8, 4)).astype(np.float32), np.array([20], np.int32),
          rng.standard_normal((1, 5, 32)).astype(np.float32))


@pytest.fixture(scope="module")
def ip2p_pipeline_folder(tmp_path_factory):
  """A tiny InstructPix2Pix pipeline saved by diffusers."""
  import diffusers
  import transformers
  torch.manual_seed(0)
  unet = _torch_unet(in_channels=8)
  vae = randomize_(diffusers.AutoencoderKL(**{k: v for k, v in presets.TINY_VAE.items()
                                              if not k.startswith("_")}))
  text = transformers.CLIPTextConfig(**{k: v for k, v in presets.TINY_CLIP_TEXT.items()
                                        if k not in ("architectures", "model_type")})
  pipe = diffusers.StableDiffusionInstructPix2PixPipeline(
      vae=vae, text_encoder=randomize_(transformers.CLIPTextModel(text)),
      tokenizer=tokenizers.transformers_tokenizer(),
      unet=unet, scheduler=diffusers.EulerAncestralDiscreteScheduler(
          beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
      safety_checker=None, feature_extractor=None, requires_safety_checker=False)
  folder = tmp_path_factory.mktemp("ip2p")
  pipe.save_pretrained(folder)
  return folder, pipe


def test_pipeline_round_trip_through_diffusers(ip2p_pipeline_folder, tmp_path):
  import diffusers
  folder, ref = ip2p_pipeline_folder
  parts = load_pipeline(str(folder))
  assert set(parts.params) == {"unet", "vae", "text_encoder"}
  assert parts.modules["unet"].config.in_channels == 8
  assert parts.scheduler_config["_class_name"] == "EulerAncestralDiscreteScheduler"
  ids = tokenizers.tokenize(parts.tokenizer, ["make it red", "add a hat"])
  ours = parts.modules["text_encoder"].apply({"params": parts.params["text_encoder"]}, ids)
  with torch.no_grad():
    theirs = ref.text_encoder(torch.from_numpy(ids).long()).last_hidden_state.numpy()
  np.testing.assert_allclose(np.asarray(ours.last_hidden_state), theirs, atol=1e-4)

  # Saved by us, loaded by diffusers' own pipeline class, same UNet numbers.
  parts.params = perturb_params(parts.params, seed=1, scale=0.01)
  save_pipeline(str(tmp_path / "out"), parts)
  again = diffusers.StableDiffusionInstructPix2PixPipeline.from_pretrained(
      tmp_path / "out", local_files_only=True, safety_checker=None)
  x = np.random.default_rng(0).standard_normal((1, 8, 8, 8)).astype(np.float32)
  ctx = np.asarray(ours.last_hidden_state)[:1]
  mine = parts.modules["unet"].apply({"params": parts.params["unet"]}, x, 500, ctx)
  with torch.no_grad():
    theirs = again.unet(torch.from_numpy(nchw(x)), 500, torch.from_numpy(ctx)).sample
  np.testing.assert_allclose(np.asarray(mine), nhwc(theirs), atol=1e-4)
  assert again.tokenizer("a cat").input_ids == parts.tokenizer("a cat").input_ids


def test_a_pipeline_built_in_code_saves_a_folder_diffusers_opens(ip2p_pipeline_folder, tmp_path):
  """A pipeline assembled in code has no model_index of its own (the GPU edit benchmark
  builds one so): the saved index must still name the pipeline class, which diffusers'
  generic loader reads to know what to build."""
  import dataclasses

  import diffusers
  for in_channels, cls in ((8, "StableDiffusionInstructPix2PixPipeline"),
                           (4, "StableDiffusionPipeline")):
    parts = load_pipeline(str(ip2p_pipeline_folder[0]))
    parts.model_index = {}
    if in_channels == 4:  # a text-to-image UNet: 4 latent channels in, 4 out
      module = parts.modules["unet"]
      parts.modules["unet"] = module.clone(
          config=dataclasses.replace(module.config, in_channels=4))
      kernel = parts.params["unet"]["conv_in"]["kernel"]
      parts.params["unet"]["conv_in"]["kernel"] = kernel[:, :, :4]
    save_pipeline(str(tmp_path / cls), parts)
    loaded = diffusers.DiffusionPipeline.from_pretrained(
        tmp_path / cls, local_files_only=True, safety_checker=None)
    assert type(loaded).__name__ == cls
    assert loaded.unet.config.in_channels == in_channels


def test_fp16_and_sharded_files_load(tmp_path):
  ref = _torch_unet()
  ref.half().save_pretrained(tmp_path / "fp16", variant="fp16")
  ref.float().save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
  assert any(f.endswith(".index.json") for f in os.listdir(tmp_path / "sharded"))
  x, t, ctx = _unet_inputs()
  with torch.no_grad():
    want = nhwc(ref(torch.from_numpy(nchw(x)), t.astype(np.int64)[0], torch.from_numpy(ctx)).sample)
  module, sharded = load_component(str(tmp_path / "sharded"))
  np.testing.assert_allclose(np.asarray(module.apply({"params": sharded}, x, t, ctx)), want, atol=1e-4)
  module, half = load_component(str(tmp_path / "fp16"), variant="fp16")
  assert all(p.dtype == np.float32 for p in jax.tree.leaves(half))  # upcast to param_dtype
  # fp16 weights: same function to fp16 rounding of the weights.
  np.testing.assert_allclose(np.asarray(module.apply({"params": half}, x, t, ctx)), want, atol=2e-2)


def test_we_write_sharded_files_too(unet_folder, tmp_path):
  module, params = load_component(str(unet_folder))
  save_component(str(tmp_path / "out"), module, params, max_shard_bytes=50_000)
  index = json.load(open(tmp_path / "out" / "diffusion_pytorch_model.safetensors.index.json"))
  assert len(set(index["weight_map"].values())) > 1
  _, again = load_component(str(tmp_path / "out"))
  jax.tree.map(np.testing.assert_array_equal, params, again)


def test_bf16_param_dtype(unet_folder):
  import jax.numpy as jnp
  module, params = load_component(str(unet_folder), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
  assert {p.dtype for p in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}
  out = module.apply({"params": params}, *_unet_inputs())
  assert out.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(out)))


# Bad input: each a clear error naming the problem.

def test_missing_config_file(unet_copy):
  os.remove(unet_copy / "config.json")
  with pytest.raises(CheckpointError, match="config.json: missing"):
    load_component(str(unet_copy))


def test_missing_weights_file(unet_copy):
  os.remove(unet_copy / "diffusion_pytorch_model.safetensors")
  with pytest.raises(CheckpointError, match="no weights found.*diffusion_pytorch_model.safetensors"):
    load_component(str(unet_copy))


def test_missing_pipeline_component(ip2p_pipeline_folder, tmp_path):
  folder = shutil.copytree(ip2p_pipeline_folder[0], tmp_path / "p")
  shutil.rmtree(folder / "vae")
  with pytest.raises(CheckpointError, match="vae/ is missing"):
    load_pipeline(str(folder))


def test_missing_shard(tmp_path):
  _torch_unet().save_pretrained(tmp_path / "u", max_shard_size="100KB")
  shard = sorted(f for f in os.listdir(tmp_path / "u") if f.endswith("-of-00002.safetensors")
                 or "-of-" in f)[0]
  os.remove(tmp_path / "u" / shard)
  with pytest.raises(CheckpointError, match=f"{shard}: listed in the shard index but missing"):
    load_component(str(tmp_path / "u"))


def test_truncated_safetensors(unet_copy):
  path = unet_copy / "diffusion_pytorch_model.safetensors"
  size = os.path.getsize(path)
  with open(path, "r+b") as f:
    f.truncate(size - 1000)
  with pytest.raises(CheckpointError, match="truncated: tensor '.*' ends at byte"):
    load_component(str(unet_copy))
  with open(path, "r+b") as f:
    f.truncate(4)
  with pytest.raises(CheckpointError, match="truncated or empty"):
    load_component(str(unet_copy))


def test_misshaped_missing_and_unexpected_tensors_are_listed(unet_copy):
  path = str(unet_copy / "diffusion_pytorch_model.safetensors")
  state = dict(safetensors.load(path))
  state["conv_in.weight"] = np.zeros((32, 5, 3, 3), np.float32)
  del state["conv_out.bias"]
  state["extra.weight"] = np.zeros(3, np.float32)
  safetensors.save(path, state)
  with pytest.raises(CheckpointError) as err:
    load_component(str(unet_copy))
  msg = str(err.value)
  assert "1 missing: conv_out.bias" in msg
  assert "1 unexpected: extra.weight" in msg
  assert "1 mis-shaped: conv_in.weight: file has (32, 5, 3, 3), model needs (32, 4, 3, 3)" in msg


@pytest.mark.parametrize("suffix", [".ckpt", ".bin"])
def test_pickle_weights_are_refused(unet_copy, suffix):
  os.remove(unet_copy / "diffusion_pytorch_model.safetensors")
  (unet_copy / f"diffusion_pytorch_model{suffix}").write_bytes(b"\x80\x04not really a pickle")
  with pytest.raises(UnsafeWeightsError, match="refusing to load pickle-based weights.*safetensors"):
    load_component(str(unet_copy))
  with pytest.raises(UnsafeWeightsError, match="--to_safetensors"):
    load_component(str(unet_copy / f"diffusion_pytorch_model{suffix}"))


def test_unsupported_config_key(unet_copy):
  config = json.load(open(unet_copy / "config.json"))
  config["addition_embed_type"] = "text_time"  # SDXL
  json.dump(config, open(unet_copy / "config.json", "w"))
  with pytest.raises(ConfigError, match="'addition_embed_type' = 'text_time' is not supported"):
    load_component(str(unet_copy))


def test_unsupported_block_type_and_unknown_key():
  with pytest.raises(ConfigError, match="down_block_types.*SimpleCrossAttnDownBlock2D"):
    module_from_config({**presets.TINY_UNET,
                        "down_block_types": ["SimpleCrossAttnDownBlock2D", "DownBlock2D"]})
  with pytest.warns(UserWarning, match="ignoring unknown config keys \\['brand_new_option'\\]"):
    module_from_config({**presets.TINY_UNET, "brand_new_option": 3})


def test_unknown_component_class():
  with pytest.raises(ConfigError, match="component class 'UNet3DConditionModel' is not supported"):
    module_from_config({"_class_name": "UNet3DConditionModel"})


def test_hub_id_offline_says_to_pass_a_folder(monkeypatch, tmp_path):
  monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty cache
  with pytest.raises(CheckpointError, match="not in the local Hugging Face cache.*local folder"):
    load_pipeline("timbrooks/instruct-pix2pix")


def test_hub_id_found_in_local_cache(unet_folder, monkeypatch, tmp_path):
  """A hub id resolves through the local cache (huggingface_hub's layout), offline."""
  monkeypatch.setenv("HF_HOME", str(tmp_path))
  monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
  repo = tmp_path / "hub" / "models--someone--tiny-unet"
  snapshot = repo / "snapshots" / ("0" * 40)
  shutil.copytree(unet_folder, snapshot)
  (repo / "refs").mkdir()
  (repo / "refs" / "main").write_text("0" * 40)
  import huggingface_hub.constants as c
  monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hub"))
  module, params = load_component("someone/tiny-unet")
  assert module.config.in_channels == 4


def test_packaged_tokenizer_gives_clip_ids():
  tok = tokenizers.load()
  assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
  ids = tokenizers.tokenize(tok, ["turn the sky red", ""])
  assert ids.shape == (2, 77) and ids.dtype == np.int32
  assert list(ids[1, :3]) == [49406, 49407, 49407]  # empty prompt: start, end, padding


def test_parameter_shapes_are_kept_beside_the_compilation_cache(tmp_path, monkeypatch):
  """``abstract_params`` traces ``init`` once per module and code version where JAX's
  persistent compilation cache is on (a CLI run's model load then skips ~1.1 s): the
  stored table gives the traced shapes and dtypes, another config gets its own entry, an
  unreadable entry is traced again, and with the cache off nothing is written."""
  import jax.numpy as jnp
  from flax import traverse_util

  from ip2p_jax.checkpoints import abstract_params, module_from_config
  flat = lambda tree: {k: (v.shape, v.dtype) for k, v in traverse_util.flatten_dict(tree).items()}
  unet = module_from_config(presets.TINY_IP2P_UNET, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
  other = module_from_config(presets.TINY_UNET)
  from ip2p_jax.checkpoints import io
  previous = jax.config.jax_compilation_cache_dir
  try:
    jax.config.update("jax_compilation_cache_dir", None)
    with monkeypatch.context() as m:  # the cache off: nothing is written
      m.setattr(io, "atomic_write", lambda *a, **k: pytest.fail("wrote a shape table"))
      traced = flat(abstract_params(unet))
    jax.config.update("jax_compilation_cache_dir", str(tmp_path))
    assert flat(abstract_params(unet)) == traced
    stored = os.listdir(tmp_path / "ip2p_param_shapes")
    assert len(stored) == 1
    with monkeypatch.context() as m:  # read back without tracing anything
      m.setattr(jax, "eval_shape", lambda *a, **k: pytest.fail("traced again"))
      again = flat(abstract_params(unet))
    assert again == traced and all(d == jnp.bfloat16 for _, d in again.values())
    assert flat(abstract_params(other)) != traced
    assert len(os.listdir(tmp_path / "ip2p_param_shapes")) == 2
    (tmp_path / "ip2p_param_shapes" / stored[0]).write_text("{not json")
    assert flat(abstract_params(unet)) == traced  # traced again, and rewritten
    assert flat(abstract_params(unet)) == traced
  finally:
    jax.config.update("jax_compilation_cache_dir", previous)
