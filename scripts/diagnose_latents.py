"""What the VAE's latents ask of the UNet, on held-out shapes-world scenes (the README's
"Why the objects a background edit keeps are lost"):

1. the VAE round trip (posterior mode) per region: object interiors, object edges,
   background, whole image; the whole-image number hides how the objects come back;
2. what a perfect UNet would score: the exact targets through the VAE, judged by
   ``ip2p eval``'s success rule (``perfect_unet``), the ceiling this VAE puts on the bars;
3. whether the latent space is colour-linear where it matters: each edit predicted cell
   by cell as the input's latents plus the changed colour's share of the cell times that
   colour's shift (``linear_edits``), decoded and compared with the exact target on the
   region the success rule reads, beside copying the input's latents and decoding the
   target's own latents (the ceiling);
4. with ``--sheet``, all of it as a picture beside the editor's own edits.

  python scripts/diagnose_latents.py [--model DIR | --vae DIR] [--num 64] [--data-seed 11]
      [--ceiling-num 200] [--sheet PNG [--also-vae DIR]]
"""
import argparse
import dataclasses
import os
import sys
import textwrap

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from ip2p_jax import InstructPix2PixPipeline, images  # noqa: E402
from ip2p_jax.checkpoints import load_component  # noqa: E402
from ip2p_jax.data import shapes  # noqa: E402
from ip2p_jax.metrics import (evaluate, heldout_examples, psnr, score_edit,  # noqa: E402
                              summarize)


def _mean(values) -> float:
  return float(np.mean([v for v in values if v is not None]))


def _coverage(scene, size: int) -> np.ndarray:
  """How much of each pixel the scene's objects cover (0 background, 1 interior)."""
  cover = np.zeros((size, size))
  for obj in scene.objects:
    cover = np.maximum(cover, shapes.coverage(obj, size))
  return cover


class Latents:
  """A VAE as jitted encode (posterior mode) and 8-bit decode of ``size`` px images."""

  def __init__(self, vae, params, size: int):
    self.size, self.factor = size, 2 ** (len(vae.config.block_out_channels) - 1)
    sample = lambda y: getattr(y, "sample", y)
    self.encode = jax.jit(
        lambda x: vae.apply({"params": params}, x / 127.5 - 1, method="encode").mode())
    self.decode = jax.jit(lambda z: ((sample(vae.apply({"params": params}, z, method="decode"))
                                      + 1) * 127.5).clip(0, 255).round())

  @classmethod
  def of_pipeline(cls, pipe) -> "Latents":
    """The editor's VAE at the editor's resolution."""
    return cls(pipe.vae, pipe.params["vae"], pipe.unet.config.sample_size * pipe.vae_scale_factor)

  @classmethod
  def of_folder(cls, folder: str) -> "Latents":
    """A VAE folder (``config.json`` + safetensors) at its ``sample_size``, to measure a
    VAE before any UNet is trained on it (e.g. ``configs/default_model.py:vae_f4``)."""
    vae, params = load_component(folder)
    return cls(vae, params, vae.config.sample_size)

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
    cover = _coverage(e.input_scene, size)
    for name, mask in (("object interiors", cover >= 1),
                       ("object edges", (cover > 0) & (cover < 1)),
                       ("background", cover == 0), ("whole", None)):
      regions[name].append(psnr(back[k].astype(np.uint8), e.input_image, mask))
  return {name: _mean(values) for name, values in regions.items()}


def perfect_unet(latents: Latents, examples, batch: int = 64) -> dict:
  """``metrics.summarize`` of the exact targets' round trips (posterior mode, decoded to
  8 bits) scored as edits: what an editor whose UNet gave each target's own latents
  would score, so the most ``ip2p eval`` can report with this VAE."""
  outputs = []
  for start in range(0, len(examples), batch):
    targets = np.stack([e.edited_image for e in examples[start:start + batch]])
    outputs.extend(np.asarray(latents.decode(latents.encode(targets.astype(np.float32)))))
  return summarize([score_edit(e, out.astype(np.uint8)) for e, out in zip(examples, outputs)])


def linear_edits(latents: Latents, examples, kind: str) -> dict:
  """PSNR (dB) against the exact targets, on the region the rule reads (the objects'
  interiors for a background edit, the recoloured object for a recolour), of three
  latents decoded: the linear prediction, the input's (copied) and the target's own (the
  ceiling); each one's success under ``ip2p eval``'s rule (``"linear success"``, ...);
  and ``mixed``, the share of the cells the objects touch that they do not fill.

  Linear prediction, cell by cell: background edit, the input's latents plus (background
  share of the cell) x (the cell's shift between the two scenes drawn without objects);
  recolour, the input's plus (object share) x (the object's shift per unit share, from
  the cells it covers most)."""
  target = np.stack([e.edited_image for e in examples])
  decoded, regions, mixed = decoded_edits(latents, examples, kind)
  scores = {name: _mean(psnr(out[k], target[k], regions[k]) for k in range(len(examples)))
            for name, out in decoded.items()}
  success = {f"{name} success": float(np.mean([score_edit(e, out[k])["success"]
                                               for k, e in enumerate(examples)]))
             for name, out in decoded.items()}
  return {**scores, **success, "mixed": float(np.mean(mixed))}


def decoded_edits(latents: Latents, examples, kind: str):
  """The three latents of :func:`linear_edits` decoded to 8 bits -> ({"linear", "copy",
  "ceiling"}: uint8 images, the region each example is scored on, the mixed shares)."""
  predicted, z_in, z_target, regions, mixed = predict_linear(latents, examples, kind)
  decoded = {name: np.asarray(latents.decode(z)).astype(np.uint8) for name, z in
             (("linear", predicted), ("copy", z_in), ("ceiling", z_target))}
  return decoded, regions, mixed


def sheet(path: str, examples, columns: dict) -> None:
  """A PNG with one row per example and one column per ``columns`` entry (a name and
  uint8 images, one per example), each column headed by its name."""
  tile, header, gap = 128, 30, 4
  names = list(columns)
  width = len(names) * (tile + gap) + gap
  im = Image.new("RGB", (width, header + len(examples) * (tile + gap) + gap + 16 * len(examples)),
                 "white")
  draw = ImageDraw.Draw(im)
  for c, name in enumerate(names):
    x = gap + c * (tile + gap)
    for line, words in enumerate(textwrap.wrap(name, 21)[:2]):
      draw.text((x, 2 + 13 * line), words, fill="black")
    for r, e in enumerate(examples):
      y = header + r * (tile + gap + 16)
      if c == 0:
        draw.text((gap, y), e.instruction, fill="black")
      cell = Image.fromarray(np.asarray(columns[name][r], np.uint8)).resize((tile, tile),
                                                                             Image.NEAREST)
      im.paste(cell, (x, y + 14))
  images.save(im, path)


def write_sheet(path: str, pipe, others=(), per_kind: int = 3, seed: int = 11) -> None:
  """The measurements as a picture: ``per_kind`` background edits and recolours, each
  as input, exact target, the target through the editor's VAE (a perfect UNet), the
  linear latent edit on the editor's grid and on each VAE of ``others``
  (:class:`Latents`), and the editor's own edit (``ip2p eval``'s settings)."""
  latents = Latents.of_pipeline(pipe)
  grids = (latents, *others)
  grid_names = [f"linear latent edit, {grid.factor}x grid" for grid in grids]
  if len(set(grid_names)) < len(grid_names):  # two VAEs of one grid: number them
    grid_names = [f"{name} (VAE {k + 1})" for k, name in enumerate(grid_names)]
  rows, columns = [], {}
  add = lambda name, pictures: columns.setdefault(name, []).extend(pictures)
  for kind in ("background", "recolor"):
    examples = heldout_examples(per_kind, latents.size, seed, edit_types=[kind])
    rows += examples
    add("input", [e.input_image for e in examples])
    add("exact target", [e.edited_image for e in examples])
    decoded = [decoded_edits(grid, examples, kind)[0] for grid in grids]
    add("target through the VAE (a perfect UNet)", decoded[0]["ceiling"])
    for name, images_of_grid in zip(grid_names, decoded):
      add(name, images_of_grid["linear"])
    add("the editor's edit", evaluate(pipe, examples, batch_size=per_kind)["outputs"])
  sheet(path, rows, columns)


def predict_linear(latents: Latents, examples, kind: str):
  """The linear prediction of :func:`linear_edits` -> (predicted, input's and target's
  latents, the region each is scored on, the mixed share of each scene's touched cells)."""
  size = latents.size
  x = np.stack([e.input_image for e in examples]).astype(np.float32)
  z_in = np.asarray(latents.encode(x))
  z_target = np.asarray(latents.encode(
      np.stack([e.edited_image for e in examples]).astype(np.float32)))
  if kind == "background":
    empty = lambda scene: shapes.render(dataclasses.replace(scene, objects=()), size)[0]
    bare = np.asarray(latents.encode(np.stack(
        [empty(e.input_scene) for e in examples] +
        [empty(e.edited_scene) for e in examples]).astype(np.float32)))
    bare_in, bare_target = bare[:len(examples)], bare[len(examples):]
  predicted, regions, mixed = [], [], []
  for k, e in enumerate(examples):
    if kind == "background":
      objects = latents.share(e.input_masks > 0)
      predicted.append(z_in[k] + (1.0 - objects)[..., None] * (bare_target[k] - bare_in[k]))
      regions.append(_coverage(e.input_scene, size) >= 1)  # the objects' interiors
    else:
      objects = latents.share(e.edit_mask)
      source = objects >= objects.max() - 1e-6
      shift = ((z_target[k] - z_in[k])[source] / objects[source][:, None]).mean(0)
      predicted.append(z_in[k] + objects[..., None] * shift)
      regions.append(e.edit_mask)
    touched = objects > 0
    mixed.append(float(((objects < 1) & touched).sum() / max(1, touched.sum())))
  return np.stack(predicted), z_in, z_target, regions, mixed


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", default=None, help="editor folder (default: the bundled one)")
  parser.add_argument("--vae", default=None,
                      help="measure this VAE folder instead of the editor's (no UNet needed)")
  parser.add_argument("--num", type=int, default=64, help="scenes per measurement")
  parser.add_argument("--data-seed", type=int, default=11, help="held-out split seed")
  parser.add_argument("--ceiling-num", type=int, default=200,
                      help="examples of ip2p eval's split (data seed 0) for the perfect UNet")
  parser.add_argument("--sheet", default=None,
                      help="also draw the measurements into this PNG (needs the editor)")
  parser.add_argument("--also-vae", default=[], action="append",
                      help="a VAE folder whose linear edits join the sheet (repeatable)")
  args = parser.parse_args()
  if args.sheet and args.vae:
    parser.error("--sheet draws the editor's edits: give --model (or nothing), not --vae")
  pipe = None if args.vae else InstructPix2PixPipeline.from_pretrained(args.model)
  if args.sheet:
    write_sheet(args.sheet, pipe, [Latents.of_folder(folder) for folder in args.also_vae])
    print(f"-> {args.sheet}")
  latents = Latents.of_folder(args.vae) if args.vae else Latents.of_pipeline(pipe)
  regions = round_trip(latents, heldout_examples(args.num, latents.size, args.data_seed))
  print(f"VAE round trip, {args.num} held-out inputs (PSNR dB): " +
        ", ".join(f"{name} {value:.2f}" for name, value in regions.items()))
  ceiling = perfect_unet(latents, heldout_examples(args.ceiling_num, latents.size, 0))
  overall = ceiling["overall"]
  print(f"a perfect UNet (the exact targets through the VAE), ip2p eval's first "
        f"{args.ceiling_num} held-out edits: success {100 * overall['success']:.1f}%, PSNR "
        f"outside the edit {overall['psnr_outside']:.2f} dB; " +
        ", ".join(f"{name} {100 * group['success']:.1f}% (n = {group['n']})"
                  for name, group in ceiling["per_edit_type"].items() if group["n"]))
  for kind in ("background", "recolor"):
    examples = heldout_examples(args.num, latents.size, args.data_seed, edit_types=[kind])
    scores = linear_edits(latents, examples, kind)
    region = "the objects' interiors" if kind == "background" else "the recoloured object"
    print(f"{kind}: {region} vs the target (PSNR dB): linear latent edit "
          f"{scores['linear']:.2f}, input's latents copied {scores['copy']:.2f}, target's "
          f"own latents (ceiling) {scores['ceiling']:.2f}; success under the rule: linear "
          f"{100 * scores['linear success']:.0f}%, copied {100 * scores['copy success']:.0f}%, "
          f"ceiling {100 * scores['ceiling success']:.0f}%; {100 * scores['mixed']:.0f}% of "
          "the cells the objects touch are shared with the background")


if __name__ == "__main__":
  main()
