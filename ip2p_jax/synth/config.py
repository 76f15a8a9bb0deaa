"""The engine's settings, with the paper's values as defaults: plain values (this module
uses no JAX), which the command line's help shows."""
from __future__ import annotations

import dataclasses

PAPER_STEPS = 100                  # Euler-ancestral steps per image
PAPER_SAMPLER = "euler_ancestral"
PAPER_SAMPLES = 100                # pairs drawn per caption
P_RANGE = (0.1, 0.9)               # injected fraction of the steps, uniform per sample
GUIDANCE_RANGE = (7.5, 15.0)       # text guidance scale, uniform per sample


@dataclasses.dataclass(frozen=True)
class FilterConfig:
  """The CLIP filter's thresholds (the original's) and how many pairs a prompt keeps."""
  min_sim_0: float = 0.2
  min_sim_1: float = 0.2
  min_sim_direction: float = 0.2
  min_sim_image: float = 0.75  # the original script's default was 0.7, the paper's 0.75
  keep: int = 4  # the best this many per prompt by sim_direction

  def thresholds(self) -> dict[str, float]:
    return {"sim_0": self.min_sim_0, "sim_1": self.min_sim_1,
            "sim_direction": self.min_sim_direction, "sim_image": self.min_sim_image}


@dataclasses.dataclass(frozen=True)
class SynthConfig:
  samples: int = PAPER_SAMPLES
  batch_size: int = 8         # pairs per compiled call
  num_inference_steps: int = PAPER_STEPS
  scheduler: str | None = PAPER_SAMPLER
  height: int | None = None   # default: the text-to-image model's native size
  width: int | None = None
  p_range: tuple[float, float] = P_RANGE
  guidance_range: tuple[float, float] = GUIDANCE_RANGE
  seed: int = 0
  jpeg_quality: int = 95
  filter: FilterConfig = FilterConfig()

  def to_json(self) -> dict:
    d = dataclasses.asdict(self)
    d["p_range"], d["guidance_range"] = list(self.p_range), list(self.guidance_range)
    return d
