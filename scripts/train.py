"""Train any stage from a config file; resumes automatically from WORKDIR.

  python scripts/train.py --config=configs/tiny_ip2p.py --workdir=/tmp/run \
      [--config.total_steps=100 --config.batch_size=8 ...]

Thin on purpose: flags in, ``ip2p_jax.train.loop.train_and_evaluate`` does the work
(call it from a notebook the same way). The console shows one line per ``log_every``
steps; library INFO logs (orbax, absl) appear only with ``--verbosity=0`` (or higher). Unknown ``--config.*`` keys and bad values
are one ``train.py: error:`` line and exit status 2 (``--debug`` shows the traceback).
"""
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

config_flags.DEFINE_config_file("config", None, "Training config file (configs/*.py).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Checkpoints, metrics, samples and the export go here.")
flags.mark_flags_as_required(["config", "workdir"])


def flag_error_message(error: BaseException) -> str:
  """One line from absl/ml_collections' flag errors, whose text may be a repr of a
  multi-line message (``'\\'totl_steps\\'\\nDid you mean "total_steps" ...'``)."""
  text = str(error)
  for _ in range(2):  # unwrap repr()-quoted messages
    if len(text) > 1 and text[0] == text[-1] and text[0] in "'\"":
      text = text[1:-1].encode().decode("unicode_escape")
  text = re.sub(r"\s*\n\s*", "; ", text.strip())
  if isinstance(error, (AttributeError, KeyError)):  # ml_collections: no such field
    text = f"unknown config key {text}"
  return text


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing, with errors as one line instead of a traceback."""
  debug = "--debug" in argv
  argv = [a for a in argv if a != "--debug"]
  try:
    return flags.FLAGS(argv)
  except Exception as e:  # noqa: BLE001 - flag errors come as several exception types
    if debug:
      raise
    print(f"train.py: error: {flag_error_message(e)}", file=sys.stderr)
    sys.exit(2)


def quiet_unless_asked() -> None:
  """Warnings and errors only, unless ``--verbosity`` was given: orbax and absl log a
  dozen INFO lines per checkpoint, which would bury the progress lines."""
  if flags.FLAGS["verbosity"].present:
    return
  import logging
  from absl import logging as absl_logging
  absl_logging.set_verbosity(absl_logging.WARNING)
  logging.getLogger().setLevel(logging.WARNING)


def main(argv):
  del argv
  quiet_unless_asked()
  from ip2p_jax.train.loop import train_and_evaluate
  summary = train_and_evaluate(flags.FLAGS.config, flags.FLAGS.workdir)
  print(f"finished at step {summary['step']}: {summary['metrics']}; export: {summary['export']}")


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
