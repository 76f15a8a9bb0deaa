"""Every bad input a one-line error before any work; output folders and datasets that
never lie (issue 13).

One table of commands, each with the exit status and a fragment of the message it must
give. ``ip2p`` commands run in-process (``ip2p_jax.cli.main``); an error must be exactly
one ``ip2p: error:`` line on stderr and must leave no output folder behind. Then the
sequences that need several runs: inputs of the same name in different subfolders,
reruns with other settings, and a second dataset imported into the same folder.
"""
import io
import json
import os
import shutil
import struct
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from ip2p_jax.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EDIT = ["--steps", "2", "--resolution", "16", "--no-compilation-cache"]


def _image(path, seed: int, size=(16, 16)):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  rng = np.random.default_rng(seed)
  Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)


def _broken_model(model: str, folder, change) -> str:
  """A copy of ``model`` with ``change(folder)`` applied."""
  copy = shutil.copytree(model, folder)
  change(copy)
  return str(copy)


def _write_unet_config(value):
  def change(folder):
    path = folder / "unet" / "config.json"
    if value == "[]":
      path.write_text("[]")
    else:
      config = json.loads(path.read_text())
      config.update(value)
      path.write_text(json.dumps(config))
  return change


def _drop_data_offsets(folder):
  """Rewrites the UNet's safetensors header with one entry missing ``data_offsets``."""
  path = folder / "unet" / "diffusion_pytorch_model.safetensors"
  blob = path.read_bytes()
  (n,) = struct.unpack("<Q", blob[:8])
  header = json.loads(blob[8:8 + n])
  name = next(k for k in header if k != "__metadata__")
  del header[name]["data_offsets"]
  text = json.dumps(header, separators=(",", ":")).encode()
  text += b" " * (n - len(text)) if len(text) <= n else b""
  assert len(text) == n
  path.write_bytes(blob[:8] + text + blob[8 + n:])


@pytest.fixture(scope="module")
def world(model, tmp_path_factory):
  """Inputs, broken model folders and data sources the table refers to by name."""
  d = tmp_path_factory.mktemp("world")
  _image(str(d / "in.png"), 0)
  (d / "a_file").write_text("not a folder")
  bin_only = d / "bin_only"
  bin_only.mkdir()
  (bin_only / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x02pickle")
  import pyarrow as pa
  import pyarrow.parquet as pq
  (d / "wrong_pq").mkdir()
  pq.write_table(pa.table({"prompt": ["a"], "image": [b"x"]}), d / "wrong_pq" / "x.parquet")
  return {
      "dir": d, "in": str(d / "in.png"), "model": model, "file": str(d / "a_file"),
      "bin_only": str(bin_only),
      "list_config": _broken_model(model, d / "m_list", _write_unet_config("[]")),
      "abc_config": _broken_model(model, d / "m_abc",
                                  _write_unet_config({"block_out_channels": "abc"})),
      "no_offsets": _broken_model(model, d / "m_offsets", _drop_data_offsets),
      "wrong_pq": str(d / "wrong_pq"),
  }


def _edit(w, *extra, model="model"):
  return ["edit", w["in"], "-p", "make it blue", "-o", str(w["dir"] / "out"), "--model",
          w[model], *EDIT, *extra]


# (id, argv from the world, exit status, fragment of stderr)
CASES = [
    ("text-scale-inf", lambda w: _edit(w, "--text-scale", "inf"), 2,
     "--text-scale must be a finite number, got inf"),
    ("text-scale-nan", lambda w: _edit(w, "--text-scale", "nan"), 2,
     "--text-scale must be a finite number, got nan"),
    ("image-scale-nan", lambda w: _edit(w, "--image-scale", "nan"), 2,
     "--image-scale must be a finite number"),
    ("seed-negative", lambda w: _edit(w, "--seed", "-1"), 2,
     "--seed must be an integer in [0, 4294967295], got -1"),
    ("seed-too-large", lambda w: _edit(w, "--seed", "4294967297"), 2,
     "got 4294967297"),
    ("steps-zero", lambda w: _edit(w, "--steps", "0"), 2, "--steps must be >= 1"),
    ("output-is-a-file", lambda w: [*_edit(w)[:4], "-o", w["file"], *_edit(w)[6:]], 2,
     "a_file: exists and is not a folder"),
    ("output-not-writable", lambda w: [*_edit(w)[:4], "-o", w["file"] + "/sub", *_edit(w)[6:]],
     2, "cannot write there"),
    ("grid-scales-empty", lambda w: _edit(w, "--grid", "--grid-text-scales", ""), 2,
     "holds no scale"),
    ("grid-scales-not-numbers", lambda w: _edit(w, "--grid-image-scales", "1,x"), 2,
     "is not a comma-separated list of numbers"),
    ("missing-input", lambda w: ["edit", str(w["dir"] / "nope.png"), "-p", "x", "-o",
                                 str(w["dir"] / "out"), "--model", w["model"]], 2,
     "nope.png: no such file, folder or matching glob"),
    ("missing-prompt", lambda w: ["edit", w["in"], "-o", str(w["dir"] / "out")], 2,
     "ip2p edit: the following arguments are required: -p/--prompt"),
    ("edit-config-is-a-list", lambda w: _edit(w, model="list_config"), 2,
     "unet/config.json: expected a JSON object"),
    ("info-config-is-a-list", lambda w: ["info", w["list_config"]], 2,
     "unet/config.json: expected a JSON object"),
    ("edit-config-wrong-type", lambda w: _edit(w, model="abc_config"), 2,
     "config key 'block_out_channels' = 'abc' must be a list of int"),
    ("info-config-wrong-type", lambda w: ["info", w["abc_config"]], 2,
     "config key 'block_out_channels' = 'abc' must be a list of int"),
    ("edit-header-no-data-offsets", lambda w: _edit(w, model="no_offsets"), 2,
     "header entry has no 'data_offsets'"),
    ("info-header-no-data-offsets", lambda w: ["info", w["no_offsets"]], 2,
     "header entry has no 'data_offsets'"),
    ("edit-bin-only-model", lambda w: _edit(w, model="bin_only"), 2,
     "holds only pickle-based weights ['diffusion_pytorch_model.bin']"),
    ("info-bin-only-model", lambda w: ["info", w["bin_only"]], 2,
     "holds only pickle-based weights ['diffusion_pytorch_model.bin']"),
    ("parquet-wrong-columns", lambda w: ["data", "import", "--format", "hf-parquet",
                                         w["wrong_pq"], "--out", str(w["dir"] / "out")], 2,
     "missing column(s) ['original_prompt', 'original_image', 'edit_prompt'"),
    ("long-instruction-warns", lambda w: [*_edit(w)[:3], "paint it " * 100, *_edit(w)[4:]], 0,
     "ip2p: warning: the instruction is 202 tokens long; CLIP reads only the first 77"),
]


def _run(argv, capsys):
  code = main(argv)
  captured = capsys.readouterr()
  return code, captured.out, captured.err


@pytest.mark.parametrize("argv,status,fragment", [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_cli_gives_the_right_output_or_one_error_line(world, argv, status, fragment, capsys):
  out_dir = world["dir"] / "out"
  shutil.rmtree(out_dir, ignore_errors=True)
  try:
    code = main(argv(world))
  except SystemExit as e:  # argparse exits from inside parse_args
    code = e.code
  err = capsys.readouterr().err
  assert code == status, err
  assert fragment in err, err
  if status == 2:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("ip2p: error: "), err
    assert not out_dir.exists()  # refused before any work: no output folder made
  else:
    assert os.path.isfile(out_dir / "in.png")


def test_debug_shows_the_traceback(world, capsys):
  assert main(["--debug", "info", world["abc_config"]]) == 2
  err = capsys.readouterr().err
  assert "Traceback (most recent call last)" in err and "block_out_channels" in err
  assert main(["info", world["abc_config"], "--debug"]) == 2  # anywhere on the line
  assert "Traceback" in capsys.readouterr().err


def test_train_script_flag_typo_is_one_line(tmp_path):
  r = subprocess.run([sys.executable, "scripts/train.py", "--config=configs/tiny_ip2p.py",
                      f"--workdir={tmp_path / 'w'}", "--config.totl_steps=3"], cwd=ROOT,
                     capture_output=True, text=True)
  lines = [line for line in r.stderr.splitlines() if line.strip()]
  assert r.returncode == 2 and len(lines) == 1, r.stderr
  assert lines[0].startswith("train.py: error: unknown config key 'totl_steps'")
  assert 'Did you mean "total_steps"' in lines[0]
  assert not (tmp_path / "w").exists()


# -- sequences ----------------------------------------------------------------------


def _manifest(out):
  return json.load(open(out / "manifest.json"))


def _embedded(path):
  with Image.open(path) as im:
    return json.loads(im.info["ip2p_jax"])


def test_same_names_in_subfolders_and_reruns(model, tmp_path, capsys):
  """Issue 13, item 1: two ``img.png`` in different subfolders, then a third added in a
  folder that sorts first; then a rerun with another instruction (item 2)."""
  src, out = tmp_path / "dup", tmp_path / "out"
  _image(str(src / "x" / "img.png"), 1)
  _image(str(src / "y" / "img.png"), 2)
  args = ["edit", str(src), "-p", "make the circle blue", "-o", str(out), "--model", model, *EDIT]
  code, stdout, err = _run(args, capsys)
  assert code == 0, err
  assert "edited 2, kept 0 existing" in stdout
  first = {rel: (out / rel).read_bytes() for rel in ("x/img.png", "y/img.png")}

  _image(str(src / "a" / "img.png"), 3)  # sorts before x and y: list positions all shift
  code, stdout, err = _run(args, capsys)
  assert code == 0, err
  assert "edited 1, kept 2 existing" in stdout
  assert sorted(str(p.relative_to(out)) for p in out.rglob("*.png")) == [
      "a/img.png", "x/img.png", "y/img.png"]
  manifest = _manifest(out)
  assert len(manifest["runs"]) == 2
  assert [len(r["edited"]) for r in manifest["runs"]] == [2, 1]
  for rel in ("a/img.png", "x/img.png", "y/img.png"):
    record = manifest["outputs"][rel]
    assert record == _embedded(out / rel)  # the file carries the same record
    assert record["input"] == str(src / rel)
    assert record["instruction"] == "make the circle blue" and record["steps"] == 2
    assert record["seed"] == 0 and record["text_scale"] == 7.5 and record["image_scale"] == 1.5
    assert record["sampler"] == "euler_ancestral" and record["model"].startswith("sha256:")
  assert len({manifest["outputs"][r]["noise_id"] for r in manifest["outputs"]}) == 3

  # The noise is a function of the relative path, not of the list position: redoing
  # everything with the third file present gives x and y exactly as before.
  code, stdout, err = _run(args + ["--overwrite"], capsys)
  assert code == 0 and "edited 3, kept 0 existing" in stdout, err
  assert {rel: (out / rel).read_bytes() for rel in first} == first

  # Another instruction into the same folder: refused before the model loads, nothing
  # changed, and the message says how to proceed.
  before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
  other = [a if a != "make the circle blue" else "make it red" for a in args]
  code, _, err = _run(other, capsys)
  assert code == 2 and err.count("\n") == 1
  assert "holds 3 output(s) made otherwise" in err and "instruction" in err
  assert "--overwrite" in err and "another -o" in err
  assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
  for flag, value in (("--steps", "3"), ("--seed", "7"), ("--text-scale", "5")):
    code, _, err = _run(args + [flag, value], capsys)
    assert code == 2 and "made otherwise" in err, (flag, err)

  code, stdout, err = _run(other + ["--overwrite"], capsys)
  assert code == 0 and "edited 3" in stdout, err
  manifest = _manifest(out)
  assert len(manifest["runs"]) == 4  # every run kept, appended
  assert [r["settings"]["prompt"] for r in manifest["runs"]] == [
      "make the circle blue"] * 3 + ["make it red"]
  assert all(r["instruction"] == "make it red" for r in manifest["outputs"].values())
  assert _embedded(out / "x/img.png")["instruction"] == "make it red"
  # and the pictures are the new instruction's edits, not the old files relabelled
  pixels = lambda data: np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
  changed = [rel for rel, data in first.items()
             if not np.array_equal(pixels((out / rel).read_bytes()), pixels(data))]
  assert sorted(changed) == sorted(first), changed


def test_inputs_that_would_share_an_output_are_refused(model, tmp_path, capsys):
  _image(str(tmp_path / "a" / "img.png"), 1)
  _image(str(tmp_path / "b" / "img.png"), 2)
  code, _, err = _run(["edit", str(tmp_path / "a" / "img.png"), str(tmp_path / "b" / "img.png"),
                       "-p", "x", "-o", str(tmp_path / "out"), "--model", model, *EDIT], capsys)
  assert code == 2 and "would both be written to" in err and "common folder" in err
  assert not (tmp_path / "out").exists()


def _ip2p_folder(root, name: str, corrupt: bool = False):
  from io import BytesIO
  folder = root / name
  folder.mkdir(parents=True)
  (folder / "prompt.json").write_text(json.dumps({"edit": "make it red", "input": "a",
                                                  "output": "b"}))
  for seed in (1, 2):
    for i in (0, 1):
      buf = BytesIO()
      Image.new("RGB", (8, 8), "blue").save(buf, format="JPEG")
      data = b"\xff\xd8\xff\xe0 broken" if corrupt and seed == 2 and i == 1 else buf.getvalue()
      (folder / f"{seed}_{i}.jpg").write_bytes(data)
  (root / "seeds.json").write_text(json.dumps([[name, [1, 2]], ["gone", [5]]]))


def test_data_import_of_another_source_into_a_used_folder(tmp_path, capsys):
  """Issue 13, item 3, and the report naming each skipped folder and corrupt row."""
  first, second, out = tmp_path / "first", tmp_path / "second", tmp_path / "data"
  _ip2p_folder(first, "f1", corrupt=True)
  _ip2p_folder(second, "s1")
  imp = lambda src, *extra: ["data", "import", "--format", "ip2p-folder", str(src), "--out",
                             str(out), *extra]
  code, stdout, err = _run(imp(first), capsys)
  assert code == 0, err
  assert "written: 1" in stdout
  assert "skipped f1/2: edited image: unreadable image" in stdout
  assert "skipped gone: listed in seeds.json but gone/prompt.json is missing" in stdout
  report = json.load(open(next(out.rglob("build_report.json"))))
  assert {e["item"] for e in report["skipped"]} == {"f1/2", "gone"}

  code, stdout, err = _run(imp(first), capsys)  # the same source again: reused, said so
  assert code == 0 and "already imported" in stdout and "written: 1" in stdout, err

  code, stdout, err = _run(imp(second), capsys)
  assert code == 2 and err.count("\n") == 1
  assert f"it holds an import of {first}" in err and "--overwrite" in err
  assert "already" not in stdout

  code, stdout, err = _run(imp(second, "--overwrite"), capsys)
  assert code == 0, err
  assert "written: 2" in stdout and "f1/2" not in stdout
  assert json.load(open(out / "import.json"))["source"] == str(second)
