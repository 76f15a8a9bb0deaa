"""The ``ip2p`` command line: one subcommand per job.

  ip2p edit INPUT... -p "instruction" -o OUT     edit images (see ``ip2p edit -h``)
  ip2p data ACTION ...                           make, import, cache and show datasets
  ip2p info MODEL                                describe a model folder
  ip2p eval [--model DIR] [--sweep]              score held-out shapes-world edits
  ip2p customize --data DIR --method M --out F   train a LoRA / Custom Diffusion adapter
  ip2p synth --captions FILE --out DIR          make training pairs from captions
  ip2p demo [--model DIR] [--port 7860]         a web page for editing step by step
"""
from __future__ import annotations

import sys


def build_parser():
  """The whole ``ip2p`` argument parser, built without importing JAX (the packages'
  exports are lazy, ``ip2p_jax._lazy``): ``--help`` answers in ~0.2 s."""
  from ip2p_jax import __version__
  from ip2p_jax.cli import common, customize, data, demo, edit, eval, info, synth
  parser = common.Parser(
      prog="ip2p", description="InstructPix2Pix in JAX: edit images by instructions. "
      "--debug (anywhere) shows a traceback instead of the one-line error.")
  parser.add_argument("--version", action="version", version=f"ip2p {__version__}")
  sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
  for module in (edit, data, info, eval, synth, customize, demo):
    module.add_parser(sub)
  return parser


def main(argv: list[str] | None = None) -> int:
  from ip2p_jax.cli import common
  argv, debug = common.pop_debug(sys.argv[1:] if argv is None else list(argv))
  args = build_parser().parse_args(argv)
  return common.run_command(args, debug)
