"""``scripts/diagnose_latents.py`` (the README's latent measurements) on the tiny random
model: its whole-image round trip is ``metrics.vae_psnr``, and an edit whose target is
its input makes the linear prediction, the copy and the ceiling one and the same."""
import dataclasses
import importlib.util
import os

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def diagnose():
  spec = importlib.util.spec_from_file_location(
      "diagnose_latents", os.path.join(ROOT, "scripts", "diagnose_latents.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_round_trip_and_linear_edits(model, diagnose):
  from ip2p_jax import InstructPix2PixPipeline
  from ip2p_jax.metrics import heldout_examples, vae_psnr
  pipe = InstructPix2PixPipeline.from_pretrained(model)
  latents = diagnose.Latents(pipe)
  examples = heldout_examples(4, latents.size, 3)
  regions = diagnose.round_trip(latents, examples)
  assert set(regions) == {"object interiors", "object edges", "background", "whole"}
  want = vae_psnr(pipe, np.stack([e.input_image for e in examples]))
  assert regions["whole"] == pytest.approx(want, abs=1e-6)
  for kind in ("background", "recolor"):
    edits = heldout_examples(3, latents.size, 3, edit_types=[kind])
    scores = diagnose.linear_edits(latents, edits, kind)
    assert all(np.isfinite(v) for v in scores.values()), scores
    # No edit at all (target = input): zero shift, so all three decode the same latents.
    unedited = [dataclasses.replace(e, edited_image=e.input_image) for e in edits]
    same = diagnose.linear_edits(latents, unedited, kind)
    assert same["linear"] == pytest.approx(same["copy"], abs=1e-9)
    assert same["ceiling"] == pytest.approx(same["copy"], abs=1e-9)
    assert same["copy"] != pytest.approx(scores["copy"])  # a real edit moves the target
