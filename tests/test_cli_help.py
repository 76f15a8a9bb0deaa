"""The command line a user reads: complete ``--help`` with defaults, ``--version``, the
README synopsis checked against the parser, and a text-to-image folder refused in one
line before any model loads."""
import argparse
import os
import re
import subprocess
import sys

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


def _synopsis(command: str) -> str:
  readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
  section = readme.split(f"## `ip2p {command}`", 1)[1]
  return section.split("```", 2)[1]


def _flags(synopsis: str):
  """(flag, value or None, inside brackets) for every option the synopsis names."""
  depth, i = 0, 0
  pattern = re.compile(r"(?<![\w-])(-{1,2}[a-z][\w-]*)(?: ((?!-)[^\s\[\]]+(?:\[[^\]]*\])?))?")
  for m in pattern.finditer(synopsis):
    depth += synopsis.count("[", i, m.start()) - synopsis.count("]", i, m.start())
    i = m.start()
    yield m.group(1), m.group(2), depth > 0


def _value(action, text):
  return action.type(text) if callable(action.type) else text


def _default(action):
  """The parser's default, or where it is resolved later (a None default), the one its
  help states: "default X", or the choice marked "(default)"."""
  if action.default is not None:
    return action.default
  text = action.help or ""
  for choice in action.choices or ():
    if re.search(rf"\b{re.escape(choice)}\b[^;]*\(default\)", text):
      return choice
  said = re.search(r"default:? ([\w.,]+)", text)
  return _value(action, said.group(1).rstrip(".,")) if said else None


@pytest.mark.parametrize("command", ["edit", "eval"])
def test_readme_synopsis_matches_the_parser(command):
  """Every flag the README's synopsis names exists, takes a value exactly when the parser's
  does, and a value shown is the parser's default (or
  its choices, A|B); a required one is not bracketed; the edit synopsis names every option
  (eval's ends in "...")."""
  synopsis = _synopsis(command)
  top = build_parser()
  parser = dict(COMMANDS)[(command,)]
  named = set()
  for flag, value, optional in _flags(synopsis):
    if flag == "--debug":  # accepted anywhere (cli.common.pop_debug)
      continue
    action = (parser._option_string_actions.get(flag) or
              top._option_string_actions.get(flag))
    assert action is not None, f"README's ip2p {command} synopsis: {flag} is no option"
    named.add(action.dest)
    takes_value = action.nargs != 0
    assert (value is not None) == takes_value, f"{flag}: value {value!r} in the synopsis"
    if action.required:
      assert not optional, f"{flag} is required: not in brackets"
    if not takes_value or value.isupper() or value.startswith('"') or \
        re.fullmatch(r"[A-Z]+(\[:[A-Z]+\])?(:[A-Z]+)?", value):
      continue  # a placeholder
    if "|" in value:
      assert set(value.split("|")) == set(action.choices), f"{flag}: choices {value}"
      assert value.split("|")[0] == _default(action), f"{flag}: the default comes first"
    else:
      default = _default(action)
      assert default is not None, f"{flag}: the synopsis shows {value}, the parser no default"
      assert _value(action, value) == default, \
          f"README's ip2p {command} synopsis says {flag} {value}, the parser's default is " \
          f"{default!r}"
  if not synopsis.rstrip().endswith("..."):
    for action in parser._actions:
      if action.option_strings and action.dest != "help":
        assert action.dest in named, f"README's ip2p {command} synopsis lacks " \
                                     f"{action.option_strings[-1]}"
  readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
  for name in SAMPLER_CHOICES:
    assert f"`{name}`" in readme, f"README does not name the {name} sampler"


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


def test_help_and_argument_errors_answer_without_importing_jax(tmp_path):
  # The parser imports no JAX (lazy package exports, ip2p_jax._lazy): `ip2p --help` and
  # a mistyped flag answer in ~0.2 s instead of JAX's ~1.5 s import on a 2-core CPU.
  # So does an input path that matches nothing (checked before the model's imports).
  folder = tmp_path / "unused-out"
  code = ("import sys\nfrom ip2p_jax.cli import main\n"
          "for argv in (['--help'], ['edit', '--no-such-flag'],\n"
          f"             ['edit', 'no-such-image.png', '-p', 'x', '-o', {str(folder)!r}]):\n"
          "  try:\n    print('exit', main(argv))\n"
          "  except SystemExit as e:\n    print('exit', e.code)\n"
          "print(sorted({m.split('.')[0] for m in sys.modules} & "
          "{'jax', 'jaxlib', 'flax', 'optax', 'torch', 'transformers'}))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       check=True, cwd=ROOT)
  lines = out.stdout.strip().splitlines()
  exits = [line for line in lines if line.startswith("exit ")]
  assert exits == ["exit 0", "exit 2", "exit 2"] and lines[-1] == "[]", out.stdout[-500:]
  assert "no-such-image.png: no such file, folder or matching glob" in out.stderr
  assert not folder.exists()
  # and the lazy exports still resolve, to the same objects as their modules'
  from ip2p_jax import pipelines
  from ip2p_jax.diffusion import DEFAULT_STEPS, schedules as sch
  from ip2p_jax.models import UNet2DConditionModel, unet
  assert ip2p_jax.InstructPix2PixPipeline is pipelines.InstructPix2PixPipeline
  assert UNet2DConditionModel is unet.UNet2DConditionModel and sch is schedules
  assert DEFAULT_STEPS == pipelines.DEFAULT_STEPS and "TextToImagePipeline" in dir(ip2p_jax)
  with pytest.raises(AttributeError, match="no attribute 'InstructPix2PixPipelin'"):
    ip2p_jax.InstructPix2PixPipelin  # noqa: B018
