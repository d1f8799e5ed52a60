"""Runs an optimizer study, then writes its report.

  python scripts/run_study.py --config=configs/study.py:tiny --workdir=studies/tiny
  python scripts/run_study.py --config=configs/study.py:small --workdir=studies/small
  python scripts/run_study.py --config=configs/study.py:small --workdir=studies/small \
      --config.seeds=0,1,2 --config.base.diagnostics.every=5

Every run of the study's protocol (lr sweep, grid extensions until the best rate is bracketed,
seeds at each best rate; jaxopt_study/study/runner.py) trains in
WORKDIR/runs/<condition>/<optimizer>/lr=<lr>/seed=<seed>; running the same command again reuses
finished runs and resumes interrupted ones; `--from_archive=docs/study_gpu_controls` first seeds
WORKDIR with a committed study's finished runs, so that it continues on a new machine. The
report (WORKDIR/REPORT.md, results/, plots/) is written at the end;
`python scripts/make_report.py WORKDIR` rewrites it alone. Per-step training logs are at
WARNING unless --verbosity is given (the progress bar stays readable); TensorBoard (every run's config as hparams): `tensorboard --logdir WORKDIR/runs`.

One GPU, many runs: `--processes=N` trains N work units at once, each in its own process with
its own share of device memory (XLA_PYTHON_CLIENT_MEM_FRACTION = 0.9 / N unless set); small
stacked models leave the GPU idle while XLA compiles on the host, and N processes overlap one's
compiling with another's training. A unit is a condition (every optimizer), or, with more
processes than conditions, one (condition, optimizer); the units start longest first as
processes free up (processes.work_units). Each unit keeps its study.json in
WORKDIR/parts/<condition>[-<optimizer>]/ (its runs/ is a link to WORKDIR/runs); when all are
done, this process merges them and writes WORKDIR/study.json and the report. WORKDIR/sessions.json records every
invocation (start, end, wall time, device, processes) for the report.

Exit codes (jaxopt_study.study.runner.EXIT_*):
  0   at least one run completed (failed and diverged runs are in the report)
  3   every run failed or diverged
  4   a run directory was trained under another config (--config.on_config_change=rerun
      trains it again; the message names the run and the changed fields)
  5   another live process trains in one of the study's run directories
  75  preempted (SIGTERM): the running run checkpointed; run the same command to continue
"""

import datetime
import functools
import os
import shlex
import signal
import subprocess
import sys
import time

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jaxopt_study import cli  # pylint: disable=g-import-not-at-top,wrong-import-position
from jaxopt_study import rundir  # pylint: disable=g-import-not-at-top,wrong-import-position
from jaxopt_study.study import report  # pylint: disable=g-import-not-at-top,wrong-import-position
from jaxopt_study.study import runner  # pylint: disable=g-import-not-at-top,wrong-import-position
from jaxopt_study.study import protocol  # pylint: disable=g-import-not-at-top,wrong-import-position
from jaxopt_study.study import processes  # pylint: disable=g-import-not-at-top,wrong-import-position

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Study directory (runs/, study.json, REPORT.md).")
flags.DEFINE_bool("report", None, "Write the report after the runs (default: config.make_report).")
flags.DEFINE_string("from_archive", None, "A committed study's directory (REPORT.md, study.json, "
                    "results/): its finished runs seed WORKDIR first, so that the study continues "
                    "where it stopped on another machine (runner.seed_from_archive).")
flags.DEFINE_integer("processes", 1, "Train the conditions in this many processes at once (see "
                     "the module docstring); 1: all in this process.")
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
  if FLAGS.processes < 1:
    raise app.UsageError(f"--processes={FLAGS.processes} must be >= 1")
  command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
  start = datetime.datetime.now()
  if FLAGS.from_archive:
    n = runner.seed_from_archive(FLAGS.config, FLAGS.from_archive, FLAGS.workdir)
    print(f"seeded {n} finished runs from {FLAGS.from_archive}")
  os.makedirs(FLAGS.workdir, exist_ok=True)
  session = functools.partial(runner.record_session, FLAGS.workdir, command=command, start=start,
                              processes=FLAGS.processes)
  session()
  try:
    if FLAGS.processes > 1:
      code = train_in_processes(FLAGS.config, FLAGS.workdir, FLAGS.processes,
                                on_stop=lambda: session(end=datetime.datetime.now()))
      if code in (runner.EXIT_PREEMPTED, runner.EXIT_CONFIG_CHANGED, runner.EXIT_LOCKED):
        session(end=datetime.datetime.now(), device=_device())
        sys.exit(code)  # stopped or refused: nothing more to train here, no report
    spec = runner.run_study(FLAGS.config, FLAGS.workdir, command=command)
  except (rundir.ConfigChanged, rundir.Locked) as e:
    session(end=datetime.datetime.now())
    print(f"error: {e}", file=sys.stderr)
    sys.exit(runner.EXIT_CONFIG_CHANGED if isinstance(e, rundir.ConfigChanged)
             else runner.EXIT_LOCKED)
  counts = {}
  for r in spec["runs"]:
    counts[r["status"]] = counts.get(r["status"], 0) + 1
  print(f"study {FLAGS.workdir}: {len(spec['runs'])} runs: {counts}")
  session(end=datetime.datetime.now(), device=_device())
  make = FLAGS.config.make_report if FLAGS.report is None else FLAGS.report
  if make:
    path = report.make_report(FLAGS.workdir)
    print(f"report: {path}")
  code = runner.exit_code(spec)
  if code != runner.EXIT_OK:
    print(f"exit code {code}: see the exit codes in scripts/run_study.py", file=sys.stderr)
  sys.exit(code)


def train_in_processes(config, workdir: str, n: int, on_stop=lambda: None) -> int:
  """Trains the work units in ``n`` child processes at a time (module docstring); their worst
  exit code. A process that ends hands its slot to the next unit (longest first); at SIGTERM,
  ``on_stop()`` runs first (the session's end, in case the children outlive a kill's grace)."""
  workdir = os.path.abspath(workdir)
  protocol.validate(config)
  units = processes.work_units(config, n, workdir)
  os.makedirs(os.path.join(workdir, "runs"), exist_ok=True)
  env = dict(os.environ)
  env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", f"{0.9 / min(n, len(units)):.3f}")
  # This script's own flags except --workdir, --processes and --report; the config flags pass
  # through unchanged, plus each unit's condition and optimizers.
  own = ("--workdir", "--processes", "--report", "--from_archive", "--config.only_conditions",
         "--config.optimizers")
  passed = [a for a in sys.argv[1:] if not a.startswith(own)]
  running, codes, stopping = [], [], []

  def start(unit):
    part = processes.part_dir(workdir, unit)
    os.makedirs(part, exist_ok=True)
    link = os.path.join(part, "runs")
    if not os.path.islink(link):
      os.symlink(os.path.join("..", "..", "runs"), link)
    cond, opts = unit
    argv = [sys.executable, os.path.abspath(__file__), *passed, f"--workdir={part}",
            "--report=false", f"--config.only_conditions={(cond,)!r}",
            f"--config.optimizers={opts!r}"]
    log = open(os.path.join(part, "log.txt"), "a")
    print(f"process: {cond} / {', '.join(opts)} (log: {log.name})", flush=True)
    running.append((subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT), log))

  def forward(signum, frame):  # SIGTERM: every child checkpoints its run; start no more
    del frame
    stopping.append(signum)
    on_stop()
    for p, _ in running:
      if p.poll() is None:
        p.send_signal(signum)

  old = signal.signal(signal.SIGTERM, forward)
  pending = list(units)
  try:
    while pending or running:
      while pending and len(running) < n and not stopping:
        start(pending.pop(0))
      if stopping and not running:
        break
      for p, log in list(running):
        if p.poll() is not None:
          codes.append(p.returncode)
          log.close()
          running.remove((p, log))
      time.sleep(0.5)
  finally:
    signal.signal(signal.SIGTERM, old)
  print(f"processes done, exit codes {codes}")
  processes.merge_parts(workdir)
  if stopping or pending or any(c == runner.EXIT_PREEMPTED or c < 0 for c in codes):
    return runner.EXIT_PREEMPTED
  for c in (runner.EXIT_CONFIG_CHANGED, runner.EXIT_LOCKED):
    if c in codes:
      return c
  return runner.EXIT_OK


def _device() -> str:
  """'<count> x <kind>' of this machine's JAX devices (initialises JAX's backend here)."""
  import jax  # pylint: disable=g-import-not-at-top

  dev = jax.devices()[0]
  return f"{jax.device_count()} x {getattr(dev, 'device_kind', dev.platform)}"


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
