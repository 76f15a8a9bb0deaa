"""Edits a fixed batch with a pipeline folder and saves the result (.npy).

Run as a subprocess so XLA_FLAGS (forced CPU device count) is set before jax loads:
  python edit_worker.py MODEL OUT.npy [--devices N]
"""
import argparse
import os
import sys

parser = argparse.ArgumentParser()
parser.add_argument("model")
parser.add_argument("out")
parser.add_argument("--devices", type=int, default=1)
args = parser.parse_args()
from xla_env import xla_flags  # noqa: E402  (this folder is on the path of a script)

os.environ["XLA_FLAGS"] = xla_flags(devices=args.devices)

import jax  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from batch_inputs import batch_images  # noqa: E402
from ip2p_jax import InstructPix2PixPipeline  # noqa: E402

assert len(jax.local_devices()) == args.devices
pipe = InstructPix2PixPipeline.from_pretrained(args.model)
out = pipe(["make it red", "add snow", "make it red"], batch_images(), num_inference_steps=4,
           seed=3, output_type="np")
np.save(args.out, out.images)
