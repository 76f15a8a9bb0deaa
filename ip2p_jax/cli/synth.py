"""``ip2p synth``: make an instruction-editing dataset from captions (the paper's engine).

  ip2p synth --captions captions.txt --out data/synth [--model T2I] [--clip DIR]
             [--generator builtin|lm:DIR] [--samples 100] [--keep 4]

Each caption becomes (instruction, edited caption) (the built-in grammar, or a causal
language model folder in the original's prompt format); a text-to-image model draws
--samples Prompt-to-Prompt pairs of the two captions; CLIP keeps the best --keep pairs
that pass the thresholds. The output is the original's folder format:
`ip2p data import --format ip2p-folder OUT --out DATASET` makes it a training set.
Running the same command again resumes where it stopped.
"""
from __future__ import annotations

from ip2p_jax.cli.common import SAMPLER_CHOICES, HelpFormatter, fail


def add_parser(sub) -> None:
  from ip2p_jax.synth.config import PAPER_SAMPLER, PAPER_SAMPLES, PAPER_STEPS, FilterConfig
  f = FilterConfig()
  p = sub.add_parser("synth", help="make training pairs from captions (instructions, "
                     "Prompt-to-Prompt, CLIP filter)", formatter_class=HelpFormatter,
                     description=__doc__)
  p.add_argument("--captions", required=True, help="text file, one caption per line")
  p.add_argument("--out", required=True, help="folder to write (resumed if it exists)")
  p.add_argument("--model", help="text-to-image diffusers folder (default: the bundled "
                 "stage-1 model)")
  p.add_argument("--clip", help="transformers CLIPModel folder (default: the bundled CLIP)")
  p.add_argument("--generator", default="builtin", help="builtin, or lm:FOLDER with a "
                 "transformers causal LM (pip install -e '.[lm]')")
  p.add_argument("--samples", type=int, default=PAPER_SAMPLES, help="pairs drawn per caption")
  p.add_argument("--keep", type=int, default=f.keep, help="best pairs kept per caption")
  p.add_argument("--steps", type=int, default=PAPER_STEPS, help="sampling steps")
  p.add_argument("--sampler", default=PAPER_SAMPLER, choices=SAMPLER_CHOICES,
                 help="sampler (the paper's)")
  p.add_argument("--batch-size", type=int, default=8, help="pairs per compiled call")
  p.add_argument("--resolution", type=int, help="image side (default: the model's)")
  p.add_argument("--seed", type=int, default=0, help="seed of instructions, noise, p and "
                 "guidance scales")
  p.add_argument("--limit", type=int, help="only the first N captions")
  for name, value in (("sim-0", f.min_sim_0), ("sim-1", f.min_sim_1),
                      ("sim-direction", f.min_sim_direction), ("sim-image", f.min_sim_image)):
    p.add_argument(f"--min-{name}", type=float, default=value,
                   help=f"CLIP threshold on {name.replace('-', '_')}")
  p.set_defaults(run=run)


def _print_report(report: dict, out: str, sheet: str | None) -> None:
  print(f"synthesized: {out}")
  for key in ("captions", "prompts", "resumed_prompts", "generated", "kept", "rejected"):
    print(f"  {key}: {report[key]}")
  for reason, n in report["instructions_rejected"].items():
    print(f"  instructions rejected ({reason}): {n}")
  for name, n in report["rejected_by"].items():
    print(f"  rejected by {name}: {n}")
  for kind, judge in report["colour_judge"].items():
    if judge["judged"]:
      print(f"  {kind} pairs that show their edit (colour judge, {judge['judged']} judged): "
            f"{judge['follows_edit']:.1%}")
  if sheet:
    print(f"contact sheet: {sheet}")


def run(args) -> int:
  import os

  from tqdm import tqdm

  from ip2p_jax import bundled
  from ip2p_jax.cli.common import enable_compilation_cache
  from ip2p_jax.images import save
  from ip2p_jax.metrics import ClipSimilarity
  from ip2p_jax.pipelines import TextToImagePipeline
  from ip2p_jax.synth import engine, instructions
  from ip2p_jax.synth.config import FilterConfig, SynthConfig

  if args.samples < 1 or args.keep < 0 or args.batch_size < 1 or args.steps < 1:
    return fail("--samples, --batch-size and --steps must be >= 1 and --keep >= 0")
  if not os.path.isfile(args.captions):
    return fail(f"{args.captions}: no such file")
  captions = engine.read_captions(args.captions)[:args.limit]
  if not captions:
    return fail(f"{args.captions}: no captions")
  generator = instructions.make_generator(args.generator, args.seed)
  enable_compilation_cache()
  pipe = TextToImagePipeline.from_pretrained(args.model, compilation_cache=False)
  pipe.set_progress_bar_config(disable=True)
  clip = ClipSimilarity(args.clip or bundled.DEFAULT_CLIP)
  config = SynthConfig(
      samples=args.samples, batch_size=min(args.batch_size, args.samples),
      num_inference_steps=args.steps, scheduler=args.sampler, height=args.resolution,
      width=args.resolution, seed=args.seed,
      filter=FilterConfig(args.min_sim_0, args.min_sim_1, args.min_sim_direction,
                          args.min_sim_image, args.keep))
  job = engine.Engine(pipe, clip, generator, config)
  with tqdm(total=len(captions), unit="caption", dynamic_ncols=True) as bar:
    def progress(report):
      bar.update(1)
      bar.set_postfix(generated=report["generated"], kept=report["kept"])
    report, rows = job.run(captions, args.out, progress)
  sheet = None
  if rows:
    sheet = os.path.join(args.out, "contact_sheet.png")
    save(engine.contact_sheet(rows), sheet)
  _print_report(report, args.out, sheet)
  return 0
