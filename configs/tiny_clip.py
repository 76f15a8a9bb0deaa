"""Tiny CLIP (both towers, contrastive) run on shapes-world captions.

  python scripts/train.py --config=configs/tiny_clip.py --workdir=/tmp/tiny_clip
"""
from configs.common import base_config


def get_config(arg=None):
  del arg
  c = base_config()
  c.stage = "clip"
  c.learning_rate = 1e-3
  return c
