"""``ip2p edit`` end to end on a tiny model: bad inputs, resume, and a killed run."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from helpers.xla_env import without_shared_cache, xla_flags


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  cache = tmp_path_factory.mktemp("xla_cache")
  return {**without_shared_cache(os.environ), "IP2P_COMPILATION_CACHE": str(cache),
          "XLA_FLAGS": xla_flags(devices=1)}


def ip2p(*args, env, **kw):
  return subprocess.run([sys.executable, "-m", "ip2p_jax.cli", *args], env=env,
                        capture_output=True, text=True, **kw)


@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory):
  d = tmp_path_factory.mktemp("inputs")
  rng = np.random.default_rng(0)
  Image.fromarray(rng.integers(0, 256, (23, 37, 3), dtype=np.uint8)).save(d / "odd.jpg")
  Image.fromarray(rng.integers(0, 256, (30, 30, 4), dtype=np.uint8)).save(d / "rgba.png")
  Image.fromarray(rng.integers(0, 65535, (20, 28), dtype=np.uint16)).save(d / "deep16.png")
  (d / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(rng.integers(0, 256, 300, np.uint8)))
  (d / "empty.png").write_bytes(b"")
  return d


def test_bad_inputs_are_skipped_listed_and_fail_the_run(model, env, mixed_folder, tmp_path):
  out = tmp_path / "out"
  args = ["edit", str(mixed_folder), "-p", "make it blue", "-o", str(out), "--model", model,
          "--steps", "2", "--resolution", "32", "--batch-size", "2"]
  first = ip2p(*args, env=env)
  assert first.returncode == 1, first.stderr
  assert sorted(f for f in os.listdir(out) if f.endswith(".png")) == [
      "deep16.png", "odd.png", "rgba.png"]
  manifest = json.load(open(out / "manifest.json"))
  failed = {os.path.basename(f["input"]): f["error"] for f in manifest["runs"][-1]["failed"]}
  assert set(failed) == {"corrupt.jpg", "empty.png"}
  assert "empty file" in failed["empty.png"] and "not a readable image" in failed["corrupt.jpg"]
  assert "corrupt.jpg" in first.stderr and "empty.png" in first.stderr
  # fit mode: outputs keep the input's aspect ratio (37x23 -> 32 wide).
  assert Image.open(out / "odd.png").size[0] == 32 and Image.open(out / "odd.png").size[1] < 32
  mtimes = {f: os.path.getmtime(out / f) for f in ("odd.png", "rgba.png", "deep16.png")}
  # The persistent compilation cache is on by default: the next run reuses the programs.
  assert os.listdir(env["IP2P_COMPILATION_CACHE"])

  second = ip2p(*args, env=env)
  assert second.returncode == 1
  assert "edited 0, kept 3 existing, failed 2" in second.stdout
  assert mtimes == {f: os.path.getmtime(out / f) for f in mtimes}

  third = ip2p(*args, "--overwrite", env=env)
  assert "edited 3, kept 0 existing" in third.stdout


def test_killed_run_leaves_no_partial_output_and_resumes(model, env, tmp_path):
  src = tmp_path / "in"
  src.mkdir()
  rng = np.random.default_rng(1)
  for i in range(8):
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(src / f"{i}.png")
  out = tmp_path / "out"
  args = ["edit", str(src), "-p", "make it green", "-o", str(out), "--model", model,
          "--steps", "30", "--resolution", "32"]
  proc = subprocess.Popen([sys.executable, "-m", "ip2p_jax.cli", *args], env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 240
  while time.time() < deadline and not (out.exists() and any(
      f.endswith(".png") and not f.startswith(".") for f in os.listdir(out))):
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  done = [f for f in os.listdir(out) if f.endswith(".png") and not f.startswith(".")]
  assert 1 <= len(done) < 8
  for f in done:  # every visible output is a complete image
    with Image.open(out / f) as im:
      im.load()
  resumed = ip2p(*args, env=env)
  assert resumed.returncode == 0, resumed.stderr
  assert f"kept {len(done)} existing" in resumed.stdout
  assert sorted(os.listdir(out)) == sorted([f"{i}.png" for i in range(8)] + ["manifest.json"])


def test_grid_sweeps_both_scales(model, env, tmp_path):
  src = tmp_path / "a.png"
  Image.fromarray(np.random.default_rng(2).integers(0, 256, (16, 16, 3), np.uint8)).save(src)
  r = ip2p("edit", str(src), "-p", "add a hat", "-o", str(tmp_path / "o"), "--model", model,
           "--steps", "2", "--resolution", "16", "--grid", "--grid-text-scales", "1,5,9",
           "--grid-image-scales", "1,2", env=env)
  assert r.returncode == 0, r.stderr
  grid = np.asarray(Image.open(tmp_path / "o" / "a_grid.png"))
  assert grid.shape == (18 + 2 * 16, 64 + 3 * 16, 3)
  cells = [grid[18 + r * 16:34 + r * 16, 64 + c * 16:80 + c * 16] for r in range(2) for c in range(3)]
  # Text scale 1 switches guidance off (as diffusers does): column 0 is the same edit in
  # both rows; every other scale pair gives a different edit.
  assert cells[0].tobytes() == cells[3].tobytes()
  assert len({c.tobytes() for c in cells}) == 5
  # Rows are image scales, columns text scales: the cell at (image 2, text 5) is the
  # plain edit at those scales (same noise: the file name's), within one level.
  r = ip2p("edit", str(src), "-p", "add a hat", "-o", str(tmp_path / "single"), "--model",
           model, "--steps", "2", "--resolution", "16", "--text-scale", "5",
           "--image-scale", "2", env=env)
  assert r.returncode == 0, r.stderr
  single = np.asarray(Image.open(tmp_path / "single" / "a.png").convert("RGB"), np.int16)
  assert np.abs(cells[4][..., :3].astype(np.int16) - single).max() <= 1
  assert np.abs(cells[2][..., :3].astype(np.int16) - single).max() > 1


def test_missing_model_and_inputs_are_clear_errors(env, tmp_path):
  no_default = {**env, "IP2P_DEFAULT_MODEL": str(tmp_path / "none")}
  image = str(tmp_path / "x.png")
  Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(image)
  out = str(tmp_path / "out")
  r = ip2p("edit", image, "-p", "p", "-o", out, env=no_default)
  assert r.returncode == 2 and "--model" in r.stderr and "diffusers-format" in r.stderr
  r = ip2p("edit", image, "-p", "p", "-o", out, "--model", str(tmp_path / "nope"), env=env)
  assert r.returncode == 2 and "no such folder" in r.stderr
  r = ip2p("edit", str(tmp_path / "y.png"), "-p", "p", "-o", out, env=env)
  assert r.returncode == 2 and "y.png: no such file, folder or matching glob" in r.stderr
  assert not os.path.exists(out)  # nothing written for a run that did not start


def test_readme_main_job_runs_on_the_bundled_default_model(env, tmp_path):
  """The README's edit command, as written, with fewer steps."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  r = ip2p("edit", os.path.join(root, "examples", "shapes_128.png"), "-p",
           "make the circle blue", "-o", str(tmp_path), "--steps", "4", env=env)
  assert r.returncode == 0, r.stderr
  out = Image.open(tmp_path / "shapes_128.png")
  assert out.size == (128, 128)  # the default model's native 128 px
  edited = np.asarray(out.convert("RGB"), np.float32)
  source = Image.open(os.path.join(root, "examples", "shapes_128.png")).convert("RGB")
  source = np.asarray(source.resize(out.size, Image.Resampling.LANCZOS), np.float32)
  assert edited.std() > 5  # an image, not a blank
  # The model's output, not the input passed through: the input differs from itself
  # by 0 levels; the bundled model's output differs by far more than 10 on average.
  assert np.abs(edited - source).mean() > 10
