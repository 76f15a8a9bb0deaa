"""The layout-free judge of ``metrics.scene_match`` against the shapes world's exact
renders: every judged ground-truth pair passes, the unedited pair and wrong edits fail."""
import collections
import dataclasses

import numpy as np
import pytest

from ip2p_jax.data import shapes
from ip2p_jax.metrics import scene_match
from ip2p_jax.synth.instructions import parse_shapes_caption

SIZE = 128


@pytest.fixture(scope="module")
def examples():
  """300 training examples of every edit type, with their captions parsed back into
  scene descriptions (stand-in places: what the judge sees for generated pictures)."""
  out = []
  for i in range(300):
    e = shapes.generate(11, i, SIZE, "train")
    out.append((e, parse_shapes_caption(e.input_caption), parse_shapes_caption(e.edited_caption)))
  return out


def test_every_judged_ground_truth_pair_passes_and_the_unedited_pair_fails(examples):
  judged = collections.Counter()
  for e, before, after in examples:
    result = scene_match.follows(e.input_image, e.edited_image, before, after)
    if e.edit_type in ("move", "reshape"):  # places are not in captions; shapes keep colours
      assert result["ok"] is None, e.instruction
      continue
    assert result["ok"] is True, (e.instruction, e.input_caption, result)
    assert result["edit"] == e.edit_type
    unedited = scene_match.follows(e.input_image, e.input_image, before, after)
    assert unedited["ok"] is False, (e.instruction, unedited)
    judged[e.edit_type] += 1
  assert set(judged) == set(shapes.EDIT_TYPES) - {"move", "reshape"}, judged


def test_a_recolour_to_another_colour_fails(examples):
  failures = 0
  for e, before, after in examples:
    if e.edit_type != "recolor":
      continue
    edit = scene_match.infer_edit(before, after)
    wrong = next(c for c in shapes.COLORS if c not in (edit.old.color, edit.new.color,
                                                       e.edited_scene.background)
                 and c not in {o.color for o in e.edited_scene.objects})
    objects = tuple(dataclasses.replace(o, color=wrong) if o == next(
        p for p in e.edited_scene.objects if p not in e.input_scene.objects) else o
        for o in e.edited_scene.objects)
    image, _ = shapes.render(dataclasses.replace(e.edited_scene, objects=objects), SIZE)
    assert scene_match.follows(e.input_image, image, before, after)["ok"] is False
    failures += 1
  assert failures >= 10


def test_an_object_edit_that_repaints_the_background_fails(examples):
  checked = 0
  for e, before, after in examples:
    if e.edit_type not in ("recolor", "add", "remove", "resize"):
      continue
    used = {o.color for o in e.edited_scene.objects} | {e.edited_scene.background}
    other = next(c for c in shapes.COLORS if c not in used)
    repainted, _ = shapes.render(dataclasses.replace(e.edited_scene, background=other), SIZE)
    result = scene_match.follows(e.input_image, repainted, before, after)
    assert result["ok"] is False and result["background_kept"] is False, e.instruction
    checked += 1
  assert checked >= 30


def test_depicts_reads_background_and_object_colours(examples):
  for e, before, _ in examples[:60]:
    assert scene_match.depicts(e.input_image, before)["ok"] is True, e.input_caption
    other = next(c for c in shapes.COLORS if c != before.background
                 and c not in {o.color for o in before.objects})
    wrong_bg, _ = shapes.render(dataclasses.replace(e.input_scene, background=other), SIZE)
    result = scene_match.depicts(wrong_bg, before)
    assert result["ok"] is False and result["background"] == other
    empty, _ = shapes.render(dataclasses.replace(e.input_scene, objects=()), SIZE)
    assert scene_match.depicts(empty, before)["missing"], e.input_caption


def test_infer_edit_names_the_change_and_refuses_two():
  red = shapes.Obj("circle", "red", "small", 0.3, 0.5)
  blue = dataclasses.replace(red, color="blue")
  square = shapes.Obj("square", "green", "large", 0.7, 0.5)
  scene = shapes.Scene("white", objects=(red, square))
  assert scene_match.infer_edit(scene, dataclasses.replace(scene, objects=(blue, square))) == \
      scene_match.Edit("recolor", red, blue)
  assert scene_match.infer_edit(scene, dataclasses.replace(scene, objects=(square,))).kind == \
      "remove"
  assert scene_match.infer_edit(scene, dataclasses.replace(scene, effects=("invert",))).kind == \
      "invert"
  two = dataclasses.replace(scene, background="black", objects=(blue, square))
  assert scene_match.infer_edit(scene, two) is None
  assert scene_match.follows(np.zeros((SIZE, SIZE, 3), np.uint8),
                             np.zeros((SIZE, SIZE, 3), np.uint8), scene, two)["ok"] is None
