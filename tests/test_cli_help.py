"""The command line a user reads: complete ``--help`` with defaults, ``--version``, the
README synopsis checked against the parser, and a text-to-image folder refused in one
line before any model loads."""
import argparse
import os
import re

import numpy as np
import pytest
from PIL import Image

import ip2p_jax
from ip2p_jax.cli import build_parser, main
from ip2p_jax.cli.common import SAMPLER_CHOICES
from ip2p_jax.diffusion import schedules

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _subparsers(parser, prefix=()):
  """(command path, parser) for every subcommand, nested ones too."""
  for action in parser._actions:
    if isinstance(action, argparse._SubParsersAction):
      for name, sub in action.choices.items():
        yield prefix + (name,), sub
        yield from _subparsers(sub, prefix + (name,))


COMMANDS = list(_subparsers(build_parser()))


def test_every_subcommand_is_covered():
  names = {" ".join(path) for path, _ in COMMANDS}
  assert {"edit", "eval", "info", "data", "data shapes", "data import", "data show",
          "data cache"} <= names


@pytest.mark.parametrize("path,parser", COMMANDS, ids=[" ".join(p) for p, _ in COMMANDS])
def test_help_explains_every_argument_and_shows_defaults(path, parser):
  text = parser.format_help()
  assert parser.description, f"{' '.join(path)} has no description"
  for action in parser._actions:
    if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
      continue
    name = "/".join(action.option_strings) or action.dest
    assert action.help, f"ip2p {' '.join(path)}: {name} has no help text"
    if action.default not in (None, False) and action.option_strings:
      flag = action.option_strings[-1]
      # the option's own entry in the help (from its line to the next option's)
      start = re.search(rf"\n  (?:-\w, )?{re.escape(flag)}[ \n]", text)
      assert start, f"ip2p {' '.join(path)} {flag}: no help entry"
      entry = text[start.end():]
      following = re.search(r"\n  -", entry)
      entry = entry[:following.start()] if following else entry
      assert "default" in entry, f"ip2p {' '.join(path)} {flag}: default not shown"


def test_version(capsys):
  with pytest.raises(SystemExit) as exit_:
    main(["--version"])
  assert exit_.value.code == 0
  assert capsys.readouterr().out.strip() == f"ip2p {ip2p_jax.__version__}"


def test_sampler_choices_are_the_library_samplers():
  assert tuple(SAMPLER_CHOICES) == schedules.SAMPLERS


def test_readme_synopsis_names_every_edit_option():
  readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
  synopsis = readme.split("## `ip2p edit`", 1)[1].split("```", 2)[1]
  edit = dict(COMMANDS)[("edit",)]
  for action in edit._actions:
    flags = [f for f in action.option_strings if f not in ("-h", "--help")]
    if flags:
      assert any(re.search(rf"{re.escape(f)}\b", synopsis) for f in flags), \
          f"README's ip2p edit synopsis lacks {flags[-1]}"
  for name in SAMPLER_CHOICES:
    assert name in readme, f"README does not name the {name} sampler"


@pytest.fixture(scope="module")
def text_to_image_folder(tmp_path_factory):
  from pipeline_fixtures import save_sd
  folder = tmp_path_factory.mktemp("sd")
  save_sd(folder)
  return str(folder)


def test_a_text_to_image_model_is_refused_in_one_line(text_to_image_folder, tmp_path, capsys):
  Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "a.png")
  status = main(["edit", str(tmp_path / "a.png"), "-p", "x", "-o", str(tmp_path / "out"),
                 "--model", text_to_image_folder, "--no-compilation-cache"])
  err = capsys.readouterr().err.strip().splitlines()
  assert status == 2 and len(err) == 1, err
  assert err[0].startswith("ip2p: error: ") and "this is a text-to-image model" in err[0]
  assert "TextToImagePipeline" in err[0]
  assert not (tmp_path / "out").exists()


def test_the_editor_pipeline_refuses_a_text_to_image_folder(text_to_image_folder):
  from ip2p_jax import InstructPix2PixPipeline, TextToImagePipeline
  from ip2p_jax.pipelines import ModelKindError
  with pytest.raises(ModelKindError, match="this is a text-to-image model"):
    InstructPix2PixPipeline.from_pretrained(text_to_image_folder, compilation_cache=False)
  TextToImagePipeline.from_pretrained(text_to_image_folder, compilation_cache=False)


def test_karras_for_a_sampler_without_it_is_one_line(model, tmp_path, capsys):
  Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "a.png")
  status = main(["edit", str(tmp_path / "a.png"), "-p", "x", "-o", str(tmp_path / "out"),
                 "--model", model, "--sampler", "ddim", "--karras"])
  err = capsys.readouterr().err.strip().splitlines()
  assert status == 2 and len(err) == 1 and "--karras: ddim has no Karras sigmas" in err[0]
