"""CLIP filtering of generated pairs (Brooks et al. 2023, Sec. 3.1.2).

Each pair is scored with the four similarities of ``ip2p_jax.metrics`` (the input
image against its caption, the edited image against the edited caption, the image
change against the caption change, and the two images against each other). A pair is
kept when every similarity reaches its threshold and it is among the ``keep`` best of
its prompt by direction similarity. The original's thresholds: 0.2, 0.2, 0.2 and 0.75
(its script's default for the image similarity was 0.7); ``config.FilterConfig``.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from ip2p_jax.synth.config import FilterConfig

# metrics name -> the original's metadata.jsonl key
METADATA_KEYS = {"sim_0": "clip_sim_0", "sim_1": "clip_sim_1",
                 "sim_direction": "clip_sim_dir", "sim_image": "clip_sim_image"}


@dataclasses.dataclass
class Decision:
  kept: np.ndarray               # [N] bool
  failed: dict[str, np.ndarray]  # similarity name -> [N] bool, below its threshold
  outranked: np.ndarray          # [N] bool: passed every threshold, not among the best k

  def reasons(self, i: int) -> list[str]:
    """Why sample ``i`` was rejected (empty when kept)."""
    out = [name for name, below in self.failed.items() if below[i]]
    return out + (["outranked"] if self.outranked[i] else [])


def decide(sims: dict[str, np.ndarray], config: FilterConfig = FilterConfig()) -> Decision:
  """The filter on one prompt's samples (``sims``: the four similarities, each [N])."""
  failed = {name: ~(np.asarray(sims[name]) >= t) for name, t in config.thresholds().items()}
  passed = ~np.any(np.stack(list(failed.values())), axis=0)
  direction = np.asarray(sims["sim_direction"], np.float64)
  order = np.argsort(-np.where(passed, direction, -np.inf), kind="stable")
  best = np.zeros_like(passed)
  best[order[:max(config.keep, 0)]] = True
  kept = passed & best
  return Decision(kept, failed, passed & ~kept)


def similarities_from_embeddings(img0, img1, txt0, txt1) -> dict[str, np.ndarray]:
  """The four similarities from (not necessarily normalised) CLIP embeddings ``[N, D]``."""
  from ip2p_jax.metrics import clip_similarity
  unit = lambda e: np.asarray(e, np.float64) / np.linalg.norm(e, axis=-1, keepdims=True)
  return clip_similarity.similarities(unit(img0), unit(img1), unit(txt0), unit(txt1))


class ClipFilter:
  """Scores pairs with a ``ClipSimilarity`` (``ip2p_jax.metrics``) and decides."""

  def __init__(self, clip, config: FilterConfig = FilterConfig()):
    self.clip, self.config = clip, config

  def __call__(self, images_0, images_1, caption: str, edited_caption: str):
    from ip2p_jax.metrics import clip_similarity
    n = len(images_0)
    txt = self.clip.encode_texts([caption, edited_caption])
    sims = clip_similarity.similarities(
        self.clip.encode_images(images_0), self.clip.encode_images(images_1),
        np.repeat(txt[:1], n, 0), np.repeat(txt[1:], n, 0))
    return sims, decide(sims, self.config)
