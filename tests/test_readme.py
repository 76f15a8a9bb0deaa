"""README.md's Python snippets run as written, in one fresh interpreter, in order.

Where the README names a real model (``ip2p-model``, a local copy of
timbrooks/instruct-pix2pix) the tiny test model folder stands in, and sizes meant for
a 512 px model shrink with it (``resolution=512`` -> 32, the 512x384 resize -> 32x24);
``photo.jpg`` is a 60x45 picture in the working folder. Nothing else is changed.
"""
import os
import re
import subprocess
import sys

import numpy as np
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALLER = {"resolution=512": "resolution=32", "(512, 384)": "(32, 24)"}


def python_snippets() -> list[str]:
  readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
  return re.findall(r"```python\n(.*?)```", readme, re.S)


def test_the_readme_has_the_snippets_this_tests():
  code = "\n".join(python_snippets())
  for name in ("InstructPix2PixPipeline.from_pretrained", "negative_prompt", "callback",
               "num_images_per_prompt", "prompt_embeds", "load_pipeline"):
    assert name in code


def test_readme_python_snippets_run(model, tmp_path):
  code = "\n".join(python_snippets()).replace('"ip2p-model"', repr(model))
  for old, new in SMALLER.items():
    assert old in code
    code = code.replace(old, new)
  # resolution=32 scales 60x45 to 32x24 (the tiny model's multiple is 4: no padding left)
  code += "\nassert len(steps) == 20 and out.images.shape == (1, 24, 32, 3)\nprint('ran')\n"
  rng = np.random.default_rng(0)
  Image.fromarray(rng.integers(0, 256, (45, 60, 3), dtype=np.uint8)).save(tmp_path / "photo.jpg")
  env = {**os.environ, "IP2P_COMPILATION_CACHE": "off"}
  out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=1200)
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.strip().endswith("ran")
  assert Image.open(tmp_path / "edited.png").size == (32, 24)  # the photo's aspect ratio
