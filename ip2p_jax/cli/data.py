"""``ip2p data``: make, import, cache and look at training data.

  ip2p data shapes --out DIR --num N [--size 64] [--heldout M] [--seed S]
  ip2p data import --format {ip2p-folder,hf-parquet,captions} SRC --out DIR
  ip2p data show DIR [--split train] [--num 8] [-o sheet.png]
  ip2p data cache DIR --model MODEL --out FILE [--resolution 64]
"""
from __future__ import annotations

import os

from ip2p_jax.cli.common import HelpFormatter, fail


def add_parser(sub) -> None:
  p = sub.add_parser("data", help="make, import, cache and inspect datasets",
                     formatter_class=HelpFormatter, description=__doc__)
  s = p.add_subparsers(dest="data_command", required=True, metavar="ACTION")
  kw = dict(formatter_class=HelpFormatter)

  shapes = s.add_parser("shapes", help="generate the procedural shapes world", **kw,
                        description="Render shapes-world triplets (input, instruction, exact "
                        "edited image) into a TFDS ArrayRecord dataset folder.")
  shapes.add_argument("--out", required=True, help="dataset folder to write")
  shapes.add_argument("--num", type=int, required=True, help="training examples")
  shapes.add_argument("--heldout", type=int, default=0,
                      help="held-out split examples (unseen colour/shape/edit combinations)")
  shapes.add_argument("--size", type=int, default=64, help="canvas size in pixels (<= 512)")
  shapes.add_argument("--seed", type=int, default=0, help="seed of the scenes and edits")
  shapes.set_defaults(run=run_shapes)

  imp = s.add_parser("import", help="import a local copy of a real dataset", **kw,
                     description="Convert a dataset on disk into a TFDS ArrayRecord folder; "
                     "missing or corrupt items are skipped and counted in build_report.json.")
  imp.add_argument("source", help="the dataset folder (or parquet folder) to read")
  imp.add_argument("--format", required=True, choices=["ip2p-folder", "hf-parquet", "captions"],
                   help="ip2p-folder: the original's seeds.json layout; hf-parquet: "
                        "timbrooks/instructpix2pix-clip-filtered's export; captions: image + "
                        ".txt pairs or a parquet with --image-column/--text-column (stage 1)")
  imp.add_argument("--out", required=True, help="dataset folder to write")
  imp.add_argument("--image-column", default="image", help="captions parquet only")
  imp.add_argument("--text-column", default="text", help="captions parquet only")
  imp.add_argument("--overwrite", action="store_true",
                   help="replace an earlier import of another source in --out")
  imp.set_defaults(run=run_import)

  show = s.add_parser("show", help="write a contact sheet PNG of a few examples", **kw,
                      description="A contact sheet (input, edited, instruction) of a dataset.")
  show.add_argument("dataset", help="a dataset folder")
  show.add_argument("--split", default="train", help="which split")
  show.add_argument("--num", type=int, default=8, help="examples on the sheet")
  show.add_argument("-o", "--output", help="PNG path (default: DATASET/contact_sheet.png, "
                    "contact_sheet_SPLIT.png for another split)")
  show.set_defaults(run=run_show)

  cache = s.add_parser("cache", help="precompute VAE latents and text embeddings", **kw,
                       description="Encode a dataset once with a model's VAE and text "
                       "encoder (config.data.latents then trains the UNet alone).")
  cache.add_argument("dataset", help="a dataset folder")
  cache.add_argument("--model", required=True, help="diffusers-format pipeline folder")
  cache.add_argument("--out", required=True, help="ArrayRecord file to write")
  cache.add_argument("--split", default="train", help="which split")
  cache.add_argument("--resolution", type=int, default=64, help="image side in pixels")
  cache.add_argument("--batch-size", type=int, default=16, help="images per encoder call")
  cache.set_defaults(run=run_cache)


SHOWN_SKIPS = 50


def _print_report(path: str, report: dict) -> None:
  """Counts, then each skipped item and why (the first ``SHOWN_SKIPS``; all of them are
  in build_report.json)."""
  print(f"dataset: {path}")
  for key in sorted(k for k in report if k != "skipped"):
    print(f"  {key}: {report[key]}")
  skipped = report.get("skipped", [])
  for entry in skipped[:SHOWN_SKIPS]:
    print(f"  skipped {entry['item']}: {entry['reason']}")
  if len(skipped) > SHOWN_SKIPS:
    print(f"  ... and {len(skipped) - SHOWN_SKIPS} more skipped, listed in build_report.json")


def run_shapes(args) -> int:
  from ip2p_jax.data import builders
  if not 8 <= args.size <= 512 or args.num < 1 or args.heldout < 0:
    return fail("--size must be in [8, 512], --num >= 1 and --heldout >= 0")
  name = f"s{args.size}_n{args.num}_h{args.heldout}_seed{args.seed}"
  path, report = builders.build("shapes_world", args.out, builders.ShapesWorldConfig(
      name=name, size=args.size, num_train=args.num, num_heldout=args.heldout, seed=args.seed))
  _print_report(path, report)
  return 0


def run_import(args) -> int:
  from ip2p_jax.data import builders
  if not os.path.exists(args.source):
    return fail(f"{args.source}: no such file or folder")
  if args.format == "captions":
    fmt = "parquet" if args.source.endswith(".parquet") or (
        os.path.isdir(args.source) and any(f.endswith(".parquet") for f in os.listdir(args.source))
    ) else "folder"
    kind = "image_captions"
  else:
    fmt, kind = args.format, "instructpix2pix"
  config = builders.SourceConfig(name=fmt.replace("-", "_"), source=os.path.abspath(args.source),
                                 format=fmt, image_column=args.image_column,
                                 text_column=args.text_column)
  try:
    path, report, fresh = builders.import_source(kind, args.out, config, overwrite=args.overwrite)
  except (FileNotFoundError, ValueError) as e:
    return fail(str(e))
  if not fresh:
    print(f"already imported from {config.source}; reusing it (--overwrite rebuilds)")
  _print_report(path, report)
  return 0


def run_show(args) -> int:
  from ip2p_jax.data import builders
  from ip2p_jax.data.contact_sheet import contact_sheet
  from ip2p_jax.images import save
  try:
    folder = builders.find_dataset(args.dataset)
    source = builders.open_split(folder, args.split)
  except (FileNotFoundError, ValueError, KeyError) as e:
    return fail(str(e))
  name = "contact_sheet.png" if args.split == "train" else f"contact_sheet_{args.split}.png"
  out = args.output or os.path.join(args.dataset, name)
  save(contact_sheet(source, args.num), out)
  print(f"{len(source)} examples in {args.split}; contact sheet: {out}")
  return 0


def run_cache(args) -> int:
  from tqdm import tqdm

  from ip2p_jax.checkpoints import load_pipeline
  from ip2p_jax.data import builders, latent_cache
  source = builders.open_split(args.dataset, args.split)
  parts = load_pipeline(args.model)
  with tqdm(total=len(source), unit="ex", desc="caching") as bar:
    n = latent_cache.build(source, args.out, parts, resolution=args.resolution,
                           batch_size=args.batch_size, progress=bar.update)
  print(f"wrote {n} records to {args.out}")
  return 0
