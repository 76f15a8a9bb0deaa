"""Tiny stage-2 (InstructPix2Pix) run on a small shapes world: tests and smoke runs.

  python scripts/train.py --config=configs/tiny_ip2p.py --workdir=/tmp/tiny_ip2p
"""
from configs.common import base_config


def get_config(arg=None):
  del arg
  return base_config()
