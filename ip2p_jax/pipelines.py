"""InstructPix2Pix editing and text-to-image generation, diffusers' pipeline arguments.

    pipe = InstructPix2PixPipeline.from_pretrained("path/to/instruct-pix2pix")
    out = pipe("make it snowy", ["a.jpg", img2], num_inference_steps=20, seed=0)
    out.images  # PIL images, each the size of its input

(Images of one call must pad to the same size; ``resolution=`` with ``resize="crop"``
or ``"resize"`` makes any set so.)

The prompts are encoded once per distinct text (:meth:`encode_prompt`); then one
``jax.jit`` per (sampler, step count, guidance, shapes) VAE-encodes the images
(posterior mode, unscaled), runs a ``lax.scan`` sampler with guidance as a denoiser
wrapper, and decodes. Image ``k``'s noise comes from ``fold_in(key(seed), k)`` (``k`` =
its position in the caller's list, or ``image_ids``), so it never depends on batch
composition. A per-step ``callback`` and the progress bar are host callbacks inside that
loop. With several local devices the image batch is split over a ``data`` mesh axis
(this process's devices only); on several hosts ``ip2p_jax.editing`` (``ip2p edit``)
gives each process its own slice of the inputs.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from PIL import Image

from ip2p_jax import bundled
from ip2p_jax import compilation
from ip2p_jax import images as imagelib
from ip2p_jax import sharding
from ip2p_jax import tokenizer as tokenizers
from ip2p_jax.adapters import token_kv
from ip2p_jax.checkpoints import PipelineParts, load_pipeline, save_pipeline
from ip2p_jax.diffusion import guidance, samplers, schedules

DEFAULT_STEPS = schedules.DEFAULT_STEPS
OUTPUT_TYPES = ("pil", "np", "latent")


@dataclasses.dataclass
class PipelineOutput:
  images: Any  # PIL images; float32 [B, H, W, 3] in [0, 1] ("np"); latents [B, h, w, C]


class ModelKindError(ValueError):
  """A folder of the wrong kind for the pipeline (a text-to-image UNet given to the editor)."""


def check_editor(unet_config, vae_config, folder: str = "") -> None:
  """Refuses a text-to-image UNet for editing: InstructPix2Pix's UNet reads the noisy latent
  and the image latent, twice the VAE's latent channels."""
  latent = vae_config.latent_channels
  if unet_config.in_channels != 2 * latent:
    where = f"{folder}: " if folder else ""
    kind = ("this is a text-to-image model" if unet_config.in_channels == latent
            else "this is not an InstructPix2Pix model")
    raise ModelKindError(
        f"{where}{kind} (UNet in_channels {unet_config.in_channels}; an InstructPix2Pix UNet "
        f"reads {2 * latent}: the noisy latent and the image latent). Edit with an "
        "InstructPix2Pix folder (e.g. timbrooks/instruct-pix2pix); generate with "
        "TextToImagePipeline")


def _as_list(x, n: int | None = None) -> list:
  if isinstance(x, (list, tuple)):
    return list(x)
  return [x] * (n or 1)


def _to_jnp_dtype(dtype):
  """A JAX/numpy dtype, its name, or a torch dtype (``torch.float16``) -> a jnp dtype."""
  if dtype is None:
    return jnp.float32
  try:
    return jnp.dtype(dtype)
  except TypeError:
    pass
  try:
    return jnp.dtype(str(dtype).removeprefix("torch."))
  except TypeError:
    raise ValueError(f"unknown dtype {dtype!r}; use jnp.float32, jnp.bfloat16 or "
                     "jnp.float16 (or their names)") from None


class _Progress:
  """The host side of the per-step callbacks: a tqdm bar, the user's ``callback`` and
  ``callback_on_step_end``. The first exception a callback raises is kept (later steps
  skip the callbacks) and re-raised once the compiled loop has finished."""

  def __init__(self, total: int, size: int, bar: dict | None, callback, every: int,
               on_step_end=None, pipe=None):
    self.size, self.callback, self.every = size, callback, max(1, every)
    self.on_step_end, self.pipe = on_step_end, pipe
    self.error: Exception | None = None
    self.bar = None
    if bar is not None:
      from tqdm.auto import tqdm
      self.bar = tqdm(total=total, **bar)

  def __call__(self, step, timestep, latents):
    step = int(step)
    if self.bar is not None:
      self.bar.update(1)
    if self.error is not None:
      return
    try:
      if self.callback is None and self.on_step_end is None:
        return
      latents = np.asarray(latents)[:self.size]
      if self.callback is not None and step % self.every == 0:  # diffusers: i % callback_steps
        self.callback(step, float(timestep), latents)
      if self.on_step_end is not None:
        self._step_end(step, float(timestep), latents)
    except Exception as e:  # noqa: BLE001 - re-raised after the loop
      self.error = e

  def _step_end(self, step, timestep, latents):
    given = {"latents": latents}
    out = self.on_step_end(self.pipe, step, timestep, given)
    if out is None:
      return
    if not isinstance(out, dict):
      raise TypeError("callback_on_step_end must return a dict (diffusers' convention: the "
                      f"callback_kwargs it was given), got {type(out).__name__}")
    returned = out.get("latents", latents)
    if returned is not latents and not np.array_equal(np.asarray(returned), latents):
      raise ValueError(
          "callback_on_step_end returned changed latents: the sampling loop runs compiled "
          "(jax.jit + lax.scan), where a callback reads the latents but cannot replace "
          "them; return the callback_kwargs unchanged (or None)")
    changed = sorted(set(out) - {"latents"})
    if changed:
      raise ValueError(f"callback_on_step_end returned {changed}: only 'latents' is passed "
                       "to it, and it cannot be replaced")

  def close(self):
    if self.bar is not None:
      self.bar.close()


CALLBACK_TENSOR_INPUTS = ("latents",)


def _tensor_inputs(on_step_end, tensor_inputs) -> None:
  """Checks ``callback_on_step_end_tensor_inputs`` (or a diffusers ``PipelineCallback``'s
  ``tensor_inputs``): the latents only."""
  if on_step_end is None:
    return
  if not callable(on_step_end):
    raise TypeError(f"callback_on_step_end must be callable, got {type(on_step_end).__name__}")
  names = getattr(on_step_end, "tensor_inputs", None) or tensor_inputs
  names = [names] if isinstance(names, str) else list(names)
  bad = [n for n in names if n not in CALLBACK_TENSOR_INPUTS]
  if bad:
    raise ValueError(f"callback_on_step_end_tensor_inputs {bad} are not available: the "
                     f"callback gets {list(CALLBACK_TENSOR_INPUTS)} (read-only) from the "
                     "compiled loop")


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
    self._progress_bar = dict(disable=False, unit="step", dynamic_ncols=True)
    self._host_step = None

  @classmethod
  def from_pretrained(cls, path: str | None = None, *, dtype: Any = None,
                      param_dtype: Any = None, torch_dtype: Any = None,
                      compilation_cache: bool = True, **unet_kwargs):
    """A diffusers-format folder, or a hub id already in the local Hugging Face cache;
    no ``path``: the model bundled with the package (``ip2p_jax.bundled``).

    ``dtype``: compute dtype; ``param_dtype``: the weights' (both float32 by default).
    ``torch_dtype`` (diffusers' name) sets both. ``compilation_cache``: JAX's persistent
    compilation cache (``ip2p_jax.compilation``), on unless False or
    ``IP2P_COMPILATION_CACHE=off``."""
    if torch_dtype is not None:
      if dtype is not None or param_dtype is not None:
        raise ValueError("pass torch_dtype or dtype/param_dtype, not both")
      dtype = param_dtype = torch_dtype
    kw = dict(dtype=_to_jnp_dtype(dtype), param_dtype=_to_jnp_dtype(param_dtype), **unet_kwargs)
    if compilation_cache:
      compilation.enable_compilation_cache()
    if path is None:
      return cls(cls._bundled(**kw))
    return cls(load_pipeline(os.fspath(path), **kw))

  def set_params(self, params) -> None:
    """Swaps in new parameters of the same shapes (a training run's EMA, for its held-out
    evaluation); the compiled functions are kept."""
    self.params = params
    self._device_params = None

  def load_adapter(self, path: str, scale: float = 1.0, *, check_base: bool = True) -> None:
    """Applies a LoRA or Custom Diffusion adapter file (ours, or a diffusers UNet LoRA)
    at ``scale``; several add up. An adapter for another base is an error
    (``ip2p_jax.adapters``)."""
    from ip2p_jax import adapters
    adapters.load_into(self, os.fspath(path), scale, check_base=check_base)

  def save_pretrained(self, path: str) -> None:
    if token_kv.KEY in self.params:
      raise ValueError("a key/value-token adapter is loaded: its rows are not weights of "
                       "the model and cannot be saved into it; save the base and pass the "
                       "adapter file with it (load_adapter)")
    save_pipeline(path, dataclasses.replace(self.parts, params=self.params,
                                            scheduler_config=self.scheduler_config))

  def set_progress_bar_config(self, **kwargs) -> None:
    """tqdm options of the per-step progress bar (diffusers' method);
    ``disable=True`` turns it off. The bar is a host callback inside the compiled loop, and
    JAX's persistent cache keys such a program on the callback's address, so only programs
    without it (bar off, no ``callback``) are reused by a new process."""
    self._progress_bar.update(kwargs)

  @property
  def size_multiple(self) -> int:
    """Image sides must be multiples of this: the VAE's and the UNet's downsampling."""
    return self.vae_scale_factor * 2 ** (len(self.unet.config.block_out_channels) - 1)

  # -- schedules -----------------------------------------------------------------

  def sampler_and_levels(self, scheduler: str | None, num_steps: int,
                         use_karras_sigmas: bool | None = None):
    """The sampler's name (the folder's own scheduler class unless ``scheduler`` names
    one), its :class:`ScheduleConfig` and noise levels for ``num_steps``."""
    name = scheduler or schedules.sampler_of_scheduler_config(self.scheduler_config)
    raw = self.scheduler_config
    if use_karras_sigmas is not None:
      if use_karras_sigmas and name not in schedules.KARRAS_SAMPLERS:
        raise ValueError(f"{name} has no Karras sigmas in diffusers "
                         f"({schedules.SCHEDULER_CLASSES[name]}); samplers that do: "
                         f"{list(schedules.KARRAS_SAMPLERS)}")
      raw = {**raw, "use_karras_sigmas": bool(use_karras_sigmas)}
    config = schedules.ScheduleConfig.from_dict(raw, name)
    return name, config, schedules.noise_levels(config, name, num_steps)

  def _sample(self, name, config, levels, denoiser, x, keys, eta, report: bool):
    on_step = None
    if report:  # the host gets the latents in diffusers' convention (see samplers)
      on_step = lambda i, t, z: jax.debug.callback(self._on_host_step, i, t, z)
    return samplers.for_config(name, config, eta)(denoiser, x, levels, keys, on_step=on_step)

  def _on_host_step(self, step, timestep, latents):
    if self._host_step is not None:
      self._host_step(step, timestep, latents)

  @staticmethod
  def _num_calls(levels) -> int:
    return len(levels.plms_timesteps) if levels.plms_timesteps is not None else levels.num_steps

  def _progress(self, levels, size, callback, callback_steps, progress_bar,
                on_step_end=None) -> _Progress | None:
    if not isinstance(callback_steps, int) or callback_steps < 1:
      raise ValueError(f"callback_steps must be a positive integer, got {callback_steps!r}")
    show = (not self._progress_bar.get("disable", False)) if progress_bar is None else progress_bar
    if not show and callback is None and on_step_end is None:
      return None
    bar = {k: v for k, v in self._progress_bar.items() if k != "disable"} if show else None
    return _Progress(self._num_calls(levels), size, bar, callback, callback_steps,
                     on_step_end, self)

  # -- pieces used inside the jitted functions -----------------------------------------

  def _network(self, params):
    """The UNet as guidance calls it. With key/value-token rows loaded the text states
    carry the tokens' mask as their last channels (:meth:`_encode_text`), which
    ``token_kv.applied`` reads and takes off."""
    network = lambda x, t, ctx: self.unet.apply({"params": params["unet"]}, x, t, ctx)
    if token_kv.KEY not in params:
      return network
    rows = params[token_kv.KEY]
    return token_kv.reading_mask(network, rows["rows"], rows["ids"].shape[0])

  def encode_prompt(self, prompt: str | Sequence[str]) -> np.ndarray:
    """CLIP's last hidden states ``[N, 77, D]`` for the prompts (each distinct text
    encoded once): what ``prompt_embeds`` / ``negative_prompt_embeds`` take. With
    key/value-token adapters loaded, ``[N, 77, D + T]``: the ``T`` new tokens' mask
    appended (``ip2p_jax.adapters.token_kv``); ``D``-wide embeddings passed in get a
    zero mask."""
    prompts = _as_list(prompt)
    unique = list(dict.fromkeys(prompts))
    ids = tokenizers.tokenize(self.tokenizer, unique)
    fn = self._jit_once(("encode",), lambda params, ids: self._encode_text(params, ids))
    if self._device_params is None:
      self._device_params = jax.device_put(self.params, NamedSharding(self._mesh, P()))
    encoded = np.asarray(jax.device_get(self._run(fn, self._device_params, ids)))
    return encoded[[unique.index(p) for p in prompts]]

  def _embeddings(self, prompts, embeds, what: str, n: int) -> np.ndarray:
    """Per-image text states from prompts or given embeddings."""
    if embeds is not None:
      embeds = np.asarray(embeds)
      if embeds.ndim != 3:
        raise ValueError(f"{what}_embeds must be [batch, tokens, width], got shape {embeds.shape}")
      if len(embeds) == 1 and n > 1:
        embeds = np.repeat(embeds, n, axis=0)
      if len(embeds) != n:
        raise ValueError(f"got {len(embeds)} {what}_embeds for {n} images")
      if token_kv.KEY in self.params and embeds.shape[-1] == self.text_encoder.config.hidden_size:
        count = len(self.params[token_kv.KEY]["ids"])  # no new tokens in given states
        embeds = np.concatenate([embeds, np.zeros(embeds.shape[:-1] + (count,), embeds.dtype)], -1)
      return embeds
    prompts = _as_list(prompts, n)
    if len(prompts) == 1 and n > 1:
      prompts = prompts * n
    if len(prompts) != n:
      raise ValueError(f"got {len(prompts)} {what}s for {n} images")
    return self.encode_prompt(prompts)

  def decode_latents(self, latents) -> np.ndarray:
    """Images float32 ``[B, H, W, 3]`` in [0, 1] from latents ``[B, h, w, C]`` as
    ``output_type="latent"`` or a ``callback`` gives them (scaled by the VAE's factor)."""
    fn = self._jit_once(("decode",), self._decode)
    if self._device_params is None:
      self._device_params = jax.device_put(self.params, NamedSharding(self._mesh, P()))
    return np.asarray(jax.device_get(self._run(fn, self._device_params,
                                               np.asarray(latents, np.float32))))

  def _encode_text(self, params, ids):
    out = self.text_encoder.apply({"params": params["text_encoder"]}, ids)
    states = out.last_hidden_state.astype(self.unet.dtype)
    if token_kv.KEY in params:
      states = token_kv.with_mask(states, ids, params[token_kv.KEY]["ids"])
    return states

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

  def _run_reporting(self, progress: _Progress | None, fn, *args):
    """:meth:`_run` with the per-step host callback routed to ``progress``."""
    self._host_step = progress
    try:
      result = jax.device_get(self._run(fn, *args))
      if progress is not None:
        jax.effects_barrier()  # every step's callback has run
        if progress.error is not None:
          raise progress.error
      return result
    finally:
      self._host_step = None
      if progress is not None:
        progress.close()

  @staticmethod
  def _image_ids(image_ids, n: int) -> np.ndarray:
    """Each image's noise index: its list position unless the caller gives them."""
    if image_ids is None:
      return np.arange(n, dtype=np.int32)
    ids = np.asarray(image_ids, np.int32)
    if ids.shape != (n,):
      raise ValueError(f"image_ids must give one index per image ({n}), got shape {ids.shape}")
    return ids

  @staticmethod
  def _per_image(value, n: int, what: str) -> np.ndarray:
    v = np.asarray(value, np.float32)
    if v.ndim and v.shape != (n,) and v.size != 1:
      raise ValueError(f"{what}: one value or one per image ({n}), got {v.size}")
    return np.broadcast_to(v.reshape(-1) if v.size == 1 else v, (n,)).copy()

  @staticmethod
  def _check_output_type(output_type: str) -> None:
    if output_type not in OUTPUT_TYPES:
      raise ValueError(f"output_type must be one of {list(OUTPUT_TYPES)}, got {output_type!r}")

  @staticmethod
  def _finish(result, size, output_type, boxes=None):
    result = np.asarray(result)[:size]
    if output_type == "latent":
      return PipelineOutput(result)
    if boxes is not None:  # crop the padding back off, per image
      result = [r[top:bottom, left:right] for r, (left, top, right, bottom) in zip(result, boxes)]
      if output_type == "np" and len({r.shape for r in result}) == 1:
        result = np.stack(result)
    if output_type == "np":
      return PipelineOutput(result)
    return PipelineOutput([imagelib.to_pil(r[None])[0] for r in result])


def _expand(n: int, *per_image):
  """Each per-image array repeated ``n`` times in place (image b's copies adjacent)."""
  return [None if a is None else np.repeat(np.asarray(a), n, axis=0) for a in per_image]


class InstructPix2PixPipeline(_Pipeline):
  """Edits images by instructions (Brooks, Holynski & Efros 2023)."""

  _bundled = staticmethod(lambda **kw: load_pipeline(bundled.editor_path(), **kw))

  def __init__(self, parts: PipelineParts):
    check_editor(parts.modules["unet"].config, parts.modules["vae"].config)
    super().__init__(parts)

  def __call__(self, prompt: str | Sequence[str] | None = None, image=None, *,
               num_inference_steps: int = DEFAULT_STEPS,
               guidance_scale: float | Sequence[float] = 7.5,
               image_guidance_scale: float | Sequence[float] = 1.5,
               negative_prompt: str | Sequence[str] | None = None,
               num_images_per_prompt: int = 1, seed: int = 0,
               latents: np.ndarray | None = None,
               prompt_embeds: np.ndarray | None = None,
               negative_prompt_embeds: np.ndarray | None = None,
               scheduler: str | None = None, use_karras_sigmas: bool | None = None,
               output_type: str = "pil", eta: float = 0.0,
               callback: Callable[[int, float, np.ndarray], None] | None = None,
               callback_steps: int = 1,
               callback_on_step_end: Callable[..., dict | None] | None = None,
               callback_on_step_end_tensor_inputs: Sequence[str] = CALLBACK_TENSOR_INPUTS,
               progress_bar: bool | None = None,
               resolution: int | None = None, resize: str = "fit",
               image_ids: Sequence[int] | None = None) -> PipelineOutput:
    """Edits ``image`` by ``prompt``, with diffusers' argument names and meanings.

    ``image``: a path, PIL image or array, or a list of them. Each is padded to the size
    the model needs and the result cropped back (``ip2p_jax.images.model_inputs``, the
    CLI's preparation); ``resolution`` also scales its longest side first (``resize``:
    "fit" pads, "crop"/"resize" fill the frame). ``prompt``: one instruction for all
    images or one per image; or ``prompt_embeds`` (:meth:`encode_prompt`).
    ``negative_prompt`` (or ``negative_prompt_embeds``) replaces the empty prompt of the
    two unconditional branches, as in diffusers. ``num_images_per_prompt`` edits each
    image that many times (image b's copies adjacent, noise ids ``b * n + j``).
    ``guidance_scale`` / ``image_guidance_scale`` may be per image (lists).
    ``latents``: unit-variance initial noise [B, h, w, latent_channels] (NHWC), scaled by
    the sampler's initial sigma. ``scheduler``: a sampler name (``ip2p_jax.diffusion.SAMPLERS``;
    default: the folder's own scheduler class); ``use_karras_sigmas`` overrides the
    folder's. ``output_type``: "pil", "np" (float [0, 1]) or "latent" (the final latents,
    uncropped). ``callback(step, timestep, latents)`` is called at steps 0,
    ``callback_steps``, 2 ``callback_steps``, ... from inside the compiled loop (latents
    NHWC numpy, diffusers' convention for the sampler); diffusers' newer
    ``callback_on_step_end(pipe, step, timestep, {"latents": latents})`` after every step,
    read-only (returning changed latents is an error: the loop is compiled). An exception
    in a callback is raised from this call. ``progress_bar``: this call's bar (default:
    on, see :meth:`set_progress_bar_config`)."""
    self._check_output_type(output_type)
    _tensor_inputs(callback_on_step_end, callback_on_step_end_tensor_inputs)
    if num_images_per_prompt < 1:
      raise ValueError(f"num_images_per_prompt must be >= 1, got {num_images_per_prompt}")
    if image is None:
      raise ValueError("image is required: a path, PIL image or array, or a list of them")
    if prompt is None and prompt_embeds is None:
      raise ValueError("pass prompt or prompt_embeds")
    pixels, boxes = imagelib.model_inputs(image, self.size_multiple, resolution, resize)
    b = len(pixels)
    text = self._embeddings(prompt, prompt_embeds, "prompt", b)
    empty = self._embeddings(negative_prompt if negative_prompt is not None else "",
                             negative_prompt_embeds, "negative_prompt", b)
    text_scale = self._per_image(guidance_scale, b, "guidance_scale")
    image_scale = self._per_image(image_guidance_scale, b, "image_guidance_scale")
    image_ids = self._image_ids(image_ids, b)
    n = num_images_per_prompt
    if n > 1:
      pixels, text, empty, text_scale, image_scale = _expand(
          n, pixels, text, empty, text_scale, image_scale)
      image_ids = (image_ids[:, None] * n + np.arange(n)[None]).reshape(-1).astype(np.int32)
      boxes = [box for box in boxes for _ in range(n)]
    # diffusers guides only when text scale > 1 and image scale >= 1; (1, 1) is the
    # unguided prediction exactly.
    off = ~((text_scale > 1.0) & (image_scale >= 1.0))
    text_scale[off], image_scale[off] = 1.0, 1.0
    guided = bool((~off).any())
    name, config, levels = self.sampler_and_levels(scheduler, num_inference_steps,
                                                    use_karras_sigmas)
    if latents is not None:
      latents = np.asarray(latents, np.float32)
    placed, size = self._shard(
        dict(pixels=pixels, text=text, empty=empty, image_ids=image_ids, latents=latents,
             text_scale=text_scale, image_scale=image_scale),
        dict(seed=np.uint32(seed)))
    progress = self._progress(levels, size, callback, callback_steps, progress_bar,
                              callback_on_step_end)
    fn = self._edit_fn(name, config, levels, guided, latents is not None, float(eta),
                       progress is not None, output_type == "latent")
    result = self._run_reporting(
        progress, fn, self._device_params, placed["text"], placed["empty"], placed["pixels"],
        placed["seed"], placed["image_ids"], placed["latents"], placed["text_scale"],
        placed["image_scale"])
    return self._finish(result, size, output_type, boxes)

  def _edit_fn(self, name, config, levels, guided, has_latents, eta, report, latent_out):
    def edit(params, text, empty, pixels, seed, image_ids, latents, text_scale, image_scale):
      text, empty = text.astype(self.unet.dtype), empty.astype(self.unet.dtype)
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
                       step_keys, eta, report)
      x = x * levels.final_scale
      return x if latent_out else self._decode(params, x)

    return self._jit_once(("edit", name, config, levels.num_steps, guided, has_latents, eta,
                           levels.sigmas.tobytes(), report, latent_out), edit)


class TextToImagePipeline(_Pipeline):
  """Stable Diffusion text-to-image with classifier-free guidance."""

  _bundled = staticmethod(lambda **kw: bundled.load_text_to_image(**kw))

  def __call__(self, prompt: str | Sequence[str] | None = None, *, height: int | None = None,
               width: int | None = None, num_inference_steps: int = DEFAULT_STEPS,
               guidance_scale: float | Sequence[float] = 7.5,
               negative_prompt: str | Sequence[str] | None = None,
               num_images_per_prompt: int = 1, seed: int = 0,
               latents: np.ndarray | None = None, prompt_embeds: np.ndarray | None = None,
               negative_prompt_embeds: np.ndarray | None = None,
               scheduler: str | None = None, use_karras_sigmas: bool | None = None,
               output_type: str = "pil", eta: float = 0.0,
               callback: Callable[[int, float, np.ndarray], None] | None = None,
               callback_steps: int = 1,
               callback_on_step_end: Callable[..., dict | None] | None = None,
               callback_on_step_end_tensor_inputs: Sequence[str] = CALLBACK_TENSOR_INPUTS,
               progress_bar: bool | None = None,
               image_ids: Sequence[int] | None = None) -> PipelineOutput:
    """Generates images for ``prompt``; arguments as :class:`InstructPix2PixPipeline`'s
    (``negative_prompt`` is the unconditional branch's text, "" by default)."""
    self._check_output_type(output_type)
    _tensor_inputs(callback_on_step_end, callback_on_step_end_tensor_inputs)
    if num_images_per_prompt < 1:
      raise ValueError(f"num_images_per_prompt must be >= 1, got {num_images_per_prompt}")
    if prompt is None and prompt_embeds is None:
      raise ValueError("pass prompt or prompt_embeds")
    b = len(prompt_embeds) if prompt_embeds is not None else len(_as_list(prompt))
    text = self._embeddings(prompt, prompt_embeds, "prompt", b)
    negative = self._embeddings(negative_prompt if negative_prompt is not None else "",
                                negative_prompt_embeds, "negative_prompt", b)
    f = self.vae_scale_factor
    default = (self.unet.config.sample_size or 64) * f
    height, width = height or default, width or default
    if height % f or width % f:
      raise ValueError(f"height and width must be multiples of {f}, got {height}x{width}")
    scale = self._per_image(guidance_scale, b, "guidance_scale")
    image_ids = self._image_ids(image_ids, b)
    n = num_images_per_prompt
    if n > 1:
      text, negative, scale = _expand(n, text, negative, scale)
      image_ids = (image_ids[:, None] * n + np.arange(n)[None]).reshape(-1).astype(np.int32)
    scale[scale <= 1.0] = 1.0
    guided = bool((scale > 1.0).any())
    name, config, levels = self.sampler_and_levels(scheduler, num_inference_steps,
                                                    use_karras_sigmas)
    if latents is not None:
      latents = np.asarray(latents, np.float32)
    placed, size = self._shard(
        dict(text=text, negative=negative, image_ids=image_ids, latents=latents, scale=scale),
        dict(seed=np.uint32(seed)))
    progress = self._progress(levels, size, callback, callback_steps, progress_bar,
                              callback_on_step_end)
    fn = self._generate_fn(name, config, levels, guided, latents is not None, float(eta),
                           (height // f, width // f), progress is not None,
                           output_type == "latent")
    result = self._run_reporting(progress, fn, self._device_params, placed["text"],
                                 placed["negative"], placed["seed"], placed["image_ids"],
                                 placed["latents"], placed["scale"])
    return self._finish(result, size, output_type)

  def _generate_fn(self, name, config, levels, guided, has_latents, eta, latent_size, report,
                   latent_out):
    def generate(params, text, negative, seed, image_ids, latents, scale):
      text, negative = text.astype(self.unet.dtype), negative.astype(self.unet.dtype)
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
                       step_keys, eta, report)
      x = x * levels.final_scale
      return x if latent_out else self._decode(params, x)

    return self._jit_once(("t2i", name, config, levels.num_steps, guided, has_latents, eta,
                           latent_size, levels.sigmas.tobytes(), report, latent_out), generate)
