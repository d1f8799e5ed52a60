"""Trains one run: python -m jaxopt_study.main --config=configs/lion.py --workdir=runs/lion

Any config field can be overridden, e.g. `--config.optimizer.learning_rate=3e-4`; presets are
picked with `--config=configs/lion.py:gpt2_small`. Running the same command again resumes from
the latest checkpoint in the workdir.
"""

import logging as std_logging

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from jaxopt_study import train

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints, TensorBoard events, results.json.")
config_flags.DEFINE_config_file(
    "config", "configs/adamw.py", "Training config file (optionally `file.py:PRESET`).",
    lock_config=True,
)
flags.mark_flags_as_required(["workdir"])


class _QuietOrbax(std_logging.Filter):
  """Orbax logs every checkpoint phase at INFO; keep its warnings and errors only."""

  def filter(self, record):
    return record.levelno >= std_logging.WARNING or "/orbax/" not in record.pathname


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Too many command-line arguments: {argv[1:]}")
  logging.get_absl_handler().addFilter(_QuietOrbax())
  logging.info("JAX process %d/%d, devices: %s", jax.process_index(), jax.process_count(), jax.devices())
  train.train_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
  app.run(main)
