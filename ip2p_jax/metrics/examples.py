"""Where evaluation examples come from: the regenerated held-out split, or a built
shapes dataset (``ip2p data shapes``) matched back to its scene graphs.

A built dataset stores images, texts and masks but not the scene graphs that
success is judged from. Its TFDS config name (``s{size}_n{num}_h{heldout}_seed{seed}``,
written by ``ip2p data shapes`` and the training loop) records the seed, so each
record is matched to ``shapes.generate(seed, i, size, split)`` by its instruction and
pixels. A record that matches nothing (a dataset renamed, or made by another
version of the shapes world) keeps no scene graph: it is scored by PSNR and PSNR
outside its stored edit mask only, with ``success`` None.
"""
from __future__ import annotations

import hashlib
import json
import os
import re

import numpy as np

from ip2p_jax.data import shapes

_CONFIG_NAME = re.compile(r"^s(\d+)_n(\d+)_h(\d+)_seed(\d+)$")


def heldout_examples(num: int, size: int, seed: int = 0, split: str = "heldout",
                     edit_types=shapes.EDIT_TYPES) -> list[shapes.Example]:
  """Examples ``0..num-1`` of ``split``, regenerated (deterministic in ``seed`` and
  ``edit_types``; the default is the shapes world's default mix)."""
  return [shapes.generate(seed, i, size, split, edit_types) for i in range(num)]


def _key(instruction: str, input_image: np.ndarray, edited_image: np.ndarray) -> tuple:
  digest = hashlib.sha1(np.ascontiguousarray(input_image).tobytes())
  digest.update(np.ascontiguousarray(edited_image).tobytes())
  return instruction, digest.hexdigest()


def _text(value) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def dataset_recipe(folder: str) -> dict | None:
  """``{"size", "num_train", "num_heldout", "seed"}`` from a shapes dataset's config
  name, or None if it does not follow ``ip2p data shapes``' naming."""
  with open(os.path.join(folder, "dataset_info.json"), encoding="utf-8") as f:
    info = json.load(f)
  m = _CONFIG_NAME.match(info.get("configName", ""))
  if info.get("name") != "shapes_world" or not m:
    return None
  size, num_train, num_heldout, seed = map(int, m.groups())
  return dict(size=size, num_train=num_train, num_heldout=num_heldout, seed=seed)


def dataset_examples(path: str, split: str = "heldout",
                     num: int | None = None) -> tuple[list[shapes.Example], int]:
  """The first ``num`` records of ``split`` of a built shapes dataset, as examples;
  returns ``(examples, unmatched)`` where ``unmatched`` records carry no scene graph
  (``input_scene`` None; see the module docstring)."""
  from ip2p_jax.data import builders
  folder = builders.find_dataset(path)
  if not {"edit_type", "edit_mask", "input_masks"} <= set(builders.features(folder)):
    raise ValueError(f"{folder}: not a shapes-world dataset (ip2p data shapes)")
  source = builders.open_split(folder, split)
  count = len(source) if num is None else min(num, len(source))
  recipe = dataset_recipe(folder)
  known = {}
  if recipe is not None:
    total = recipe["num_heldout" if split == "heldout" else "num_train"]
    for i in range(total):
      ex = shapes.generate(recipe["seed"], i, recipe["size"], split)
      known[_key(ex.instruction, ex.input_image, ex.edited_image)] = ex
  examples, unmatched = [], 0
  for r in range(count):
    record = source[r]
    inp, out = np.asarray(record["input_image"]), np.asarray(record["edited_image"])
    match = known.get(_key(_text(record["instruction"]), inp, out))
    if match is None:
      unmatched += 1
      match = shapes.Example(
          inp, out, _text(record["instruction"]), _text(record["input_caption"]),
          _text(record["edited_caption"]), _text(record["edit_type"]),
          np.asarray(record["input_masks"])[..., 0], np.asarray(record["edited_masks"])[..., 0],
          np.asarray(record["edit_mask"])[..., 0] > 0, None, None)
    examples.append(match)
  return examples, unmatched
