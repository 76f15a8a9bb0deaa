"""Installs the trained default model into the package (fp16 safetensors):

  ip2p_jax/assets/default_model/  the InstructPix2Pix editor (runs/default/ip2p/export)
  ip2p_jax/assets/default_t2i/    its stage-1 text-to-image model: the UNet and scheduler;
                                  the VAE, text encoder and tokenizer are the editor's
  ip2p_jax/assets/default_clip/   the CLIP (text + vision) of ``ip2p eval``'s CLIP metrics

  python scripts/install_default_model.py [--runs runs/default] [--only t2i]
"""
import argparse
import json
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from ip2p_jax.checkpoints import load_component, load_pipeline, save_component  # noqa: E402
from ip2p_jax.checkpoints import safetensors, save_pipeline  # noqa: E402

ASSETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                      "ip2p_jax", "assets")


def _replace(folder: str, write) -> None:
  """Writes ``folder`` next to itself and swaps it in, so a failure leaves the old one."""
  staging = folder + ".new"
  shutil.rmtree(staging, ignore_errors=True)
  write(staging)
  shutil.rmtree(folder, ignore_errors=True)
  os.replace(staging, folder)
  print(f"installed {folder}")


def _check_same_encoders(t2i) -> None:
  """The bundled text-to-image model borrows the editor's VAE and text encoder: refuse a
  stage-1 export trained with others."""
  editor = load_pipeline(os.path.join(ASSETS, "default_model")) if os.path.isdir(
      os.path.join(ASSETS, "default_model")) else None
  if editor is None:
    return
  for name in ("vae", "text_encoder"):
    same = jax.tree.map(lambda a, b: bool(np.array_equal(np.float16(a), np.float16(b))),
                        t2i.params[name], editor.params[name])
    if not all(jax.tree.leaves(same)):
      raise SystemExit(f"the stage-1 export's {name} differs from the bundled editor's")


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--runs", default="runs/default")
  parser.add_argument("--only", choices=["t2i"],
                      help="install only this part (a stage-1 run continued on its own)")
  args = parser.parse_args()
  if args.only is None:
    editor = load_pipeline(os.path.join(args.runs, "ip2p", "export"))
    _replace(os.path.join(ASSETS, "default_model"),
             lambda f: save_pipeline(f, editor, dtype=np.float16))

  t2i = load_pipeline(os.path.join(args.runs, "t2i", "export"))
  _check_same_encoders(t2i)

  def write_t2i(folder):
    save_component(os.path.join(folder, "unet"), t2i.modules["unet"], t2i.params["unet"],
                   dtype=np.float16)
    os.makedirs(os.path.join(folder, "scheduler"), exist_ok=True)
    with open(os.path.join(folder, "scheduler", "scheduler_config.json"), "w") as f:
      json.dump(t2i.scheduler_config, f, indent=2)
  _replace(os.path.join(ASSETS, "default_t2i"), write_t2i)
  if args.only:
    return

  clip_module, clip_params = load_component(os.path.join(args.runs, "clip", "export", "clip"))

  editor_text = editor.params["text_encoder"]["text_model"]
  same = jax.tree.map(lambda a, b: bool(np.array_equal(np.float16(a), np.float16(b))),
                      clip_params["text_model"], editor_text)
  if not all(jax.tree.leaves(same)):
    raise SystemExit("the CLIP's text tower differs from the editor's text encoder")

  def write_clip(folder):
    # The text tower is the editor's text encoder: stored once (ip2p_jax.bundled.load_clip).
    save_component(folder, clip_module, clip_params, dtype=np.float16)
    weights = os.path.join(folder, "model.safetensors")
    tensors = {k: v for k, v in safetensors.load(weights).items()
               if not k.startswith("text_model.")}
    safetensors.save(weights, tensors)
    # Our CLIP stage trains on pixels in [-1, 1]: mean 0.5, std 0.5 in [0, 1] units.
    with open(os.path.join(folder, "preprocessor_config.json"), "w") as f:
      json.dump({"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
                 "crop_size": clip_module.config.vision_config.image_size}, f, indent=2)
  _replace(os.path.join(ASSETS, "default_clip"), write_clip)


if __name__ == "__main__":
  main()
