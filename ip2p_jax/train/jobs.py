"""What each training stage trains, on what, and how it is judged: the models, the
initial parameters, the objective, the data kind, sample images and the export.

Stages (``config.stage``):
  * ``instruct_pix2pix``: the UNet (8 input channels) on triplets; VAE and text
    encoder frozen. Initialised from ``config.model.init_from`` (a stage-1 export or
    any SD-format folder; ``conv_in`` expanded 4 -> 8) or from scratch.
  * ``text_to_image``: the UNet (4 channels) on image-caption pairs; VAE and text
    encoder frozen (from ``init_from`` or the component folders).
  * ``vae``: the autoencoder on images.
  * ``clip``: both CLIP towers, contrastively, on image-caption pairs.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ip2p_jax import tokenizer as tokenizers
from ip2p_jax.checkpoints import (PipelineParts, load_component, load_pipeline,
                                  module_from_config, save_component, save_pipeline)
from ip2p_jax.diffusion import schedules
from ip2p_jax.models import CLIPTextModel
from ip2p_jax.train import objectives

STAGES = ("instruct_pix2pix", "text_to_image", "vae", "clip")
# Data kind per stage: which image fields are augmented together and which text is tokenized.
DATA = {
    "instruct_pix2pix": (("input_image", "edited_image"), "instruction"),
    "text_to_image": (("image",), "caption"),
    "vae": (("image",), "caption"),
    "clip": (("image",), "caption"),
}


@dataclasses.dataclass
class Job:
  stage: str
  module: Any                       # the trained Flax module
  init_params: Callable             # key -> params (boxed with logical axes) or None
  loaded_params: Any                # params read from a folder, or None
  frozen_modules: dict
  frozen_params: dict
  loss: Callable
  tokenizer: Any
  scheduler_config: dict


def _dtype(name: str):
  return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


def _dict(value) -> dict:
  return value.to_dict() if hasattr(value, "to_dict") else dict(value)


def _random_params(module, key):
  return module.init(key, *module.dummy_inputs())["params"]


def _frozen_encoders(config, kw) -> tuple[dict, dict, Any]:
  """VAE and text encoder for the diffusion stages: from ``init_from`` (a pipeline
  folder), from ``vae_from``/``text_encoder_from`` component folders, or random (tests)."""
  m = config.model
  modules, params = {}, {}
  tokenizer = tokenizers.load()
  if m.init_from:
    parts = load_pipeline(m.init_from, **kw)
    tokenizer = parts.tokenizer
    for name in ("vae", "text_encoder"):
      modules[name], params[name] = parts.modules[name], parts.params[name]
    return modules, params, tokenizer
  for i, (name, source, preset) in enumerate((("vae", m.vae_from, m.vae),
                                              ("text_encoder", m.text_encoder_from,
                                               m.text_encoder))):
    if source:
      modules[name], params[name] = load_component(source, **kw)
    else:  # random frozen encoders: only for tests and smoke runs
      modules[name] = module_from_config(_dict(preset), **kw)
      params[name] = nn.unbox(_random_params(modules[name], jax.random.key(1000 + i)))
  if m.get("tokenizer_from"):
    tokenizer = tokenizers.load(m.tokenizer_from)
  return modules, params, tokenizer


def build(config) -> Job:
  stage = config.stage
  if stage not in STAGES:
    raise ValueError(f"config.stage must be one of {STAGES}, got {stage!r}")
  m = config.model
  kw = dict(dtype=_dtype(m.compute_dtype), param_dtype=jnp.float32)
  scheduler_config = _dict(config.scheduler)
  schedule = schedules.ScheduleConfig.from_dict(
      scheduler_config, schedules.sampler_of_scheduler_config(scheduler_config))

  if stage in ("instruct_pix2pix", "text_to_image"):
    frozen_modules, frozen_params, tokenizer = _frozen_encoders(config, kw)
    empty = tokenizers.tokenize(tokenizer, [""])[0]
    unet_kw = dict(kw, remat=m.remat)
    loaded = None
    if m.init_from:
      parts = load_pipeline(m.init_from, **unet_kw)
      module, loaded = parts.modules["unet"], parts.params["unet"]
      latent = frozen_modules["vae"].config.latent_channels
      want = 2 * latent if stage == "instruct_pix2pix" else latent
      if module.config.in_channels != want:
        loaded = objectives.expand_conv_in(loaded, want)
        module = module.clone(config=dataclasses.replace(module.config, in_channels=want))
    else:
      module = module_from_config(_dict(m.unet), **unet_kw)
    vae, text = frozen_modules["vae"], frozen_modules["text_encoder"]
    gamma = config.get("min_snr_gamma", 0.0)
    if config.data.get("latents"):  # a latent cache: the frozen encoders never run
      empty_text = np.asarray(text.apply({"params": frozen_params["text_encoder"]},
                                         empty[None]).last_hidden_state, np.float32)
      scale = vae.config.scaling_factor
      if stage == "instruct_pix2pix":
        loss = objectives.instruct_pix2pix_cached(module, schedule, empty_text, scale,
                                                  dropout=config.conditioning_dropout,
                                                  min_snr_gamma=gamma)
      else:
        loss = objectives.text_to_image_cached(module, schedule, empty_text, scale,
                                               caption_dropout=config.caption_dropout,
                                               min_snr_gamma=gamma)
    elif stage == "instruct_pix2pix":
      loss = objectives.instruct_pix2pix(module, vae, text, schedule, empty,
                                         dropout=config.conditioning_dropout,
                                         min_snr_gamma=gamma)
    else:
      loss = objectives.text_to_image(module, vae, text, schedule, empty,
                                      caption_dropout=config.caption_dropout,
                                      min_snr_gamma=gamma)
    return Job(stage, module, lambda k: _random_params(module, k), loaded, frozen_modules,
               frozen_params, loss, tokenizer, scheduler_config)

  tokenizer = tokenizers.load()
  if stage == "vae":
    module = module_from_config(_dict(m.vae), **kw)
    loss = objectives.autoencoder(module, kl_weight=config.kl_weight,
                                  crop=config.get("vae_crop", 0),
                                  mse_weight=config.get("vae_mse_weight", 0.0))
  else:
    module = module_from_config(_dict(m.clip), **kw)
    loss = objectives.contrastive(module)
  return Job(stage, module, lambda k: _random_params(module, k), None, {}, {}, loss, tokenizer,
             scheduler_config)


def latent_scaling_factor(vae, params, images: np.ndarray, seed: int = 0) -> float:
  """``1 / std`` of the VAE's posterior samples of ``images`` (uint8 [N, H, W, 3]):
  latent diffusion's scale factor (Rombach et al. 2022, Sec. 4.3.2 and Appendix G),
  which gives the diffusion model unit-variance latents. SD's 0.18215 is this number
  for SD's VAE on its data; a VAE trained here has its own."""
  encode = jax.jit(lambda x, k: vae.apply({"params": params}, objectives.to_unit(x),
                                          method="encode").sample(k))
  samples = [np.asarray(encode(images[i:i + 64], jax.random.key(seed + i)))
             for i in range(0, len(images), 64)]
  return float(1.0 / np.concatenate(samples).std())


def export(job: Job, params, folder: str, calibration_images: np.ndarray | None = None) -> str:
  """Writes the trained model in diffusers/transformers format; returns the folder. A
  VAE's ``scaling_factor`` is measured on ``calibration_images`` when given."""
  if job.stage in ("instruct_pix2pix", "text_to_image"):
    cls = ("StableDiffusionInstructPix2PixPipeline" if job.stage == "instruct_pix2pix"
           else "StableDiffusionPipeline")
    parts = PipelineParts({"unet": job.module, **job.frozen_modules},
                          {"unet": params, **job.frozen_params}, job.tokenizer,
                          job.scheduler_config, {"_class_name": cls})
    save_pipeline(folder, parts)
  else:
    name = "vae" if job.stage == "vae" else "clip"
    module = job.module
    if job.stage == "vae" and calibration_images is not None:
      scale = latent_scaling_factor(module, params, calibration_images)
      module = module.clone(config=dataclasses.replace(module.config, scaling_factor=scale))
    save_component(os.path.join(folder, name), module, params)
    job.tokenizer.save_pretrained(os.path.join(folder, "tokenizer"))
    if job.stage == "clip":  # the text tower alone, to condition a UNet
      text = CLIPTextModel(job.module.config.text_config)
      save_component(os.path.join(folder, "text_encoder"), text,
                     {"text_model": params["text_model"]})
  return folder


def pipeline(job: Job, params):
  """The diffusion stage's pipeline over in-memory ``params`` (UNet) and the frozen
  encoders, for samples and evaluation during training."""
  from ip2p_jax.pipelines import InstructPix2PixPipeline, TextToImagePipeline
  parts = PipelineParts({"unet": job.module, **job.frozen_modules},
                        {"unet": params, **job.frozen_params}, job.tokenizer,
                        job.scheduler_config, {})
  cls = InstructPix2PixPipeline if job.stage == "instruct_pix2pix" else TextToImagePipeline
  return cls(parts)


def samples(job: Job, params, examples: list[dict], steps: int, seed: int = 0) -> np.ndarray:
  """A picture of what the model does on fixed examples (rows), as uint8 [H, W, 3]:
  IP2P input | target | edit; text-to-image generations; VAE input | reconstruction."""
  if job.stage == "instruct_pix2pix":
    pipe = pipeline(job, params)
    out = pipe([e["instruction"] for e in examples], [e["input_image"] for e in examples],
               num_inference_steps=steps, seed=seed, output_type="np").images
    rows = [np.concatenate([e["input_image"], e["edited_image"],
                            (o * 255).round().astype(np.uint8)], 1) for e, o in zip(examples, out)]
  elif job.stage == "text_to_image":
    pipe = pipeline(job, params)
    size = examples[0]["image"].shape[0]
    out = pipe([e["caption"] for e in examples], height=size, width=size,
               num_inference_steps=steps, seed=seed, output_type="np").images
    rows = [np.concatenate([e["image"], (o * 255).round().astype(np.uint8)], 1)
            for e, o in zip(examples, out)]
  elif job.stage == "vae":
    x = np.stack([e["image"] for e in examples]).astype(np.float32) / 127.5 - 1
    recon, _ = job.module.apply({"params": params}, x)
    recon = ((np.asarray(recon) + 1) * 127.5).clip(0, 255).round().astype(np.uint8)
    rows = [np.concatenate([e["image"], r], 1) for e, r in zip(examples, recon)]
  else:
    raise ValueError(f"stage {job.stage!r} has no sample picture")
  return np.concatenate(rows, 0)
