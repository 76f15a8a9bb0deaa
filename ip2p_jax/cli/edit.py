"""``ip2p edit``: edit images, a folder or a large image set by one instruction."""
from __future__ import annotations

import argparse
import os
import sys

from ip2p_jax.cli.common import CommandError, enable_compilation_cache, fail, resolve_model

EXAMPLES = """examples:
  ip2p edit photo.jpg -p "make it look like a watercolor" -o out/
  ip2p edit photos/ "more/*.png" -p "turn the sky red" -o out/ --batch-size 8 --steps 20
  ip2p edit photo.jpg -p "add fireworks" -o out/ --grid   # text x image scale sweep
"""


def _floats(text: str) -> list[float]:
  return [float(v) for v in text.split(",") if v.strip()]


def add_parser(sub) -> None:
  p = sub.add_parser("edit", help="edit images by an instruction", epilog=EXAMPLES,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders or globs")
  p.add_argument("-p", "--prompt", required=True, help="the edit instruction")
  p.add_argument("-o", "--output", required=True, metavar="OUT", help="output folder")
  p.add_argument("--model", help="diffusers-format folder or cached hub id "
                 "(default: the model bundled with ip2p_jax)")
  p.add_argument("--steps", type=int, default=50, help="sampling steps (default 50)")
  p.add_argument("--text-scale", type=float, default=7.5, help="text guidance s_T (7.5)")
  p.add_argument("--image-scale", type=float, default=1.5, help="image guidance s_I (1.5)")
  p.add_argument("--seed", type=int, default=0, help="image k uses noise (seed, k)")
  p.add_argument("--sampler", choices=["euler_ancestral", "euler", "ddim", "dpmpp_2m"],
                 help="default: the model folder's scheduler (Euler ancestral for IP2P)")
  p.add_argument("--resolution", type=int, default=None,
                 help="longest side in pixels (default: the model's native size, 512 for SD)")
  p.add_argument("--resize", choices=["fit", "crop", "resize"], default="fit",
                 help="fit: pad, nothing cut (default); crop: the original's centre crop; "
                      "resize: stretch slightly")
  p.add_argument("--batch-size", type=int, default=1, help="images per compiled call")
  p.add_argument("--overwrite", action="store_true", help="redo outputs that exist")
  p.add_argument("--max-pixels", type=int, default=64_000_000, help="refuse larger inputs")
  p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
  p.add_argument("--grid", action="store_true",
                 help="also write INPUT_grid.png sweeping text x image scale per input")
  p.add_argument("--grid-text-scales", type=_floats, default=[3.0, 5.0, 7.5, 10.0])
  p.add_argument("--grid-image-scales", type=_floats, default=[1.0, 1.2, 1.5, 2.0])
  p.add_argument("--no-compilation-cache", action="store_true")
  p.add_argument("--coordinator", help="multi-host: coordinator host:port "
                 "(with --num-processes and --process-id); on TPU pods and SLURM, "
                 "--distributed auto-detects instead")
  p.add_argument("--num-processes", type=int)
  p.add_argument("--process-id", type=int)
  p.add_argument("--distributed", action="store_true",
                 help="call jax.distributed.initialize() with auto-detection")
  p.set_defaults(run=run)


def run(args) -> int:
  import jax
  import jax.numpy as jnp
  from tqdm import tqdm

  from ip2p_jax import InstructPix2PixPipeline, editing
  from ip2p_jax import images as imagelib
  from ip2p_jax.checkpoints import CheckpointError

  if args.steps < 1 or args.batch_size < 1 or (args.resolution is not None and args.resolution < 8):
    return fail("--steps and --batch-size must be >= 1 and --resolution >= 8")
  if args.coordinator:
    jax.distributed.initialize(coordinator_address=args.coordinator,
                               num_processes=args.num_processes, process_id=args.process_id)
  elif args.distributed:
    jax.distributed.initialize()
  if not args.no_compilation_cache:
    enable_compilation_cache()
  try:
    model = resolve_model(args.model)
    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    pipe = InstructPix2PixPipeline.from_pretrained(model, dtype=dtype, param_dtype=dtype)
  except (CommandError, CheckpointError, ValueError) as e:
    return fail(str(e))
  native = (pipe.unet.config.sample_size or 64) * pipe.vae_scale_factor
  settings = editing.EditSettings(
      prompt=args.prompt, steps=args.steps, text_scale=args.text_scale,
      image_scale=args.image_scale, seed=args.seed, sampler=args.sampler,
      resolution=args.resolution or native, resize=args.resize, batch_size=args.batch_size,
      overwrite=args.overwrite, max_pixels=args.max_pixels)
  progress = lambda total: tqdm(total=total, unit="img", desc="editing", dynamic_ncols=True,
                                disable=None)
  report = editing.edit_files(pipe, args.inputs, args.output, settings, progress=progress)
  if args.grid:
    for entry in report.edited:
      grid = editing.scale_grid(pipe, imagelib.load(entry["input"], args.max_pixels), settings,
                                args.grid_text_scales, args.grid_image_scales)
      stem = os.path.splitext(entry["output"])[0]
      imagelib.save(grid, f"{stem}_grid.png")
  n = len(report.edited)
  rate = n / report.seconds if report.seconds else 0.0
  print(f"edited {n}, kept {len(report.skipped_existing)} existing, failed "
        f"{len(report.failed)} ({rate:.2f} images/s) -> {args.output}")
  for item in report.failed:
    print(f"  failed: {item['error']}", file=sys.stderr)
  return 0 if report.ok else 1
