r"""Runs per device-hour of a study preset: K runs stacked in one vmapped step vs one at a time.

  python scripts/benchmark_stacking.py --config=configs/study.py:controls --stacks=1,5,15 \
      --steps=300 --append=BENCHMARKS.md

For each K, trains K runs of the study's first condition and optimizer (its grid's rates and
seeds, exactly the configs the runner would train; ``train.train_runs``) for ``--steps`` steps in a temporary directory, with
everything a study run does (evals, diagnostics, probes, checkpoints; host syncs at least 5
times). Measured: the whole wall
time (set-up and compilation included) and the steady-state tokens/s of the loop (results.json).
Runs per hour at the preset's full length = 3600 K / (overhead + num_steps * tokens_per_step * K /
tokens_per_s), where overhead = the measured wall - the timed steps' share, i.e. set-up,
compilation and the first steps are paid once per stack. Peak GPU memory is the process's
peak so far (``memory_stats``), so list the largest K first to read each K's own peak.
"""

from __future__ import annotations

import datetime
import os
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax

from jaxopt_study import cli
from jaxopt_study import rundir
from jaxopt_study import train
from jaxopt_study.study import protocol

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", "configs/study.py:controls",
                                "Study config (configs/study.py:PRESET).")
flags.DEFINE_list("stacks", ["1", "5", "15"], "Runs per stacked step to compare.")
flags.DEFINE_integer("steps", 300, "Steps trained per setting (the preset's cadences apply).")
flags.DEFINE_string("optimizer", None, "Optimizer (default: the study's first).")
flags.DEFINE_string("condition", None, "Condition (default: the study's first).")
flags.DEFINE_string("append", None, "Markdown file to append the table to.")


def configs_for(study, condition: str, optimizer: str, k: int, steps: int):
  """K run configs the runner would train: grid rates x seeds, in the runner's order."""
  pairs = [(m, s) for m in study.lr_multipliers for s in study.seeds]
  pairs = (pairs * (k // len(pairs) + 1))[:k]
  out = []
  for m, s in pairs:
    lr = protocol.round_lr(study.learning_rates[optimizer] * m)
    c = protocol.run_config(study, condition, optimizer, lr, s)
    full_steps = c.num_steps
    with c.unlocked():
      # Host syncs at least 5 times: the loop's tokens/s clock starts at the first one.
      c.num_steps, c.sync_every = steps, max(1, min(c.sync_every, steps // 5))
    out.append(c)
  return out, full_steps


def measure(configs) -> dict:
  k = len(configs)
  with tempfile.TemporaryDirectory() as tmp:
    dirs = [os.path.join(tmp, f"run{i}") for i in range(k)]
    t0 = time.perf_counter()
    train.train_runs(configs, dirs)
    wall = time.perf_counter() - t0
    res = [rundir.RunResults.load(d) for d in dirs]
  tps_run = res[0].tokens_per_second  # steady state, per run
  if not tps_run:
    raise SystemExit(f"K={k}: no steady-state tokens/s (status {res[0].status}); raise --steps")
  stats = jax.devices()[0].memory_stats() or {}  # None on CPU
  return {"k": k, "wall_s": wall, "tokens_per_s_per_run": tps_run,
          "peak_gib": stats.get("peak_bytes_in_use", float("nan")) / 2**30,
          "status": sorted({r.status for r in res})}


def main(argv):
  del argv
  study = FLAGS.config
  cond = FLAGS.condition or protocol.conditions_of(study)[0]
  opt = FLAGS.optimizer or study.optimizers[0]
  rows = []
  for k in (int(x) for x in FLAGS.stacks):
    configs, full_steps = configs_for(study, cond, opt, k, FLAGS.steps)
    m = measure(configs)
    tok_step = configs[0].batch_size * configs[0].seq_len
    timed = FLAGS.steps * tok_step / m["tokens_per_s_per_run"]  # all K advance together
    overhead = max(m["wall_s"] - timed, 0.0)
    m.update(overhead_s=overhead, full_steps=full_steps,
             runs_per_hour=3600 * k / (overhead + full_steps * tok_step / m["tokens_per_s_per_run"]))
    rows.append(m)
    print(f"K={k}: wall {m['wall_s']:.1f} s for {FLAGS.steps} steps, {m['tokens_per_s_per_run']:.0f} "
          f"tokens/s per run ({k * m['tokens_per_s_per_run']:.0f} total), overhead "
          f"{overhead:.1f} s, {m['runs_per_hour']:.0f} runs/hour at {full_steps} steps "
          f"peak {m['peak_gib']:.1f} GiB {m['status']}", flush=True)
  dev = jax.devices()[0]
  try:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, check=True).stdout.strip()
  except Exception:  # pylint: disable=broad-except
    commit = "?"
  base = next((m for m in rows if m["k"] == 1), rows[0])["runs_per_hour"]
  lines = [f"Device {jax.device_count()} x {getattr(dev, 'device_kind', dev.platform)}, "
           f"{datetime.date.today()}, commit {commit}, study preset `{study.preset}` condition "
           f"`{cond}`, optimizer `{opt}`, {FLAGS.steps} steps timed per setting.", "",
           "| runs stacked | wall (s) | tokens/s per run | tokens/s total | overhead (s) | "
           f"runs / device-hour at {rows[0]['full_steps']} steps | vs one at a time (K=1) | "
           "peak GPU memory so far (GiB) |",
           "|---|---|---|---|---|---|---|---|"]
  for m in rows:
    lines.append(f"| {m['k']} | {m['wall_s']:.1f} | {m['tokens_per_s_per_run']:.0f} | "
                 f"{m['k'] * m['tokens_per_s_per_run']:.0f} | {m['overhead_s']:.1f} | "
                 f"{m['runs_per_hour']:.0f} | {m['runs_per_hour'] / base:.2f}x | "
                 f"{m['peak_gib']:.1f} |")
  table = "\n".join(lines)
  print(table)
  if FLAGS.append:
    with open(FLAGS.append, "a") as f:
      f.write("\n" + table + "\n")


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
