"""Batch editing: per-image determinism, sharding over devices, and several processes."""
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from batch_inputs import batch_images
from helpers.xla_env import without_shared_cache, xla_flags
from ip2p_jax import InstructPix2PixPipeline

HERE = os.path.dirname(os.path.abspath(__file__))
PROMPTS = ["make it red", "add snow", "make it red"]
FLOAT_TOL = 1e-5  # same math; only the batch size changes XLA's accumulation order


@pytest.fixture(scope="module")
def pipe(model):
  return InstructPix2PixPipeline.from_pretrained(model)


@pytest.fixture(scope="module")
def reference(pipe):
  return pipe(PROMPTS, batch_images(), num_inference_steps=4, seed=3, output_type="np").images


def test_image_result_does_not_depend_on_its_batch(pipe, reference):
  images = batch_images()
  alone = pipe(PROMPTS[1], [images[1]], num_inference_steps=4, seed=3, output_type="np",
               image_ids=[1]).images
  pair = pipe(PROMPTS[1:], images[1:], num_inference_steps=4, seed=3, output_type="np",
              image_ids=[1, 2]).images
  np.testing.assert_allclose(alone[0], reference[1], atol=FLOAT_TOL)
  np.testing.assert_allclose(pair, reference[1:], atol=FLOAT_TOL)
  # Same image and prompt at positions 0 and 2: different noise, different result.
  same = pipe(PROMPTS[0], [images[0], images[0]], num_inference_steps=4, seed=3,
              output_type="np").images
  assert np.abs(same[0] - same[1]).max() > 0.01


def test_seed_changes_the_result(pipe, reference):
  other = pipe(PROMPTS, batch_images(), num_inference_steps=4, seed=4, output_type="np").images
  assert np.abs(other - reference).max() > 0.01


def test_sharded_over_8_devices_equals_one_device(model, reference, tmp_path):
  out = tmp_path / "sharded.npy"
  subprocess.run([sys.executable, os.path.join(HERE, "helpers", "edit_worker.py"), model,
                  str(out), "--devices", "8"], check=True, env={**os.environ})
  # 3 images padded to 8 devices, one image per device.
  np.testing.assert_allclose(np.load(out), reference, atol=FLOAT_TOL)


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_edit_disjoint_slices_like_one(model, tmp_path):
  """A 2-process jax.distributed run (localhost) writes exactly what one process does."""
  src = tmp_path / "in"
  src.mkdir()
  for i, im in enumerate(batch_images(5, size=(16, 16))):
    im.save(src / f"img{i}.png")
  cmd = [sys.executable, "-m", "ip2p_jax.cli", "edit", str(src), "-p", "make it red",
         "--model", model, "--steps", "3", "--resolution", "16", "--no-compilation-cache"]
  env = {**without_shared_cache(os.environ), "XLA_FLAGS": xla_flags(devices=1)}
  subprocess.run(cmd + ["-o", str(tmp_path / "single")], check=True, env=env)
  port = _free_port()
  procs = [subprocess.Popen(cmd + ["-o", str(tmp_path / "multi"), "--coordinator",
                                   f"127.0.0.1:{port}", "--num-processes", "2",
                                   "--process-id", str(i)], env=env) for i in range(2)]
  assert [p.wait(timeout=300) for p in procs] == [0, 0]
  names = sorted(f for f in os.listdir(tmp_path / "single") if f.endswith(".png"))
  assert names == [f"img{i}.png" for i in range(5)]
  assert sorted(f for f in os.listdir(tmp_path / "multi") if f.endswith(".png")) == names
  for f in names:
    a = np.asarray(Image.open(tmp_path / "single" / f), np.int16)
    b = np.asarray(Image.open(tmp_path / "multi" / f), np.int16)
    assert np.abs(a - b).max() <= 1  # one 8-bit level of rounding at most
  # Each process reports its own slice: 0, 2, 4 and 1, 3.
  import json
  edited = [sorted(os.path.basename(e["input"]) for e in json.load(open(
      tmp_path / "multi" / f"manifest.process-{i}.json"))["runs"][-1]["edited"]) for i in range(2)]
  assert edited == [["img0.png", "img2.png", "img4.png"], ["img1.png", "img3.png"]]


def test_save_pretrained_round_trips(pipe, reference, tmp_path):
  pipe.save_pretrained(str(tmp_path / "saved"))
  again = InstructPix2PixPipeline.from_pretrained(str(tmp_path / "saved"))
  out = again(PROMPTS, batch_images(), num_inference_steps=4, seed=3, output_type="np").images
  np.testing.assert_allclose(out, reference, atol=FLOAT_TOL)
