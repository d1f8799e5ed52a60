"""Diagnostics in real training move the way the synthetic corpus's ground truth says.

One AdamW run on a Zipf corpus whose topic switches at step 40, full diagnostics every 2 steps:
  * rarer tokens (by training frequency) have lower update frequency and older embedding rows;
  * the switch shows up as a drop in cos(g_t, m_{t-1}) and a jump in the short/long
    gradient-energy ratio.
And a short run of every optimizer writes every diagnostics family it can compute.
"""

import json
import os

import numpy as np
import pytest

from tests.test_train import tiny_config
from jaxopt_study import train

SHIFT = 40


def _series(workdir):
  rows = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      r = json.loads(line)
      rows.setdefault(r.pop("step"), {}).update(r)
  return rows


def _config(optimizer, steps, every):
  c = tiny_config(optimizer)
  c.num_steps, c.log_every, c.eval_every, c.checkpoint_every = steps, steps, steps, steps
  c.data.vocab_size = 512
  c.data.synthetic.update(shift="switch", shift_every=SHIFT, num_topics=2, zipf_exponent=1.1)
  c.schedule.name, c.schedule.warmup_steps = "constant", 5
  c.diagnostics.every = every
  c.diagnostics.per_param = c.diagnostics.per_layer = False  # fewer outputs, faster compile
  c.diagnostics.window = c.diagnostics.horizon = 10
  return c


@pytest.fixture(scope="module")
def shifted_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("shift"))
  train.train_and_evaluate(_config("adamw", 2 * SHIFT, every=2), workdir)
  return _series(workdir)


def test_rare_tokens_update_less_and_age_more(shifted_run):
  last = shifted_run[max(s for s in shifted_run if "sparsity/emb_row_update_freq_mean" in shifted_run[s])]
  freq = [last[f"sparsity/emb_row_update_freq_mean/freq_bucket={b:02d}"] for b in range(10)]
  age = [last[f"aging/emb_row_age_mean/freq_bucket={b:02d}"] for b in range(10)]
  # bucket 00 = most frequent tokens ... 09 = rarest
  assert freq[0] > 0.9 and freq[-1] < 0.5 * freq[0], freq
  assert np.corrcoef(np.arange(10), freq)[0, 1] < -0.8, freq
  assert age[-1] > age[0] + 1, age
  assert np.corrcoef(np.arange(10), age)[0, 1] > 0.8, age


def test_shift_drops_cos_grad_momentum_and_raises_energy_ratio(shifted_run):
  def window(name, lo, hi):
    return np.array([shifted_run[s][name] for s in sorted(shifted_run)
                     if lo <= s < hi and name in shifted_run[s]])

  # Metrics are recorded at step t + 1 for the update of step t; the switch is at step 40.
  cos_before, cos_after = window("drift/cos_grad_mu", 28, SHIFT + 1), window("drift/cos_grad_mu", SHIFT + 1, SHIFT + 5)
  energy_before = window("drift/energy_ratio", 28, SHIFT + 1)
  energy_after = window("drift/energy_ratio", SHIFT + 1, SHIFT + 7)
  assert cos_after.min() < cos_before.mean() - 0.1, (cos_before, cos_after)
  assert energy_after.max() > energy_before.max() + 0.2, (energy_before, energy_after)


FAMILIES = ("sparsity/", "drift/", "aging/", "norms/", "heterogeneity/", "sign/")


@pytest.mark.parametrize("optimizer", ["sgd_momentum", "adamw", "adafactor", "lion", "signsgd"])
def test_every_optimizer_writes_every_family(optimizer, tmp_path):
  train.train_and_evaluate(_config(optimizer, 4, every=2), str(tmp_path))
  names = {k for r in _series(str(tmp_path)).values() for k in r}
  for family in FAMILIES:
    assert any(n.startswith(family) for n in names), (optimizer, family)
  assert any(n.startswith("eval/loss_by_frequency") for n in names)
  # The second-moment staleness exists exactly for optimizers that keep one.
  has_nu = any(n.startswith("aging/log_staleness") for n in names)
  assert has_nu == (optimizer in ("adamw", "adafactor")), optimizer
