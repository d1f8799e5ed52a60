"""The study layer: aggregation against hand-made run directories, the measures, and a tiny study.

The hand-made study has 2 conditions (pre-LN with a distribution shift, post-LN), 5 optimizers,
2 learning rates and 2 seeds, with one diverged run, one failed run and one missing run (listed
in study.json, never written). The end-to-end test executes notebooks/quickstart.ipynb (a tiny
study through scripts' code paths and the report) with nbclient.
"""

import functools
import json
import math
import os
import pathlib
import shutil
import subprocess
import sys
import time
import types

import ml_collections
import numpy as np
import pandas as pd
import pytest

from jaxopt_study import rundir
from jaxopt_study.study import literature
from jaxopt_study.study import loading
from jaxopt_study.study import measures
from jaxopt_study.study import plots
from jaxopt_study.study import report
from jaxopt_study.study import stats
from jaxopt_study.study import tables

REPO = pathlib.Path(__file__).resolve().parents[1]
OPTS = ["sgd_momentum", "adamw", "adafactor", "lion", "signsgd"]
BASE_LR = {"sgd_momentum": 0.1, "adamw": 6e-4, "adafactor": 1e-2, "lion": 1e-4, "signsgd": 1e-4}
MULTS = (1 / 3, 1.0, 3.0)
# Final validation loss of (optimizer, multiplier), seed 0: every optimizer's best is x1 (inside
# its grid); sgd's x3 diverges, signsgd's x3 fails. Seed s adds 0.01 s; test = validation + 0.02.
FINAL = {
    ("sgd_momentum", 1 / 3): 5.3, ("sgd_momentum", 1.0): 5.0, ("sgd_momentum", 3.0): 4.8,
    ("adamw", 1 / 3): 4.3, ("adamw", 1.0): 4.0, ("adamw", 3.0): 4.2,
    ("adafactor", 1 / 3): 4.3, ("adafactor", 1.0): 4.1, ("adafactor", 3.0): 4.25,
    ("lion", 1 / 3): 4.4, ("lion", 1.0): 4.02, ("lion", 3.0): 4.3,
    ("signsgd", 1 / 3): 4.8, ("signsgd", 1.0): 4.6, ("signsgd", 3.0): 4.7,
}
NUM_STEPS, SHIFT = 300, 150
DIVERGED = ("base", "sgd_momentum", 3.0, 0)
FAILED = ("base", "signsgd", 3.0, 0)
MISSING = ("base", "lion", 1.0, 2)
BASELINES = {"uniform": 6.93, "unigram": 6.0, "entropy_floor": 3.5}


def _curve(final, seed, shift=True, spike_at=None):
  steps = np.arange(1, NUM_STEPS + 1)
  loss = final + 3.0 * np.exp(-steps / 40.0)
  if shift:
    # Jump by 1.0 at the shift, decaying back with a 30-step time constant.
    loss = loss + np.where(steps > SHIFT, 1.0 * np.exp(-(steps - SHIFT - 1) / 30.0), 0.0)
  loss = loss + 0.001 * np.sin(steps * (1.3 + seed))
  if spike_at is not None:
    loss[steps == spike_at] += 5.0
  return steps, loss


def _write_run(root, cond, opt, mult, seed, status="completed"):
  lr = float(rundir.lr_str(BASE_LR[opt] * mult))
  rel = rundir.run_relpath(cond, opt, lr, seed)
  d = root / rel
  d.mkdir(parents=True)
  final = FINAL[(opt, mult)] + 0.01 * seed + (0.05 if cond == "post_ln" else 0.0)
  steps, loss = _curve(final, seed, shift=cond == "base",
                       spike_at=200 if (opt == "adamw" and mult == 1.0 and seed == 0) else None)
  stop = NUM_STEPS if status == "completed" else 120
  # Post-LN raises the gradient-norm CV by 1.0 (+ a little noise) at every (lr, seed).
  post = 1.0 + 0.01 * ((seed + 3 * MULTS.index(mult)) % 4) if cond == "post_ln" else 0.0
  with open(d / "metrics.jsonl", "w") as f:
    for s, l in zip(steps[:stop], loss[:stop]):
      rec = {"step": int(s), "train/loss": float(l), "train/learning_rate": lr}
      if s % 10 == 0:
        rec.update({
            "sparsity/small_frac/layer=00": 0.1 + s / 3000, "sparsity/small_frac/layer=01": 0.2,
            "sparsity/small_frac/kind=token_embedding": 0.9,
            "drift/cos_grad_mu": 0.5 - (0.4 if s == SHIFT + 10 else 0.0),
            "drift/energy_ratio": 1.0 + (2.0 if s == SHIFT + 10 else 0.0),
            "heterogeneity/grad_norm_cv": 1.0 + post + 0.1 * OPTS.index(opt),
            "heterogeneity/step_size_cv": 0.5,
            "norms/param/layer=00": 10 + s / 100, "norms/param/layer=01": 11 + s / 100,
            "norms/update_param_ratio/layer=00": 1e-3, "norms/update_param_ratio/layer=01": 2e-3,
            "aging/age_q10": 0.0, "aging/age_q50": 1.0, "aging/age_q90": 30.0,
            "idle/update_sq_share/kind=token_embedding": 0.01,
            "aging/param=wte/embedding/age_mean": 3.0,  # dropped from the long CSV
        })
        for b in range(4):
          rec[f"sparsity/emb_row_update_freq_mean/freq_bucket={b:02d}"] = 1.0 / (1 + 3 * b)
        if opt in ("adamw", "adafactor"):
          rec.update({"aging/log_staleness_q10": -1.0, "aging/log_staleness_q50": 0.5,
                      "aging/log_staleness_q90": 2.0, "aging/frac_older_than_H": 0.05})
          for b in range(4):
            rec[f"aging/emb_row_log_staleness_mean/freq_bucket={b:02d}"] = 0.5 * b
      if s % 100 == 0:
        rec["eval/loss"] = float(l) + 0.05
      f.write(json.dumps(rec) + "\n")
    # A resumed run repeats a step: the last record wins.
    f.write(json.dumps({"step": 10, "train/moe_aux_loss": 1.0}) + "\n")
    f.write('{"step": 11, "train/lo')  # truncated last line (killed mid-write)
  val = float(loss[stop - 1]) + 0.05
  res = {
      "optimizer": opt, "learning_rate": lr, "seed": seed, "num_params": 1000,
      "num_steps": NUM_STEPS, "tokens_per_step": 64, "status": status,
      "steps_done": stop, "tokens_seen": stop * 64,
      "final_train_loss": float(loss[stop - 1]),
      "final_eval_loss": val if status == "completed" else None,
      # Seed 0 has no train sample (as a run archived before it existed).
      "final_eval_losses": ({"validation": val, "test": val + 0.02, "current": val - 0.1,
                             "past": val + 0.3, **({"train_sample": val - 0.2} if seed else {})}
                            if status == "completed" else {}),
      "final_eval_perplexity": None,
      "eval_loss_by_frequency": [final - 1, final, final + 1,
                                 final + 2 + (1.0 if opt == "sgd_momentum" else 0.0)],
      "baselines": BASELINES,
      "tokens_per_second": 1000.0,
      "diverged_at_step": 120 if status == "diverged" else None,
      "devices": 1, "platform": "cpu",
  }
  if status == "failed":
    res = {"optimizer": opt, "learning_rate": lr, "seed": seed, "status": "failed",
           "error": "RuntimeError: boom", "num_steps": NUM_STEPS}
  (d / "results.json").write_text(json.dumps(res))
  return rel


def fake_runs():
  """(condition, optimizer, multiplier, seed, phase): the sweep at seed 0, seeds 1-2 at x1."""
  out = []
  for cond in ("base", "post_ln"):
    for opt in OPTS:
      out += [(cond, opt, m, 0, "sweep") for m in MULTS]
      out += [(cond, opt, 1.0, s, "seeds") for s in (1, 2)]
  return out


def make_fake_study(root: pathlib.Path, status_of=None):
  status_of = status_of or {DIVERGED: "diverged", FAILED: "failed"}
  runs = []
  for cond, opt, mult, seed, phase in fake_runs():
    key = (cond, opt, mult, seed)
    lr = float(rundir.lr_str(BASE_LR[opt] * mult))
    rel = rundir.run_relpath(cond, opt, lr, seed)
    if key != MISSING:
      _write_run(root, cond, opt, mult, seed, status_of.get(key, "completed"))
    runs.append({"condition": cond, "optimizer": opt, "learning_rate": lr,
                 "lr_multiplier": mult, "seed": seed, "workdir": rel, "phase": phase})
  spec = {
      "name": "fake", "optimizers": OPTS, "sweep_seeds": [0], "seeds": [0, 1, 2],
      "lr_multipliers": list(MULTS), "learning_rates": BASE_LR, "lr_grid_max_extensions": 2,
      "num_steps": NUM_STEPS, "tokens_per_step": 64,
      "command": "python scripts/run_study.py --config=configs/study.py:small --workdir=x",
      "conditions": {
          "base": {"overrides": {}, "ln_position": "pre", "shift_steps": [SHIFT], "eval_at": "seen",
                   "freq_buckets": [{"bucket": b, "mean_token_freq": 10.0 ** (-1 - b),
                                     "expected_update_freq": 1 - (1 - 10.0 ** (-1 - b)) ** 64}
                                    for b in range(4)]},
          "post_ln": {"overrides": {"model.ln_position": "post"}, "ln_position": "post",
                      "shift_steps": []},
      },
      "runs": runs,
  }
  (root / "study.json").write_text(json.dumps(spec))
  return spec


@pytest.fixture(scope="module")
def fake_report(tmp_path_factory):
  root = tmp_path_factory.mktemp("study")
  make_fake_study(root)
  path = report.make_report(str(root))
  return root, path


# ----------------------------------------------------------------------------- measures


def test_count_loss_spikes_hand_computed():
  # History 0,1,0,1,... (mean 0.5, std 0.5): threshold mean + 6 sigma = 3.5.
  steps = np.arange(1, 21)
  losses = np.array([0.0, 1.0] * 10)
  losses[15] = 3.6  # step 16: 3.6 > 3.5 -> spike
  losses[17] = 3.4  # step 18: the history now holds 3.6 -> not a spike
  assert measures.count_loss_spikes(steps, losses, window=128, num_sigma=6.0,
                                  min_history=8) == [16]
  # A short window: only the last 4 steps count, and min_history=4 enables it early.
  l2 = np.array([1.0, 1.0, 1.0, 1.0, 1.0, 2.0, 1.0])
  assert measures.count_loss_spikes(np.arange(7), l2, window=4, num_sigma=6.0,
                                  min_history=4) == [5]
  # Too little history: no verdict.
  assert measures.count_loss_spikes(np.arange(7), l2, window=4, num_sigma=6.0,
                                  min_history=5) == []
  # Window in steps, not points: sparse logging (every 10 steps) sees only 12 points of 128.
  s3 = np.arange(10, 310, 10)
  l3 = np.full(s3.size, 2.0) + 0.01 * (np.arange(s3.size) % 2)
  l3[20] = 2.2
  assert measures.count_loss_spikes(s3, l3, window=128, num_sigma=6.0, min_history=8) == [210]
  # Non-finite losses are neither spikes nor history.
  l4 = l3.copy()
  l4[25] = np.nan
  assert measures.count_loss_spikes(s3, l4) == [210]


def test_shift_recovery_on_synthetic_curve():
  steps = np.arange(1, 401)
  # Flat 2.0 before the shift at step 200, +1 jump decaying as exp(-(s-201)/25) after.
  loss = np.where(steps > 200, 2.0 + np.exp(-(steps - 201) / 25.0), 2.0)
  rec = measures.shift_recovery(steps, loss, 200, pre_window=20, smooth=1, tolerance=0.02)
  # Recovered when exp(-(s-201)/25) <= 0.04 -> s - 201 >= 25 ln 25 = 80.47 -> s = 282.
  assert rec["pre_level"] == pytest.approx(2.0)
  assert rec["peak"] == pytest.approx(1.0)
  assert rec["recovery_steps"] == 82 and rec["recovered"]
  # Trailing mean over 10 steps delays recovery: first s whose mean of (s-9..s) <= 2.04.
  rec10 = measures.shift_recovery(steps, loss, 200, pre_window=20, smooth=10, tolerance=0.02)
  ex = [s for s in range(201, 401) if np.mean(loss[(steps > max(s - 10, 200)) & (steps <= s)])
        <= 2.04][0]
  assert rec10["recovery_steps"] == ex - 200 and ex > 282
  # Never recovers before `until`.
  rec_none = measures.shift_recovery(steps, loss, 200, tolerance=0.02, smooth=1, until=250)
  assert rec_none["recovery_steps"] is None and not rec_none["recovered"]
  # No data after the shift.
  assert measures.shift_recovery(steps, loss, 400)["pre_level"] is None


def test_best_lr_selection():
  rows = [
      # lr 1: best mean loss among fully completed lrs.
      ("c", "o", 1.0, 0, "completed", 3.0), ("c", "o", 1.0, 1, "completed", 3.2),
      # lr 3: lower loss but one seed diverged -> not best.
      ("c", "o", 3.0, 0, "completed", 2.0), ("c", "o", 3.0, 1, "diverged", None),
      # lr 0.3: worse.
      ("c", "o", 0.3, 0, "completed", 3.5), ("c", "o", 0.3, 1, "completed", 3.5),
      # lr 10: missing only: not swept.
      ("c", "o", 10.0, 0, "missing", None),
      # other optimizer: everything diverged -> no best lr.
      ("c", "p", 1.0, 0, "diverged", None), ("c", "p", 2.0, 0, "diverged", None),
      # another: one lr with a missing seed is judged on the seed it has; best on the low edge.
      ("c", "q", 1.0, 0, "completed", 2.0), ("c", "q", 1.0, 1, "missing", None),
      ("c", "q", 2.0, 0, "completed", 2.5), ("c", "q", 2.0, 1, "completed", 2.5),
      # a completed run with a NaN validation loss cannot be best; a single swept lr.
      ("c", "r", 1.0, 0, "completed", float("nan")), ("c", "r", 2.0, 0, "completed", 4.0),
      ("c", "s", 1.0, 0, "completed", 4.0),
      # the best lr is bracketed by a diverged neighbour.
      ("c", "t", 1.0, 0, "completed", 4.0), ("c", "t", 2.0, 0, "completed", 3.0),
      ("c", "t", 4.0, 0, "diverged", None),
  ]
  df = pd.DataFrame(rows, columns=["condition", "optimizer", "learning_rate", "seed", "status",
                                   tables.SELECTION_COLUMN])
  df["lr_multiplier"] = df["learning_rate"]
  best = tables.select_best_lr(df).set_index("optimizer")
  assert best.loc["o", "best_lr"] == 1.0
  assert best.loc["o", "best_val_loss"] == pytest.approx(3.1)
  assert best.loc["o", "bracketed"] and best.loc["o", "num_lrs"] == 3
  assert np.isnan(best.loc["p", "best_lr"]) and pd.isna(best.loc["p", "best_val_loss"])
  assert best.loc["q", "best_lr"] == 1.0 and best.loc["q", "unbracketed_side"] == "low"
  assert best.loc["r", "best_lr"] == 2.0 and best.loc["r", "unbracketed_side"] == "high"
  assert best.loc["s", "unbracketed_side"] == "single" and not best.loc["s", "bracketed"]
  assert best.loc["t", "best_lr"] == 2.0 and best.loc["t", "bracketed"]
  # Selection over the sweep seeds only: at seed 0, lr 3 completed with the lowest loss.
  assert tables.select_best_lr(df, sweep_seeds=[0]).set_index("optimizer").loc[
      "o", "best_lr"] == 3.0


def test_frequency_losses():
  assert measures.frequency_losses([1.0, 2.0, 5.0]) == (1.0, 5.0)
  assert measures.frequency_losses([1.0, 2.0, 5.0], 2, 2) == (1.5, 3.5)
  assert measures.frequency_losses([1.0, None, 5.0, None]) == (1.0, 5.0)  # empty buckets
  assert measures.frequency_losses([]) == (None, None)
  assert measures.frequency_losses(None) == (None, None)


# ----------------------------------------------------------------------------- statistics


@pytest.mark.parametrize("q,df,expected", [
    # Student-t tables (e.g. NIST/SEMATECH e-Handbook 1.3.6.7.2), 3 decimals.
    (0.975, 1, 12.706), (0.975, 2, 4.303), (0.975, 3, 3.182), (0.975, 4, 2.776),
    (0.975, 10, 2.228), (0.975, 30, 2.042), (0.975, 100, 1.984), (0.95, 5, 2.015),
    (0.995, 3, 5.841), (0.9, 1, 3.078),
])
def test_t_quantile_matches_tables(q, df, expected):
  assert stats.t_quantile(q, df) == pytest.approx(expected, abs=6e-4)
  assert stats.t_quantile(1 - q, df) == pytest.approx(-expected, abs=6e-4)


def test_mean_ci_hand_computed_and_compare():
  ci = stats.mean_ci([1.0, 2.0, 3.0])
  # mean 2, sample sd 1, t_{0.975,2} = 4.3027: half-width 4.3027 / sqrt(3) = 2.4841.
  assert ci.mean == 2.0 and ci.n == 3 and ci.half_width == pytest.approx(2.4841, abs=1e-4)
  assert ci.format() == "2.000 ± 2.484 (95% t, n=3)"
  one = stats.mean_ci([5.0, float("nan"), None])
  assert one.n == 1 and one.half_width is None and "no interval" in one.format()
  assert stats.mean_ci([]).mean is None
  a, b = stats.mean_ci([1.0, 1.1, 1.2]), stats.mean_ci([2.0, 2.1, 2.2])
  assert stats.compare(a, b) == "lower" and stats.compare(b, a) == "higher"
  assert stats.compare(a, stats.mean_ci([1.1, 1.2, 1.3])) == "tie"
  assert stats.compare(a, one) is None


def test_read_metrics_last_record_wins(tmp_path):
  p = tmp_path / "metrics.jsonl"
  p.write_text('{"step": 1, "a": 1.0}\n{"step": 2, "a": 2.0, "b/param=x": 1}\n'
               '{"step": 1, "a": 5.0}\n{"step": 3, "a": NaN}\n{"step": 4, "a"')
  df = loading.read_metrics(str(p))
  assert list(df.index) == [1, 2, 3]
  assert df.loc[1, "a"] == 5.0 and "b/param=x" not in df
  assert math.isnan(df.loc[3, "a"])


def test_settings_reject_unknown_fields():
  assert loading.Settings.from_dicts({"spike_window": 64}, None).spike_window == 64
  with pytest.raises(ValueError, match="spike_windw.*valid"):
    loading.Settings.from_dicts({"spike_windw": 64})


# ----------------------------------------------------------------------------- aggregation


def test_aggregation_of_hand_made_runs(fake_report):
  root, _ = fake_report
  runs = pd.read_csv(root / "results" / "runs.csv")
  assert len(runs) == len(fake_runs())  # every expected run, including the missing one
  st = runs.set_index(["condition", "optimizer", "lr_multiplier", "seed"])["status"]
  assert st[DIVERGED] == "diverged"
  assert st[FAILED] == "failed"
  assert st[MISSING] == "missing"
  assert (runs["status"] == "completed").sum() == len(fake_runs()) - 3

  best = pd.read_csv(root / "results" / "best_lr.csv")
  b = best[best["condition"] == "base"].set_index("optimizer")
  for opt in OPTS:  # x1 everywhere; sgd's x3 (lower loss) diverged, signsgd's x3 failed
    assert b.loc[opt, "best_lr"] == pytest.approx(BASE_LR[opt]) and b.loc[opt, "bracketed"]

  f = pd.read_csv(root / "results" / "findings.csv")
  fb = f[f["condition"] == "base"].set_index("optimizer")
  # Reported loss = the test split: mean over the 3 seeds of (last train loss + 0.05 + 0.02),
  # with the 95% t half-width s t_{0.975,2} / sqrt(3).
  vals = [_curve(4.0 + 0.01 * s, s)[1][-1] + 0.07 for s in (0, 1, 2)]
  assert (fb["report_split"] == "test").all()
  assert fb.loc["adamw", "final_loss"] == pytest.approx(np.mean(vals))
  assert fb.loc["adamw", "final_loss_ci95"] == pytest.approx(
      np.std(vals, ddof=1) * 4.302653 / math.sqrt(3), rel=1e-4)
  assert fb.loc["adamw", "final_loss_n"] == 3 and fb.loc["lion", "final_loss_n"] == 2
  # The other eval splits (adaptation to the current topics, forgetting of past ones).
  # The memorisation gap pairs each run's two losses: seeds 1 and 2 (seed 0 has no train
  # sample) give (val - 0.2) - (val + 0.02) each, whatever their val; an unpaired difference of
  # the two means (over seeds 1-2 and 0-2) would not be -0.22.
  assert fb.loc["adamw", "train_sample_minus_test"] == pytest.approx(-0.22)
  assert fb.loc["adamw", "final_past_loss"] - fb.loc["adamw", "final_current_loss"] == (
      pytest.approx(0.4))
  assert fb.loc["sgd_momentum", "diverged"] == 1 and fb.loc["sgd_momentum", "diverged_lrs"] == 0.3
  assert fb.loc["signsgd", "failed"] == 1 and fb.loc["lion", "missing"] == 1
  assert fb.loc["adamw", "spikes_best_lr"] == 1  # the injected spike at step 200, seed 0
  assert fb.loc["lion", "spikes_sweep"] == 0
  # Rare (last bucket) vs frequent (bucket 0).
  assert fb.loc["sgd_momentum", "rare_minus_frequent"] == pytest.approx(4.0)
  assert fb.loc["adamw", "rare_minus_frequent"] == pytest.approx(3.0)
  # Shift recovery: every completed best-lr run recovers from the shift at step 150.
  assert fb.loc["adamw", "shifts_seen"] == 3 and fb.loc["adamw", "shifts_recovered"] == 3
  assert 30 < fb.loc["adamw", "recovery_steps"] < 200
  # Staleness only where there is a second moment.
  assert fb.loc["adamw", "aging/log_staleness_q50"] == pytest.approx(0.5)
  assert np.isnan(fb.loc["lion", "aging/log_staleness_q50"])
  assert fb.loc["lion", "idle/update_sq_share/kind=token_embedding"] == pytest.approx(0.01)

  comp = pd.read_csv(root / "results" / "comparisons.csv")
  v = comp[comp["condition"] == "base"].set_index(["a", "b"])["verdict"]
  assert v[("adamw", "adafactor")] == "lower"  # disjoint intervals
  assert v[("adamw", "lion")] == "tie"  # lion: 2 seeds, 4.02 vs 4.00: overlapping intervals
  assert v[("sgd_momentum", "adamw")] == "higher"

  long = pd.read_parquet(root / "results" / "scalars_long.parquet")
  assert set(long.columns) == {"condition", "optimizer", "learning_rate", "seed", "workdir",
                               "step", "tokens", "metric", "value"}
  assert not long["metric"].str.contains("/param=").any()
  # Series the report never reads stay in the run directories only; rows in a fixed order.
  assert "train/loss" in set(long["metric"]) and not set(long["metric"]) & set(
      tables.NOT_ARCHIVED)
  key = list(zip(long["metric"], long["workdir"], long["step"]))
  assert key == sorted(key)
  one = long[(long["optimizer"] == "adamw") & (long["seed"] == 0) & (long["metric"] ==
             "train/moe_aux_loss") & (long["condition"] == "base")]
  assert one["value"].tolist() == [1.0] * 3  # the repeated step 10 record, three adamw lrs
  res = json.loads((root / "results" / "results.json").read_text())
  assert len(res["runs"]) == len(runs) and res["literature"]


def test_literature_checks(fake_report):
  root, _ = fake_report
  lit = json.loads((root / "results" / "results.json").read_text())["literature"]
  # The per-condition claims on every condition (primary first), then the LN pair.
  assert [(c["claim"].split()[0], c["condition"]) for c in lit] == [
      ("Adam-family", "base"), ("Adam-family", "post_ln"), ("Lion's", "base"),
      ("Lion's", "post_ln"), ("Post-LN", "base -> post_ln")]
  by = {c["claim"].split()[0]: c for c in lit if c["condition"] != "post_ln"}
  assert by["Adam-family"]["verdict"] == "agrees", by["Adam-family"]
  # Decided on the per-seed differences (the seeds share data and initial parameters).
  assert by["Adam-family"]["reason"].startswith("paired 95% interval below 0: adamw lower")
  assert "adamw - sgd_momentum" in by["Adam-family"]["measured"]
  # Best lrs 6e-4 / 1e-4 = 6x, but a x3 grid only resolves it to 2x-18x.
  assert "6.00x" in by["Lion's"]["measured"] and by["Lion's"]["verdict"] == "inconclusive"
  assert "too coarse" in by["Lion's"]["reason"]
  assert by["Post-LN"]["verdict"] == "agrees", by["Post-LN"]
  # The report tallies each claim's verdicts over the conditions above its table.
  text = (root / "REPORT.md").read_text()
  adam = [l for l in text.splitlines() if l.startswith("- Adam-family")]
  assert len(adam) == 1 and "**agrees** in base" in adam[0], adam
  assert "| claim | condition | measured here | verdict | why |" in text


def _literature(study):
  runs = tables.runs_table(study)
  best = tables.select_best_lr(runs, study.spec.get("sweep_seeds"))
  return {c["claim"].split()[0]: c for c in literature.literature_checks(
      study, runs, best, tables.findings_table(runs, best))
          if c["condition"] in (study.conditions[0], "base -> post_ln")}


def _checks(root, status_of):
  make_fake_study(root, {DIVERGED: "diverged", FAILED: "failed", **status_of})
  return _literature(loading.load_study(str(root)))


def test_literature_never_compares_against_a_diverged_run(tmp_path):
  # Every SGD run diverged: no best lr, so nothing to compare against.
  all_sgd = {(c, "sgd_momentum", m, s): "diverged" for c, _, m, s, _ in fake_runs()}
  c = _checks(tmp_path / "a", all_sgd)["Adam-family"]
  assert c["verdict"] == "inconclusive" and "sgd_momentum has no completed run" in c["reason"]
  # One seed diverged at SGD's best lr: the mean of the others would hide it.
  c = _checks(tmp_path / "b", {("base", "sgd_momentum", 1.0, 2): "diverged"})["Adam-family"]
  assert c["verdict"] == "inconclusive" and "diverged or failed" in c["reason"]


def test_a_claim_whose_optimizers_are_absent_gets_one_row_not_one_per_condition(tmp_path):
  # A two-optimizer study (AdamW and Lion, like markov_lion): the Adam-vs-SGD claim cannot be
  # measured in any condition, so one row says so; Lion's ratio is still checked per condition.
  spec = make_fake_study(tmp_path)
  spec["optimizers"] = ["adamw", "lion"]
  spec["runs"] = [r for r in spec["runs"] if r["optimizer"] in spec["optimizers"]]
  (tmp_path / "study.json").write_text(json.dumps(spec))
  for opt in ("sgd_momentum", "adafactor", "signsgd"):
    for p in tmp_path.glob(f"runs/*/{opt}"):
      shutil.rmtree(p)
  study = loading.load_study(str(tmp_path))
  assert study.optimizers == ["adamw", "lion"]
  runs = tables.runs_table(study)
  best = tables.select_best_lr(runs, study.spec.get("sweep_seeds"))
  lit = literature.literature_checks(study, runs, best, tables.findings_table(runs, best))
  assert [(c["claim"].split()[0], c["condition"]) for c in lit] == [
      ("Adam-family", "–"), ("Lion's", "base"), ("Lion's", "post_ln"),
      ("Post-LN", "base -> post_ln")]
  assert lit[0]["reason"] == "SGD-momentum or the Adam family not in the study"
  text = "\n".join(report.literature_section(lit))
  assert "- Adam-family (AdamW, Adafactor) reaches a lower loss than SGD-momentum on " \
         "transformers: not measured here (SGD-momentum or the Adam family not in the study)" in text
  # A smoke test withholds the verdicts, not the reason a claim was not measured at all.
  smoke = loading.load_study(str(tmp_path), {"smoke_test": True})
  lit = literature.literature_checks(smoke, runs, best, tables.findings_table(runs, best))
  assert lit[0]["reason"] == "SGD-momentum or the Adam family not in the study"
  assert all("smoke test" in c["reason"] for c in lit[1:])


def test_literature_inconclusive_when_fixed_by_the_configuration(fake_report, tmp_path):
  # One learning rate per optimizer: the "best" rates are the configured centres, so neither
  # the comparison nor the ratio of best rates nor the LN effect is a finding.
  spec = make_fake_study(tmp_path)
  spec["runs"] = [r for r in spec["runs"] if r["lr_multiplier"] == 1.0]
  (tmp_path / "study.json").write_text(json.dumps(spec))
  keep = {r["workdir"] for r in spec["runs"]}
  for p in tmp_path.glob("runs/*/*/lr=*/seed=*"):
    if p.relative_to(tmp_path).as_posix() not in keep:
      shutil.rmtree(p)
  checks = _literature(loading.load_study(str(tmp_path)))
  for name in ("Adam-family", "Lion's", "Post-LN"):
    assert checks[name]["verdict"] == "inconclusive", checks[name]
    assert "single learning rate" in checks[name]["reason"], checks[name]
  # A smoke test states no verdict at all (the same runs give verdicts otherwise).
  root, _ = fake_report
  for c in _literature(loading.load_study(str(root), {"smoke_test": True})).values():
    assert c["verdict"] == "inconclusive" and "smoke test" in c["reason"]


def test_report_has_every_figure_and_the_findings_table(fake_report):
  root, path = fake_report
  text = pathlib.Path(path).read_text()
  for name in plots.FIGURE_NAMES:
    if name in plots.STUDY_FIGURES:
      files = [root / "plots" / f"{name}.png"]
    else:
      files = [root / "plots" / f"{name}__{c}.png" for c in ("base", "post_ln")]
    for fp in files:
      assert fp.exists() and fp.stat().st_size > 1000, fp
      assert f"]({fp.relative_to(root)})" in text
  assert "## Findings" in text and "| optimizer | best lr | stability |" in text
  # What the held-out splits hold, where a train/test gap needs it (base: synthetic, 'seen').
  assert text.count("Validation and test splits: fresh held-out sequences") == 1
  assert "mixture of every topic of the training schedule" in text
  assert "final test loss (95% t)" in text and "95% Student-t interval" in text
  for opt in OPTS:
    assert f"| **{opt}** |" in text
  assert "**diverged**" in text and "**missing**" in text and "**failed**" in text
  assert "| condition | optimizer | lr | seed | runs | status | detail |" in text
  # base misses one lion run (MISSING); diverged and failed runs have an outcome.
  assert ("Coverage: complete: post_ln; partial: base (lion incomplete); no run finished: none."
          in text)
  assert "## Against the literature" in text and "## Comparisons" in text
  assert "unigram 6.000" in text  # the baselines
  assert "| current / past / train_sample loss |" in text
  assert "python scripts/run_study.py" in text
  assert "Smoke test" not in text
  # The post_ln condition has no shift: the drift figure says so instead of crashing.
  assert "no distribution shift" in text
  gap = [sec for sec in text.split("### ") if "plots/gap_vs_heterogeneity.png" in sec][0]
  assert "Data absent" not in gap  # two conditions with SGD, SignSGD, AdamW and the CV


def test_coverage_names_complete_partial_and_unstarted_conditions():
  rows = [("a", "x", "completed"), ("a", "y", "diverged"), ("a", "y", "failed"),
          ("b", "x", "completed"), ("b", "x", "preempted"), ("b", "y", "missing"),
          ("c", "x", "preempted"), ("c", "y", "missing")]
  runs = pd.DataFrame(rows, columns=["condition", "optimizer", "status"])
  study = types.SimpleNamespace(conditions=["a", "b", "c"], optimizers=["x", "y"])
  assert report.coverage(study, runs) == (
      "Coverage: complete: a; partial: b (x incomplete, y no run finished); no run finished: c.")


def test_report_regenerates_from_its_archive_alone(fake_report, tmp_path):
  root, _ = fake_report
  copy = tmp_path / "committed"
  copy.mkdir()
  (copy / "study.json").write_text((root / "study.json").read_text())
  (copy / "results").mkdir()
  (copy / "results" / loading.ARCHIVE_RESULTS).write_bytes(
      (root / "results" / loading.ARCHIVE_RESULTS).read_bytes())
  # The same table written otherwise (another compression, as another pyarrow might): the
  # regenerated report leaves these bytes alone, so a committed archive does not churn.
  scalars = copy / "results" / loading.ARCHIVE_SCALARS
  pd.read_parquet(root / "results" / loading.ARCHIVE_SCALARS).to_parquet(
      scalars, index=False, compression="snappy")
  before = scalars.read_bytes()
  assert before != (root / "results" / loading.ARCHIVE_SCALARS).read_bytes()
  report.make_report(str(copy))  # no runs/ directory at all
  assert scalars.read_bytes() == before and not list((copy / "results").glob("*.tmp"))
  for table in ("runs.csv", "findings.csv", "best_lr.csv", "comparisons.csv"):
    a = pd.read_csv(root / "results" / table)
    b = pd.read_csv(copy / "results" / table)
    pd.testing.assert_frame_equal(a, b, check_dtype=False)


def test_report_with_no_diagnostics_and_no_study_json(tmp_path):
  d = tmp_path / "runs" / "base" / "adamw" / "lr=0.0006" / "seed=0"
  d.mkdir(parents=True)
  (d / "results.json").write_text(json.dumps({"status": "completed", "final_eval_loss": 3.0,
                                              "num_steps": 10, "steps_done": 10}))
  (d / "metrics.jsonl").write_text("".join(
      json.dumps({"step": s, "train/loss": 4.0 - s / 10}) + "\n" for s in range(1, 11)))
  path = report.make_report(str(tmp_path))
  text = pathlib.Path(path).read_text()
  assert "Data absent or partial" in text
  assert "recorded no test split" in text  # falls back to validation, and says so
  for name in plots.FIGURE_NAMES:
    sfx = ".png" if name in plots.STUDY_FIGURES else "__base.png"
    assert (tmp_path / "plots" / f"{name}{sfx}").exists()
  # An empty study dir still produces a report.
  empty = tmp_path / "empty"
  empty.mkdir()
  assert "0 runs" in pathlib.Path(report.make_report(str(empty))).read_text()
  # Provenance: study.json's note and sessions.json's device and wall time head the report.
  rundir.write_json(str(empty / "study.json"), {"note": "Incomplete: 2 of 5 conditions ran."})
  rundir.write_json(str(empty / "sessions.json"), [
      {"start": "2026-01-01T00:00:00", "end": "2026-01-01T00:09:00", "wall_s": 540,
       "device": "1 x NVIDIA H100", "processes": 3, "command": "python scripts/run_study.py"}])
  head = pathlib.Path(report.make_report(str(empty))).read_text().split("## ")[0]
  assert "> **Note.** Incomplete: 2 of 5 conditions ran." in head
  assert "(9.0 min) on 1 x NVIDIA H100, 3 process(es)" in head


def test_smoke_test_report_is_labelled_and_has_no_verdicts(fake_report, tmp_path):
  root, _ = fake_report
  text = pathlib.Path(report.make_report(str(root), {"smoke_test": True})).read_text()
  assert "**Smoke test.**" in text and "a smoke test compares nothing" in text
  assert "**agrees**" not in text and "**disagrees**" not in text
  assert "## Findings" not in text and "## Numbers (smoke test: no findings)" in text
  report.make_report(str(root))  # leave the module fixture as it was


def test_figures_draw_what_they_say_and_no_legend_covers_data(fake_report, monkeypatch):
  """What each figure draws, read off the matplotlib objects before they are saved."""
  from matplotlib.transforms import Bbox
  root, _ = fake_report
  drawn = {}
  real_save = plots._save

  def inspect(fig, path):
    fig.tight_layout()
    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    axes = []
    for ax in fig.axes:
      leg = ax.get_legend()
      over = False
      if leg is not None:
        both = Bbox.intersection(leg.get_window_extent(r), ax.get_window_extent(r))
        over = both is not None and both.width > 1 and both.height > 1
      axes.append({"lines": [(l.get_label(), l.get_linestyle()) for l in ax.get_lines()],
                   "legend": [t.get_text() for t in leg.get_texts()] if leg else [],
                   "legend_over_data": over})
    drawn[os.path.basename(path)] = axes
    real_save(fig, path)

  monkeypatch.setattr(plots, "_save", inspect)
  report.make_report(str(root))
  for name in ("loss_vs_tokens__base.png", "drift_around_shifts__base.png",
               "moment_staleness__base.png", "embedding_update_frequency__base.png"):
    assert not any(a["legend_over_data"] for a in drawn[name]), name
  loss = drawn["loss_vs_tokens__base.png"][0]
  assert not any("1 seeds" in t for t in loss["legend"]) and any("3 seeds" in t for t in loss["legend"])
  styles = {label.split(" (")[0]: ls for label, ls in loss["lines"] if not label.startswith("_")}
  assert styles["distribution shift"] not in {styles["uniform"], styles["unigram"]}
  # Every optimizer sees the same batches, so the same row update frequencies: one line, said
  # so, beside the expected curve (and its averaging) -- not five lines in one colour.
  freq = drawn["embedding_update_frequency__base.png"][0]["lines"]
  measured = [label for label, _ in freq if label.startswith("measured")]
  assert len(measured) == 1 and "every optimizer" in measured[0] and len(freq) == 2
  assert any("mean over the bucket's tokens and topics" in label for label, _ in freq)


def test_a_check_without_a_condition_to_run_on_says_so_in_the_tally():
  checks = [{"claim": "post-LN", "condition": "–", "measured": "–", "verdict": "inconclusive",
             "reason": "no pre-/post-LN condition pair in the study"},
            {"claim": "Adam", "condition": "base", "measured": "x", "verdict": "agrees",
             "reason": "r"}]
  text = "\n".join(report.literature_section(checks))
  assert ("- post-LN: not measured here (no pre-/post-LN condition pair in the study)" in text)
  assert "- Adam: **agrees** in base" in text and " in –" not in text


# ----------------------------------------------------------------------------- runner


def test_expand_identical_conditions():
  from jaxopt_study.study import presets as study_configs
  from jaxopt_study.study import protocol

  config = study_configs.get_config("small")
  runs = protocol.expand(config)
  assert len(runs) == 2 * 5 * 5 * 1  # conditions x optimizers x 5-point grid x sweep seed
  assert {r.optimizer for r in runs} == set(OPTS) and {r.phase for r in runs} == {"sweep"}
  steps = {r.config.num_steps for r in runs}
  tokens = {r.config.num_steps * r.config.batch_size * r.config.seq_len for r in runs}
  assert len(steps) == 1 and tokens == {config.token_budget}
  # Runs of a (condition, seed) differ only in the optimizer block.
  ref = {}
  for r in runs:
    c = r.config.copy_and_resolve_references()
    assert c.optimizer.name == r.optimizer and c.optimizer.learning_rate == r.learning_rate
    assert c.seed == r.seed
    del c.optimizer
    ref.setdefault((r.condition, r.seed), c.to_json())
    assert ref[(r.condition, r.seed)] == c.to_json()
  post = [r for r in runs if r.condition == "post_ln"]
  assert {r.config.model.ln_position for r in post} == {"post"}
  lrs = sorted(r.learning_rate for r in runs if r.optimizer == "adamw" and r.condition == "base")
  assert np.allclose(np.diff(np.log(lrs)), math.log(3), rtol=1e-2)  # log-spaced, 5 points
  with pytest.raises(KeyError, match="model.no_such_field"):
    bad = study_configs.get_config("tiny")
    bad.conditions.base.overrides = {"model": {"no_such_field": 1}}
    protocol.expand(bad)


@pytest.mark.parametrize("fine,coarse", [("markov_lion", "markov"),
                                         ("wikitext2_lion", "wikitext2_sizes")])
def test_a_finer_grid_study_shares_the_coarse_studys_runs(fine, coarse):
  # The Lion-control presets promise that --from_archive=<the coarse study> reuses its runs:
  # every 2nd point of the finer grid inside the coarse grid's range is a coarse grid point with
  # the same workdir and trajectory; the points between are new rates (half the coarse log-step).
  from jaxopt_study.study import presets as study_configs
  from jaxopt_study.study import protocol

  fine_runs, coarse_runs = (
      {r.relpath: r for r in protocol.expand(study_configs.get_config(p))} for p in (fine, coarse))
  for opt in ("adamw", "lion"):
    for cond in ("base", "size_8x512"):
      grid = sorted((r.learning_rate, path) for path, r in fine_runs.items()
                    if r.optimizer == opt and r.condition == cond)
      assert np.allclose(np.diff(np.log([lr for lr, _ in grid])), math.log(3) / 2, rtol=1e-2)
      coarse_lrs = [r.learning_rate for r in coarse_runs.values()
                    if r.optimizer == opt and r.condition == cond]
      inside = [path for lr, path in grid[::2] if min(coarse_lrs) <= lr <= max(coarse_lrs)]
      shared = [path for _, path in grid if path in coarse_runs]
      assert shared == inside and len(shared) >= 2, (fine, opt, cond)
      for path in shared:
        assert (rundir.config_fingerprint(fine_runs[path].config)
                == rundir.config_fingerprint(coarse_runs[path].config)), path


@pytest.mark.parametrize("field,value,match", [
    ("seeds", (0, 1), "config.seeds.*>= 3"),
    ("lr_multipliers", (1 / 3, 1.0, 3.0), "config.lr_multipliers has 3 points"),
    ("lr_multipliers", (0.1, 0.3, 1.0, 2.0, 4.0), "log-spaced"),
    ("on_config_change", "ignore", "on_config_change"),
    ("optimizers", ("adamw", "adam"), "unknown optimizer 'adam'"),
])
def test_protocol_is_enforced(field, value, match):
  from jaxopt_study.study import presets as study_configs
  from jaxopt_study.study import protocol

  config = study_configs.get_config("small")
  config[field] = value
  with pytest.raises(ValueError, match=match):
    protocol.expand(config)


def _fake_trainer(calls, val_loss, status_of=lambda c: "completed"):
  """A train.train_and_evaluate stand-in writing config.json and results.json like train."""

  def fake_train(config, workdir):
    calls.append((config.optimizer.name, config.optimizer.learning_rate, config.seed))
    status = status_of(config)
    with open(os.path.join(workdir, rundir.CONFIG), "w") as f:
      f.write(config.to_json_best_effort())
    res = rundir.RunResults(
        optimizer=config.optimizer.name, learning_rate=config.optimizer.learning_rate,
        seed=config.seed, status=status, num_steps=config.num_steps,
        steps_done=config.num_steps if status == "completed" else 7,
        final_eval_loss=val_loss(config) if status == "completed" else None,
        diverged_at_step=7 if status == "diverged" else None,
        config_fingerprint=rundir.config_fingerprint(config))
    res.save(workdir)
    return res.to_dict()

  return fake_train


def _protocol_config(optimizer="adamw"):
  from jaxopt_study.study import presets as study_configs

  config = study_configs.get_config("tiny")
  config.optimizers = (optimizer,)
  config.report.smoke_test = False
  config.lr_multipliers = (1 / 9, 1 / 3, 1.0, 3.0, 9.0)
  config.lr_grid_max_extensions = 2
  config.sweep_seeds, config.seeds = (0,), (0, 1, 2)
  config.make_report = False
  config.compilation_cache = False  # no global jax.config change inside the test process
  return config


@pytest.mark.parametrize("optimum,expected_mults,bracketed", [
    (27.0, (1 / 9, 1 / 3, 1, 3, 9, 27, 81), True),  # two extensions bracket lr x27
    (1 / 30, (1 / 81, 1 / 27, 1 / 9, 1 / 3, 1, 3, 9), True),  # low side: x1/27
    (1000.0, (1 / 9, 1 / 3, 1, 3, 9, 27, 81), False),  # the limit: still on the edge
])
def test_runner_extends_the_grid_until_bracketed(tmp_path, monkeypatch, optimum,
                                                 expected_mults, bracketed):
  from jaxopt_study import train
  from jaxopt_study.study import runner
  from jaxopt_study.study import protocol

  config = _protocol_config()
  centre = config.learning_rates.adamw
  calls = []
  monkeypatch.setattr(train, "train_and_evaluate", _fake_trainer(
      calls, lambda c: 3.0 + math.log(c.optimizer.learning_rate / (centre * optimum)) ** 2))
  spec = runner.run_study(config, str(tmp_path), progress=False)
  swept = sorted(lr for _, lr, seed in calls if seed == 0)
  assert np.allclose(swept, sorted(protocol.round_lr(centre * m) for m in expected_mults))
  best = min(swept, key=lambda lr: abs(math.log(lr / (centre * optimum))))
  assert sorted(seed for _, lr, seed in calls if lr == best) == [0, 1, 2]  # seeds at the best
  assert len(calls) == len(expected_mults) + 2
  assert {r["phase"] for r in spec["runs"]} == {"sweep", "extension", "seeds"}
  b = tables.select_best_lr(tables.runs_table(loading.load_study(str(tmp_path))), [0])
  assert bool(b["bracketed"].iloc[0]) == bracketed and b["best_lr"].iloc[0] == best
  assert runner.exit_code(spec) == runner.EXIT_OK
  calls.clear()  # a second invocation plans the same runs and trains none of them
  again = runner.run_study(config, str(tmp_path), progress=False)
  assert calls == [] and len(again["runs"]) == len(spec["runs"])


def test_extension_points_are_added_together_and_trained_in_one_stack(tmp_path, monkeypatch):
  """Two points at once on the high edge: x27 and x81 in one stack; the optimum (x27) is then
  bracketed, so the grid is the one that one point at a time gives."""
  from jaxopt_study import train
  from jaxopt_study.study import runner
  from jaxopt_study.study import protocol

  config = _protocol_config()
  config.lr_grid_extension_points, config.stack_runs = 2, 5
  centre = config.learning_rates.adamw
  calls, groups = [], []
  one = _fake_trainer(calls, lambda c: 3.0 + math.log(c.optimizer.learning_rate / (centre * 27))
                      ** 2)

  def fake_stacked(configs, workdirs):
    groups.append(sorted(c.optimizer.learning_rate for c in configs))
    return [one(c, w) for c, w in zip(configs, workdirs)]

  monkeypatch.setattr(train, "train_and_evaluate", one)
  monkeypatch.setattr(train, "train_runs", fake_stacked)
  spec = runner.run_study(config, str(tmp_path), progress=False)
  lr = lambda m: protocol.round_lr(centre * m)
  assert groups == [[lr(m) for m in (1 / 9, 1 / 3, 1, 3, 9)], [lr(27), lr(81)],
                    [lr(27), lr(27)]]  # sweep, both extension points, seeds 1 and 2 at x27
  assert spec["lr_grid_extension_points"] == 2
  assert [r["phase"] for r in spec["runs"] if r["learning_rate"] in (lr(27), lr(81))
          and r["seed"] == 0] == ["extension", "extension"]
  config.lr_grid_extension_points = 0
  with pytest.raises(ValueError, match="lr_grid_extension_points"):
    runner.run_study(config, str(tmp_path / "bad"), progress=False)


def test_a_study_run_in_parts_keeps_one_study_json_for_all_of_them(tmp_path, monkeypatch):
  """One invocation per condition (and per optimizer) into one workdir, as the wikitext2_sizes
  preset runs its sizes: study.json keeps every part's conditions and runs, in the config's
  order; each invocation's returned spec (its exit code) is its own."""
  from jaxopt_study import train
  from jaxopt_study.study import runner

  config = _protocol_config()
  config.optimizers = ("adamw", "lion")
  config.report.smoke_test = True  # 3 rates, one seed: the protocol's minimums do not apply
  config.lr_multipliers, config.lr_grid_max_extensions = (1 / 3, 1.0, 3.0), 0
  config.sweep_seeds = config.seeds = (0,)
  config.conditions.wide = ml_collections.ConfigDict(
      {"description": "as base, wider", "overrides": {"model": {"d_model": 128}}})
  calls = []
  monkeypatch.setattr(train, "train_and_evaluate", _fake_trainer(calls, lambda c: 3.0))
  wd = str(tmp_path / "study")
  config.only_conditions = ("wide",)
  part = runner.run_study(config, wd, progress=False)
  assert {r["condition"] for r in part["runs"]} == {"wide"} and len(calls) == 6
  config.only_conditions, config.optimizers = ("base",), ("lion",)
  part = runner.run_study(config, wd, progress=False)
  assert {(r["condition"], r["optimizer"]) for r in part["runs"]} == {("base", "lion")}
  whole = json.loads((tmp_path / "study" / "study.json").read_text())
  assert list(whole["conditions"]) == ["base", "wide"]  # the config's order, primary first
  assert whole["conditions"]["wide"]["description"] == "as base, wider"
  assert set(whole["optimizers"]) == {"adamw", "lion"} and len(whole["runs"]) == 9
  assert {(r["condition"], r["optimizer"]) for r in whole["runs"]} == {
      ("wide", "adamw"), ("wide", "lion"), ("base", "lion")}
  study = loading.load_study(wd)
  assert study.conditions == ["base", "wide"] and study.condition_info("wide")["overrides"]
  # A part run again (nothing to train) changes nothing; another preset's study.json in the
  # workdir is not carried into this one.
  calls.clear()
  runner.run_study(config, wd, progress=False)
  key = lambda runs: sorted((r["workdir"], r["status"]) for r in runs)
  assert not calls and key(json.loads((tmp_path / "study" / "study.json").read_text())[
      "runs"]) == key(whole["runs"])
  other = json.loads((tmp_path / "study" / "study.json").read_text())
  other["preset"] = "another"
  (tmp_path / "study" / "study.json").write_text(json.dumps(other))
  runner.run_study(config, wd, progress=False)
  assert list(json.loads((tmp_path / "study" / "study.json").read_text())["conditions"]) == [
      "base"]


def test_a_study_continues_from_its_committed_archive(tmp_path, monkeypatch):
  """Seeded from study.json + results/ alone, the runner retrains only what the archive lacks
  (or trained under another config), and the report reads the archived series."""
  from jaxopt_study import train
  from jaxopt_study.study import runner

  config = _protocol_config()
  centre = config.learning_rates.adamw
  calls = []
  monkeypatch.setattr(train, "train_and_evaluate", _fake_trainer(
      calls, lambda c: 3.0 + math.log(c.optimizer.learning_rate / centre) ** 2))
  first = runner.run_study(config, str(tmp_path / "first"), progress=False)
  committed = tmp_path / "committed"  # what a commit keeps: no run directories
  (committed / "results").mkdir(parents=True)
  spec = json.loads((tmp_path / "first" / "study.json").read_text())
  spec["note"] = "INCOMPLETE: a hand-written note"  # kept when the study continues
  (committed / "study.json").write_text(json.dumps(spec))
  archived = {r["workdir"]: json.loads((tmp_path / "first" / r["workdir"] / "results.json")
                                       .read_text()) for r in first["runs"]}
  changed = first["runs"][0]["workdir"]
  archived[changed]["config_fingerprint"] = "another config"
  (committed / "results" / "run_results.json").write_text(json.dumps(archived))
  kept = first["runs"][1]["workdir"]
  pd.DataFrame({"workdir": [kept], "step": [5], "metric": ["train/loss"], "value": [4.25]}).to_parquet(
      committed / "results" / "scalars_long.parquet", index=False)

  again = tmp_path / "again"
  assert runner.seed_from_archive(config, str(committed), str(again)) == len(archived) - 1
  calls.clear()
  spec = runner.run_study(config, str(again), progress=False)
  lr, seed = rundir.parse_run_relpath(changed)["learning_rate"], first["runs"][0]["seed"]
  assert calls == [("adamw", lr, seed)]  # only the run trained under another config
  assert len(spec["runs"]) == len(first["runs"])
  assert all(r["status"] == "completed" for r in spec["runs"])
  assert spec["note"] == "INCOMPLETE: a hand-written note"
  study = loading.load_study(str(again))
  run = [r for r in study.runs if r.relpath == kept][0]
  assert run.status == "completed" and run.series("train/loss")[1].tolist() == [4.25]
  with pytest.raises(FileNotFoundError, match="run_results.json"):
    runner.seed_from_archive(config, str(tmp_path / "nowhere"), str(tmp_path / "x"))

  # Another study sharing some runs (a finer grid, no extensions) takes those runs alone: its
  # report must not list the archive's other rates, and study.json stays its own.
  finer = _protocol_config()
  finer.name = "finer"
  finer.lr_multipliers = (1 / 3, 3 ** -0.5, 1.0, 3 ** 0.5, 3.0)
  finer.lr_grid_max_extensions = 0
  shared = {rel for rel in archived if rel != changed and rundir.parse_run_relpath(rel)[
      "learning_rate"] in {float(rundir.lr_str(centre * m)) for m in (1 / 3, 1, 3)}}
  assert len(shared) >= 3
  fine_dir = tmp_path / "fine"
  assert runner.seed_from_archive(finer, str(committed), str(fine_dir)) == len(shared)
  assert not (fine_dir / "study.json").exists()
  assert set(json.loads((fine_dir / "results" / "run_results.json").read_text())) == shared


def test_runner_stacks_fresh_runs_and_runs_checkpointed_at_one_step(tmp_path, monkeypatch):
  from jaxopt_study import train
  from jaxopt_study.study import runner
  from jaxopt_study.study import protocol

  config = _protocol_config()
  config.stack_runs = 3
  centre = config.learning_rates.adamw
  calls, groups = [], []
  one = _fake_trainer(calls, lambda c: 3.0 + math.log(c.optimizer.learning_rate / centre) ** 2)

  def fake_stacked(configs, workdirs):
    groups.append(sorted((c.optimizer.learning_rate, c.seed) for c in configs))
    return [one(c, w) for c, w in zip(configs, workdirs)]

  def earlier(mult, status, step, checkpoint=True):
    rd = tmp_path / rundir.run_relpath("base", "adamw", protocol.round_lr(centre * mult), 0)
    if checkpoint:
      (rd / rundir.CHECKPOINTS / str(step)).mkdir(parents=True)
    rd.mkdir(parents=True, exist_ok=True)
    rundir.RunResults(status=status, steps_done=step).save(str(rd))

  monkeypatch.setattr(train, "train_and_evaluate", one)
  monkeypatch.setattr(train, "train_runs", fake_stacked)
  earlier(3.0, "preempted", 3)  # a stack stopped at step 3: stacked again, with
  earlier(9.0, "running", 3)  # a run of it killed after that step's save (status not updated)
  earlier(1 / 9, "running", 2)  # the only run checkpointed at step 2: alone
  earlier(1 / 3, "failed", 0, checkpoint=False)  # failed before any checkpoint: fresh
  spec = runner.run_study(config, str(tmp_path), progress=False)
  assert len(calls) == 5 + 2  # 5 sweep runs (best x1: bracketed), 2 more seeds
  lr = lambda m: protocol.round_lr(centre * m)
  assert groups == [[(lr(1 / 3), 0), (lr(1.0), 0)], [(lr(3.0), 0), (lr(9.0), 0)],
                    [(centre, 1), (centre, 2)]]
  assert all(r["status"] == "completed" for r in spec["runs"])
  assert {r["stacked"] for r in spec["runs"]} == {1, 2}


def test_runner_reuses_resumes_and_records_failures(tmp_path, monkeypatch):
  from jaxopt_study.study import presets as study_configs
  from jaxopt_study import train
  from jaxopt_study.study import runner

  calls, failed_once = [], []
  inner = _fake_trainer(calls, lambda c: 3.0, lambda c: (
      "diverged" if c.optimizer.name == "sgd_momentum" else "completed"))

  def fake_train(config, workdir):
    if config.optimizer.name == "lion" and not failed_once:
      failed_once.append(1)
      raise RuntimeError("boom")
    return inner(config, workdir)

  monkeypatch.setattr(train, "train_and_evaluate", fake_train)
  config = study_configs.get_config("tiny")
  config.make_report = False
  config.compilation_cache = False  # no global jax.config change inside the test process
  spec = runner.run_study(config, str(tmp_path), command="cmd", progress=False)
  st = {r["optimizer"]: r["status"] for r in spec["runs"]}
  assert st == {"sgd_momentum": "diverged", "adamw": "completed", "adafactor": "completed",
                "lion": "failed", "signsgd": "completed"}
  lion = next(r for r in spec["runs"] if r["optimizer"] == "lion")
  res = rundir.RunResults.load(str(tmp_path / lion["workdir"]))
  assert res.status == "failed" and "RuntimeError: boom" in res.error
  saved = json.loads((tmp_path / "study.json").read_text())
  assert saved["command"] == "cmd" and saved["conditions"]["base"]["shift_steps"] == [30, 60]
  assert len(saved["conditions"]["base"]["freq_buckets"]) >= 5
  assert saved["report"]["smoke_test"] and all(r["config_fingerprint"] for r in saved["runs"])
  # Again: finished and diverged runs are reused, the failed one is retried (and succeeds).
  calls.clear()
  spec = runner.run_study(config, str(tmp_path), progress=False)
  assert [c[0] for c in calls] == ["lion"]
  assert all(r["status"] in ("completed", "diverged") for r in spec["runs"])
  res = rundir.RunResults.load(str(tmp_path / lion["workdir"]))
  assert res.error is None and json.loads((tmp_path / "study.json").read_text())["command"] == "cmd"
  # A preempted run (SIGTERM) stops the study; an unfinished run is resumed next time.
  adamw = next(r for r in spec["runs"] if r["optimizer"] == "adamw")
  rundir.RunResults(status="preempted", steps_done=3).save(str(tmp_path / adamw["workdir"]))
  monkeypatch.setattr(train, "train_and_evaluate",
                      _fake_trainer(calls, lambda c: 3.0, lambda c: "preempted"))
  calls.clear()
  spec = runner.run_study(config, str(tmp_path), progress=False)
  assert [c[0] for c in calls] == ["adamw"] and spec["stopped_early"]
  assert runner.exit_code(spec) == runner.EXIT_PREEMPTED


def test_runner_refuses_or_reruns_a_run_whose_config_changed(tmp_path, monkeypatch):
  from jaxopt_study.study import presets as study_configs
  from jaxopt_study import train
  from jaxopt_study.study import runner

  calls = []
  monkeypatch.setattr(train, "train_and_evaluate", _fake_trainer(calls, lambda c: 3.0))
  config = study_configs.get_config("tiny")
  config.make_report = False
  config.compilation_cache = False
  runner.run_study(config, str(tmp_path), progress=False)
  assert len(calls) == 5
  # Logging cadence is not part of the trajectory: the finished runs are reused.
  config.base.log_every = 5
  calls.clear()
  runner.run_study(config, str(tmp_path), progress=False)
  assert calls == []
  # A wider model is another run: refused, naming the run and the field, before any training.
  config.base.model.d_model = 128
  with pytest.raises(rundir.ConfigChanged,
                     match=r"runs/base/sgd_momentum/lr=0.1/seed=0.*model.d_model: 64.0 -> 128"):
    runner.run_study(config, str(tmp_path), progress=False)
  assert calls == []
  # ... or trained again when asked, the old directory kept aside.
  config.on_config_change = "rerun"
  spec = runner.run_study(config, str(tmp_path), progress=False)
  assert len(calls) == 5 and all(r["status"] == "completed" for r in spec["runs"])
  assert len(list(tmp_path.glob("runs/base/*/lr=*/seed=0/replaced-*/config.json"))) == 5
  saved = json.loads((tmp_path / "runs/base/adamw/lr=0.0006/seed=0/config.json").read_text())
  assert saved["model"]["d_model"] == 128
  # The report does not mistake the moved runs for runs of the study.
  assert len(loading.load_study(str(tmp_path)).runs) == 5


def test_runner_stops_on_a_locked_run_without_recording_a_failure(tmp_path, monkeypatch):
  from jaxopt_study.study import presets as study_configs
  from jaxopt_study import train
  from jaxopt_study.study import runner

  def locked(config, workdir):
    raise rundir.Locked(f"{workdir}/run.lock is held by pid 1")

  monkeypatch.setattr(train, "train_and_evaluate", locked)
  config = study_configs.get_config("tiny")
  config.make_report = False
  config.compilation_cache = False
  with pytest.raises(rundir.Locked):
    runner.run_study(config, str(tmp_path), progress=False)
  assert not list(tmp_path.glob("runs/*/*/*/*/results.json"))  # the other process's run


def test_sigterm_that_breaks_a_compile_is_a_stop_not_a_failure(tmp_path, monkeypatch):
  """SIGTERM reaches the compiler's child processes too (ptxas exits with code 15) and the step
  raises: the runs are recorded as preempted, not failed, and no other run starts."""
  import signal
  from jaxopt_study import train
  from jaxopt_study.study import runner

  calls = []

  def stopped_mid_compile(config, workdir):
    calls.append(config.seed)
    os.kill(os.getpid(), signal.SIGTERM)  # the runner's handler takes it (no run handler yet)
    raise RuntimeError("INTERNAL: ptxas exited with non-zero error code 15")

  monkeypatch.setattr(train, "train_and_evaluate", stopped_mid_compile)
  old = signal.getsignal(signal.SIGTERM)
  spec = runner.run_study(_protocol_config(), str(tmp_path), progress=False)
  assert signal.getsignal(signal.SIGTERM) == old  # the runner's handler is removed again
  assert len(calls) == 1 and spec["stopped_early"]
  statuses = {r["status"] for r in spec["runs"]}
  assert statuses == {"preempted", "pending"}, statuses
  res = rundir.RunResults.load(str(tmp_path / spec["runs"][0]["workdir"]))
  assert res.status == "preempted" and res.error is None
  assert runner.exit_code(spec) == runner.EXIT_PREEMPTED


def test_exit_codes():
  from jaxopt_study.study import runner

  def spec(*statuses, stopped=False):
    return {"runs": [{"status": s} for s in statuses], "stopped_early": stopped}

  assert runner.exit_code(spec("completed", "diverged", "failed")) == runner.EXIT_OK == 0
  assert runner.exit_code(spec("diverged", "failed")) == runner.EXIT_NO_RUN_COMPLETED != 0
  assert runner.exit_code(spec("failed")) == runner.EXIT_NO_RUN_COMPLETED
  assert runner.exit_code(spec("completed", "pending", stopped=True)) == runner.EXIT_PREEMPTED
  assert len({runner.EXIT_OK, runner.EXIT_NO_RUN_COMPLETED, runner.EXIT_CONFIG_CHANGED,
              runner.EXIT_LOCKED, runner.EXIT_PREEMPTED}) == 5


# ----------------------------------------------------------------------------- end to end


def test_quickstart_notebook_runs_a_tiny_study_end_to_end(tmp_path, monkeypatch):
  """Executes notebooks/quickstart.ipynb top to bottom (CPU): 5 tiny runs and the report."""
  nbformat = pytest.importorskip("nbformat")
  nbclient = pytest.importorskip("nbclient")
  study_dir = tmp_path / "study"
  monkeypatch.setenv("STUDY_DIR", str(study_dir))
  monkeypatch.delenv("JAXOPT_STUDY_TENSORBOARD", raising=False)
  nb = nbformat.read(REPO / "notebooks" / "quickstart.ipynb", as_version=4)
  t0 = time.time()
  nbclient.NotebookClient(nb, timeout=900, kernel_name="python3",
                          resources={"metadata": {"path": str(tmp_path)}}).execute()
  elapsed = time.time() - t0
  spec = json.loads((study_dir / "study.json").read_text())
  assert [r["status"] for r in spec["runs"]] == ["completed"] * 5, spec["runs"]
  text = (study_dir / "REPORT.md").read_text()
  for name in plots.FIGURE_NAMES:
    rel = f"plots/{name}.png" if name in plots.STUDY_FIGURES else f"plots/{name}__base.png"
    assert (study_dir / rel).stat().st_size > 1000 and f"]({rel})" in text
  assert "| optimizer | best lr | stability |" in text
  for opt in OPTS:
    assert f"| **{opt}** |" in text
  runs = pd.read_csv(study_dir / "results" / "runs.csv")
  assert runs["final_eval_loss"].notna().all() and (runs["steps_done"] == 80).all()
  # The diagnostics reached the report: real numbers, not placeholders, in the core figures.
  findings = pd.read_csv(study_dir / "results" / "findings.csv").set_index("optimizer")
  assert findings.loc["adamw", "aging/log_staleness_q50"] == findings.loc[
      "adamw", "aging/log_staleness_q50"]  # not NaN: AdamW has a second moment
  assert np.isnan(findings.loc["lion", "aging/log_staleness_q50"])  # Lion has none
  assert findings["heterogeneity/grad_norm_cv"].notna().all()
  assert findings["shifts_seen"].min() >= 1
  for name in ("loss_vs_tokens", "grad_sparsity_heatmap", "drift_around_shifts",
               "embedding_update_frequency", "grad_heterogeneity", "layer_norms"):
    section = text.split("### ")
    sec = [s for s in section if f"plots/{name}__base.png" in s][0]
    assert "Data absent" not in sec, (name, sec[:500])
  print(f"quickstart notebook: {elapsed:.0f} s")


def test_wikitext_notebook_runs_its_smoke_study_on_local_files(tmp_path, monkeypatch):
  """Executes notebooks/wikitext103_tpu.ipynb top to bottom on CPU, as CI can: local WikiText
  files (WIKITEXT_DIR) instead of the hub download, and its JAXOPT_STUDY_SMOKE settings."""
  from tests.test_data import _write_wikitext
  nbformat = pytest.importorskip("nbformat")
  nbclient = pytest.importorskip("nbclient")
  study_dir = tmp_path / "wt103"
  folder = _write_wikitext(tmp_path / "wiki", (("train", 40), ("valid", 6), ("test", 6)))
  for k, v in {"STUDY_DIR": str(study_dir), "WIKITEXT_DIR": str(folder),
               "JAXOPT_STUDY_SMOKE": "1"}.items():
    monkeypatch.setenv(k, v)
  monkeypatch.delenv("JAXOPT_STUDY_TENSORBOARD", raising=False)
  monkeypatch.delenv("JAXOPT_STUDY_CACHE", raising=False)
  nb = nbformat.read(REPO / "notebooks" / "wikitext103_tpu.ipynb", as_version=4)
  nbclient.NotebookClient(nb, timeout=900, kernel_name="python3",
                          resources={"metadata": {"path": str(tmp_path)}}).execute()
  outputs = "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []))
  assert "attention: auto" in outputs  # no GPU here: XLA's attention, never cuDNN's
  spec = json.loads((study_dir / "study.json").read_text())
  assert [r["status"] for r in spec["runs"]] == ["completed"] * 5, spec["runs"]
  assert {r["workdir"].split("/")[1] for r in spec["runs"]} == {"base"}
  text = (study_dir / "REPORT.md").read_text()
  assert "**Smoke test.**" in text and "**agrees**" not in text
  assert (study_dir / "cache").is_dir()  # the tokenizer and token cache live with the study


def _install_cell(name):
  nb = json.loads((REPO / "notebooks" / name).read_text())
  (src,) = ["".join(c["source"]) for c in nb["cells"]
            if c["cell_type"] == "code" and "install_source" in "".join(c["source"])]
  return src


_RUN_INSTALL_CELL = """
import importlib.abc, json, subprocess, sys
class NoPackage(importlib.abc.MetaPathFinder):  # as on a fresh Colab: not installed yet
  def find_spec(self, name, path=None, target=None):
    if name.split(".")[0] == "jaxopt_study" and not INSTALLED:
      raise ImportError(name)
INSTALLED = False
sys.meta_path.insert(0, NoPackage())
calls = []
def fake_run(argv, check):
  global INSTALLED
  calls.append(argv[argv.index("install") + 2:])  # after 'install -q'
  INSTALLED = True
subprocess.run = fake_run
try:
  exec(open(sys.argv[1]).read())
  print("RESULT" + json.dumps(calls))
except RuntimeError as e:
  print("RESULT" + json.dumps(str(e)))
"""


@pytest.mark.parametrize("notebook", ["quickstart.ipynb", "wikitext103_tpu.ipynb"])
def test_notebook_install_cell_installs_from_its_checkout_or_the_url_or_says_what_to_set(
    notebook, tmp_path):
  cell = tmp_path / "cell.py"
  cell.write_text(_install_cell(notebook))
  script = tmp_path / "run.py"
  script.write_text(_RUN_INSTALL_CELL)

  def run(cwd, url=None):
    env = {k: v for k, v in os.environ.items() if k != "JAXOPT_STUDY_REPO"}
    if url:
      env["JAXOPT_STUDY_REPO"] = url
    out = subprocess.run([sys.executable, str(script), str(cell)], cwd=cwd, env=env,
                         capture_output=True, text=True, timeout=120)
    assert "RESULT" in out.stdout, out.stderr[-2000:]
    return json.loads(out.stdout.split("RESULT", 1)[1])

  assert run(REPO / "notebooks") == [["-e", str(REPO)]]  # opened from its checkout
  elsewhere = tmp_path / "colab"
  elsewhere.mkdir()
  assert run(elsewhere, "https://example.org/me/jaxopt_study.git") == [
      ["git+https://example.org/me/jaxopt_study.git"]]
  assert "set REPO_URL" in run(elsewhere)


def test_processes_split_work_into_units_and_merge_their_study_files(tmp_path):
  """run_study.py --processes: every (condition, optimizer) in exactly one unit, the most work
  first; whole conditions when they are enough to fill the processes, else one optimizer each;
  the parts' study.json files merge into one with every run, condition and optimizer."""
  from jaxopt_study.study import presets as study_configs
  from jaxopt_study.study import processes

  config = study_configs.get_config("controls")
  units = processes.work_units(config, 5)
  assert sorted(c for c, _ in units) == sorted(config.conditions)
  assert all(opts == tuple(config.optimizers) for _, opts in units)
  assert units[0][0] == "depth_8"  # the most work (2x the layers) is placed first
  per_opt = processes.work_units(config, 20)  # 20 processes > 12 conditions: one optimizer each
  assert sorted((c, o) for c, (o,) in per_opt) == sorted(
      (c, o) for c in config.conditions for o in config.optimizers)
  assert {c for c, _ in per_opt[:len(config.optimizers)]} == {"depth_8"}
  assert processes.part_dir("w", per_opt[0]) == os.path.join("w", "parts", "depth_8-" +
                                                          per_opt[0][1][0])
  # Resumed: finished sweeps weigh nothing, so the units left come first.
  for cond in config.conditions:
    for opt in config.optimizers:
      if (cond, opt) in (("base", "adamw"), ("tied", "lion")):
        continue
      for lr in range(len(config.lr_multipliers)):
        for seed in config.sweep_seeds:
          rd = tmp_path / "resumed" / rundir.run_relpath(cond, opt, lr + 1.0, seed)
          os.makedirs(rd)
          rundir.write_json(str(rd / "results.json"), {"status": "completed"})
  resumed = processes.work_units(config, 20, str(tmp_path / "resumed"))
  assert sorted(resumed[:2]) == [("base", ("adamw",)), ("tied", ("lion",))], resumed[:3]
  assert sorted(c for c, _ in processes.work_units(config, 2, str(tmp_path / "resumed"))[:2]) == [
      "base", "tied"]
  part_of = {"base": ("base", ("adamw",)), "tied": ("tied", tuple(config.optimizers))}
  for k, (cond, wall) in enumerate([("base", 12.5), ("tied", None)]):
    os.makedirs(processes.part_dir(str(tmp_path), part_of[cond]))
    rundir.write_json(os.path.join(processes.part_dir(str(tmp_path), part_of[cond]), "study.json"), {
        "preset": "controls", "command": f"child {k}", "conditions": {cond: {"num_steps": 5}},
        "optimizers": list(part_of[cond][1]),
        "runs": [{"workdir": f"runs/{cond}/adamw/lr=0.001/seed=0", "status": "completed",
                  "wall_s": wall}]})
  # The parent's study.json (seeded from an archive) already has tied's run; the part scored it.
  rundir.write_json(str(tmp_path / "study.json"), {"runs": [
      {"workdir": "runs/tied/adamw/lr=0.001/seed=0", "status": "completed", "wall_s": None,
       "analysis": "skipped: no checkpoint"}]})
  part1 = os.path.join(processes.part_dir(str(tmp_path), part_of["tied"]), "study.json")
  rundir.write_json(part1, {**rundir.read_json(part1), "runs": [
      {**rundir.read_json(part1)["runs"][0], "analysis": "done (retrained here)"}]})
  # A part written before a re-split says "preempted"; the run's results.json says completed.
  rd = tmp_path / "runs/tied/adamw/lr=0.001/seed=0"
  os.makedirs(rd)
  rundir.write_json(str(rd / "results.json"), {"status": "completed"})
  part = rundir.read_json(part1)
  part["runs"][0]["status"] = "preempted"
  rundir.write_json(part1, part)
  processes.merge_parts(str(tmp_path))
  merged = rundir.read_json(str(tmp_path / "study.json"))
  assert {r["status"] for r in merged["runs"]} == {"completed"}
  assert merged["preset"] == "controls" and set(merged["conditions"]) == {"base", "tied"}
  assert merged["optimizers"] == ["adamw", *[o for o in config.optimizers if o != "adamw"]]
  assert "command" not in merged  # the parent's command, set by its final pass
  assert sorted((r["workdir"], r["wall_s"]) for r in merged["runs"]) == [
      ("runs/base/adamw/lr=0.001/seed=0", 12.5), ("runs/tied/adamw/lr=0.001/seed=0", None)]
  assert [r.get("analysis") for r in merged["runs"] if "tied" in r["workdir"]] == [
      "done (retrained here)"]


def test_paired_comparison_removes_the_seed_variance():
  # Seeds move both optimizers' losses together (0, +0.3, -0.2); a is below b by 0.05, 0.06,
  # 0.04 on the same seeds; seed 3 ran for a only (unpaired).
  seed_shift = {0: 0.0, 1: 0.3, 2: -0.2, 3: 0.1}
  gap = {0: 0.05, 1: 0.06, 2: 0.04}
  rows = []
  for s, shift in seed_shift.items():
    rows.append(dict(condition="c", optimizer="a", learning_rate=1e-3, seed=s,
                     status="completed", final_test_loss=4.0 + shift - gap.get(s, 0.05)))
    if s in gap:
      rows.append(dict(condition="c", optimizer="b", learning_rate=0.1, seed=s,
                       status="completed", final_test_loss=4.0 + shift))
  rows.append(dict(condition="c", optimizer="b", learning_rate=0.3, seed=0, status="completed",
                   final_test_loss=1.0))  # another rate: not the best, never compared
  runs = pd.DataFrame(rows)
  best = pd.DataFrame([dict(condition="c", optimizer="a", best_lr=1e-3),
                       dict(condition="c", optimizer="b", best_lr=0.1)])
  r = tables.comparisons_table(runs, best, "c", ["a", "b"]).iloc[0]
  assert r["verdict"] == "tie"  # unpaired: the seed spread (0.5) swamps a 0.05 gap
  # Paired, by hand: d = (-0.05, -0.06, -0.04), mean -0.05, sd 0.01, t_{0.975, 2} = 4.302653.
  half = 0.01 * 4.302653 / math.sqrt(3)
  assert r["paired"] == f"{-0.05:.3f} ± {half:.3f} (95% t, n=3)"
  assert r["paired_verdict"] == "lower"
  swapped = tables.comparisons_table(runs, best, "c", ["b", "a"]).iloc[0]
  assert swapped["paired_verdict"] == "higher"


def test_parse_overrides_reads_the_scripts_field_literal_syntax():
  from jaxopt_study.study import protocol

  assert protocol.parse_overrides("diagnostics.enabled=False, optimizer.b1=0.95,,name='x'") == {
      "diagnostics.enabled": False, "optimizer.b1": 0.95, "name": "x"}
  assert protocol.parse_overrides("") == {}


def test_against_baselines_by_hand():
  """One hand-built row: every column is a difference written out here, not the report's code."""
  f = pd.DataFrame([dict(optimizer="adamw", final_loss=3.0, final_train_loss=3.4,
                         train_sample_minus_test=-0.5, num_params=100, tokens_seen=50),
                    dict(optimizer="lion", final_loss=3.5, final_train_loss=3.7,
                         num_params=100, tokens_seen=50)])  # an archived run: no train sample
  lines = report.against_baselines(
      f, {"unigram": 5.0, "marginal_entropy": 4.0, "entropy_floor": 2.0}, "test")
  rows = {l.split("|")[1].strip(): [c.strip() for c in l.split("|")[2:-1]]
          for l in "\n".join(lines).splitlines() if l.startswith("| **")}
  # - unigram, - marginal, learnt = (4 - 3) / (4 - 2), train eval - test, last batch - test, tpp
  assert rows["**adamw**"] == ["-2.000", "-1.000", "0.50", "-0.500", "0.400", "0.50"]
  assert rows["**lion**"] == ["-1.500", "-0.500", "0.25", "–", "0.200", "0.50"]


def test_the_report_names_the_text_the_runs_trained_on(tmp_path):
  """Setup gives the sha256 of the text every run recorded, and says so in bold when the runs
  trained on different texts (e.g. a resume pointed at other files)."""
  from jaxopt_study.study import report

  (tmp_path / "study.json").write_text(json.dumps({"optimizers": ["adamw"],
                                                   "conditions": {"base": {}}}))
  text = {"train": "a" * 64, "validation": "b" * 64, "test": "c" * 64}

  def run(seed, data_sha256):
    rd = tmp_path / rundir.run_relpath("base", "adamw", 1e-3, seed)
    rd.mkdir(parents=True)
    rundir.RunResults(optimizer="adamw", learning_rate=1e-3, seed=seed, status="completed",
                      data_sha256=data_sha256).save(str(rd))

  def setup():
    return "\n".join(report.setup_section(loading.load_study(str(tmp_path))))

  run(0, text)
  run(1, None)  # recorded before the field existed
  assert f"train `{'a' * 16}`, validation `{'b' * 16}`" in setup()
  assert "1 of 2 runs record it" in setup()
  run(2, {**text, "train": "d" * 64})
  assert "**2 different texts** among the runs" in setup()


def test_a_session_is_recorded_from_its_start_so_a_killed_one_still_shows(tmp_path):
  """run_study.py writes its sessions.json entry at the start and completes it at SIGTERM and at
  the end: a parent killed in between (timeout -k) still leaves when it started."""
  import datetime as dt
  from jaxopt_study.study import runner

  start = dt.datetime(2026, 1, 1, 0, 0, 0)
  session = functools.partial(runner.record_session, str(tmp_path), command="python x.py",
                              start=start, processes=3)
  session()

  def head():
    return pathlib.Path(report.make_report(str(tmp_path))).read_text().split("## ")[0]

  assert ("started 2026-01-01T00:00:00, killed before it recorded its end, on a device it did "
          "not record, 3 process(es): python x.py") in head()
  session(end=start + dt.timedelta(minutes=9))  # SIGTERM: the end, no device query
  session(end=start + dt.timedelta(minutes=9, seconds=30), device="1 x NVIDIA H100")
  assert "ran 2026-01-01T00:00:00 to 2026-01-01T00:09:30 (9.5 min) on 1 x NVIDIA H100" in head()
  assert len(json.loads((tmp_path / "sessions.json").read_text())) == 1
  runner.record_session(str(tmp_path), command="python x.py", start=start + dt.timedelta(hours=1),
                        processes=1)  # the next invocation: its own entry
  assert len(json.loads((tmp_path / "sessions.json").read_text())) == 2


def test_the_post_ln_claim_is_checked_on_every_pre_post_pair(tmp_path):
  """Two (pre-LN, post-LN) pairs, e.g. at two model sizes: one row each, never just the first.
  The second pair is the first one copied with a width override on both sides, and its post-LN
  runs' CV lowered instead: its row must say so."""
  spec = make_fake_study(tmp_path)
  for src, dst in (("base", "wide"), ("post_ln", "wide_post")):
    shutil.copytree(tmp_path / "runs" / src, tmp_path / "runs" / dst)
    spec["runs"] += [dict(r, condition=dst, workdir=r["workdir"].replace(f"/{src}/", f"/{dst}/"))
                     for r in spec["runs"] if r["condition"] == src]
  spec["conditions"]["wide"] = {"overrides": {"model.d_model": 64}, "ln_position": "pre"}
  spec["conditions"]["wide_post"] = {"overrides": {"model.d_model": 64,
                                                   "model.ln_position": "post"},
                                     "ln_position": "post"}
  (tmp_path / "study.json").write_text(json.dumps(spec))
  for path in (tmp_path / "runs" / "wide_post").glob("*/*/*/metrics.jsonl"):
    lines = path.read_text().split("\n")  # the last one is cut short on purpose (a kill)
    for i, line in enumerate(lines[:-1]):
      row = json.loads(line)
      if "heterogeneity/grad_norm_cv" in row:
        row["heterogeneity/grad_norm_cv"] -= 3.0
        lines[i] = json.dumps(row)
    path.write_text("\n".join(lines))
  study = loading.load_study(str(tmp_path))
  runs = tables.runs_table(study)
  best = tables.select_best_lr(runs, study.spec.get("sweep_seeds"))
  ln = [c for c in literature.literature_checks(study, runs, best, tables.findings_table(runs, best))
        if c["claim"].startswith("Post-LN")]
  assert [c["condition"] for c in ln] == ["base -> post_ln", "wide -> wide_post"]
  assert [c["verdict"] for c in ln] == ["agrees", "disagrees"]
