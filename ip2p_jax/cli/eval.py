"""``ip2p eval``: score a model on held-out shapes-world edits (and sweep its scales).

Writes to ``--out``: ``eval.json`` (everything, per example too), ``eval.md`` (a
table per edit type), ``sheet.png`` (input | instruction | output | ground truth);
with ``--sweep`` also ``sweep.csv`` and ``sweep.png`` (the paper's Figure 8).
"""
from __future__ import annotations

import argparse
import json
import os

import numpy as np

from ip2p_jax.cli.edit import _adapter
from ip2p_jax.cli.common import (KARRAS_HELP, SAMPLER_CHOICES, SAMPLER_HELP, CommandError,
                                 HelpFormatter, check_adapter_files, check_sampler,
                                 enable_compilation_cache, fail, resolve_model)
from ip2p_jax.diffusion.schedules import DEFAULT_STEPS

EXAMPLES = """examples:
  ip2p eval                                   # the bundled model, 200 held-out edits
  ip2p eval --model runs/ip2p/export --num 50 --steps 20 --out eval/
  ip2p eval --data data/ --split heldout      # a dataset built by `ip2p data shapes`
  ip2p eval --sweep --num 50 --clip my-clip/  # + CLIP direction vs image similarity
  ip2p eval --edit-types sepia --num 50 --adapter sepia.safetensors   # an adapter's concept
"""


def _edit_types(text: str) -> tuple[str, ...]:
  from ip2p_jax.data import shapes
  names = tuple(dict.fromkeys(t.strip() for t in text.split(",") if t.strip()))
  bad = [t for t in names if t not in shapes.ALL_EDIT_TYPES]
  if bad or not names:
    raise argparse.ArgumentTypeError(f"{text!r}: edit types from "
                                     f"{', '.join(shapes.ALL_EDIT_TYPES)}")
  return names


def add_parser(sub) -> None:
  p = sub.add_parser("eval", help="score a model on held-out shapes-world edits",
                     epilog=EXAMPLES, formatter_class=HelpFormatter,
                     description="Edit held-out shapes-world examples and score them from "
                     "their exact scene graphs (success per edit type, PSNRs, CLIP metrics).")
  p.add_argument("--model", help="diffusers-format folder (default: the bundled model)")
  p.add_argument("--data", help="a shapes dataset built by `ip2p data shapes` (default: "
                 "regenerate the held-out split at the model's native size)")
  p.add_argument("--split", default="heldout", help="--data split")
  p.add_argument("--num", type=int, default=200, help="examples")
  p.add_argument("--data-seed", type=int, default=0,
                 help="seed of the regenerated held-out split")
  p.add_argument("--edit-types", type=_edit_types, default=None, metavar="A,B",
                 help="regenerate only these edit types (default: the shapes world's mix; "
                      "'sepia' is outside it, for the customization example)")
  p.add_argument("--adapter", type=_adapter, action="append", default=[],
                 metavar="PATH[:SCALE]", help="apply a LoRA or Custom Diffusion adapter "
                 "(ip2p customize) at SCALE (default 1) before editing; repeatable")
  p.add_argument("--resolution", type=int, default=None,
                 help="size of the regenerated examples (default: the model's native size)")
  p.add_argument("--out", default="ip2p_eval", help="output folder")
  p.add_argument("--clip", help="transformers CLIPModel folder for the CLIP metrics "
                 "(default: the bundled one; skipped if there is none, except with --sweep)")
  p.add_argument("--sweep", action="store_true",
                 help="also sweep image scale 1.0-2.2 (text 7.5) and text scale 3-12 "
                      "(image 1.5): sweep.csv, sweep.png")
  p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="sampling steps")
  p.add_argument("--text-scale", type=float, default=7.5, help="text guidance s_T")
  p.add_argument("--image-scale", type=float, default=1.5, help="image guidance s_I")
  p.add_argument("--seed", type=int, default=0, help="example k uses noise (seed, k)")
  p.add_argument("--sampler", choices=SAMPLER_CHOICES, metavar="NAME",
                 help=f"one of {', '.join(SAMPLER_CHOICES)}; {SAMPLER_HELP}")
  p.add_argument("--karras", action="store_true", help=KARRAS_HELP)
  p.add_argument("--batch-size", type=int, default=8, help="examples per compiled call")
  p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                 help="compute and weight dtype")
  p.add_argument("--sheet-rows", type=int, default=22,
                 help="examples shown in sheet.png, edit types in turn")
  p.add_argument("--no-compilation-cache", action="store_true",
                 help="do not use JAX's persistent compilation cache")
  p.set_defaults(run=run)


def _write(path: str, text: str) -> None:
  from ip2p_jax.atomic import atomic_write
  with atomic_write(path, "w", encoding="utf-8") as f:
    f.write(text)


def _clip(args):
  """``(CLIP scorer, its folder)``, or ``(None, None)`` with a note when no folder is
  given or bundled."""
  from ip2p_jax.metrics import DEFAULT_CLIP, ClipSimilarity
  folder = args.clip or DEFAULT_CLIP
  if not args.clip and not os.path.isdir(DEFAULT_CLIP):
    if args.sweep:
      raise CommandError("--sweep plots CLIP similarities, and no CLIP model is bundled with "
                         "this installation yet: pass --clip DIR (a transformers CLIPModel folder)")
    print("note: no CLIP model bundled; CLIP metrics skipped (pass --clip DIR)")
    return None, None
  try:
    return ClipSimilarity(folder), os.path.abspath(folder)
  except (OSError, ValueError) as e:
    raise CommandError(f"--clip: {e}") from None


def _examples(args, native: int, factor: int):
  from ip2p_jax.metrics import dataset_examples, heldout_examples
  if args.data:
    try:
      examples, unmatched = dataset_examples(args.data, args.split, args.num)
    except (FileNotFoundError, ValueError, KeyError) as e:
      raise CommandError(str(e)) from None
    if unmatched:
      print(f"note: {unmatched} of {len(examples)} records do not match the shapes world's "
            "scene graphs (another version built them?): scored by PSNR only")
    source = {"data": os.path.abspath(args.data), "split": args.split}
  else:
    size = args.resolution or native
    if args.edit_types:
      examples = heldout_examples(args.num, size, args.data_seed, edit_types=args.edit_types)
    else:
      examples = heldout_examples(args.num, size, args.data_seed)
    source = {"data": "regenerated", "split": "heldout", "data_seed": args.data_seed,
              "size": size}
    if args.edit_types:
      source["edit_types"] = list(args.edit_types)
  if not examples:
    raise CommandError(f"no examples in {args.data} ({args.split})")
  size = examples[0].input_image.shape[0]
  if size % factor:
    raise CommandError(f"examples are {size} px, not a multiple of the model's {factor} "
                       "(VAE downsampling)")
  return examples, source


def run(args) -> int:
  import jax.numpy as jnp
  from tqdm import tqdm

  from ip2p_jax import InstructPix2PixPipeline
  from ip2p_jax import images as imagelib
  from ip2p_jax.checkpoints import CheckpointError, check_pipeline
  from ip2p_jax.metrics import evaluate, vae_psnr
  from ip2p_jax.metrics import report as reports

  if args.num < 1 or args.steps < 1 or args.batch_size < 1 or args.sheet_rows < 0 or \
      (args.resolution is not None and args.resolution < 8):
    return fail("--num, --steps and --batch-size must be >= 1, --sheet-rows >= 0 and "
                "--resolution >= 8")
  if not args.no_compilation_cache:
    enable_compilation_cache()
  try:
    if args.data and args.edit_types:
      raise CommandError("--edit-types selects among regenerated examples; a --data set "
                         "holds its own")
    check_adapter_files(args.adapter)
    model = resolve_model(args.model)
    check_sampler(args.sampler, args.karras, check_pipeline(model).scheduler_config)
    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    pipe = InstructPix2PixPipeline.from_pretrained(model, dtype=dtype, param_dtype=dtype,
                                                   compilation_cache=False)
    adapters = []
    for path, scale in args.adapter:
      pipe.load_adapter(path, scale)
      adapters.append({"path": os.path.abspath(path), "scale": scale})
    clip, clip_folder = _clip(args)
    native = (pipe.unet.config.sample_size or 64) * pipe.vae_scale_factor
    examples, source = _examples(args, native, pipe.vae_scale_factor)
  except (CommandError, CheckpointError, ValueError) as e:
    return fail(str(e))

  def run_at(text_scale, image_scale, desc, leave=True):
    with tqdm(total=len(examples), unit="ex", desc=desc, dynamic_ncols=True, disable=None,
              leave=leave) as bar:
      return evaluate(pipe, examples, num_inference_steps=args.steps,
                      guidance_scale=text_scale, image_guidance_scale=image_scale,
                      seed=args.seed, scheduler=args.sampler, batch_size=args.batch_size,
                      clip=clip, progress=bar.update, use_karras_sigmas=args.karras or None)

  result = run_at(args.text_scale, args.image_scale, "evaluating")
  outputs = result.pop("outputs")
  result.update(model=os.path.abspath(model), clip=clip_folder, **source)
  if adapters:
    from ip2p_jax.adapters.files import file_hash
    result["adapters"] = [dict(a, sha256=file_hash(a["path"])) for a in adapters]
  result["vae_psnr"] = vae_psnr(pipe, np.stack([e.input_image for e in examples]))
  os.makedirs(args.out, exist_ok=True)
  rows = reports.sheet_rows([e.edit_type for e in examples], args.sheet_rows)
  imagelib.save(reports.sheet(examples, outputs, result["examples"], rows),
                os.path.join(args.out, "sheet.png"))
  _write(os.path.join(args.out, "eval.md"), reports.markdown(result))

  if args.sweep:
    done = {(args.text_scale, args.image_scale): result}
    sweep = []
    for text_scale, image_scale, which in tqdm(reports.SWEEP_POINTS, desc="sweep",
                                               unit="point", disable=None):
      key = (text_scale, image_scale)
      if key not in done:
        done[key] = run_at(text_scale, image_scale, f"  text {text_scale:g} image "
                           f"{image_scale:g}", leave=False)
      sweep.append(reports.sweep_row(text_scale, image_scale, which, done[key]))
    _write(os.path.join(args.out, "sweep.csv"), reports.sweep_csv(sweep))
    reports.sweep_plot(sweep, os.path.join(args.out, "sweep.png"))
    result["sweep"] = sweep
  _write(os.path.join(args.out, "eval.json"), json.dumps(result, indent=1) + "\n")

  overall = result["overall"]
  print(f"success {_pct(overall['success'])} over {overall['n']} examples; held-out "
        f"combinations {_pct(result['held_out']['success'])}; PSNR {_db(overall['psnr'])}, "
        f"outside the edit {_db(overall['psnr_outside'])}; VAE reconstruction "
        f"{_db(result['vae_psnr'])}")
  for edit_type, group in result["per_edit_type"].items():
    if group["n"]:
      print(f"  {edit_type:<11} n={group['n']:<4} success {_pct(group['success'])}")
  print(f"-> {args.out}")
  return 0


def _pct(value) -> str:
  return "-" if value is None else f"{100 * value:.1f}%"


def _db(value) -> str:
  return "-" if value is None else f"{value:.2f} dB"
