"""The ``ip2p`` command line: one subcommand per job.

  ip2p edit INPUT... -p "instruction" -o OUT     edit images (see ``ip2p edit -h``)
  ip2p data ACTION ...                           make, import, cache and show datasets
  ip2p info MODEL                                describe a model folder
  ip2p eval [--model DIR] [--sweep]              score held-out shapes-world edits
"""
from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
  from ip2p_jax.cli import data, edit, eval, info
  parser = argparse.ArgumentParser(
      prog="ip2p", description="InstructPix2Pix in JAX: edit images by instructions.")
  sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
  for module in (edit, data, info, eval):
    module.add_parser(sub)
  args = parser.parse_args(argv)
  try:
    return int(args.run(args) or 0)
  except KeyboardInterrupt:
    print("interrupted", file=sys.stderr)
    return 130
