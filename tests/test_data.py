"""Data: the shapes world's exact ground truth, TFDS builders from files the test writes,
and the grain pipeline's determinism, sharding, paired augmentation and resume."""
import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from ip2p_jax.data import builders, shapes
from ip2p_jax.data import input_pipeline as ip


# -- shapes world ---------------------------------------------------------------------

@pytest.mark.parametrize("size", [32, 64, 128])
def test_local_edits_change_exactly_the_edited_objects(size):
  counts = {}
  for i in range(120 if size < 128 else 40):
    ex = shapes.generate(seed=7, index=i, size=size)
    counts[ex.edit_type] = counts.get(ex.edit_type, 0) + 1
    changed = np.any(ex.input_image != ex.edited_image, axis=-1)
    if ex.edit_type in shapes.LOCAL_EDITS:
      assert not np.any(changed & ~ex.edit_mask), (ex.edit_type, ex.instruction)
      # Where a removed object's interior is not under an added object (or vice versa),
      # object and background swap, so pixels must change; a recolor changes its interior.
      old, new = set(ex.input_scene.objects), set(ex.edited_scene.objects)
      interior = lambda objs: np.any([shapes.coverage(o, size) == 1.0 for o in objs] or
                                     [np.zeros((size, size), bool)], axis=0)
      support = lambda objs: np.any([shapes.coverage(o, size) > 0 for o in objs] or
                                    [np.zeros((size, size), bool)], axis=0)
      removed, added = old - new, new - old
      swapped = (interior(removed) & ~support(added)) | (interior(added) & ~support(removed))
      if ex.edit_type == "recolor":
        swapped = interior(removed)
      if swapped.any():
        assert changed[swapped].mean() > 0.95, ex.instruction
    elif ex.edit_type == "invert":
      np.testing.assert_array_equal(ex.edited_image, 255 - ex.input_image)
    elif ex.edit_type == "grayscale":
      assert (ex.edited_image == ex.edited_image[..., :1]).all()
    elif ex.edit_type == "darken":
      assert ex.edited_image.mean() < 0.5 * ex.input_image.mean() + 12
    elif ex.edit_type == "flip":
      np.testing.assert_array_equal(ex.edited_image, ex.input_image[:, ::-1])
    # The target is exactly the edited scene graph's rendering.
    np.testing.assert_array_equal(ex.edited_image, shapes.render(ex.edited_scene, size)[0])
  if size < 128:
    assert set(counts) == set(shapes.EDIT_TYPES)


def test_examples_are_deterministic_and_captions_describe_the_scene():
  a, b = shapes.generate(3, 11), shapes.generate(3, 11)
  np.testing.assert_array_equal(a.input_image, b.input_image)
  assert a.instruction == b.instruction
  assert shapes.generate(4, 11).instruction != a.instruction or \
      not np.array_equal(shapes.generate(4, 11).input_image, a.input_image)
  for obj in a.input_scene.objects:
    assert f"{obj.color} {obj.shape}" in a.input_caption
  assert a.input_scene.background in a.input_caption


def test_instructions_name_their_object_unambiguously():
  for i in range(200):
    ex = shapes.generate(1, i)
    if ex.edit_type in ("recolor", "reshape", "remove", "move", "resize"):
      changed = set(ex.input_scene.objects) - set(ex.edited_scene.objects)
      (target,) = changed
      ref = shapes.reference(ex.input_scene, target)
      assert ref in ex.instruction
      matches = [o for o in ex.input_scene.objects if ref in (o.shape, f"{o.color} {o.shape}")]
      assert matches == [target]


def test_held_out_combinations_never_appear_in_train():
  for i in range(300):
    ex = shapes.generate(0, i, split="train")
    pairs = {(o.color, o.shape) for s in (ex.input_scene, ex.edited_scene) for o in s.objects}
    assert not pairs & shapes.HELD_OUT_PAIRS
  for i in range(40):
    ex = shapes.generate(0, i, split="heldout")
    target = None
    changed = set(ex.input_scene.objects) ^ set(ex.edited_scene.objects)
    if changed:
      target = sorted(changed, key=lambda o: o in ex.edited_scene.objects)[0].shape
    assert shapes.is_held_out(ex.input_scene, ex.edited_scene, ex.edit_type, target)


# -- builders --------------------------------------------------------------------------

def _jpeg(color, size=(20, 16)):
  buf = io.BytesIO()
  Image.new("RGB", size, color).save(buf, format="JPEG")
  return buf.getvalue()


def _read_all(path, split="train"):
  src = builders.open_split(path, split)
  return [src[i] for i in range(len(src))]


def test_shapes_world_builder(tmp_path):
  path, report = builders.build("shapes_world", str(tmp_path), builders.ShapesWorldConfig(
      name="t", size=32, num_train=12, num_heldout=3, seed=5))
  assert report == {"train_written": 12, "heldout_written": 3}
  rows = _read_all(path)
  assert len(rows) == 12 and rows[0]["input_image"].shape == (32, 32, 3)
  assert rows[0]["edit_mask"].shape == (32, 32, 1)
  assert builders.splits(path) == ["heldout", "train"]
  # Rebuilding is a no-op that returns the stored report.
  assert builders.build("shapes_world", str(tmp_path), builders.ShapesWorldConfig(
      name="t", size=32, num_train=12, num_heldout=3, seed=5))[1] == report


def test_shapes_world_rendered_by_worker_processes_writes_the_same_files(tmp_path, monkeypatch):
  """Large splits are rendered by a process pool; every example is a function of
  (seed, index) and the pool keeps their order, so the files are byte for byte the
  serial build's."""
  def build(where):
    path, report = builders.build("shapes_world", str(tmp_path / where),
                                  builders.ShapesWorldConfig(name="p", size=16, num_train=40,
                                                             num_heldout=0, seed=3))
    assert report == {"train_written": 40}
    files = sorted(f for f in os.listdir(path) if ".array_record" in f)
    return [open(os.path.join(path, f), "rb").read() for f in files]

  serial = build("serial")
  monkeypatch.setattr(builders, "SHAPES_PARALLEL_FROM", 10)
  monkeypatch.setattr(os, "cpu_count", lambda: 2)  # a pool on a one-core runner too
  contexts = []
  real = builders.multiprocessing.get_context
  monkeypatch.setattr(builders.multiprocessing, "get_context",
                      lambda method: contexts.append(method) or real(method))
  assert build("pool") == serial and len(serial) == 1
  assert contexts == ["spawn"]  # the pool did render them


def test_instructpix2pix_folder_format_skips_and_counts(tmp_path):
  root = tmp_path / "ip2p"
  listing = [["0001", [11, 12]], ["0002", [21]], ["missing_dir", [31, 32]], ["0004", [41]]]
  for name, seeds in listing:
    if name == "missing_dir":
      continue
    d = root / name
    d.mkdir(parents=True)
    prompt = {"edit": "" if name == "0004" else f"edit {name}", "input": f"in {name}",
              "output": f"out {name}"}
    (d / "prompt.json").write_text(json.dumps(prompt))
    for s in seeds:
      (d / f"{s}_0.jpg").write_bytes(_jpeg("red"))
      (d / f"{s}_1.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated" if s == 12 else _jpeg("blue"))
  (root / "seeds.json").write_text(json.dumps(listing))
  path, report = builders.build("instructpix2pix", str(tmp_path / "out"), builders.SourceConfig(
      name="folder", source=str(root), format="ip2p-folder"))
  skipped = {e["item"]: e["reason"] for e in report.pop("skipped")}
  assert report == {"written": 2, "skipped_corrupt_image": 1, "skipped_missing_folder": 1,
                    "skipped_examples_in_missing_folders": 2, "skipped_empty_prompt": 1}
  assert sorted(skipped) == ["0001/12", "0004/41", "missing_dir"]
  assert skipped["0001/12"].startswith("edited image: unreadable image")
  assert "missing_dir/prompt.json is missing (2 examples)" in skipped["missing_dir"]
  assert skipped["0004/41"] == "empty edit instruction"
  rows = sorted(_read_all(path), key=lambda r: r["instruction"])
  assert [r["instruction"] for r in rows] == [b"edit 0001", b"edit 0002"]
  assert rows[0]["input_caption"] == b"in 0001" and rows[0]["edited_caption"] == b"out 0001"
  assert rows[0]["input_image"].shape == (16, 20, 3)
  assert rows[0]["input_image"][..., 0].mean() > 200 and rows[0]["edited_image"][..., 2].mean() > 200


def test_instructpix2pix_parquet_format(tmp_path):
  import pyarrow as pa
  import pyarrow.parquet as pq
  img = lambda b: {"bytes": b, "path": None}
  table = pa.table({
      "original_prompt": ["a cat", "a dog", "a car"],
      "original_image": [img(_jpeg("red")), img(_jpeg("green")), img(b"not an image")],
      "edit_prompt": ["make it a tiger", "  ", "make it red"],
      "edited_prompt": ["a tiger", "a wolf", "a red car"],
      "edited_image": [img(_jpeg("blue")), img(_jpeg("blue")), img(_jpeg("red"))],
  })
  (tmp_path / "pq").mkdir()
  pq.write_table(table, tmp_path / "pq" / "train-00000.parquet")
  path, report = builders.build("instructpix2pix", str(tmp_path / "out"), builders.SourceConfig(
      name="pq", source=str(tmp_path / "pq"), format="hf-parquet"))
  skipped = {e["item"]: e["reason"] for e in report.pop("skipped")}
  assert report == {"written": 1, "skipped_empty_prompt": 1, "skipped_corrupt_image": 1}
  assert skipped["train-00000.parquet/1"] == "empty edit instruction"
  assert skipped["train-00000.parquet/2"].startswith("input image: unreadable image")
  (row,) = _read_all(path)
  assert row["instruction"] == b"make it a tiger" and row["edited_caption"] == b"a tiger"
  assert row["input_caption"] == b"a cat"
  # the pictures in their places: the red original, the blue edit
  assert row["input_image"][..., 0].mean() > 200 and row["input_image"][..., 2].mean() < 50
  assert row["edited_image"][..., 2].mean() > 200 and row["edited_image"][..., 0].mean() < 50


def test_image_captions_from_folder_and_parquet(tmp_path):
  folder = tmp_path / "caps"
  folder.mkdir()
  (folder / "a.jpg").write_bytes(_jpeg("red"))
  (folder / "a.txt").write_text("a red square\n")
  (folder / "b.png").write_bytes(b"\x89PNG broken")
  (folder / "b.txt").write_text("broken")
  (folder / "c.jpg").write_bytes(_jpeg("blue"))
  (folder / "c.txt").write_text("")
  path, report = builders.build("image_captions", str(tmp_path / "o1"), builders.SourceConfig(
      name="f", source=str(folder), format="folder"))
  skipped = {e["item"]: e["reason"] for e in report.pop("skipped")}
  assert report == {"written": 1, "skipped_corrupt_image": 1, "skipped_empty_prompt": 1}
  assert skipped["b.png"].startswith("unreadable image") and skipped["c.jpg"] == "empty caption"
  assert _read_all(path)[0]["caption"] == b"a red square"

  import pyarrow as pa
  import pyarrow.parquet as pq
  pq.write_table(pa.table({"img": [{"bytes": _jpeg("red"), "path": None}], "txt": ["red"]}),
                 tmp_path / "c.parquet")
  path, report = builders.build("image_captions", str(tmp_path / "o2"), builders.SourceConfig(
      name="p", source=str(tmp_path / "c.parquet"), format="parquet", image_column="img",
      text_column="txt"))
  assert report == {"written": 1, "skipped": []} and _read_all(path)[0]["caption"] == b"red"


# -- grain pipeline ----------------------------------------------------------------------

class ListSource:
  """An in-memory triplet source; ``bad`` indices raise like a corrupt record."""

  def __init__(self, n, size=40, bad=(), same=False):
    rng = np.random.default_rng(0)
    self.items = []
    for i in range(n):
      a = rng.integers(0, 256, (size, size + 8, 3), dtype=np.uint8)
      a[0, 0] = [i % 256, i // 256, 0]  # records are identifiable by this pixel
      self.items.append({"input_image": a, "edited_image": a.copy() if same else 255 - a,
                         "instruction": f"edit {i}".encode()})
    self.bad = set(bad)

  def __len__(self):
    return len(self.items)

  def __repr__(self):  # grain checks the source by repr when restoring iterator state
    return f"ListSource({len(self.items)}, bad={sorted(self.bad)})"

  def __getitem__(self, i):
    if i in self.bad:
      raise ValueError(f"corrupt record {i}")
    return self.items[i]


@pytest.fixture(scope="module")
def tok():
  from ip2p_jax import tokenizer
  return tokenizer.load()


def _batches(loader, n):
  it = iter(loader)
  return [next(it) for _ in range(n)]


def test_same_seed_same_batches(tok):
  cfg = ip.PipelineConfig(resolution=32, batch_size=4, seed=3)
  a = _batches(ip.make_loader(ListSource(20), cfg, tokenizer=tok), 6)
  b = _batches(ip.make_loader(ListSource(20), cfg, tokenizer=tok), 6)
  for x, y in zip(a, b):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
  c = _batches(ip.make_loader(ListSource(20), ip.PipelineConfig(resolution=32, batch_size=4,
                                                                seed=4), tokenizer=tok), 1)
  assert not np.array_equal(c[0]["input_ids"], a[0]["input_ids"])


@pytest.mark.parametrize("n,drop", [(25, True), (23, False)])
def test_process_shards_are_disjoint_and_complete(tok, n, drop):
  cfg = ip.PipelineConfig(resolution=32, batch_size=1, shuffle=True, num_epochs=1,
                          drop_remainder=drop)
  seen = []
  for shard in range(3):
    loader = ip.make_loader(ListSource(n), cfg, tokenizer=tok, shard_index=shard, shard_count=3)
    ids = [tuple(b["input_ids"][0]) for b in loader]  # "edit {i}" names the record
    seen.append(ids)
  flat = [i for ids in seen for i in ids]
  assert len(flat) == len(set(flat))
  assert len(flat) == (n // 3) * 3 if drop else len(flat) == n


def test_crop_and_flip_are_identical_on_both_images(tok):
  # edited = 255 - input exactly; without resizing, the pair must stay exact inverses.
  cfg = ip.PipelineConfig(resolution=40, batch_size=8, max_resize=1.0)  # 40x48 -> crop 40x40
  for batch in _batches(ip.make_loader(ListSource(16), cfg, tokenizer=tok), 2):
    np.testing.assert_array_equal(batch["edited_image"], 255 - batch["input_image"])
  # With random resizing too: identical inputs stay identical, and crops do vary.
  cfg = ip.PipelineConfig(resolution=24, batch_size=8, max_resize=1.3)
  batch = _batches(ip.make_loader(ListSource(16, same=True), cfg, tokenizer=tok), 1)[0]
  np.testing.assert_array_equal(batch["edited_image"], batch["input_image"])
  assert batch["input_image"].shape == (8, 24, 24, 3)
  # One picture in every record, no flips: the 8 crops of it are not all the same window.
  source = ListSource(16, same=True)
  for item in source.items:
    item["input_image"] = item["edited_image"] = source.items[0]["input_image"]
  cfg = ip.PipelineConfig(resolution=24, batch_size=8, max_resize=1.3, flip=False)
  batch = _batches(ip.make_loader(source, cfg, tokenizer=tok), 1)[0]
  assert len({image.tobytes() for image in batch["input_image"]}) > 4


def test_resume_from_iterator_state_is_exact(tok):
  cfg = ip.PipelineConfig(resolution=32, batch_size=4, seed=9)
  full = _batches(ip.make_loader(ListSource(30), cfg, tokenizer=tok), 10)
  it = iter(ip.make_loader(ListSource(30), cfg, tokenizer=tok))
  for _ in range(6):
    next(it)
  state = it.get_state()
  resumed = iter(ip.make_loader(ListSource(30), cfg, tokenizer=tok))
  resumed.set_state(state)
  for expected in full[6:]:
    got = next(resumed)
    for k in expected:
      np.testing.assert_array_equal(got[k], expected[k])


def test_corrupt_records_are_skipped_and_counted(tok):
  cfg = ip.PipelineConfig(resolution=32, batch_size=5, shuffle=False, num_epochs=1)
  batches = list(ip.make_loader(ListSource(10, bad={2, 3, 7}), cfg, tokenizer=tok))
  skipped = sum(int(b["corrupt_skipped"].sum()) for b in batches)
  assert skipped == 2 + 1 + 1  # record 2 -> skips 2,3; record 3 -> skips 3; record 7 -> 7
  assert sum(len(b["input_ids"]) for b in batches) == 10


def test_tfds_source_through_grain_with_workers(tmp_path, tok):
  path, _ = builders.build("shapes_world", str(tmp_path), builders.ShapesWorldConfig(
      name="g", size=32, num_train=16, num_heldout=0))
  src = builders.open_split(path, "train", skip_decoding=("input_masks", "edited_masks",
                                                          "edit_mask"))
  cfg = ip.PipelineConfig(resolution=32, batch_size=8, worker_count=2, max_resize=1.0)
  it = iter(ip.make_loader(src, cfg, tokenizer=tok))
  batch = next(it)
  assert batch["input_image"].shape == (8, 32, 32, 3) and batch["input_ids"].shape == (8, 77)
  assert (batch["input_ids"][:, 0] == 49406).all()


def test_a_flipped_pair_mirrors_its_instruction(tok):
  """A horizontal flip of both images must also swap "left" and "right" in the text,
  or it teaches the opposite side; unflipped examples keep their words."""
  assert ip.mirror_text("move the square to the left") == "move the square to the right"
  assert ip.mirror_text(b"add a red star at the top Right") == b"add a red star at the top Left"
  assert ip.mirror_text("make the circle bright") == "make the circle bright"  # whole words
  flip = ip.PairedCropFlip(("input_image", "edited_image"), 8, 1.0, flip=True)
  image = np.arange(8 * 8 * 3, dtype=np.uint8).reshape(8, 8, 3)
  element = {"input_image": image, "edited_image": image, "instruction": b"move it to the left"}
  seen = set()
  for seed in range(16):
    out = flip.random_map(element, np.random.default_rng(seed))
    flipped = not np.array_equal(out["input_image"], image)
    assert out["instruction"] == (b"move it to the right" if flipped else b"move it to the left")
    seen.add(flipped)
  assert seen == {True, False}
