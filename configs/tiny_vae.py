"""Tiny autoencoder run on shapes-world images.

  python scripts/train.py --config=configs/tiny_vae.py --workdir=/tmp/tiny_vae
"""
from configs.common import base_config


def get_config(arg=None):
  del arg
  c = base_config()
  c.stage = "vae"
  c.learning_rate = 1e-3
  return c
