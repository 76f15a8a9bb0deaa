"""``ip2p edit``: edit images, a folder or a large image set by an instruction, several
instructions in sequence (``-p A -p B``), or a saved edit chain (``--chain FILE``)."""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import tempfile

from ip2p_jax.cli.common import (KARRAS_HELP, SAMPLER_CHOICES, SAMPLER_HELP, CommandError,
                                 HelpFormatter, check_adapter_files, enable_compilation_cache,
                                 resolve_model, warn)
from ip2p_jax.diffusion.schedules import DEFAULT_STEPS

EXAMPLES = """examples:
  ip2p edit photo.jpg -p "make it look like a watercolor" -o out/
  ip2p edit photos/ "more/*.png" -p "turn the sky red" -o out/ --batch-size 8 --steps 20
  ip2p edit photo.jpg -p "add fireworks" -o out/ --grid   # text x image scale sweep
  ip2p edit photos/ -p "make it winter" -p "add a red scarf" -o out/   # a chain of two
  ip2p edit photos/ --chain chain.json -o out/   # replay a chain saved by ip2p demo
"""
STEP_FLAGS = {"steps": "--steps", "text_scale": "--text-scale", "image_scale": "--image-scale",
              "seed": "--seed", "sampler": "--sampler", "karras": "--karras"}
PREPARATION = {"resolution": "--resolution", "resize": "--resize", "dtype": "--dtype"}


def _floats(text: str) -> list[float]:
  """A comma-separated list of finite numbers, at least one."""
  try:
    values = [float(v) for v in text.split(",") if v.strip()]
  except ValueError:
    raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers") from None
  if not values:
    raise argparse.ArgumentTypeError(f"{text!r} holds no scale; give e.g. 3,5,7.5")
  if not all(math.isfinite(v) for v in values):
    raise argparse.ArgumentTypeError(f"{text!r}: scales must be finite numbers")
  return values


def _adapter(text: str) -> tuple[str, float]:
  """``PATH[:SCALE]`` -> (path, scale); the scale defaults to 1."""
  path, sep, scale = text.rpartition(":")
  if sep and path:
    try:
      value = float(scale)
    except ValueError:
      return text, 1.0
    if not math.isfinite(value):
      raise argparse.ArgumentTypeError(f"{text!r}: the scale must be a finite number")
    return path, value
  return text, 1.0


def add_parser(sub) -> None:
  p = sub.add_parser("edit", help="edit images by an instruction", epilog=EXAMPLES,
                     description="Edit images by an instruction: each input is scaled to "
                     "--resolution, padded to the size the model needs, edited, and the "
                     "padding cropped off.", formatter_class=HelpFormatter)
  p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders or globs")
  p.add_argument("-p", "--prompt", action="append", metavar="INSTRUCTION",
                 help="the edit instruction; repeat it to apply several in sequence, each "
                      "output the next one's input (one -p or --chain is required)")
  p.add_argument("--chain", metavar="FILE",
                 help="replay an edit chain saved as JSON (ip2p demo's download, "
                      "ip2p_jax.chain.EditChain.save): its steps, each with its own seed, "
                      "scales, steps and sampler, and its resolution, resize and dtype")
  p.add_argument("-o", "--output", required=True, metavar="OUT", help="output folder")
  p.add_argument("--model", help="diffusers-format folder or cached hub id "
                 "(default: the model bundled with ip2p_jax)")
  p.add_argument("--adapter", type=_adapter, action="append", default=[],
                 metavar="PATH[:SCALE]", help="apply a LoRA or Custom Diffusion adapter "
                 "(ip2p customize, or a diffusers UNet LoRA) at SCALE (default 1); repeatable")
  p.add_argument("--steps", type=int, help=f"sampling steps (default {DEFAULT_STEPS})")
  p.add_argument("--text-scale", type=float, help="text guidance s_T (default 7.5)")
  p.add_argument("--image-scale", type=float, help="image guidance s_I (default 1.5)")
  p.add_argument("--seed", type=int,
                 help="in [0, 2^32 - 1] (default 0); an image's noise is (seed, a hash of its "
                      "path relative to the input folder)")
  p.add_argument("--sampler", choices=SAMPLER_CHOICES, metavar="NAME",
                 help=f"one of {', '.join(SAMPLER_CHOICES)}; {SAMPLER_HELP}")
  p.add_argument("--karras", action="store_true", help=KARRAS_HELP)
  p.add_argument("--resolution", type=int, default=None,
                 help="longest side in pixels (default: the model's native size, 512 for SD)")
  p.add_argument("--resize", choices=["fit", "crop", "resize"],
                 help="fit: pad, nothing cut (default); crop: the original's centre crop; "
                      "resize: stretch slightly")
  p.add_argument("--batch-size", type=int, default=1,
                 help="images per compiled call (images of one prepared size)")
  p.add_argument("--overwrite", action="store_true",
                 help="redo outputs that exist (without it, outputs made with exactly these "
                      "settings are kept and outputs made otherwise are an error)")
  p.add_argument("--max-pixels", type=int, default=64_000_000,
                 help="refuse inputs with more pixels (decompression bombs)")
  p.add_argument("--dtype", choices=["float32", "bfloat16"],
                 help="compute and weight dtype (default float32; bfloat16 halves memory, "
                      "for accelerators)")
  p.add_argument("--grid", action="store_true",
                 help="also write OUT/NAME_grid.png sweeping text x image scale per input")
  p.add_argument("--grid-text-scales", type=_floats, default=[3.0, 5.0, 7.5, 10.0],
                 metavar="S,S,...", help="--grid columns: comma-separated text scales")
  p.add_argument("--grid-image-scales", type=_floats, default=[1.0, 1.2, 1.5, 2.0],
                 metavar="S,S,...", help="--grid rows: comma-separated image scales")
  p.add_argument("--no-compilation-cache", action="store_true",
                 help="do not use JAX's persistent compilation cache (~/.cache/ip2p_jax/xla "
                      "or $IP2P_COMPILATION_CACHE)")
  p.add_argument("--coordinator", help="multi-host: coordinator host:port "
                 "(with --num-processes and --process-id); on TPU pods and SLURM, "
                 "--distributed auto-detects instead")
  p.add_argument("--num-processes", type=int, help="multi-host: how many processes")
  p.add_argument("--process-id", type=int, help="multi-host: this process's index")
  p.add_argument("--distributed", action="store_true",
                 help="call jax.distributed.initialize() with auto-detection")
  p.set_defaults(run=run)


def check_output_folder(path: str) -> None:
  """Creates ``path`` if needed and proves it writable by writing a file there."""
  if os.path.exists(path) and not os.path.isdir(path):
    raise CommandError(f"-o {path}: exists and is not a folder")
  try:
    os.makedirs(path, exist_ok=True)
    fd, probe = tempfile.mkstemp(dir=path, prefix=".tmp-probe-")
    os.close(fd)
    os.unlink(probe)
  except OSError as e:
    raise CommandError(f"-o {path}: cannot write there ({e.strerror or e})") from None


def _check_prompt_lengths(prompts, tokenizer_dir: str | None) -> None:
  """Warns when CLIP will cut an instruction (77 tokens, start and end included)."""
  from ip2p_jax import tokenizer as tokenizers
  tok = tokenizers.load(tokenizer_dir)
  for prompt in prompts:
    n = len(tok(prompt).input_ids)
    if n > tokenizers.MAX_LENGTH:
      warn(f"the instruction is {n} tokens long; CLIP reads only the first "
           f"{tokenizers.MAX_LENGTH} (start and end tokens included), the rest is ignored")


def _steps(args):
  """The edits to apply, from -p (one or several) or --chain; and the chain, if any.
  Checked before the model loads."""
  from ip2p_jax import editing
  from ip2p_jax.chain import EditChain
  if args.chain and args.prompt:
    raise CommandError("give -p/--prompt or --chain, not both")
  if not args.chain and not args.prompt:
    raise CommandError("ip2p edit: the following arguments are required: -p/--prompt "
                       "(or --chain FILE)")
  if args.chain:
    given = [flag for key, flag in STEP_FLAGS.items() if getattr(args, key) not in (None, False)]
    if given:
      raise CommandError(f"{', '.join(given)}: with --chain every step has its own; edit the "
                         "chain file, or give the instructions with -p instead")
    chain = EditChain.load(args.chain)
    if not chain.steps:
      raise CommandError(f"--chain {args.chain}: the chain has no steps")
    return chain.steps, chain
  step = editing.Step(
      "", seed=0 if args.seed is None else args.seed,
      text_scale=7.5 if args.text_scale is None else args.text_scale,
      image_scale=1.5 if args.image_scale is None else args.image_scale,
      steps=DEFAULT_STEPS if args.steps is None else args.steps,
      sampler=args.sampler, karras=args.karras)
  return [dataclasses.replace(step, instruction=p) for p in args.prompt], None


def _check_inputs(inputs) -> None:
  """An input that matches nothing is an error before anything heavy loads."""
  from ip2p_jax import editing  # imports no JAX
  _, missing = editing.expand_inputs(inputs)
  if missing:
    raise CommandError(missing[0]["error"])


def _plan(args, info, process: tuple[int, int]):
  """Everything checked before the model loads: settings, output folder, records (the
  inputs were checked by ``run`` before anything else). ``process``: (index, count) of
  this process."""
  from ip2p_jax import editing
  from ip2p_jax.checkpoints.fingerprint import folder_hash
  from ip2p_jax.adapters.files import file_hash
  from ip2p_jax.diffusion import schedules
  from ip2p_jax.pipelines import check_editor
  unet = info.configs["unet"]
  check_editor(unet, info.configs["vae"], info.folder)
  native = (unet.sample_size or 64) * 2 ** (len(info.configs["vae"].block_out_channels) - 1)
  steps, chain = _steps(args)
  if args.grid and len(steps) > 1:
    raise CommandError("--grid sweeps the scales of one edit; give one -p")
  made = {k: getattr(chain, k) for k in PREPARATION} if chain else {}
  first = steps[0]
  settings = editing.EditSettings(
      prompt=first.instruction if len(steps) == 1 else None, steps=first.steps,
      text_scale=first.text_scale, image_scale=first.image_scale, seed=first.seed,
      sampler=first.sampler, karras=first.karras,
      chain=tuple(steps) if len(steps) > 1 else (),
      resolution=args.resolution or made.get("resolution") or native,
      resize=args.resize or made.get("resize") or "fit", batch_size=args.batch_size,
      overwrite=args.overwrite, max_pixels=args.max_pixels,
      dtype=args.dtype or made.get("dtype") or "float32")
  editing.validate_settings(settings)
  sampler = schedules.sampler_of_scheduler_config(info.scheduler_config)
  for step in steps:
    name = step.sampler or sampler
    if name not in schedules.SAMPLERS:
      raise CommandError(f"sampler {name!r}: not one of {', '.join(schedules.SAMPLERS)}")
    if step.karras and name not in schedules.KARRAS_SAMPLERS:
      raise CommandError(f"--karras: {name} has no Karras sigmas in diffusers; samplers that "
                         f"do: {', '.join(schedules.KARRAS_SAMPLERS)}")
    schedules.ScheduleConfig.from_dict(info.scheduler_config, name)
  _check_prompt_lengths(dict.fromkeys(step.instruction for step in steps), info.tokenizer_dir)
  if os.path.exists(args.output) and not os.path.isdir(args.output):
    raise CommandError(f"-o {args.output}: exists and is not a folder")
  model = folder_hash(info.folder)
  check_adapter_files(args.adapter)
  for path, scale in args.adapter:  # an adapted model is another model for the records
    model += f"+{file_hash(path)}@{scale:g}"
  if chain is not None and chain.model and chain.model != model:
    warn(f"--chain {args.chain} was made with model {chain.model}, this run uses {model}: "
         "its images will differ from the chain's")
  plan = editing.make_plan(args.inputs, args.output, settings, sampler=sampler,
                           model=model, process=process)
  if not plan.items:
    raise CommandError(f"no image files found in {' '.join(args.inputs)}")
  check_output_folder(args.output)
  return settings, plan, chain


def _check_replay(chain, report, max_pixels: int) -> None:
  """Where an input is the chain's own source, says whether the replay gave the chain's
  recorded final image (same pixels) or not."""
  from ip2p_jax import images as imagelib
  from ip2p_jax.chain import pixels_sha256
  recorded = chain.output_sha256[-1] if chain.output_sha256 else None
  if not recorded or not chain.source_sha256:
    return
  for entry in report.edited:
    if os.path.basename(entry["input"]) != chain.name:
      continue
    if pixels_sha256(imagelib.load(entry["input"], max_pixels)) != chain.source_sha256:
      continue
    if pixels_sha256(imagelib.load(entry["output"])) == recorded:
      print(f"{entry['output']}: the chain's recorded result, pixel for pixel")
    else:
      warn(f"{entry['output']}: differs from the chain's recorded result (another model, "
           "dtype, batch size or machine)")


def run(args) -> int:
  _check_inputs(args.inputs)  # a mistyped path answers in ~0.2 s, not after JAX's import
  import jax
  import jax.numpy as jnp
  from tqdm import tqdm

  from ip2p_jax import InstructPix2PixPipeline, editing
  from ip2p_jax import images as imagelib
  from ip2p_jax.checkpoints import check_pipeline

  info = check_pipeline(resolve_model(args.model))
  settings, plan, chain = _plan(args, info, (0, 1))  # jax.distributed must start first
  if args.coordinator:
    jax.distributed.initialize(coordinator_address=args.coordinator,
                               num_processes=args.num_processes, process_id=args.process_id)
  elif args.distributed:
    jax.distributed.initialize()
  if jax.process_count() > 1:  # each process's slice depends on the process count
    settings, plan, chain = _plan(args, info, (jax.process_index(), jax.process_count()))
  if not args.no_compilation_cache:
    enable_compilation_cache()
  dtype = jnp.bfloat16 if settings.dtype == "bfloat16" else jnp.float32
  pipe = InstructPix2PixPipeline.from_pretrained(info.folder, dtype=dtype, param_dtype=dtype,
                                                 compilation_cache=False)
  for path, scale in args.adapter:
    pipe.load_adapter(path, scale)
  progress = lambda total: tqdm(total=total, unit="edit", desc="editing", dynamic_ncols=True,
                                disable=None)
  report = editing.edit_files(pipe, args.inputs, args.output, settings, plan=plan,
                              progress=progress)
  if args.grid:
    for entry in report.edited:
      grid = editing.scale_grid(pipe, imagelib.load(entry["input"], args.max_pixels), settings,
                                args.grid_text_scales, args.grid_image_scales,
                                noise_id=entry["noise_id"])
      stem = os.path.splitext(entry["output"])[0]
      imagelib.save(grid, f"{stem}_grid.png")
  if chain is not None:
    _check_replay(chain, report, args.max_pixels)
  n = len(report.edited)
  rate = n / report.seconds if report.seconds else 0.0
  print(f"edited {n}, kept {len(report.skipped_existing)} existing, failed "
        f"{len(report.failed)} ({rate:.2f} images/s) -> {args.output}")
  for item in report.failed:
    error = item["error"]
    print(f"  failed: {error if item['input'] in error else item['input'] + ': ' + error}",
          file=sys.stderr)
  return 0 if report.ok else 1
