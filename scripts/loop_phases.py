r"""Where a training run's wall time goes: the loop's phases, timed, for config variants.

  python scripts/loop_phases.py --config=configs/study.py:controls --steps=200 \
      --variants=";probes.enabled=False;diagnostics.enabled=False,probes.enabled=False"

Trains one run of the study's first condition and optimizer (``protocol.run_config``, the
optimizer's grid centre, seed 0) for ``--steps`` steps with ``sync_every = --sync_every``,
once per variant (comma-separated ``field=python_literal`` overrides of the run config; variants
separated by ';', the empty variant is the config as is), each in a temporary directory, and
prints the wall time (compilation included), the loop's tokens/s after its first host sync
(results.json) and the time spent in each phase: ``advance`` (the jitted step, its lazy
compilations included, and the input wait), ``probes``, ``evaluate``, ``fetch`` and ``write``
(metric fetches and writes; the loop's final flush is both) and ``ckpt_save``. BENCHMARKS.md,
lease D, has a table made by this script.
"""

from __future__ import annotations

import collections
import functools
import os
import sys
import tempfile
import time

from absl import app
from absl import flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=g-import-not-at-top,wrong-import-position
from jaxopt_study import cli
from jaxopt_study import checkpointing
from jaxopt_study import train
from jaxopt_study import writers
from jaxopt_study.study import protocol

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", "configs/study.py:controls",
                                "Study config (configs/study.py:PRESET).")
flags.DEFINE_integer("steps", 200, "Steps per variant.")
flags.DEFINE_integer("sync_every", 50, "Host syncs (and the tokens/s clock) every this many steps.")
flags.DEFINE_string("variants", ";probes.enabled=False",
                    "Variants separated by ';', each 'field=literal,...' (empty: as is).")

PHASES = {  # name -> (module or class, attribute) wrapped with a timer
    "advance": (train, "advance"), "probes": (train, "measure_probes"),
    "evaluate": (train, "evaluate"), "fetch": (writers.MetricBuffer, "fetch"),
    "write": (writers.MetricBuffer, "write"),
    "ckpt_save": (checkpointing, "save"),
}


def _timed(name, fn, totals, counts):
  @functools.wraps(fn)
  def wrapper(*args, **kwargs):
    t0 = time.perf_counter()
    try:
      return fn(*args, **kwargs)
    finally:
      totals[name] += time.perf_counter() - t0
      counts[name] += 1
  return wrapper


def main(argv):
  del argv
  study = FLAGS.config
  cond, opt = protocol.conditions_of(study)[0], study.optimizers[0]
  totals, counts = collections.defaultdict(float), collections.Counter()
  for name, (owner, attr) in PHASES.items():
    setattr(owner, attr, _timed(name, getattr(owner, attr), totals, counts))
  for variant in FLAGS.variants.split(";"):
    config = protocol.run_config(study, cond, opt, study.learning_rates[opt], 0)
    with config.unlocked():
      config.num_steps, config.sync_every = FLAGS.steps, FLAGS.sync_every
      protocol.apply_overrides(config, protocol.parse_overrides(variant), f"--variants '{variant}'")
    totals.clear()
    counts.clear()
    with tempfile.TemporaryDirectory() as tmp:
      t0 = time.perf_counter()
      res = train.train_and_evaluate(config, tmp)
      wall = time.perf_counter() - t0
    phases = " ".join(f"{k} {totals[k]:.2f}s ({counts[k]})" for k in PHASES if counts[k])
    print(f"[{variant or 'as is'}] {cond}/{opt}: wall {wall:.1f}s, tokens/s "
          f"{res.tokens_per_second or float('nan'):.0f}; {phases}", flush=True)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
