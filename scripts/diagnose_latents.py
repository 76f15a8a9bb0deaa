"""What the VAE's latents ask of the UNet, on held-out shapes-world scenes (the README's
"Why the objects a background edit keeps are lost"):

1. the VAE round trip (posterior mode) per region: object interiors, object edges,
   background, whole image; the whole-image number hides how the objects come back;
2. whether the latent space is colour-linear: a background edit predicted as the input's
   latents plus (background share of each latent cell) x (the mean shift of the
   pure-background cells), a recolour as the input's plus (edited share of each cell) x
   (the shift of the cells the edit covers most); each decoded and compared with the
   exact target on the region that matters (the objects; the recoloured object), beside
   copying the input's latents and decoding the target's own latents (the ceiling).

  python scripts/diagnose_latents.py [--model DIR] [--num 64] [--data-seed 11]
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from ip2p_jax import InstructPix2PixPipeline  # noqa: E402
from ip2p_jax.data import shapes  # noqa: E402
from ip2p_jax.metrics import heldout_examples, psnr  # noqa: E402


def _mean(values) -> float:
  return float(np.mean([v for v in values if v is not None]))


class Latents:
  """The pipeline's VAE as jitted encode (posterior mode) and 8-bit decode."""

  def __init__(self, pipe):
    vae, params = pipe.vae, pipe.params["vae"]
    self.size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    self.factor = pipe.vae_scale_factor
    sample = lambda y: getattr(y, "sample", y)
    self.encode = jax.jit(
        lambda x: vae.apply({"params": params}, x / 127.5 - 1, method="encode").mode())
    self.decode = jax.jit(lambda z: ((sample(vae.apply({"params": params}, z, method="decode"))
                                      + 1) * 127.5).clip(0, 255).round())

  def share(self, mask: np.ndarray) -> np.ndarray:
    """The share of each latent cell's pixels that ``mask`` covers."""
    cells, f = self.size // self.factor, self.factor
    return mask.astype(np.float32).reshape(cells, f, cells, f).mean((1, 3))


def round_trip(latents: Latents, examples) -> dict:
  """Mean PSNR (dB) of the inputs' round trip over object interiors, object edges, the
  background and the whole image (the last is ``metrics.vae_psnr``)."""
  size = latents.size
  x = np.stack([e.input_image for e in examples]).astype(np.float32)
  back = np.asarray(latents.decode(latents.encode(x)))
  regions = {"object interiors": [], "object edges": [], "background": [], "whole": []}
  for k, e in enumerate(examples):
    cover = np.zeros((size, size))
    for obj in e.input_scene.objects:
      cover = np.maximum(cover, shapes.coverage(obj, size))
    for name, mask in (("object interiors", cover >= 1), ("object edges", (cover > 0) & (cover < 1)),
                       ("background", cover == 0), ("whole", None)):
      regions[name].append(psnr(back[k].astype(np.uint8), e.input_image, mask))
  return {name: _mean(values) for name, values in regions.items()}


def linear_edits(latents: Latents, examples, kind: str) -> dict:
  """PSNR (dB) against the exact targets, on the region that matters, of three latents
  decoded: the linear prediction (module docstring), the input's (copied) and the
  target's own (the ceiling)."""
  x = np.stack([e.input_image for e in examples]).astype(np.float32)
  target = np.stack([e.edited_image for e in examples])
  z_in = np.asarray(latents.encode(x))
  z_target = np.asarray(latents.encode(target.astype(np.float32)))
  predicted, masks = [], []
  for k, e in enumerate(examples):
    if kind == "background":  # the objects stay; the cells they touch must re-encode
      mask = e.input_masks > 0
      moved = 1.0 - latents.share(mask)
      source = moved == 1.0
    else:  # the recoloured object's cells
      mask = e.edit_mask
      moved = latents.share(mask)
      source = moved >= moved.max() - 1e-6
    shift = (z_target[k] - z_in[k])[source].mean(0)
    predicted.append(z_in[k] + moved[..., None] * shift)
    masks.append(mask)
  decoded = {name: np.asarray(latents.decode(z)).astype(np.uint8) for name, z in
             (("linear", np.stack(predicted)), ("copy", z_in), ("ceiling", z_target))}
  return {name: _mean(psnr(out[k], target[k], masks[k]) for k in range(len(examples)))
          for name, out in decoded.items()}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", default=None, help="editor folder (default: the bundled one)")
  parser.add_argument("--num", type=int, default=64, help="scenes per measurement")
  parser.add_argument("--data-seed", type=int, default=11, help="held-out split seed")
  args = parser.parse_args()
  latents = Latents(InstructPix2PixPipeline.from_pretrained(args.model))
  regions = round_trip(latents, heldout_examples(args.num, latents.size, args.data_seed))
  print(f"VAE round trip, {args.num} held-out inputs (PSNR dB): " +
        ", ".join(f"{name} {value:.2f}" for name, value in regions.items()))
  for kind in ("background", "recolor"):
    examples = heldout_examples(args.num, latents.size, args.data_seed, edit_types=[kind])
    scores = linear_edits(latents, examples, kind)
    region = "the objects" if kind == "background" else "the recoloured object"
    print(f"{kind}: {region} vs the target (PSNR dB): linear latent edit "
          f"{scores['linear']:.2f}, input's latents copied {scores['copy']:.2f}, target's "
          f"own latents (ceiling) {scores['ceiling']:.2f}")


if __name__ == "__main__":
  main()
