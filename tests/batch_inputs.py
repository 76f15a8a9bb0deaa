"""Deterministic inputs shared by in-process and subprocess batch-editing tests."""
import numpy as np
from PIL import Image


def batch_images(n: int = 3, size=(24, 16)):
  rng = np.random.default_rng(11)
  return [Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
          for _ in range(n)]
