"""The shapes world's "sepia" edit (outside the default mix; the customization example's
new concept): exact targets, a scorer that tells it from the other whole-image edits,
the default mix and its verdicts untouched, and ``ip2p eval --edit-types sepia
--adapter``."""
import json

import numpy as np
import pytest

from ip2p_jax import metrics
from ip2p_jax.adapters import files, lora, targets
from ip2p_jax.cli import build_parser, main
from ip2p_jax.data import shapes
from ip2p_jax.metrics import aggregate, heldout_examples, report, score_edit


def test_sepia_examples_are_exact_and_whole_image():
  for split in ("train", "heldout"):
    for i in range(4):
      ex = shapes.generate(0, i, 32, split, edit_types=("sepia",))
      assert ex.edit_type == "sepia" and ex.instruction in shapes.TEMPLATES["sepia"]
      assert ex.edited_caption.endswith(", in sepia") and ex.edit_mask.all()
      r, g, b = ex.input_image.reshape(-1, 3).astype(np.float64).T
      want = np.stack([0.393 * r + 0.769 * g + 0.189 * b, 0.349 * r + 0.686 * g + 0.168 * b,
                       0.272 * r + 0.534 * g + 0.131 * b], -1)
      assert np.abs(ex.edited_image.reshape(-1, 3) - np.clip(want, 0, 255)).max() <= 0.5 + 1e-3


def test_the_default_mix_never_makes_sepia_and_other_names_are_refused():
  assert "sepia" not in shapes.EDIT_TYPES and "sepia" in shapes.ALL_EDIT_TYPES
  assert {shapes.generate(0, i, 16, "heldout").edit_type for i in range(60)} <= set(
      shapes.EDIT_TYPES)
  with pytest.raises(ValueError, match="sepia"):
    shapes.generate(0, 0, 16, edit_types=("sepiaa",))


def test_sepia_is_scored_against_the_other_whole_image_edits():
  examples = heldout_examples(8, 64, edit_types=("sepia",))
  for ex in examples:
    assert score_edit(ex, ex.edited_image)["success"]
    assert not score_edit(ex, ex.input_image)["success"]
    gray = shapes._apply_effect(ex.input_image, "grayscale")  # the nearest other edit
    s = score_edit(ex, gray)
    assert not s["success"] and s["detail"]["nearest_edit"] == "grayscale"
    assert s["psnr_outside"] is None
  # The default mix's global verdicts do not consider sepia.
  gray_ex = next(e for e in heldout_examples(40, 32) if e.edit_type == "grayscale")
  toned = shapes._apply_effect(gray_ex.input_image, "sepia")
  assert score_edit(gray_ex, toned)["detail"]["nearest_edit"] != "sepia"


def test_reports_list_sepia_only_when_present():
  mix = heldout_examples(6, 16)
  scores = [score_edit(e, e.edited_image) for e in mix]
  assert list(aggregate.summarize(scores)["per_edit_type"]) == list(shapes.EDIT_TYPES)
  sepia = [score_edit(e, e.edited_image) for e in heldout_examples(2, 16, edit_types=("sepia",))]
  summary = aggregate.summarize(scores + sepia)
  assert list(summary["per_edit_type"])[-1] == "sepia"
  assert summary["per_edit_type"]["sepia"] == {**summary["per_edit_type"]["sepia"], "n": 2,
                                               "success": 1.0}
  assert report.sheet_rows(["recolor", "sepia", "sepia"], 2) == [0, 1]


def test_eval_cli_options():
  args = build_parser().parse_args(["eval", "--edit-types", "sepia,grayscale",
                                    "--adapter", "a.safetensors:0.5"])
  assert args.edit_types == ("sepia", "grayscale") and args.adapter == [("a.safetensors", 0.5)]
  with pytest.raises(SystemExit):
    build_parser().parse_args(["eval", "--edit-types", "striped"])


def test_eval_scores_sepia_edits_with_an_adapter(model, tmp_path, monkeypatch):
  """``ip2p eval --edit-types sepia --adapter``: only sepia examples, the adapter applied
  and recorded (tiny random model: the numbers mean nothing, the plumbing does)."""
  from ip2p_jax.checkpoints import load_pipeline
  import jax
  base = load_pipeline(model)
  paths = targets.select(base.params["unet"], ("to_q",))
  weights = lora.init(base.params["unet"], paths, 2, jax.random.key(0))
  rng = np.random.default_rng(0)  # lora.init zeroes B (a no-op adapter): make it act
  weights = {p: {k: (rng.normal(0, 0.5, np.shape(v)).astype(np.float32) if k == "lora_B"
                     else np.asarray(v))
                 for k, v in w.items()} for p, w in weights.items()}
  adapter = str(tmp_path / "a.safetensors")
  files.save(adapter, files.Adapter("lora", lora=lora.LoRA(
      {p: {k: np.asarray(v) for k, v in w.items()} for p, w in weights.items()},
      {p: 2.0 for p in paths})))
  out = tmp_path / "eval"
  monkeypatch.setattr(metrics, "DEFAULT_CLIP", str(tmp_path / "no_clip_here"))
  assert main(["eval", "--model", model, "--edit-types", "sepia", "--num", "2", "--steps", "2",
               "--adapter", f"{adapter}:0.5", "--out", str(out), "--no-compilation-cache",
               "--batch-size", "2", "--sheet-rows", "2"]) == 0
  result = json.load(open(out / "eval.json"))
  assert result["per_edit_type"]["sepia"]["n"] == 2 == result["overall"]["n"]
  assert result["edit_types"] == ["sepia"]
  assert result["adapters"][0]["scale"] == 0.5 and result["adapters"][0]["sha256"].startswith(
      "sha256:")
  # ... and applied: the same examples without it come out differently (the eval is
  # deterministic, so an ignored adapter would give identical scores; on this tiny random
  # model the change is small: measured 4e-4 dB)
  plain = tmp_path / "eval_plain"
  assert main(["eval", "--model", model, "--edit-types", "sepia", "--num", "2", "--steps", "2",
               "--out", str(plain), "--no-compilation-cache", "--batch-size", "2",
               "--sheet-rows", "2"]) == 0
  with_adapter = [e["psnr"] for e in result["examples"]]
  without = [e["psnr"] for e in json.load(open(plain / "eval.json"))["examples"]]
  assert with_adapter != without
