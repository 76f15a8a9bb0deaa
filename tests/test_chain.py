"""Edit chains (``ip2p_jax.chain``) and ``ip2p edit -p A -p B`` / ``--chain`` on the tiny
model: each step's output is the next step's input, every step is reproduced from its
record, and a saved chain replays to the same pixels in Python and on the command line."""
import json
import os
import re

import numpy as np
import pytest
from PIL import Image

from ip2p_jax import InstructPix2PixPipeline, editing
from ip2p_jax import images as imagelib
from ip2p_jax.chain import EditChain, pixels_sha256
from ip2p_jax.cli import main
from ip2p_jax.editing import EditError, Step

RES = 16  # the tiny model's images: 16 px, 4 sampling steps
A = Step("make it red", seed=1, steps=3, sampler="euler_ancestral")
B = Step("add snow", seed=2, text_scale=5.0, image_scale=1.2, steps=3, sampler="euler_ancestral")


def _pixels(im) -> np.ndarray:
  return np.asarray(imagelib.to_rgb(im))


@pytest.fixture(scope="module")
def pipe(model):
  pipe = InstructPix2PixPipeline.from_pretrained(model)
  pipe.set_progress_bar_config(disable=True)
  return pipe


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  """Three PNGs, one of another aspect ratio."""
  d = tmp_path_factory.mktemp("chain_inputs")
  rng = np.random.default_rng(5)
  for name, shape in (("a.png", (16, 16, 3)), ("b.png", (16, 16, 3)), ("wide.png", (12, 20, 3))):
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(d / name)
  return d


@pytest.fixture(scope="module")
def chain(pipe, folder):
  chain = EditChain(Image.open(folder / "wide.png"), "wide.png", resolution=RES)
  chain.apply(pipe, A)
  chain.apply(pipe, B)
  return chain


def test_each_step_edits_the_previous_output(pipe, chain, folder):
  """Step k is the one-image edit of step k-1's 8-bit output, with the noise of the
  source's file name: step 1 is exactly what ``ip2p edit wide.png -p ...`` makes."""
  source = imagelib.load(str(folder / "wide.png"))
  first = editing.edit_images(pipe, [source], [A], [editing.noise_id("wide.png")], resolution=RES)
  second = editing.edit_images(pipe, first, [B], [editing.noise_id("wide.png")], resolution=RES)
  assert [_pixels(im).tobytes() for im in chain.images] == [
      _pixels(first[0]).tobytes(), _pixels(second[0]).tobytes()]
  w, h = chain.images[0].size  # fit mode: the source's aspect ratio, padding cropped off
  assert max(w, h) <= RES and abs(w / h - 20 / 12) < 0.1
  assert not np.array_equal(_pixels(chain.images[0]), _pixels(chain.images[1]))


def test_undo_and_branch(pipe, chain):
  work = chain.branch(2)
  step, image = work.undo()
  assert step == B and _pixels(image).tobytes() == _pixels(chain.images[1]).tobytes()
  assert work.tip is work.images[0] and len(chain.steps) == 2  # the original is unchanged
  other = chain.branch(0)
  assert other.tip is other.source and other.steps == []
  other.apply(pipe, B)  # B on the source: another image than B after A
  assert not np.array_equal(_pixels(other.images[0]), _pixels(chain.images[1]))
  work.undo()
  with pytest.raises(EditError, match="nothing to undo"):
    work.undo()
  with pytest.raises(EditError, match="can branch after step 0 to 2, not 3"):
    chain.branch(3)


def test_json_round_trip_replays_the_same_pixels(pipe, chain, folder, tmp_path):
  path = tmp_path / "chain.json"
  chain.save(str(path))
  data = json.loads(path.read_text())
  assert data["format"] == "ip2p_jax.chain/1" and data["source"]["name"] == "wide.png"
  assert [s["instruction"] for s in data["steps"]] == ["make it red", "add snow"]
  assert data["steps"][1]["seed"] == 2 and data["steps"][1]["text_scale"] == 5.0
  loaded = EditChain.load(str(path))
  assert loaded.steps == chain.steps and loaded.images == []
  replay = loaded.replay(pipe, Image.open(folder / "wide.png"))
  assert loaded.reproduces(replay)
  assert [_pixels(im).tobytes() for im in replay.images] == [
      _pixels(im).tobytes() for im in chain.images]
  # Another image (and name): the same steps, other pixels, and not a reproduction.
  other = loaded.replay(pipe, Image.open(folder / "a.png"), "a.png")
  assert other.images[1].size == (16, 16) and not loaded.reproduces(other)


@pytest.mark.parametrize("change,message", [
    (lambda d: d.update(format="other"), "not an edit chain"),
    (lambda d: d["steps"][0].update(seed=-3), "step 1: --seed must be an integer"),
    (lambda d: d["steps"][1].update(colour="red"), "step 2: unknown field(s) ['colour']"),
    (lambda d: d["steps"][0].update(steps="4"), "step 1: 'steps' = '4' has the wrong type"),
    (lambda d: d.update(resize="zoom"), "resize must be one of"),
])
def test_bad_chain_files_are_one_clear_error(chain, tmp_path, change, message):
  data = chain.to_dict()
  change(data)
  path = tmp_path / "bad.json"
  path.write_text(json.dumps(data))
  with pytest.raises(EditError, match=re.escape(message)):
    EditChain.load(str(path))


def _edit(capsys, *args):
  code = main(["edit", *args, "--no-compilation-cache"])
  captured = capsys.readouterr()
  return code, captured.out, captured.err


def test_cli_chain_is_two_runs_in_one(model, folder, tmp_path, capsys):
  """``-p A -p B`` gives what ``-p A`` then ``-p B`` on its outputs gives, pixel for
  pixel (PNG inputs keep their names, so their noise), in one run and one folder."""
  common = ["--model", model, "--resolution", str(RES), "--steps", "3", "--seed", "4"]
  code, out, err = _edit(capsys, str(folder), "-p", A.instruction, "-p", B.instruction,
                         "-o", str(tmp_path / "chain"), *common)
  assert code == 0 and "edited 3" in out, err
  assert _edit(capsys, str(folder), "-p", A.instruction, "-o", str(tmp_path / "one"), *common)[0] == 0
  assert _edit(capsys, str(tmp_path / "one"), "-p", B.instruction, "-o", str(tmp_path / "two"),
               *common)[0] == 0
  for name in ("a.png", "b.png", "wide.png"):
    chained = _pixels(Image.open(tmp_path / "chain" / name))
    assert chained.tobytes() == _pixels(Image.open(tmp_path / "two" / name)).tobytes(), name
  record = json.loads(Image.open(tmp_path / "chain" / "wide.png").info["ip2p_jax"])
  assert [s["instruction"] for s in record["chain"]] == [A.instruction, B.instruction]
  assert all(s["seed"] == 4 and s["sampler"] == "euler_ancestral" for s in record["chain"])
  # A rerun keeps the outputs; a chain of other steps into the folder is refused.
  code, out, _ = _edit(capsys, str(folder), "-p", A.instruction, "-p", B.instruction,
                       "-o", str(tmp_path / "chain"), *common)
  assert code == 0 and "kept 3 existing" in out
  code, _, err = _edit(capsys, str(folder), "-p", A.instruction, "-o", str(tmp_path / "chain"),
                       *common)
  assert code == 2 and "made otherwise" in err and "chain" in err


def test_cli_replays_a_saved_chain(model, pipe, chain, folder, tmp_path, capsys):
  """``--chain`` takes every step's own settings and the chain's resolution; on the
  chain's own source it says the result is the recorded one."""
  from ip2p_jax.checkpoints.fingerprint import folder_hash
  saved = chain.branch(2)
  saved.model = folder_hash(model)
  saved.save(str(tmp_path / "chain.json"))
  code, out, err = _edit(capsys, str(folder), "--chain", str(tmp_path / "chain.json"),
                         "-o", str(tmp_path / "out"), "--model", model)
  assert code == 0 and "edited 3" in out, err
  assert "wide.png: the chain's recorded result, pixel for pixel" in out
  assert "warning" not in err
  assert _pixels(Image.open(tmp_path / "out" / "wide.png")).tobytes() == \
      _pixels(chain.images[1]).tobytes()
  replay_a = EditChain.load(str(tmp_path / "chain.json")).replay(
      pipe, Image.open(folder / "a.png"), "a.png")
  assert pixels_sha256(Image.open(tmp_path / "out" / "a.png")) == replay_a.output_sha256[-1]


def test_run_on_files_is_the_cli_chain_in_python(pipe, chain, folder, tmp_path):
  """``EditChain.run_on_files``: every file gets the whole chain with its own noise, the
  same pixels as a replay on that file; a second call resumes (nothing redone)."""
  report = chain.run_on_files(pipe, [str(folder)], str(tmp_path / "out"))
  assert {"a.png", "b.png", "wide.png"} <= set(os.listdir(tmp_path / "out"))
  assert not report.failed
  assert _pixels(Image.open(tmp_path / "out" / "wide.png")).tobytes() == \
      _pixels(chain.images[1]).tobytes()
  replay_b = chain.replay(pipe, Image.open(folder / "b.png"), "b.png")
  assert pixels_sha256(Image.open(tmp_path / "out" / "b.png")) == replay_b.output_sha256[-1]
  again = chain.run_on_files(pipe, [str(folder)], str(tmp_path / "out"))
  assert len(again.skipped_existing) == 3


@pytest.mark.parametrize("extra,message", [
    (["-p", "x", "--chain", "c.json"], "give -p/--prompt or --chain, not both"),
    (["--chain", "c.json", "--seed", "3"], "--seed: with --chain every step has its own"),
    (["--chain", "missing.json"], "missing.json: no such chain file"),
    (["-p", "x", "-p", "y", "--grid"], "--grid sweeps the scales of one edit"),
    ([], "the following arguments are required: -p/--prompt (or --chain FILE)"),
])
def test_cli_chain_errors_are_one_line_before_any_work(model, chain, folder, tmp_path, capsys,
                                                       extra, message):
  chain.save(str(tmp_path / "c.json"))
  extra = [str(tmp_path / e) if e.endswith(".json") else e for e in extra]
  code, _, err = _edit(capsys, str(folder / "a.png"), "-o", str(tmp_path / "out"), "--model",
                       model, *extra)
  assert code == 2 and message in err and err.count("\n") == 1, err
  assert not (tmp_path / "out").exists()
