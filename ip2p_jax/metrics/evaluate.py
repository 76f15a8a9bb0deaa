"""Held-out evaluation: edit shapes-world examples with a pipeline and score them.

    from ip2p_jax.metrics import evaluate, heldout_examples
    report = evaluate(pipe, heldout_examples(200, size=128), num_inference_steps=50,
                      guidance_scale=7.5, image_guidance_scale=1.5, seed=0)
    report["per_edit_type"]["recolor"]["success"], report["outputs"]  # uint8 [N, S, S, 3]

Deterministic: example ``k``'s noise is ``(seed, k)`` whatever the batch size, and
every batch has the same shape (the last one padded), so a training run that
calls this every ``eval_every`` steps compiles the sampler once.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from ip2p_jax.data import shapes
from ip2p_jax.metrics import aggregate
from ip2p_jax.metrics.shapes_scoring import score_edit


def edit_examples(pipe, examples: Sequence[shapes.Example], *, num_inference_steps: int,
                  guidance_scale: float, image_guidance_scale: float, seed: int,
                  scheduler: str | None, batch_size: int,
                  progress: Callable[[int], None] | None = None,
                  use_karras_sigmas: bool | None = None) -> np.ndarray:
  """uint8 ``[N, S, S, 3]``: each example's input edited by its own instruction."""
  n = len(examples)
  outputs = []
  for start in range(0, n, batch_size):
    chunk = list(range(start, min(start + batch_size, n)))
    ids = chunk + [chunk[-1]] * (batch_size - len(chunk))  # one shape: one compile
    out = pipe([examples[i].instruction for i in ids],
               np.stack([examples[i].input_image for i in ids]),
               num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
               image_guidance_scale=image_guidance_scale, seed=seed, scheduler=scheduler,
               use_karras_sigmas=use_karras_sigmas, output_type="np", image_ids=ids,
               progress_bar=False).images
    outputs.append((np.asarray(out[:len(chunk)]) * 255).round().clip(0, 255).astype(np.uint8))
    if progress is not None:
      progress(len(chunk))
  return np.concatenate(outputs) if outputs else np.zeros((0, 1, 1, 3), np.uint8)


def evaluate(pipe, examples: Sequence[shapes.Example], *, num_inference_steps: int = 50,
             guidance_scale: float = 7.5, image_guidance_scale: float = 1.5, seed: int = 0,
             scheduler: str | None = None, batch_size: int = 8, clip=None, params=None,
             progress: Callable[[int], None] | None = None,
             use_karras_sigmas: bool | None = None) -> dict:
  """Edits ``examples`` with ``pipe`` (an ``InstructPix2PixPipeline``) and scores them.

  ``clip``: a :class:`ClipSimilarity` to add the paper's CLIP metrics (captions
  before/after as the texts). ``params``: evaluate these parameters instead of the
  pipeline's, for this call only (e.g. a training run's EMA; the compiled sampler is
  reused).
  ``progress(k)`` is called after each batch of ``k`` examples. ``scheduler`` and
  ``use_karras_sigmas`` as the pipeline takes them (default: the folder's own).

  Returns the :func:`aggregate.summarize` dict (``overall``, ``per_edit_type``,
  ``held_out``, ``held_out_edit``) plus ``settings``, ``examples`` (one
  :func:`score_edit` dict per example, with its ``index``, ``instruction`` and CLIP
  values) and ``outputs`` (uint8 ``[N, S, S, 3]``, the only non-JSON entry).
  """
  if params is not None:  # swapped in for this call only (the compiled sampler is reused)
    previous = pipe.params
    pipe.set_params(params)
    try:
      return evaluate(pipe, examples, num_inference_steps=num_inference_steps,
                      guidance_scale=guidance_scale, image_guidance_scale=image_guidance_scale,
                      seed=seed, scheduler=scheduler, batch_size=batch_size, clip=clip,
                      progress=progress, use_karras_sigmas=use_karras_sigmas)
    finally:
      pipe.set_params(previous)
  settings = dict(num_inference_steps=num_inference_steps, guidance_scale=float(guidance_scale),
                  image_guidance_scale=float(image_guidance_scale), seed=seed,
                  scheduler=scheduler, num_examples=len(examples))
  if use_karras_sigmas is not None:
    settings["use_karras_sigmas"] = bool(use_karras_sigmas)
  outputs = edit_examples(pipe, examples, num_inference_steps=num_inference_steps,
                          guidance_scale=guidance_scale,
                          image_guidance_scale=image_guidance_scale, seed=seed,
                          scheduler=scheduler, batch_size=batch_size, progress=progress,
                          use_karras_sigmas=use_karras_sigmas)
  scores = []
  for k, (example, output) in enumerate(zip(examples, outputs)):
    scores.append({"index": k, "instruction": example.instruction, **score_edit(example, output)})
  if clip is not None and len(examples):
    sims = clip(np.stack([e.input_image for e in examples]), outputs,
                [e.input_caption for e in examples], [e.edited_caption for e in examples])
    for k, score in enumerate(scores):
      score.update({key: float(sims[key][k]) for key in aggregate.CLIP_KEYS})
  return {**aggregate.summarize(scores), "settings": settings, "examples": scores,
          "outputs": outputs}
