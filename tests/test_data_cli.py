"""``ip2p data`` commands and the latent cache."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from ip2p_jax.data import builders, latent_cache


def ip2p(*args):
  return subprocess.run([sys.executable, "-m", "ip2p_jax.cli", *args], capture_output=True,
                        text=True)


def test_shapes_show_and_import(tmp_path):
  r = ip2p("data", "shapes", "--out", str(tmp_path / "s"), "--num", "6", "--heldout", "2",
           "--size", "32")
  assert r.returncode == 0, r.stderr
  assert "train_written: 6" in r.stdout and "heldout_written: 2" in r.stdout
  r = ip2p("data", "show", str(tmp_path / "s"), "--num", "3", "-o", str(tmp_path / "sheet.png"))
  assert r.returncode == 0, r.stderr
  sheet = Image.open(tmp_path / "sheet.png")
  assert sheet.size[1] >= 3 * 128  # three rows of tiles
  # A folder in the original format with one missing listed folder.
  root = tmp_path / "ip2p"
  (root / "a").mkdir(parents=True)
  (root / "a" / "prompt.json").write_text(json.dumps({"edit": "make it red", "input": "x",
                                                      "output": "y"}))
  for i in (0, 1):
    Image.new("RGB", (16, 16), "blue").save(root / "a" / f"5_{i}.jpg")
  (root / "seeds.json").write_text(json.dumps([["a", [5]], ["gone", [1]]]))
  r = ip2p("data", "import", "--format", "ip2p-folder", str(root), "--out", str(tmp_path / "o"))
  assert r.returncode == 0, r.stderr
  assert "written: 1" in r.stdout and "skipped_missing_folder: 1" in r.stdout
  r = ip2p("data", "import", "--format", "hf-parquet", str(tmp_path / "nope"), "--out", "x")
  assert r.returncode == 2 and "no such file" in r.stderr


def test_latent_cache_matches_the_encoders(tmp_path):
  sys.path.insert(0, os.path.dirname(__file__))
  from pipeline_fixtures import save_ip2p
  from ip2p_jax.checkpoints import load_pipeline
  from ip2p_jax import tokenizer as tokenizers
  save_ip2p(tmp_path / "model")
  parts = load_pipeline(str(tmp_path / "model"))
  path, _ = builders.build("shapes_world", str(tmp_path / "d"), builders.ShapesWorldConfig(
      name="c", size=16, num_train=5, num_heldout=0))
  source = builders.open_split(path, "train")
  n = latent_cache.build(source, str(tmp_path / "cache.array_record"), parts, resolution=16,
                         batch_size=2)
  cache = latent_cache.LatentCacheSource(str(tmp_path / "cache.array_record"))
  assert n == len(cache) == 5
  rec, ex = cache[3], source[3]
  vae, text = parts.modules["vae"], parts.modules["text_encoder"]
  post = vae.apply({"params": parts.params["vae"]},
                   ex["input_image"][None].astype(np.float32) / 127.5 - 1, method="encode")
  np.testing.assert_allclose(rec["image_latent"], np.asarray(post.mode())[0], atol=1e-5)
  # every record in the source's order (records are decoded by a thread pool, ahead)
  every = vae.apply({"params": parts.params["vae"]}, np.stack(
      [source[i]["input_image"] for i in range(n)]).astype(np.float32) / 127.5 - 1,
                    method="encode").mode()
  np.testing.assert_allclose(np.stack([cache[i]["image_latent"] for i in range(n)]),
                             np.asarray(every), atol=1e-5)
  ids = tokenizers.tokenize(parts.tokenizer, [ex["instruction"].decode()])
  want = text.apply({"params": parts.params["text_encoder"]}, ids).last_hidden_state[0]
  np.testing.assert_allclose(rec["text"].astype(np.float32), np.asarray(want), atol=2e-3)
  assert rec["text"].dtype == np.float16 and rec["edited_logvar"].shape == rec["edited_mean"].shape
  loader = latent_cache.make_loader(cache, latent_cache.LatentLoaderConfig(batch_size=2),
                                    shard_index=0, shard_count=1)
  batch = next(iter(loader))
  assert batch["image_latent"].shape == (2, 8, 8, 4)

  # Read from memory (the default for small caches, what GPU runs need for speed) or
  # record by record from the file: the same records, and the same shuffled batches.
  on_disk = latent_cache.LatentCacheSource(str(tmp_path / "cache.array_record"),
                                           in_memory=False)
  assert cache.in_memory and not on_disk.in_memory
  for i in range(n):
    assert sorted(cache[i]) == sorted(on_disk[i])
    for key in cache[i]:
      np.testing.assert_array_equal(cache[i][key], on_disk[i][key])
  cache[0].pop("text")  # a caller changing a record does not change the cache
  assert "text" in cache[0]
  batches = [list(latent_cache.make_loader(
      c, latent_cache.LatentLoaderConfig(batch_size=2, seed=3, num_epochs=2),
      shard_index=0, shard_count=1)) for c in (cache, on_disk)]
  assert len(batches[0]) == len(batches[1]) == 5
  for a, b in zip(*batches):
    assert sorted(a) == sorted(b)
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])

  # A run resumes from either loader's checkpointed state into the other (grain's
  # iterator state format), and two shards of the held columns are grain's shards.
  config = latent_cache.LatentLoaderConfig(batch_size=2, seed=5)
  for first, second in ((cache, on_disk), (on_disk, cache)):
    it = iter(latent_cache.make_loader(first, config, shard_index=0, shard_count=1))
    next(it), next(it)
    state = it.get_state()
    want = next(it)
    resumed = iter(latent_cache.make_loader(second, config, shard_index=0, shard_count=1))
    resumed.set_state(state)
    np.testing.assert_array_equal(next(resumed)["text"], want["text"])
  for index in range(2):
    got, want = (next(iter(latent_cache.make_loader(c, config, shard_index=index,
                                                   shard_count=2))) for c in (cache, on_disk))
    np.testing.assert_array_equal(got["image_latent"], want["image_latent"])
  other = latent_cache.make_loader(cache, latent_cache.LatentLoaderConfig(batch_size=2, seed=6),
                                   shard_index=0, shard_count=1)
  with pytest.raises(ValueError, match="data order"):
    iter(other).set_state(state)


def test_a_source_with_nothing_to_import_is_one_line_and_leaves_nothing(tmp_path):
  """An ``ip2p synth`` output that kept no pair (an empty seeds.json), then one whose only
  example is unreadable: one error line saying so, and --out left empty for the rerun."""
  root, out = tmp_path / "synth", tmp_path / "o"
  root.mkdir()
  (root / "seeds.json").write_text("[]")
  r = ip2p("data", "import", "--format", "ip2p-folder", str(root), "--out", str(out))
  last = r.stderr.strip().splitlines()[-1]
  assert r.returncode == 2 and last.startswith("ip2p: error:"), r.stderr[-2000:]
  assert "nothing to import" in last and "empty seeds.json" in last
  assert not os.path.exists(out) or os.listdir(out) == []
  (root / "a").mkdir()
  (root / "a" / "prompt.json").write_text(json.dumps({"edit": "x", "input": "a", "output": "b"}))
  (root / "seeds.json").write_text(json.dumps([["a", [3]]]))  # its images are missing
  r = ip2p("data", "import", "--format", "ip2p-folder", str(root), "--out", str(out))
  last = r.stderr.strip().splitlines()[-1]
  assert r.returncode == 2 and "nothing to import" in last and "skipped" in last, last
  assert os.listdir(out) == []
