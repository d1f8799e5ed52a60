r"""Where a stacked sweep's wall time goes: XLA compile seconds and counts, and the loop's phases.

  python scripts/stack_phases.py controls 300 base sgd_momentum "15;" \
      "15;diagnostics.enabled=False,probes.enabled=False" "1;"

Arguments: study preset, steps, condition, optimizer, then one setting per argument,
``K;field=python_literal,...``. For each setting, trains the K run configs the runner would
stack (``benchmark_stacking.configs_for``: the grid's rates x seeds) for the given steps in a
temporary directory (``train.train_runs``) and
prints one line: the wall time, the seconds and counts of XLA's backend compiles, jaxpr tracing
and lowering (``jax.monitoring`` events), and the time in ``advance`` (the step, with a device
sync after each so that the time lands here), ``eval``, ``ckpt_save`` and metric ``flush``.
BENCHMARKS.md, lease E, has a table made by it.
"""

import collections
import functools
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax

import benchmark_stacking
from jaxopt_study import checkpointing
from jaxopt_study import train
from jaxopt_study import writers
from jaxopt_study.study import presets
from jaxopt_study.study import protocol

SECONDS = collections.defaultdict(float)
COUNTS = collections.Counter()


def _on_duration(name, secs, **_):
  if any(k in name for k in ("compile", "trace", "mlir")):
    key = "c:" + name.rsplit("/", 1)[-1]
    SECONDS[key] += secs
    COUNTS[key] += 1


def _timed(name, fn, block=False):
  @functools.wraps(fn)
  def wrapper(*args, **kwargs):
    t = time.perf_counter()
    try:
      out = fn(*args, **kwargs)
      if block:
        jax.block_until_ready(out)
      return out
    finally:
      SECONDS[name] += time.perf_counter() - t
      COUNTS[name] += 1
  return wrapper


def main(argv):
  if len(argv) < 6:
    raise SystemExit(__doc__)
  preset, steps, cond, opt, settings = argv[1], int(argv[2]), argv[3], argv[4], argv[5:]
  jax.monitoring.register_event_duration_secs_listener(_on_duration)
  train.advance = _timed("advance", train.advance, block=True)
  train.eval_totals = _timed("eval", train.eval_totals)
  checkpointing.save = _timed("ckpt_save", checkpointing.save)
  writers.MetricBuffer.flush = _timed("flush", writers.MetricBuffer.flush)
  for setting in settings:
    k, _, sets = setting.partition(";")
    k = int(k)
    configs, _ = benchmark_stacking.configs_for(presets.get_config(preset), cond, opt, k, steps)
    for c in configs:
      protocol.apply_overrides(c, protocol.parse_overrides(sets), setting)
    SECONDS.clear()
    COUNTS.clear()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
      dirs = [os.path.join(tmp, f"run{i}") for i in range(k)]
      train.train_runs(configs, dirs)
    wall = time.perf_counter() - t0
    print(f"K={k} {sets or 'as configured'} steps={steps} wall {wall:.1f} s " +
          " ".join(f"{n}={v:.1f}s/{COUNTS[n]}" for n, v in sorted(SECONDS.items())), flush=True)


if __name__ == "__main__":
  main(sys.argv)
