"""Tiny stage-1 (text-to-image) run on shapes-world captions.

  python scripts/train.py --config=configs/tiny_t2i.py --workdir=/tmp/tiny_t2i
"""
from configs import models
from configs.common import base_config


def get_config(arg=None):
  del arg
  c = base_config()
  c.stage = "text_to_image"
  c.model.unet = models.TINY_UNET
  return c
