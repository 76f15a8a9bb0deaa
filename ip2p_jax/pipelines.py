"""InstructPix2Pix editing and text-to-image generation, each one jitted function.

    pipe = InstructPix2PixPipeline.from_pretrained("path/to/instruct-pix2pix")
    out = pipe("make it snowy", [img1, img2], num_inference_steps=20, seed=0)
    out.images  # PIL images

Inside one ``jax.jit`` per (sampler, step count, guidance, shapes): each distinct
instruction is encoded once, the images are VAE-encoded (posterior mode,
unscaled), a ``lax.scan`` sampler runs with guidance as a denoiser wrapper, and
the result is decoded. Image ``k``'s noise comes from ``fold_in(key(seed), k)``
(``k`` = its position in the caller's list, or ``image_ids``), so it never
depends on batch composition. With several local devices the image batch is
split over a ``data`` mesh axis; multi-host runs edit one slice per process.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ip2p_jax import bundled
from ip2p_jax import images as imagelib
from ip2p_jax import sharding
from ip2p_jax import tokenizer as tokenizers
from ip2p_jax.checkpoints import PipelineParts, load_pipeline, save_pipeline
from ip2p_jax.diffusion import guidance, samplers, schedules


@dataclasses.dataclass
class PipelineOutput:
  images: Any  # list of PIL images, or float32 [B, H, W, 3] in [0, 1]


def _as_list(x, n: int | None = None) -> list:
  if isinstance(x, (list, tuple)):
    return list(x)
  return [x] * (n or 1)


class _Pipeline:
  """Shared by both pipelines: components, schedules, sharding and the jit cache."""

  def __init__(self, parts: PipelineParts):
    self.parts = parts
    self.unet = parts.modules["unet"]
    self.vae = parts.modules["vae"]
    self.text_encoder = parts.modules["text_encoder"]
    self.params = parts.params
    self.tokenizer = parts.tokenizer
    self.scheduler_config = dict(parts.scheduler_config)
    self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
    self._compiled: dict = {}
    self._mesh = Mesh(np.array(jax.local_devices()), ("data",))
    self._device_params = None

  @classmethod
  def from_pretrained(cls, path: str | None = None, *, dtype: Any = jnp.float32,
                      param_dtype: Any = jnp.float32, **unet_kwargs):
    """A diffusers-format folder, or a hub id already in the local Hugging Face cache;
    no ``path``: the model bundled with the package (``ip2p_jax.bundled``)."""
    kw = dict(dtype=dtype, param_dtype=param_dtype, **unet_kwargs)
    if path is None:
      return cls(cls._bundled(**kw))
    return cls(load_pipeline(path, **kw))

  def set_params(self, params) -> None:
    """Swaps in new parameters of the same shapes (a training run's EMA, for its held-out
    evaluation); the compiled functions are kept."""
    self.params = params
    self._device_params = None

  def save_pretrained(self, path: str) -> None:
    save_pipeline(path, dataclasses.replace(self.parts, params=self.params,
                                            scheduler_config=self.scheduler_config))

  # -- schedules -----------------------------------------------------------------

  def sampler_and_levels(self, scheduler: str | None, num_steps: int):
    name = scheduler or schedules.sampler_of_scheduler_config(self.scheduler_config)
    config = schedules.ScheduleConfig.from_dict(self.scheduler_config, name)
    return name, config, schedules.noise_levels(config, name, num_steps)

  def _sample(self, name, config, levels, denoiser, x, keys, eta):
    fn = samplers.SAMPLER_FNS[name]
    if name == "ddim":
      return fn(denoiser, x, levels, keys, eta=eta,
                clip_sample=config.clip_sample_range if config.clip_sample else None)
    return fn(denoiser, x, levels, keys)

  # -- pieces used inside the jitted functions -----------------------------------------

  def _network(self, params):
    return lambda x, t, ctx: self.unet.apply({"params": params["unet"]}, x, t, ctx)

  def _encode_text(self, params, ids):
    out = self.text_encoder.apply({"params": params["text_encoder"]}, ids)
    return out.last_hidden_state.astype(self.unet.dtype)

  def _decode(self, params, latents):
    cfg = self.vae.config
    z = latents / cfg.scaling_factor + (cfg.shift_factor or 0.0)
    images = self.vae.apply({"params": params["vae"]}, z, method="decode")
    return jnp.clip(images.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0)

  @staticmethod
  def _keys(seed, image_ids):
    base = jax.random.key(seed)
    image_keys = jax.vmap(lambda i: jax.random.fold_in(base, i))(image_ids)
    init = jax.vmap(lambda k: jax.random.fold_in(k, 0))(image_keys)
    steps = jax.vmap(lambda k: jax.random.fold_in(k, 1))(image_keys)
    return init, steps

  @staticmethod
  def _initial_noise(init_keys, shape, dtype):
    return jax.vmap(lambda k: jax.random.normal(k, shape, dtype))(init_keys)

  # -- sharding ------------------------------------------------------------------

  def _shard(self, batch_arrays: dict, replicated: dict):
    """Pads the batch to a multiple of the local device count and places it on the mesh."""
    n = len(jax.local_devices())
    size = len(next(iter(batch_arrays.values())))
    pad = (-size) % n
    placed = {}
    for k, v in batch_arrays.items():
      if v is None:
        placed[k] = None
        continue
      v = np.asarray(v)
      if pad:
        v = np.concatenate([v, np.repeat(v[-1:], pad, axis=0)])
      placed[k] = jax.device_put(v, NamedSharding(self._mesh, P("data")))
    for k, v in replicated.items():
      placed[k] = jax.device_put(v, NamedSharding(self._mesh, P()))
    if self._device_params is None:
      self._device_params = jax.device_put(self.params, NamedSharding(self._mesh, P()))
    return placed, size

  def _jit_once(self, key, fn):
    """One jitted function per (job, sampler, schedule, guidance, ...) key; jax.jit then
    compiles it once per input shape."""
    if key not in self._compiled:
      self._compiled[key] = jax.jit(fn)
    return self._compiled[key]

  def _run(self, fn, *args):
    """Runs a compiled function under the pipeline's own mesh and axis rules (also when
    called from inside a training run's mesh)."""
    with jax.set_mesh(self._mesh), nn.logical_axis_rules(sharding.INFERENCE_RULES):
      return fn(*args)

  @staticmethod
  def _image_ids(image_ids, n: int) -> np.ndarray:
    """Each image's noise index: its list position unless the caller gives them."""
    if image_ids is None:
      return np.arange(n, dtype=np.int32)
    ids = np.asarray(image_ids, np.int32)
    if ids.shape != (n,):
      raise ValueError(f"image_ids must give one index per image ({n}), got shape {ids.shape}")
    return ids

  def _tokens(self, prompts: Sequence[str]):
    unique = list(dict.fromkeys(prompts))
    index = np.array([unique.index(p) for p in prompts], np.int32)
    return tokenizers.tokenize(self.tokenizer, unique), index

  @staticmethod
  def _finish(result, size, output_type):
    result = np.asarray(jax.device_get(result))[:size]
    if output_type == "np":
      return PipelineOutput(result)
    if output_type == "pil":
      return PipelineOutput(imagelib.to_pil(result))
    raise ValueError(f"output_type must be 'pil' or 'np', got {output_type!r}")


class InstructPix2PixPipeline(_Pipeline):
  """Edits images by instructions (Brooks, Holynski & Efros 2023)."""

  _bundled = staticmethod(lambda **kw: load_pipeline(bundled.editor_path(), **kw))

  def __call__(self, prompt: str | Sequence[str], image, *, num_inference_steps: int = 100,
               guidance_scale: float | Sequence[float] = 7.5,
               image_guidance_scale: float | Sequence[float] = 1.5, seed: int = 0,
               latents: np.ndarray | None = None, scheduler: str | None = None,
               output_type: str = "pil", eta: float = 0.0,
               image_ids: Sequence[int] | None = None) -> PipelineOutput:
    """Edits ``image`` (PIL, array, or a list of them, all one size) by ``prompt``
    (one instruction for all, or one per image). ``latents``: diffusers' meaning,
    unit-variance initial noise [B, h, w, 4] (NHWC), scaled by the sampler's
    initial sigma. Scales may be per image (lists)."""
    pixels = self._pixels(image)
    b = len(pixels)
    prompts = _as_list(prompt, b)
    if len(prompts) == 1 and b > 1:
      prompts = prompts * b
    if len(prompts) != b:
      raise ValueError(f"got {len(prompts)} prompts for {b} images")
    text_scale = np.broadcast_to(np.asarray(guidance_scale, np.float32), (b,)).copy()
    image_scale = np.broadcast_to(np.asarray(image_guidance_scale, np.float32), (b,)).copy()
    # diffusers guides only when text scale > 1 and image scale >= 1; (1, 1) is the
    # unguided prediction exactly.
    off = ~((text_scale > 1.0) & (image_scale >= 1.0))
    text_scale[off], image_scale[off] = 1.0, 1.0
    guided = bool((~off).any())
    name, config, levels = self.sampler_and_levels(scheduler, num_inference_steps)
    ids, index = self._tokens(prompts)
    empty = tokenizers.tokenize(self.tokenizer, [""])
    image_ids = self._image_ids(image_ids, b)
    if latents is not None:
      latents = np.asarray(latents, np.float32)
    placed, size = self._shard(
        dict(pixels=pixels, index=index, image_ids=image_ids, latents=latents,
             text_scale=text_scale, image_scale=image_scale),
        dict(ids=ids, empty=empty, seed=np.uint32(seed)))
    fn = self._edit_fn(name, config, levels, guided, latents is not None, float(eta))
    result = self._run(fn, self._device_params, placed["ids"], placed["empty"], placed["index"],
                placed["pixels"], placed["seed"], placed["image_ids"], placed["latents"],
                placed["text_scale"], placed["image_scale"])
    return self._finish(result, size, output_type)

  def _pixels(self, image) -> np.ndarray:
    pixels = imagelib.to_array(image)
    h, w = pixels.shape[1:3]
    f = self.vae_scale_factor
    if h % f or w % f:
      raise imagelib.ImageError(
          f"image size {w}x{h} is not a multiple of {f} (the VAE's downsampling); prepare it "
          f"with ip2p_jax.images.prepare(image, resolution, mode='fit'|'crop'|'resize')")
    return pixels

  def _edit_fn(self, name, config, levels, guided, has_latents, eta):
    def edit(params, ids, empty_ids, index, pixels, seed, image_ids, latents, text_scale,
             image_scale):
      encoded = self._encode_text(params, jnp.concatenate([ids, empty_ids]))
      text = encoded[:-1][index]
      empty = jnp.broadcast_to(encoded[-1:], text.shape)
      posterior = self.vae.apply({"params": params["vae"]}, pixels.astype(self.vae.dtype),
                                 method="encode")
      image_latents = posterior.mode().astype(jnp.float32)
      init_keys, step_keys = self._keys(seed, image_ids)
      if latents is None:
        shape = image_latents.shape[1:-1] + (self.vae.config.latent_channels,)
        latents = self._initial_noise(init_keys, shape, jnp.float32)
      network = self._network(params)
      if guided:
        denoiser = guidance.instruct_pix2pix(network, config.prediction_type, text, empty,
                                             image_latents, text_scale, image_scale)
      else:
        denoiser = guidance.image_conditioned(network, config.prediction_type, text,
                                              image_latents)
      x = self._sample(name, config, levels, denoiser, latents * levels.init_noise_sigma,
                       step_keys, eta)
      return self._decode(params, x * levels.final_scale)

    return self._jit_once(("edit", name, config, levels.num_steps, guided, has_latents, eta,
                           levels.sigmas.tobytes()), edit)


class TextToImagePipeline(_Pipeline):
  _bundled = staticmethod(lambda **kw: bundled.load_text_to_image(**kw))

  """Stable Diffusion text-to-image with classifier-free guidance."""

  def __call__(self, prompt: str | Sequence[str], *, height: int | None = None,
               width: int | None = None, num_inference_steps: int = 50,
               guidance_scale: float | Sequence[float] = 7.5,
               negative_prompt: str | Sequence[str] | None = None, seed: int = 0,
               latents: np.ndarray | None = None, scheduler: str | None = None,
               output_type: str = "pil", eta: float = 0.0,
               image_ids: Sequence[int] | None = None) -> PipelineOutput:
    prompts = _as_list(prompt)
    b = len(prompts)
    negatives = _as_list(negative_prompt if negative_prompt is not None else "", b)
    if len(negatives) != b:
      raise ValueError(f"got {len(negatives)} negative prompts for {b} prompts")
    f = self.vae_scale_factor
    default = (self.unet.config.sample_size or 64) * f
    height, width = height or default, width or default
    if height % f or width % f:
      raise ValueError(f"height and width must be multiples of {f}, got {height}x{width}")
    scale = np.broadcast_to(np.asarray(guidance_scale, np.float32), (b,)).copy()
    scale[scale <= 1.0] = 1.0
    guided = bool((scale > 1.0).any())
    name, config, levels = self.sampler_and_levels(scheduler, num_inference_steps)
    ids, index = self._tokens(prompts + negatives)
    image_ids = self._image_ids(image_ids, b)
    if latents is not None:
      latents = np.asarray(latents, np.float32)
    placed, size = self._shard(
        dict(index=index[:b], negative_index=index[b:], image_ids=image_ids, latents=latents,
             scale=scale),
        dict(ids=ids, seed=np.uint32(seed)))
    fn = self._generate_fn(name, config, levels, guided, latents is not None, float(eta),
                           (height // f, width // f))
    result = self._run(fn, self._device_params, placed["ids"], placed["index"], placed["negative_index"],
                placed["seed"], placed["image_ids"], placed["latents"], placed["scale"])
    return self._finish(result, size, output_type)

  def _generate_fn(self, name, config, levels, guided, has_latents, eta, latent_size):
    def generate(params, ids, index, negative_index, seed, image_ids, latents, scale):
      encoded = self._encode_text(params, ids)
      text, negative = encoded[index], encoded[negative_index]
      init_keys, step_keys = self._keys(seed, image_ids)
      if latents is None:
        shape = latent_size + (self.unet.config.out_channels,)
        latents = self._initial_noise(init_keys, shape, jnp.float32)
      network = self._network(params)
      if guided:
        denoiser = guidance.classifier_free(network, config.prediction_type, text, negative, scale)
      else:
        denoiser = guidance.text_conditioned(network, config.prediction_type, text)
      x = self._sample(name, config, levels, denoiser, latents * levels.init_noise_sigma,
                       step_keys, eta)
      return self._decode(params, x * levels.final_scale)

    return self._jit_once(("t2i", name, config, levels.num_steps, guided, has_latents, eta,
                           latent_size, levels.sigmas.tobytes()), generate)
