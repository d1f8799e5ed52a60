"""Diagnostics in real training move the way the synthetic corpus's ground truth says.

AdamW on a Zipf corpus, full diagnostics every 2 steps:
  * without a shift, rarer tokens (by training frequency) have lower update frequency and older
    embedding rows and second moments;
  * with a topic switch at step 50, the switch shows up as a drop in cos(g_t, m_{t-1}) and a
    jump in the short/long gradient-energy ratio. (The jump needs a model whose gradients have
    settled before the switch; at lr 6e-4 the gradient norm at step 50 is still at its early
    level and the ratio barely moves, while the cosine still drops.)
And a short run of every optimizer writes every diagnostics family it can compute.
"""

import json
import os

import numpy as np
import pytest

from tests.test_train import tiny_config
from jaxopt_study import train

SHIFT = 50


def _series(workdir):
  rows = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      r = json.loads(line)
      rows.setdefault(r.pop("step"), {}).update(r)
  return rows


def _config(optimizer, steps, every, shift="switch"):
  c = tiny_config(optimizer)
  c.num_steps, c.log_every, c.eval_every, c.checkpoint_every = steps, steps, steps, steps
  c.data.vocab_size = 512
  c.data.synthetic.update(shift=shift, shift_every=SHIFT, num_topics=2, zipf_exponent=1.1)
  c.schedule.name, c.schedule.warmup_steps = "constant", 5
  c.optimizer.learning_rate = 1.5e-3
  c.diagnostics.every = every
  c.diagnostics.per_param = c.diagnostics.per_layer = False  # fewer outputs, faster compile
  c.diagnostics.window = c.diagnostics.horizon = 10
  return c


def _rank_corr(values):
  """Spearman correlation of ``values`` with the bucket index."""
  ranks = np.argsort(np.argsort(values))
  return np.corrcoef(np.arange(len(values)), ranks)[0, 1]


@pytest.fixture(scope="module")
def shifted_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("shift"))
  results = train.train_and_evaluate(_config("adamw", SHIFT + 16, every=2), workdir)
  return _series(workdir), results


def test_rare_tokens_update_less_and_age_more(tmp_path):
  # Same shapes and optimizer as the shifted run: its compiled steps come from the cache.
  train.train_and_evaluate(_config("adamw", 40, every=2, shift="none"), str(tmp_path))
  series = _series(str(tmp_path))
  last = series[max(s for s in series if "sparsity/emb_row_update_freq_mean" in series[s])]
  buckets = range(10)  # 00 = most frequent tokens ... 09 = rarest
  freq = [last[f"sparsity/emb_row_update_freq_mean/freq_bucket={b:02d}"] for b in buckets]
  age = [last[f"aging/emb_row_age_mean/freq_bucket={b:02d}"] for b in buckets]
  stale = [last[f"aging/emb_row_log_staleness_mean/freq_bucket={b:02d}"] for b in buckets]
  assert freq[0] > 0.95 and freq[-1] < 0.2 * freq[0], freq
  assert np.all(np.diff(freq) <= 1e-6), freq  # monotone: rarer, less often updated
  assert age[0] < 0.5 and age[-1] > 5, age
  assert _rank_corr(age) > 0.9, age  # measured here: 0,0,0,0,.2,.1,1.5,3.3,8.2,19
  # Second moments of rare rows lag their (zero) current gradient more: larger log(nu / s).
  assert _rank_corr(stale) > 0.8, stale


def test_shift_drops_cos_grad_momentum_and_raises_energy_ratio(shifted_run):
  shifted_run, _ = shifted_run
  def window(name, lo, hi):
    return np.array([shifted_run[s][name] for s in sorted(shifted_run)
                     if lo <= s < hi and name in shifted_run[s]])

  # Metrics are recorded at step t + 1 for the update of step t; the switch is at step 40.
  cos_before = window("drift/cos_grad_mu", SHIFT - 12, SHIFT + 1)
  cos_after = window("drift/cos_grad_mu", SHIFT + 1, SHIFT + 5)
  energy_before = window("drift/energy_ratio", SHIFT - 12, SHIFT + 1)
  energy_after = window("drift/energy_ratio", SHIFT + 1, SHIFT + 17)
  assert cos_before.min() > 0.5 and cos_after.min() < 0.0, (cos_before, cos_after)
  assert energy_after.max() > 1.3 * energy_before.max(), (energy_before, energy_after)


FAMILIES = ("sparsity/", "drift/", "aging/", "norms/", "heterogeneity/", "sign/", "idle/")


@pytest.mark.parametrize("optimizer", ["sgd_momentum", "adamw", "adafactor", "lion", "signsgd"])
def test_every_optimizer_writes_every_family(optimizer, tmp_path, shifted_run):
  results = train.train_and_evaluate(_config(optimizer, 4, every=2), str(tmp_path))
  # Identical conditions: every optimizer starts from the same initial parameters.
  assert results.init_params_fingerprint == shifted_run[1].init_params_fingerprint
  names = {k for r in _series(str(tmp_path)).values() for k in r}
  for family in FAMILIES:
    assert any(n.startswith(family) for n in names), (optimizer, family)
  # The metrics the study reports by name: heterogeneity at initialisation, sign descent per
  # layer, idle movement per token-frequency bucket.
  for name in ("heterogeneity/grad_norm_cv_at_init", "sign/descent_agree_frac/kind=attention",
               "sign/update_sign_likeness", "idle/update_sq_share/kind=token_embedding",
               "idle/emb_update_abs_mean_idle/freq_bucket=09"):
    assert name in names, (optimizer, name)
  # Heterogeneity at initialisation is the model's (same theta_0, same first batch), not the
  # optimizer's: every optimizer reports AdamW's value.
  at_init = lambda series: [r["heterogeneity/grad_norm_cv_at_init"] for r in series.values()
                            if "heterogeneity/grad_norm_cv_at_init" in r]
  np.testing.assert_allclose(at_init(_series(str(tmp_path))), at_init(shifted_run[0])[0],
                             rtol=1e-5)
  assert any(n.startswith("eval/loss_by_frequency") for n in names)
  # The second-moment staleness exists exactly for optimizers that keep one.
  has_nu = any(n.startswith("aging/log_staleness") for n in names)
  assert has_nu == (optimizer in ("adamw", "adafactor")), optimizer
