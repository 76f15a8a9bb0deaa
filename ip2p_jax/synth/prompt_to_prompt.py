"""Prompt-to-Prompt image pairs (Hertz et al. 2022) as InstructPix2Pix made its data.

Both captions of a pair are drawn by a :class:`~ip2p_jax.pipelines.TextToImagePipeline`
from the same initial noise and the same per-step noise; for the first ``p`` fraction
of the steps the second image's self-attention uses the first image's attention maps
``softmax(q k^T / sqrt(d))`` (its own values), so the two pictures share their layout
and differ where the captions do. The paper draws ``p ~ U(0.1, 0.9)`` and the text
guidance scale ``~ U(7.5, 15)`` per sample.

How: the UNet's ``Attention.attend`` (``models/layers.py``) is intercepted with flax's
``nn.intercept_methods`` while the pair program traces its network calls. For a pair
whose injection is on, the second image's self-attention query and key are replaced by
the first's, which gives exactly the first's maps applied to the second's values, in
the one attention function of the package. Without the interceptor (every other use of
the UNet) nothing is added to the program. Injection covers both branches of
classifier-free guidance (the original Prompt-to-Prompt code edits the conditional half
only; its unconditional half then differs between the two images).

Sample ``s`` uses the noise ``TextToImagePipeline(prompt, seed=s)`` would give its first
image, so with ``p = 0`` the second image is exactly that pipeline's picture of the
second caption, and the first image always is that of the first.
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ip2p_jax.diffusion import guidance
from ip2p_jax.synth.config import GUIDANCE_RANGE, P_RANGE, PAPER_SAMPLER, PAPER_STEPS



def _from_first(x: jax.Array, inject: jax.Array) -> jax.Array:
  """Batch ``[G * M * 2, ...]`` laid out as (branch, pair, first/second): the second of
  pair ``j`` replaced by the first where ``inject[j]``."""
  m = inject.shape[0]
  y = x.reshape((-1, m, 2) + x.shape[1:])
  mask = inject.reshape((1, m) + (1,) * (y.ndim - 3))
  second = jnp.where(mask, y[:, :, 0], y[:, :, 1])
  return jnp.stack([y[:, :, 0], second], axis=2).reshape(x.shape)


def inject_self_attention(inject: jax.Array):
  """A flax method interceptor: in every self-attention of the intercepted model, pair
  ``j``'s second image attends with the first image's query and key where ``inject[j]``
  (``[M]`` bool; the batch is pairs, first and second adjacent)."""
  def interceptor(next_fun, args, kwargs, context):
    if context.method_name != "attend" or not kwargs.get("self_attention", False):
      return next_fun(*args, **kwargs)
    query, key, value = args
    return next_fun(_from_first(query, inject), _from_first(key, inject), value, **kwargs)
  return interceptor


def injected_steps(p: np.ndarray, num_steps: int) -> np.ndarray:
  """Steps ``i < p * num_steps`` are injected: ``ceil(p * num_steps)`` of them."""
  return np.ceil(np.asarray(p, np.float64) * num_steps - 1e-9).clip(0, num_steps).astype(np.int32)


def draw(seed: int, index: int, num_samples: int, p_range=P_RANGE,
         guidance_range=GUIDANCE_RANGE) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Prompt ``index``'s samples: (noise seeds, p, text guidance scales), each
  ``[num_samples]``, deterministic in ``(seed, index)`` (what a resumed run redraws)."""
  rng = np.random.default_rng([seed, index, 0x9292])
  seeds = rng.integers(0, 2 ** 31 - 1, num_samples)
  return seeds, rng.uniform(*p_range, num_samples), rng.uniform(*guidance_range, num_samples)


class PromptToPrompt:
  """Draws Prompt-to-Prompt pairs with a text-to-image pipeline, one jitted program
  per batch shape (pairs split over the local devices)::

      p2p = PromptToPrompt(TextToImagePipeline.from_pretrained(folder))
      first, second = p2p(["a cat"] * 4, ["a dog"] * 4, seeds, p, scales)  # uint8
  """

  def __init__(self, pipe, *, num_inference_steps: int = PAPER_STEPS,
               scheduler: str | None = PAPER_SAMPLER, height: int | None = None,
               width: int | None = None):
    self.pipe = pipe
    self.num_steps = num_inference_steps
    self.name, self.config, self.levels = pipe.sampler_and_levels(scheduler, num_inference_steps)
    f = pipe.vae_scale_factor
    default = (pipe.unet.config.sample_size or 64) * f
    height, width = height or default, width or default
    if height % f or width % f:
      raise ValueError(f"height and width must be multiples of {f}, got {height}x{width}")
    self.latent_size = (height // f, width // f)

  def __call__(self, prompts_0: Sequence[str], prompts_1: Sequence[str], seeds, p,
               guidance_scale, *, output_type: str = "uint8") -> tuple[np.ndarray, np.ndarray]:
    """Pairs ``(prompts_0[j], prompts_1[j])`` with noise seed ``seeds[j]``, injection
    fraction ``p[j]`` in [0, 1] and text guidance ``guidance_scale[j]``. Returns the
    first and second images ``[M, H, W, 3]``: uint8, or float in [0, 1] ("np")."""
    m = len(prompts_0)
    if len(prompts_1) != m:
      raise ValueError(f"got {m} first prompts and {len(prompts_1)} second prompts")
    seeds, p, scale = (np.asarray(v).reshape(-1) for v in (seeds, p, guidance_scale))
    if not len(seeds) == len(p) == len(scale) == m:
      raise ValueError(f"seeds, p and guidance_scale need one value per pair ({m})")
    if np.any((p < 0) | (p > 1)):
      raise ValueError("p must lie in [0, 1]")
    pipe = self.pipe
    text = pipe.encode_prompt([t for pair in zip(prompts_0, prompts_1) for t in pair])
    text = text.reshape((m, 2) + text.shape[1:])
    negative = pipe.encode_prompt([""])[0]
    placed, size = pipe._shard(
        dict(text=text, seeds=seeds.astype(np.uint32),
             steps=injected_steps(p, self.num_steps), scale=scale.astype(np.float32)),
        dict(negative=negative))
    fn = pipe._jit_once(("prompt_to_prompt", self.name, self.config, self.num_steps,
                         self.levels.sigmas.tobytes(), self.latent_size), self._pairs)
    images = np.asarray(jax.device_get(pipe._run(
        fn, pipe._device_params, placed["text"], placed["negative"], placed["seeds"],
        placed["steps"], placed["scale"])))[:size]
    if output_type == "uint8":
      images = np.round(images * 255).astype(np.uint8)
    elif output_type != "np":
      raise ValueError(f"output_type must be 'uint8' or 'np', got {output_type!r}")
    return images[:, 0], images[:, 1]

  def _pairs(self, params, text, negative, seeds, steps, scale):
    """``[M, 2, H, W, 3]`` in [0, 1] for ``M`` pairs (text ``[M, 2, L, D]``)."""
    pipe, levels = self.pipe, self.levels
    m = text.shape[0]
    dtype = pipe.unet.dtype
    text = text.reshape((2 * m,) + text.shape[2:]).astype(dtype)
    negative = jnp.broadcast_to(negative.astype(dtype), text.shape)
    # The noise TextToImagePipeline(seed=s) gives its image 0, shared by both of a pair.
    keys = jax.vmap(lambda s: jax.random.fold_in(jax.random.key(s), 0))(seeds)
    init_keys = jax.vmap(lambda k: jax.random.fold_in(k, 0))(keys)
    step_keys = jax.vmap(lambda k: jax.random.fold_in(k, 1))(keys)
    shape = self.latent_size + (pipe.unet.config.out_channels,)
    both = jnp.repeat(jnp.arange(m), 2)
    latents = pipe._initial_noise(init_keys, shape, jnp.float32)[both]
    guided = guidance.classifier_free(pipe._network(params), self.config.prediction_type,
                                      text, negative, jnp.repeat(scale, 2))
    levels_f32 = jnp.asarray(np.asarray(levels.sigmas[:-1], np.float32))

    def denoiser(x, sigma, t):
      step = jnp.sum(levels_f32 > sigma * (1 + 1e-4))  # the step whose level this is
      with nn.intercept_methods(inject_self_attention(step < steps)):
        return guided(x, sigma, t)

    x = pipe._sample(self.name, self.config, levels, denoiser,
                     latents * levels.init_noise_sigma, step_keys[both], 0.0, False)
    images = pipe._decode(params, x * levels.final_scale)
    return images.reshape((m, 2) + images.shape[1:])

