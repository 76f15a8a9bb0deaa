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
import json
import os
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ip2p_jax import paths
from ip2p_jax.adapters import token_kv
from ip2p_jax.adapters.training import Customization
from ip2p_jax import tokenizer as tokenizers
from ip2p_jax.checkpoints import (PipelineParts, load_component, module_from_config, resolve,
                                  save_component, save_pipeline)
from ip2p_jax.diffusion import guidance, samplers, schedules
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
  load_params: Callable | None      # () -> params read from a folder (placed), or None
  frozen_modules: dict
  frozen_params: dict
  loss: Callable
  tokenizer: Any
  scheduler_config: dict
  customization: Any = None         # adapters.training.Customization (config.customize)


def _dtype(name: str):
  return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


def _dict(value) -> dict:
  return value.to_dict() if hasattr(value, "to_dict") else dict(value)


def _module_of(folder: str, **kw):
  """The module a component folder's config.json describes (its weights not read)."""
  with paths.open(os.path.join(resolve(folder), "config.json"), encoding="utf-8") as f:
    return module_from_config(json.load(f), **kw)


def _random_params(module, key):
  return module.init(key, *module.dummy_inputs())["params"]


def _random_frozen_params(module, key):
  """Random weights for a frozen encoder, in one compiled program (run op by op, the
  initialisers compiled ~200 small programs, one per shape, at every run's start)."""
  return nn.unbox(jax.jit(lambda k: _random_params(module, k))(key))


def _frozen_encoders(config, kw, place) -> tuple[dict, dict, Any]:
  """VAE and text encoder for the diffusion stages: from ``vae_from``/``text_encoder_from``
  component folders, else from ``init_from`` (a pipeline folder), else random (tests).
  Weights read from folders are placed by ``place`` shard by shard."""
  m = config.model
  modules, params = {}, {}
  tokenizer = tokenizers.load()
  if m.init_from:  # a component folder given beside it replaces the pipeline's own
    folder = resolve(m.init_from)
    for name, source in (("vae", m.vae_from), ("text_encoder", m.text_encoder_from)):
      modules[name], params[name] = load_component(source or os.path.join(folder, name),
                                                   shardings=place, **kw)
    tok_dir = os.path.join(folder, "tokenizer")
    return modules, params, tokenizers.load(tok_dir if paths.isdir(tok_dir) else None)
  for i, (name, source, preset) in enumerate((("vae", m.vae_from, m.vae),
                                              ("text_encoder", m.text_encoder_from,
                                               m.text_encoder))):
    if source:
      modules[name], params[name] = load_component(source, shardings=place, **kw)
    else:  # random frozen encoders: only for tests and smoke runs
      modules[name] = module_from_config(_dict(preset), **kw)
      params[name] = _random_frozen_params(modules[name], jax.random.key(1000 + i))
  if m.get("tokenizer_from"):
    tokenizer = tokenizers.load(m.tokenizer_from)
  return modules, params, tokenizer


def _host(x) -> np.ndarray:
  """A (possibly multi-process) array's value on this host."""
  if getattr(x, "is_fully_addressable", True):
    return np.asarray(x)
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _text_dropout(custom, rate: float) -> float:
  """The conditioning dropout of a run: none when key/value token rows train (a dropped
  instruction would still carry its tokens' mask, teaching the rows on the empty prompt
  that sampling never gives them)."""
  return 0.0 if custom is not None and custom.token_kv else rate


def build(config, place: Callable | None = None) -> Job:
  """The job of ``config.stage``. ``place`` (``module -> pytree of shardings``) puts
  weights read from folders straight onto their devices, each host reading only its
  shards; the trained UNet is read only when ``job.load_params()`` is called (not on
  resume) and each folder is read once."""
  stage = config.stage
  if stage not in STAGES:
    raise ValueError(f"config.stage must be one of {STAGES}, got {stage!r}")
  m = config.model
  kw = dict(dtype=_dtype(m.compute_dtype), param_dtype=jnp.float32)
  scheduler_config = _dict(config.scheduler)
  schedule = schedules.ScheduleConfig.from_dict(
      scheduler_config, schedules.sampler_of_scheduler_config(scheduler_config))

  custom = Customization.from_config(config)
  if custom is not None and (stage not in ("instruct_pix2pix", "text_to_image")
                             or config.data.get("latents") or config.get("eval_every")):
    raise ValueError("config.customize works on the diffusion stages' images (not a latent "
                     "cache) and without eval_every")
  if stage in ("instruct_pix2pix", "text_to_image"):
    frozen_modules, frozen_params, tokenizer = _frozen_encoders(config, kw, place)
    if custom is not None:  # new tokens: tokenizer, text-encoder rows
      frozen_modules, frozen_params, tokenizer = custom.prepare_text(
          frozen_modules, frozen_params, tokenizer)
    empty = tokenizers.tokenize(tokenizer, [""])[0]
    unet_kw = dict(kw, remat=m.remat)
    load = None
    if m.init_from:
      unet_dir = os.path.join(resolve(m.init_from), "unet")
      stored = _module_of(unet_dir, **unet_kw)
      latent = frozen_modules["vae"].config.latent_channels
      want = 2 * latent if stage == "instruct_pix2pix" else latent
      module = stored if stored.config.in_channels == want else stored.clone(
          config=dataclasses.replace(stored.config, in_channels=want))

      def load():
        _, params = load_component(unet_dir, shardings=place, **unet_kw)
        if stored.config.in_channels != want:
          params = objectives.expand_conv_in(params, want)
        return params
    else:
      module = module_from_config(_dict(m.unet), **unet_kw)
    vae, text = frozen_modules["vae"], frozen_modules["text_encoder"]
    gamma = config.get("min_snr_gamma", 0.0)
    if config.data.get("latents"):  # a latent cache: the frozen encoders never run
      empty_text = _host(text.apply({"params": frozen_params["text_encoder"]},
                                    empty[None]).last_hidden_state).astype(np.float32)
      scale = vae.config.scaling_factor
      if stage == "instruct_pix2pix":
        loss = objectives.instruct_pix2pix_cached(
            module, schedule, empty_text, scale, dropout=config.conditioning_dropout,
            min_snr_gamma=gamma, object_weight=config.get("object_weight", 0.0))
      else:
        loss = objectives.text_to_image_cached(module, schedule, empty_text, scale,
                                               caption_dropout=config.caption_dropout,
                                               min_snr_gamma=gamma)
    elif config.get("object_weight", 0.0) > 0:
      raise ValueError("object_weight reads the object masks of a latent cache: set "
                       "data.latents (scripts/build_latent_cache.py)")
    elif stage == "instruct_pix2pix":
      loss = objectives.instruct_pix2pix(module, vae, text, schedule, empty,
                                         dropout=_text_dropout(custom,
                                                               config.conditioning_dropout),
                                         min_snr_gamma=gamma)
    else:
      loss = objectives.text_to_image(module, vae, text, schedule, empty,
                                      caption_dropout=_text_dropout(custom,
                                                                    config.caption_dropout),
                                      min_snr_gamma=gamma)
    job = Job(stage, module, lambda k: _random_params(module, k), load, frozen_modules,
              frozen_params, loss, tokenizer, scheduler_config)
    return job if custom is None else custom.wrap_job(job)

  tokenizer = tokenizers.load()
  if stage == "vae":
    load = None
    if m.vae_from:  # continue a trained VAE (its config, scaling factor included)
      module = _module_of(m.vae_from, **kw)
      load = lambda: load_component(m.vae_from, shardings=place, **kw)[1]
    else:
      module = module_from_config(_dict(m.vae), **kw)
    decoder_only = config.get("vae_train", "all") == "decoder"
    if decoder_only and not m.vae_from:
      raise ValueError("vae_train='decoder' fine-tunes a trained VAE: set model.vae_from")
    loss = objectives.autoencoder(module, kl_weight=config.kl_weight,
                                  crop=config.get("vae_crop", 0),
                                  mse_weight=config.get("vae_mse_weight", 0.0),
                                  decoder_only=decoder_only)
    return Job(stage, module, lambda k: _random_params(module, k), load, {}, {}, loss,
               tokenizer, scheduler_config)
  module = module_from_config(_dict(m.clip), **kw)
  return Job(stage, module, lambda k: _random_params(module, k), None, {}, {},
             objectives.contrastive(module), tokenizer, scheduler_config)


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


def export(job: Job, params, folder, calibration_images: np.ndarray | None = None) -> str:
  """Writes the trained model in diffusers/transformers format to ``folder`` (local or a
  bucket: written locally, then copied); returns the folder. A VAE's ``scaling_factor``
  is measured on ``calibration_images`` when given."""
  with paths.local_folder(folder) as local:
    _export(job, params, local, calibration_images)
  return str(folder)


def _export(job: Job, params, folder: str, calibration_images: np.ndarray | None) -> None:
  if job.customization is not None:  # the adapter alone, not a model folder
    from ip2p_jax.adapters import files
    adapter = job.customization.adapter(job.module, params, job.frozen_params)
    files.save(os.path.join(folder, "adapter.safetensors"), adapter)
  elif job.stage in ("instruct_pix2pix", "text_to_image"):
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


def pipeline(job: Job, params):
  """The diffusion stage's pipeline over in-memory ``params`` (UNet) and the frozen
  encoders, for samples and evaluation during training."""
  from ip2p_jax.pipelines import InstructPix2PixPipeline, TextToImagePipeline
  frozen = job.frozen_params
  if job.customization is not None:
    params, frozen = job.customization.merged(params, frozen)
  parts = PipelineParts({"unet": job.module, **job.frozen_modules},
                        {"unet": params, **frozen}, job.tokenizer,
                        job.scheduler_config, {})
  cls = InstructPix2PixPipeline if job.stage == "instruct_pix2pix" else TextToImagePipeline
  return cls(parts)


SHEET_HEADERS = {"instruct_pix2pix": ("input", "target", "edit"),
                 "text_to_image": ("training image", "generated"),
                 "vae": ("input", "reconstruction")}


def sample_inputs(job: Job, examples: list[dict]) -> dict[str, np.ndarray]:
  """The arrays :func:`sampler` reads for fixed examples (decoded records at the
  training resolution): token ids and uint8 pixels."""
  if job.stage == "instruct_pix2pix":
    return {"ids": tokenizers.tokenize(job.tokenizer, [e["instruction"] for e in examples]),
            "empty": tokenizers.tokenize(job.tokenizer, [""]),
            "pixels": np.stack([e["input_image"] for e in examples])}
  if job.stage == "text_to_image":
    return {"ids": tokenizers.tokenize(job.tokenizer, [e["caption"] for e in examples]),
            "empty": tokenizers.tokenize(job.tokenizer, [""]),
            "pixels": np.stack([e["image"] for e in examples])}
  if job.stage == "vae":
    return {"pixels": np.stack([e["image"] for e in examples])}
  raise ValueError(f"stage {job.stage!r} has no sample picture")


def sampler(job: Job, steps: int, seed: int = 0, text_scale: float = 7.5,
            image_scale: float = 1.5) -> Callable:
  """``fn(params, frozen, inputs) -> float images in [0, 1]``: a pure function of the
  trained parameters, to jit once with the training run's shardings (the EMA weights
  stay sharded; nothing is gathered). IP2P edits the input with two-scale guidance,
  stage 1 generates from the caption with classifier-free guidance (both with the
  folder's sampler and the CLI's scales), the VAE reconstructs."""
  if job.stage == "vae":
    def reconstruct(params, frozen, inputs):
      del frozen
      recon, _ = job.module.apply({"params": params}, objectives.to_unit(inputs["pixels"]))
      return jnp.clip(recon.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0)
    return reconstruct
  name = schedules.sampler_of_scheduler_config(job.scheduler_config)
  schedule = schedules.ScheduleConfig.from_dict(job.scheduler_config, name)
  levels = schedules.noise_levels(schedule, name, steps)
  vae, text_encoder = job.frozen_modules["vae"], job.frozen_modules["text_encoder"]

  def run(params, frozen, inputs):
    rows = None
    if job.customization is not None:
      rows = job.customization.token_rows(params, frozen)
      params, frozen = job.customization.merged(params, frozen)

    def encode(ids):
      states = text_encoder.apply({"params": frozen["text_encoder"]},
                                  ids).last_hidden_state.astype(job.module.dtype)
      return states if rows is None else token_kv.with_mask(states, ids, rows[1])
    text = encode(inputs["ids"])
    empty = jnp.broadcast_to(encode(inputs["empty"]), text.shape)
    b = text.shape[0]
    scale = lambda s: jnp.full((b,), s, jnp.float32)
    network = lambda x, t, ctx: job.module.apply({"params": params}, x, t, ctx)
    if rows is not None:  # key/value token rows where the new tokens sit (as the pipelines)
      network = token_kv.reading_mask(network, rows[0], rows[1].shape[0])
    size = inputs["pixels"].shape[1] // (2 ** (len(vae.config.block_out_channels) - 1))
    if job.stage == "instruct_pix2pix":
      image = vae.apply({"params": frozen["vae"]}, objectives.to_unit(inputs["pixels"]),
                        method="encode").mode().astype(jnp.float32)
      denoiser = guidance.instruct_pix2pix(network, schedule.prediction_type, text, empty,
                                           image, scale(text_scale), scale(image_scale))
    else:
      denoiser = guidance.classifier_free(network, schedule.prediction_type, text, empty,
                                          scale(text_scale))
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(seed), i))(jnp.arange(b))
    noise = jax.vmap(lambda k: jax.random.normal(
        jax.random.fold_in(k, 0), (size, size, vae.config.latent_channels)))(keys)
    step_keys = jax.vmap(lambda k: jax.random.fold_in(k, 1))(keys)
    x = samplers.SAMPLER_FNS[name](denoiser, noise * levels.init_noise_sigma, levels, step_keys)
    z = x * levels.final_scale / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)
    images = vae.apply({"params": frozen["vae"]}, z, method="decode")
    return jnp.clip(images.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0)
  return run


def sheet(stage: str, examples: list[dict], outputs: np.ndarray,
          headers: tuple[str, ...] | None = None):
  """A labelled PIL picture of what the model does on fixed examples: a header row
  naming the columns (``headers``, default by stage), then per example its text
  (instruction or caption) above the images (input | target | edit; training image |
  generated; input | reconstruction)."""
  from PIL import Image, ImageDraw
  headers = headers or SHEET_HEADERS[stage]
  outputs = (np.asarray(outputs) * 255).round().astype(np.uint8)
  rows = []
  for e, out in zip(examples, outputs):
    if stage == "instruct_pix2pix":
      rows.append((e["instruction"], [e["input_image"], e["edited_image"], out]))
    elif stage == "text_to_image":
      rows.append((e["caption"], [e["image"], out]))
    else:
      rows.append(("", [e["image"], out]))
  size = rows[0][1][0].shape[0]
  cell, text_h, pad = max(size, 96), 14, 4
  width = len(headers) * (cell + pad) + pad
  height = text_h + pad + len(rows) * (cell + text_h + pad) + pad
  canvas = Image.new("RGB", (width, height), "white")
  draw = ImageDraw.Draw(canvas)
  for j, title in enumerate(headers):
    draw.text((pad + j * (cell + pad), 2), title, fill="black")
  y = text_h + pad
  chars = max(8, width // 6)
  for text, images in rows:
    draw.text((pad, y), text if len(text) <= chars else text[:chars - 3] + "...", fill="black")
    y += text_h
    for j, im in enumerate(images):
      tile = Image.fromarray(np.asarray(im)).resize((cell, cell), Image.Resampling.NEAREST)
      canvas.paste(tile, (pad + j * (cell + pad), y))
    y += cell + pad
  return canvas
