"""Runs an optimizer study, then writes its report.

  python scripts/run_study.py --config=configs/study.py:tiny --workdir=studies/tiny
  python scripts/run_study.py --config=configs/study.py:small --workdir=studies/small
  python scripts/run_study.py --config=configs/study.py:small --workdir=studies/small \
      --config.seeds=0,1,2 --config.base.diagnostics.every=5

Every run of the study's protocol (lr sweep, grid extensions until the best rate is bracketed,
seeds at each best rate; jaxopt_study/study/runner.py) trains in
WORKDIR/runs/<condition>/<optimizer>/lr=<lr>/seed=<seed>; running the same command again reuses
finished runs and resumes interrupted ones. The report (WORKDIR/REPORT.md, results/, plots/) is
written at the end; `python scripts/make_report.py WORKDIR` rewrites it alone.
Per-step training logs are at WARNING unless --verbosity is given (the progress bar stays
readable); TensorBoard (every run's config as hparams): `tensorboard --logdir WORKDIR/runs`.

Exit codes (jaxopt_study.study.runner.EXIT_*):
  0   at least one run completed (failed and diverged runs are in the report)
  3   every run failed or diverged
  4   a run directory was trained under another config (--config.on_config_change=rerun
      trains it again; the message names the run and the changed fields)
  5   another live process trains in one of the study's run directories
  75  preempted (SIGTERM): the running run checkpointed; run the same command to continue
"""

import os
import shlex
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jaxopt_study import rundir  # pylint: disable=g-import-not-at-top,wrong-import-position
from jaxopt_study.study import report  # pylint: disable=g-import-not-at-top,wrong-import-position
from jaxopt_study.study import runner  # pylint: disable=g-import-not-at-top,wrong-import-position

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Study directory (runs/, study.json, REPORT.md).")
flags.DEFINE_bool("report", None, "Write the report after the runs (default: config.make_report).")
config_flags.DEFINE_config_file(
    "config", "configs/study.py:tiny", "Study config file (`configs/study.py:PRESET`).",
    lock_config=True,
)
flags.mark_flags_as_required(["workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Too many command-line arguments: {argv[1:]}")
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
  try:
    spec = runner.run_study(FLAGS.config, FLAGS.workdir, command=command)
  except (rundir.ConfigChanged, rundir.Locked) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(runner.EXIT_CONFIG_CHANGED if isinstance(e, rundir.ConfigChanged)
             else runner.EXIT_LOCKED)
  counts = {}
  for r in spec["runs"]:
    counts[r["status"]] = counts.get(r["status"], 0) + 1
  print(f"study {FLAGS.workdir}: {len(spec['runs'])} runs: {counts}")
  make = FLAGS.config.make_report if FLAGS.report is None else FLAGS.report
  if make:
    path = report.make_report(FLAGS.workdir)
    print(f"report: {path}")
  code = runner.exit_code(spec)
  if code != runner.EXIT_OK:
    print(f"exit code {code}: see the exit codes in scripts/run_study.py", file=sys.stderr)
  sys.exit(code)


if __name__ == "__main__":
  app.run(main)
