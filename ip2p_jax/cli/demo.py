"""``ip2p demo``: the interactive editing page (``ip2p_jax.demo``), on the bundled model
unless ``--model`` names another; needs the ``demo`` extra (``pip install -e ".[demo]"``)."""
from __future__ import annotations

import importlib.util

from ip2p_jax.cli.common import CommandError, HelpFormatter, resolve_model

EXAMPLES = """examples:
  ip2p demo                        # the bundled model at http://127.0.0.1:7860
  ip2p demo --model ip2p-model --port 8080
"""


def add_parser(sub) -> None:
  p = sub.add_parser("demo", help="a web page for editing step by step (Gradio)",
                     epilog=EXAMPLES, formatter_class=HelpFormatter,
                     description="Serve a web page for editing an image step by step: "
                     "instruction, steps, scales, seed and sampler; continue from a result, "
                     "undo, branch, the scale grid, and download the image and its chain "
                     "(which `ip2p edit --chain` replays).")
  p.add_argument("--model", help="diffusers-format InstructPix2Pix folder or cached hub id "
                 "(default: the model bundled with ip2p_jax)")
  p.add_argument("--host", default="127.0.0.1",
                 help="address to listen on (0.0.0.0 makes the page reachable from other "
                      "machines)")
  p.add_argument("--port", type=int, default=7860, help="port to listen on")
  p.add_argument("--resolution", type=int, default=None,
                 help="longest side in pixels (default: the model's native size)")
  p.add_argument("--max-pixels", type=int, default=16_000_000,
                 help="refuse uploads with more pixels (decompression bombs)")
  p.add_argument("--max-batch", type=int, default=8,
                 help="edit requests arriving together run in batches of at most this many")
  p.set_defaults(run=run)


def run(args) -> int:
  if importlib.util.find_spec("gradio") is None:
    raise CommandError('ip2p demo needs Gradio: pip install -e ".[demo]"')
  if not 0 < args.port < 65536:
    raise CommandError(f"--port must be in 1..65535, got {args.port}")
  if args.resolution is not None and args.resolution < 8:
    raise CommandError(f"--resolution must be >= 8, got {args.resolution}")
  if args.max_pixels < 1:
    raise CommandError(f"--max-pixels must be >= 1, got {args.max_pixels}")
  if args.max_batch < 1:
    raise CommandError(f"--max-batch must be >= 1, got {args.max_batch}")
  from ip2p_jax.checkpoints import check_pipeline
  from ip2p_jax.pipelines import check_editor
  info = check_pipeline(resolve_model(args.model))
  check_editor(info.configs["unet"], info.configs["vae"], info.folder)
  from ip2p_jax import demo
  demo.launch(info.folder, args.host, args.port, args.resolution, args.max_batch,
              args.max_pixels)
  return 0
