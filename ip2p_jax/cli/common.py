"""Helpers shared by subcommands: the default model, the compilation cache, errors.

Every failure of a command is one ``ip2p: error: ...`` line on stderr and exit
status 2 (argument errors, bad model folders, and unexpected exceptions alike; ``ip2p
edit`` exits 1 when it skipped unreadable inputs and edited the rest, 130 on Ctrl-C);
``--debug`` anywhere on the command line shows the traceback instead.
"""
from __future__ import annotations

import argparse
import os
import sys
import traceback

from ip2p_jax import bundled
from ip2p_jax.diffusion.schedules import SAMPLERS


class CommandError(Exception):
  """A user-facing error: printed without a traceback, exit status 2."""


def check_adapter_files(adapters) -> None:
  """``--adapter PATH[:SCALE]`` values (``(path, scale)`` pairs): each file must exist,
  checked before any model loads (their contents are read with the model)."""
  for path, _ in adapters:
    if not os.path.isfile(path):
      raise CommandError(f"--adapter {path}: no such file")


def resolve_model(model: str | None) -> str:
  """``--model``, else the bundled default model (``$IP2P_DEFAULT_MODEL`` overrides where)."""
  if model:
    return model
  default = bundled.editor_path()
  if os.path.isfile(os.path.join(default, "model_index.json")):
    return default
  raise CommandError(
      "no default model is bundled with this installation yet. Pass --model with a "
      "diffusers-format InstructPix2Pix folder, e.g. a local copy of timbrooks/instruct-pix2pix "
      "(`hf download timbrooks/instruct-pix2pix --local-dir ip2p-model`, then "
      "`--model ip2p-model`).")


def enable_compilation_cache(path: str | None = None) -> str | None:
  """JAX's persistent compilation cache, so a second run does not recompile
  (``ip2p_jax.compilation``)."""
  from ip2p_jax.compilation import enable_compilation_cache as enable
  return enable(path)


SAMPLER_CHOICES = SAMPLERS
SAMPLER_HELP = ("default: the model folder's own scheduler class (Euler ancestral for IP2P, "
                "PNDM for SD 1.5); each name is one diffusers scheduler class (README)")
KARRAS_HELP = ("Karras et al. sigmas (diffusers' use_karras_sigmas) for euler, heun, lms, "
               "dpmpp_2m, dpmpp_2m_sde, unipc")


def check_sampler(sampler: str | None, karras: bool, scheduler_config) -> str:
  """The sampler that will run (``--sampler``, else the folder's own scheduler class), with
  ``--karras`` and the folder's scheduler options checked for it before any model loads."""
  from ip2p_jax.diffusion import schedules
  name = sampler or schedules.sampler_of_scheduler_config(scheduler_config)
  if karras and name not in schedules.KARRAS_SAMPLERS:
    raise CommandError(f"--karras: {name} has no Karras sigmas in diffusers; samplers that "
                       f"do: {', '.join(schedules.KARRAS_SAMPLERS)}")
  schedules.ScheduleConfig.from_dict(scheduler_config, name)
  return name


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
  """Examples kept as written; every option's default shown."""

  def _get_help_string(self, action):
    if action.default in (None, False) or isinstance(action, argparse._StoreTrueAction):
      return action.help
    return super()._get_help_string(action)


def one_line(message: str) -> str:
  """A multi-line message (e.g. a list of mis-shaped tensors) joined into one line."""
  return "; ".join(line.strip() for line in str(message).splitlines() if line.strip())


DEBUG = False  # set by run_command from --debug


def fail(message: str, status: int = 2) -> int:
  """Prints the one error line (after the traceback of the exception being handled,
  under ``--debug``) and returns ``status``."""
  if DEBUG and sys.exc_info()[0] is not None:
    traceback.print_exc()
  print(f"ip2p: error: {one_line(message)}", file=sys.stderr)
  return status


def warn(message: str) -> None:
  print(f"ip2p: warning: {one_line(message)}", file=sys.stderr)


class Parser(argparse.ArgumentParser):
  """argparse whose usage errors are one ``ip2p: error:`` line, exit status 2."""

  def error(self, message: str):
    self.exit(2, f"ip2p: error: {self.prog}: {message} (see `{self.prog} -h`)\n")


def pop_debug(argv: list[str]) -> tuple[list[str], bool]:
  """``argv`` without ``--debug`` (accepted anywhere), and whether it was there."""
  return [a for a in argv if a != "--debug"], "--debug" in argv


def run_command(args, debug: bool) -> int:
  """Runs a parsed subcommand. Errors that escape it become one ``ip2p: error:`` line
  and exit status 2, or the traceback under ``--debug``."""
  global DEBUG
  DEBUG = debug
  try:
    return int(args.run(args) or 0)
  except KeyboardInterrupt:
    print("interrupted", file=sys.stderr)
    return 130
  except Exception as e:  # noqa: BLE001 - the CLI boundary: one line, not a traceback
    if debug:
      traceback.print_exc()
      return 2
    known = isinstance(e, (CommandError, ValueError, OSError))
    what = str(e) if known and str(e) else f"{type(e).__name__}: {e}"
    return fail(what + ("" if known else " (rerun with --debug for the traceback)"))
