"""Writes ``ip2p_jax/assets/demo_examples/``: the pictures ``ip2p demo`` offers as
examples, with an instruction each (``examples.json``). The README's 128 px picture and
three held-out shapes-world scenes whose edits the bundled model does (darken, invert,
grayscale); deterministic.

  python scripts/make_demo_examples.py
"""
import json
import os
import shutil

from PIL import Image

from ip2p_jax import bundled
from ip2p_jax.atomic import atomic_write
from ip2p_jax.data import shapes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(bundled.ASSETS, "demo_examples")


def main():
  os.makedirs(OUT, exist_ok=True)
  shutil.copyfile(os.path.join(ROOT, "examples", "shapes_128.png"),
                  os.path.join(OUT, "shapes_128.png"))
  entries = [{"image": "shapes_128.png", "instruction": "make the circle blue"}]
  for k, edit_type in enumerate(("darken", "invert", "grayscale")):
    example = shapes.generate(seed=12, index=k, size=128, split="heldout",
                              edit_types=(edit_type,))
    name = f"{edit_type}_128.png"
    with atomic_write(os.path.join(OUT, name)) as f:
      Image.fromarray(example.input_image).save(f, format="PNG")
    entries.append({"image": name, "instruction": example.instruction})
  with atomic_write(os.path.join(OUT, "examples.json"), "w", encoding="utf-8") as f:
    json.dump(entries, f, indent=2)
    f.write("\n")
  print("\n".join(f"{e['image']}: {e['instruction']}" for e in entries))


if __name__ == "__main__":
  main()
