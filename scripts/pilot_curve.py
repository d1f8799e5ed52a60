r"""The eval-loss curve of one run of a study config, for sizing a preset (BENCHMARKS.md, lease E).

  python scripts/pilot_curve.py --config=configs/study.py:controls --condition=stationary \
      --optimizer=adamw --lr=1e-3 --steps=3000 --set=data.synthetic.copy_prob=0.9

Trains ``protocol.run_config(study, condition, optimizer, lr, seed)`` for ``--steps`` steps with
diagnostics and probes off, an eval every ``--eval_every`` steps, each ``--set`` override
(``field=python_literal``) applied, in a temporary directory, and prints the data's reference
losses and every split's eval loss at each eval.
"""

import json
import os
import sys
import tempfile

from absl import app
from absl import flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=g-import-not-at-top,wrong-import-position
from jaxopt_study import cli
from jaxopt_study import rundir
from jaxopt_study import train
from jaxopt_study.study import loading
from jaxopt_study.study import protocol

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", "configs/study.py:controls", "Study config.")
flags.DEFINE_string("condition", "base", "Condition of the study.")
flags.DEFINE_string("optimizer", "adamw", "Optimizer.")
flags.DEFINE_float("lr", None, "Peak learning rate (default: the optimizer's grid centre).")
flags.DEFINE_integer("seed", 0, "Seed.")
flags.DEFINE_integer("steps", 3000, "Steps.")
flags.DEFINE_integer("eval_every", 500, "Steps between evals.")
flags.DEFINE_multi_string("set", [], "field=python_literal override of the run config.")


def main(argv):
  del argv
  study = FLAGS.config
  lr = FLAGS.lr or study.learning_rates[FLAGS.optimizer]
  c = protocol.run_config(study, FLAGS.condition, FLAGS.optimizer, lr, FLAGS.seed)
  with c.unlocked():
    c.num_steps = FLAGS.steps
    c.diagnostics.enabled = c.probes.enabled = False
    c.eval_every = c.sync_every = FLAGS.eval_every
    c.checkpoint_every = FLAGS.steps
    for kv in FLAGS.set:
      protocol.apply_overrides(c, protocol.parse_overrides(kv), "--set")
  with tempfile.TemporaryDirectory() as tmp:
    results = train.train_and_evaluate(c, tmp)
    print("reference losses:", json.dumps(results.baselines))
    metrics = loading.read_metrics(rundir.path(tmp, rundir.METRICS))
    evals = metrics[[k for k in metrics.columns if k.startswith("eval") and k.endswith("/loss")]]
    for step, row in evals.dropna(how="all").iterrows():
      print(step, row.dropna().round(3).to_dict(), flush=True)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
