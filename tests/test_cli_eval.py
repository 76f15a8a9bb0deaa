"""``ip2p eval`` on the tiny random model: the files it writes, built datasets, errors."""
import csv
import json
import os

import numpy as np
import pytest
from PIL import Image

from clip_fixtures import save_tiny_clip
from ip2p_jax import metrics
from ip2p_jax.cli import main
from ip2p_jax.data import builders, shapes
from ip2p_jax.metrics import report as reports

FAST = ["--steps", "2", "--no-compilation-cache"]


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
  folder = tmp_path_factory.mktemp("clip")
  save_tiny_clip(folder)
  return str(folder)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  out = tmp_path_factory.mktemp("data")
  path, _ = builders.build("shapes_world", str(out), builders.ShapesWorldConfig(
      name="s16_n1_h4_seed2", size=16, num_train=1, num_heldout=4, seed=2))
  return path


@pytest.fixture
def no_default_clip(monkeypatch, tmp_path):
  monkeypatch.setattr(metrics, "DEFAULT_CLIP", str(tmp_path / "no_clip_here"))


def test_eval_writes_json_markdown_and_sheet(model, clip, tmp_path, capsys):
  out = tmp_path / "eval"
  rc = main(["eval", "--model", model, "--num", "6", "--out", str(out), "--clip", clip,
             "--batch-size", "4", "--sheet-rows", "4", *FAST])
  captured = capsys.readouterr()
  assert rc == 0, captured.err
  result = json.load(open(out / "eval.json"))
  assert list(result["per_edit_type"]) == list(shapes.EDIT_TYPES)
  assert result["overall"]["n"] == 6 == sum(g["n"] for g in result["per_edit_type"].values())
  assert result["held_out"]["n"] == 6  # the regenerated held-out split
  assert result["size"] == 16 and result["data"] == "regenerated"  # the tiny model's native size
  assert result["settings"]["num_inference_steps"] == 2 and result["clip"] == os.path.abspath(clip)
  assert all(isinstance(s["success"], bool) for s in result["examples"])
  for key in metrics.CLIP_KEYS:
    assert -1 <= result["overall"][key] <= 1
  table = (out / "eval.md").read_text()
  assert "| edit type | n | success | PSNR (dB) | PSNR outside (dB) | sim_0" in table
  # The VAE line is the folder's own autoencoder: diffusers' PyTorch AutoencoderKL on the
  # same inputs (posterior mode, 8-bit output), per-image PSNR averaged, within 0.05 dB
  # (an 8-bit rounding of a few pixels may differ).
  import torch
  from diffusers import AutoencoderKL
  inputs = np.stack([e.input_image for e in metrics.heldout_examples(6, 16, 0)])
  vae = AutoencoderKL.from_pretrained(os.path.join(model, "vae")).eval()
  with torch.no_grad():
    x = torch.from_numpy(inputs).permute(0, 3, 1, 2).float() / 127.5 - 1
    y = vae.decode(vae.encode(x).latent_dist.mode()).sample
  back = ((y.permute(0, 2, 3, 1).numpy() + 1) * 127.5).clip(0, 255).round().astype(np.uint8)
  want = np.mean([metrics.psnr(a, b) for a, b in zip(inputs, back)])
  assert abs(result["vae_psnr"] - want) < 0.05 and want < 100, (result["vae_psnr"], want)
  assert f"{result['vae_psnr']:.2f} dB PSNR" in table
  for edit_type in shapes.EDIT_TYPES:
    assert f"| {edit_type} | {result['per_edit_type'][edit_type]['n']} |" in table
  sheet = Image.open(out / "sheet.png")
  assert sheet.size == reports.sheet_size(4)
  # the output column holds the model's outputs: neither blank cells nor the inputs again
  x = 2 * reports.MARGIN + reports.TILE + reports.TEXT_WIDTH + reports.MARGIN
  rows = slice(reports.HEADER, reports.HEADER + reports.TILE)
  pixels = np.asarray(sheet.convert("RGB"), np.int16)
  cell = pixels[rows, x:x + reports.TILE]
  given = pixels[rows, reports.MARGIN:reports.MARGIN + reports.TILE]
  assert cell.std() > 0 and np.abs(cell - given).mean() > 1.0
  assert "success" in captured.out and str(out) in captured.out


def test_sweep_writes_csv_and_plot(model, clip, tmp_path, capsys):
  out = tmp_path / "sweep"
  rc = main(["eval", "--model", model, "--num", "2", "--out", str(out), "--clip", clip,
             "--sweep", "--batch-size", "2", *FAST])
  assert rc == 0, capsys.readouterr().err
  rows = list(csv.DictReader(open(out / "sweep.csv")))
  assert len(rows) == len(reports.SWEEP_POINTS) == 14
  assert [(float(r["text_scale"]), float(r["image_scale"]), r["sweep"]) for r in rows] == \
      list(reports.SWEEP_POINTS)
  assert {float(r["image_scale"]) for r in rows if r["sweep"] == "image"} == \
      {1.0, 1.2, 1.4, 1.6, 1.8, 2.0, 2.2}
  for r in rows:
    assert -1 <= float(r["sim_direction"]) <= 1 and -1 <= float(r["sim_image"]) <= 1
    assert 0 <= float(r["success"]) <= 1
  # Two scales give two sets of outputs: the points differ.
  assert len({r["sim_image"] for r in rows}) > 1
  assert Image.open(out / "sweep.png").size[0] > 100
  assert len(json.load(open(out / "eval.json"))["sweep"]) == 14
  # Each row is the eval at its own scales: a plain `ip2p eval` at two of them (one from
  # each sweep) gives the row's numbers.
  for text_scale, image_scale in ((3.0, 1.5), (7.5, 2.2)):
    single = tmp_path / f"t{text_scale}_i{image_scale}"
    rc = main(["eval", "--model", model, "--num", "2", "--out", str(single), "--clip", clip,
               "--batch-size", "2", "--text-scale", str(text_scale),
               "--image-scale", str(image_scale), *FAST])
    assert rc == 0, capsys.readouterr().err
    overall = json.load(open(single / "eval.json"))["overall"]
    row = next(r for r in rows if (float(r["text_scale"]), float(r["image_scale"])) ==
               (text_scale, image_scale))
    for key in reports.SWEEP_COLUMNS[3:]:  # "" where undefined (no region outside a global edit)
      value = None if row[key] == "" else float(row[key])
      assert value == pytest.approx(overall[key], abs=1e-6), (key, row, overall)
    assert float(row["sim_direction"]) == pytest.approx(overall["sim_direction"], abs=1e-6)


def test_eval_on_a_built_dataset(model, dataset, tmp_path, capsys, no_default_clip):
  out = tmp_path / "eval"
  rc = main(["eval", "--model", model, "--data", dataset, "--out", str(out), "--steps", "1",
             "--no-compilation-cache"])
  captured = capsys.readouterr()
  assert rc == 0, captured.err
  assert "CLIP metrics skipped" in captured.out
  result = json.load(open(out / "eval.json"))
  assert result["overall"]["n"] == 4 and result["overall"]["n_scored"] == 4
  assert result["clip"] is None and "sim_image" not in result["overall"]
  assert result["data"] == os.path.abspath(dataset) and result["split"] == "heldout"


def test_dataset_records_are_matched_to_their_scene_graphs(dataset, tmp_path):
  examples, unmatched = metrics.dataset_examples(dataset, "heldout")
  assert unmatched == 0 and len(examples) == 4
  regenerated = {e.instruction: e for e in (shapes.generate(2, i, 16, "heldout")
                                            for i in range(4))}
  for e in examples:
    assert e.input_scene == regenerated[e.instruction].input_scene
    assert metrics.score_edit(e, e.edited_image)["success"] is True
  # Renamed (seed unknown): no scene graphs, PSNRs only.
  import shutil
  copy = tmp_path / "renamed"
  shutil.copytree(dataset, copy)
  info = json.load(open(copy / "dataset_info.json"))
  info["configName"] = "custom"
  json.dump(info, open(copy / "dataset_info.json", "w"))
  examples, unmatched = metrics.dataset_examples(str(copy), "heldout", num=3)
  assert unmatched == 3 and all(e.input_scene is None for e in examples)
  for e in examples:
    s = metrics.score_edit(e, e.edited_image)
    assert s["success"] is None and s["psnr"] == 100.0
    assert (s["psnr_outside"] is None) == (e.edit_type in shapes.GLOBAL_EDITS)


@pytest.mark.parametrize("extra,message", [
    (["--sweep"], "--sweep plots CLIP similarities"),
    (["--clip", "/nonexistent/clip"], "--clip: /nonexistent/clip: not a CLIP model folder"),
    (["--num", "0"], "--num, --steps and --batch-size must be >= 1"),
    (["--data", "/nonexistent/data"], "no TFDS dataset"),
    (["--sampler", "ddim", "--karras"], "--karras: ddim has no Karras sigmas in diffusers"),
    (["--karras"], "--karras: euler_ancestral has no Karras sigmas"),  # the folder's own
])
def test_errors_are_one_line(model, tmp_path, capsys, no_default_clip, extra, message):
  rc = main(["eval", "--model", model, "--out", str(tmp_path / "o"), *FAST, *extra])
  err = capsys.readouterr().err.strip().splitlines()
  assert rc == 2 and len(err) == 1 and err[0].startswith("ip2p: error:"), err
  assert message in err[0]


@pytest.mark.parametrize("extra,message", [
    (["--adapter", "/nonexistent/a.safetensors"], "--adapter /nonexistent/a.safetensors: no such"),
    (["--data", "/nonexistent/data", "--edit-types", "recolor"], "--edit-types selects among"),
])
def test_argument_errors_come_before_the_model_loads(tmp_path, capsys, extra, message):
  # The model folder does not exist: the argument's own error must come first.
  rc = main(["eval", "--model", str(tmp_path / "no_model"), "--out", str(tmp_path / "o"),
             *extra])
  err = capsys.readouterr().err.strip().splitlines()
  assert rc == 2 and len(err) == 1 and message in err[0], err


def test_karras_and_sampler_as_in_edit(model, tmp_path, capsys, no_default_clip):
  """``ip2p eval --sampler euler --karras`` edits with Karras sigmas (recorded in
  eval.json), as ``ip2p edit`` does: other pixels than without ``--karras``."""
  results = {}
  for karras in (False, True):
    out = tmp_path / f"karras_{karras}"
    rc = main(["eval", "--model", model, "--num", "2", "--out", str(out), "--sampler", "euler",
               *FAST, "--steps", "4",  # (with 2 steps Karras' sigmas are the usual two)
               *(["--karras"] if karras else [])])
    assert rc == 0, capsys.readouterr().err
    results[karras] = json.load(open(out / "eval.json"))
  assert results[True]["settings"]["use_karras_sigmas"] is True
  assert "use_karras_sigmas" not in results[False]["settings"]
  assert results[True]["settings"]["scheduler"] == results[False]["settings"]["scheduler"] == "euler"
  psnr = {k: [e["psnr"] for e in r["examples"]] for k, r in results.items()}
  assert psnr[True] != psnr[False]
