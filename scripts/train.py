"""Train any stage from a config file; resumes automatically from WORKDIR.

  python scripts/train.py --config=configs/tiny_ip2p.py --workdir=/tmp/run \
      [--config.total_steps=100 --config.batch_size=8 ...]

Thin on purpose: flags in, ``ip2p_jax.train.loop.train_and_evaluate`` does the work
(call it from a notebook the same way). Unknown ``--config.*`` keys are errors.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

config_flags.DEFINE_config_file("config", None, "Training config file (configs/*.py).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Checkpoints, metrics, samples and the export go here.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  from ip2p_jax.train.loop import train_and_evaluate
  summary = train_and_evaluate(flags.FLAGS.config, flags.FLAGS.workdir)
  print(f"finished at step {summary['step']}: {summary['metrics']}; export: {summary['export']}")


if __name__ == "__main__":
  app.run(main)
