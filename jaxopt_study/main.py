"""Trains one run: python -m jaxopt_study.main --config=configs/lion.py --workdir=runs/lion

Any config field can be overridden, e.g. `--config.optimizer.learning_rate=3e-4`; presets are
picked with `--config=configs/lion.py:gpt2_small`. Running the same command again resumes from
the latest checkpoint in the workdir; a changed config is refused unless `--restart` is given.

Exit codes (for schedulers): 0 completed, 3 diverged (a result, recorded in results.json),
75 preempted (checkpointed; run the same command again to resume), 1 any error.
"""

import errno
import logging as std_logging
import sys

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from jaxopt_study import cli
from jaxopt_study import rundir
from jaxopt_study import sharding
from jaxopt_study import train

EXIT_CODES = {"completed": 0, "diverged": 3, "preempted": 75}  # else 1

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints, TensorBoard events, results.json.")
flags.DEFINE_bool(
    "restart", False,
    "Move an existing run in --workdir aside (to WORKDIR/replaced-<time>/) and start fresh.",
)
config_flags.DEFINE_config_file(
    "config", "configs/adamw.py", "Training config file (optionally `file.py:PRESET`).",
    lock_config=True,
)
flags.mark_flags_as_required(["workdir"])


class _Quiet(std_logging.Filter):
  """Orbax logs every checkpoint phase at INFO, JAX every platform it did not find (``Unable
  to initialize backend 'tpu'``); keep their warnings and errors only (``-v 1`` shows all)."""

  NOISY = ("/orbax/", "xla_bridge.py")

  def filter(self, record):
    return (record.levelno >= std_logging.WARNING or logging.get_verbosity() > logging.INFO
            or not any(n in record.pathname for n in self.NOISY))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Too many command-line arguments: {argv[1:]}")
  logging.get_absl_handler().addFilter(_Quiet())
  sharding.maybe_initialize_distributed()  # before anything touches a device
  logging.info("JAX process %d/%d, devices: %s", jax.process_index(), jax.process_count(), jax.devices())
  try:
    if FLAGS.restart and jax.process_index() == 0:
      moved = rundir.move_aside(FLAGS.workdir)
      if moved:
        logging.warning("--restart: the previous run is now in %s", moved)
    results = train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except (rundir.ConfigChanged, rundir.Locked, rundir.BadWorkdir, rundir.BadFile) as e:
    logging.error("%s", e)
    sys.exit(1)
  except OSError as e:
    if e.errno != errno.ENOSPC:
      raise
    logging.error(
        "No space left on device (%s). Free space or point --workdir at another disk, then run "
        "the same command again: it resumes from the last complete checkpoint.", e.filename or e
    )
    sys.exit(1)
  sys.exit(EXIT_CODES.get(results.status, 1))


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
