"""The study layer: aggregation against hand-made run directories, the measures, and a tiny study.

The hand-made study has 2 conditions (pre-LN with a distribution shift, post-LN), 5 optimizers,
2 learning rates and 2 seeds, with one diverged run, one failed run and one missing run (listed
in study.json, never written). The end-to-end test executes notebooks/quickstart.ipynb (a tiny
study through scripts' code paths and the report) with nbclient.
"""

import json
import math
import os
import pathlib
import time

import numpy as np
import pandas as pd
import pytest

from jaxopt_study.study import plots
from jaxopt_study.study import report

REPO = pathlib.Path(__file__).resolve().parents[1]
OPTS = ["sgd_momentum", "adamw", "adafactor", "lion", "signsgd"]
BASE_LR = {"sgd_momentum": 0.1, "adamw": 6e-4, "adafactor": 1e-2, "lion": 1e-4, "signsgd": 1e-4}
# Final loss of (optimizer, multiplier): adamw best at x3, lion best at x1 -> adamw/lion lr = 18.
FINAL = {
    ("sgd_momentum", 1.0): 5.0, ("sgd_momentum", 3.0): 4.8,
    ("adamw", 1.0): 4.2, ("adamw", 3.0): 4.0,
    ("adafactor", 1.0): 4.1, ("adafactor", 3.0): 4.3,
    ("lion", 1.0): 4.15, ("lion", 3.0): 4.25,
    ("signsgd", 1.0): 4.6, ("signsgd", 3.0): 4.7,
}
NUM_STEPS, SHIFT = 300, 150
DIVERGED = ("base", "sgd_momentum", 3.0, 1)
FAILED = ("base", "signsgd", 3.0, 0)
MISSING = ("base", "lion", 3.0, 1)


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
  lr = float(report.lr_str(BASE_LR[opt] * mult))
  rel = report.run_relpath(cond, opt, lr, seed)
  d = root / rel
  d.mkdir(parents=True)
  final = FINAL[(opt, mult)] + 0.01 * seed + (0.05 if cond == "post_ln" else 0.0)
  steps, loss = _curve(final, seed, shift=cond == "base",
                       spike_at=200 if (opt == "adamw" and mult == 3.0 and seed == 0) else None)
  stop = NUM_STEPS if status == "completed" else 120
  post = 1.0 if cond == "post_ln" else 0.0
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
            "aging/mu_mass_older_than_H": 0.01,
            "aging/param=wte/embedding/age_mean": 3.0,  # dropped from the long CSV
        })
        for b in range(4):
          rec[f"sparsity/emb_row_update_freq_mean/freq_bucket={b:02d}"] = 1.0 / (1 + 3 * b)
        if opt in ("adamw", "adafactor"):
          rec.update({"aging/log_staleness_q10": -1.0, "aging/log_staleness_q50": 0.5,
                      "aging/log_staleness_q90": 2.0, "aging/nu_mass_older_than_H": 0.05})
          for b in range(4):
            rec[f"aging/emb_row_log_staleness_mean/freq_bucket={b:02d}"] = 0.5 * b
      if s % 100 == 0:
        rec["eval/loss"] = float(l) + 0.05
      f.write(json.dumps(rec) + "\n")
    # A resumed run repeats a step: the last record wins.
    f.write(json.dumps({"step": 10, "train/grad_norm": 1.0}) + "\n")
    f.write('{"step": 11, "train/lo')  # truncated last line (killed mid-write)
  res = {
      "optimizer": opt, "learning_rate": lr, "seed": seed, "num_params": 1000,
      "num_steps": NUM_STEPS, "tokens_per_step": 64, "status": status,
      "steps_done": stop, "tokens_seen": stop * 64,
      "final_train_loss": float(loss[stop - 1]),
      "final_eval_loss": float(loss[stop - 1]) + 0.05 if status == "completed" else None,
      "final_eval_perplexity": None,
      "eval_loss_by_frequency": {"00": final - 1, "01": final, "02": final + 1,
                                 "03": final + 2 + (1.0 if opt == "sgd_momentum" else 0.0)},
      "tokens_per_second": 1000.0,
      "diverged_at_step": 120 if status == "diverged" else None,
      "devices": 1, "platform": "cpu",
  }
  if status == "failed":
    res = {"optimizer": opt, "learning_rate": lr, "seed": seed, "status": "failed",
           "error": "RuntimeError: boom", "num_steps": NUM_STEPS}
  (d / "results.json").write_text(json.dumps(res))
  return rel


def make_fake_study(root: pathlib.Path):
  runs = []
  for cond in ("base", "post_ln"):
    for opt in OPTS:
      for mult in (1.0, 3.0):
        for seed in (0, 1):
          if cond == "post_ln" and mult != 1.0:
            continue
          key = (cond, opt, mult, seed)
          lr = float(report.lr_str(BASE_LR[opt] * mult))
          rel = report.run_relpath(cond, opt, lr, seed)
          if key != MISSING:
            status = ("diverged" if key == DIVERGED else "failed" if key == FAILED
                      else "completed")
            _write_run(root, cond, opt, mult, seed, status)
          runs.append({"condition": cond, "optimizer": opt, "learning_rate": lr,
                       "lr_multiplier": mult, "seed": seed, "workdir": rel})
  spec = {
      "name": "fake", "optimizers": OPTS, "seeds": [0, 1], "lr_multipliers": [1.0, 3.0],
      "num_steps": NUM_STEPS, "tokens_per_step": 64,
      "command": "python scripts/run_study.py --config=configs/study.py:tiny --workdir=x",
      "conditions": {
          "base": {"overrides": {}, "ln_position": "pre", "shift_steps": [SHIFT],
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
  assert report.count_loss_spikes(steps, losses, window=128, num_sigma=6.0,
                                  min_history=8) == [16]
  # A short window: only the last 4 steps count, and min_history=4 enables it early.
  l2 = np.array([1.0, 1.0, 1.0, 1.0, 1.0, 2.0, 1.0])
  assert report.count_loss_spikes(np.arange(7), l2, window=4, num_sigma=6.0,
                                  min_history=4) == [5]
  # Too little history: no verdict.
  assert report.count_loss_spikes(np.arange(7), l2, window=4, num_sigma=6.0,
                                  min_history=5) == []
  # Window in steps, not points: sparse logging (every 10 steps) sees only 12 points of 128.
  s3 = np.arange(10, 310, 10)
  l3 = np.full(s3.size, 2.0) + 0.01 * (np.arange(s3.size) % 2)
  l3[20] = 2.2
  assert report.count_loss_spikes(s3, l3, window=128, num_sigma=6.0, min_history=8) == [210]
  # Non-finite losses are neither spikes nor history.
  l4 = l3.copy()
  l4[25] = np.nan
  assert report.count_loss_spikes(s3, l4) == [210]


def test_shift_recovery_on_synthetic_curve():
  steps = np.arange(1, 401)
  # Flat 2.0 before the shift at step 200, +1 jump decaying as exp(-(s-201)/25) after.
  loss = np.where(steps > 200, 2.0 + np.exp(-(steps - 201) / 25.0), 2.0)
  rec = report.shift_recovery(steps, loss, 200, pre_window=20, smooth=1, tolerance=0.02)
  # Recovered when exp(-(s-201)/25) <= 0.04 -> s - 201 >= 25 ln 25 = 80.47 -> s = 282.
  assert rec["pre_level"] == pytest.approx(2.0)
  assert rec["peak"] == pytest.approx(1.0)
  assert rec["recovery_steps"] == 82 and rec["recovered"]
  # Trailing mean over 10 steps delays recovery: first s whose mean of (s-9..s) <= 2.04.
  rec10 = report.shift_recovery(steps, loss, 200, pre_window=20, smooth=10, tolerance=0.02)
  ex = [s for s in range(201, 401) if np.mean(loss[(steps > max(s - 10, 200)) & (steps <= s)])
        <= 2.04][0]
  assert rec10["recovery_steps"] == ex - 200 and ex > 282
  # Never recovers before `until`.
  rec_none = report.shift_recovery(steps, loss, 200, tolerance=0.02, smooth=1, until=250)
  assert rec_none["recovery_steps"] is None and not rec_none["recovered"]
  # No data after the shift.
  assert report.shift_recovery(steps, loss, 400)["pre_level"] is None


def test_best_lr_selection():
  rows = [
      # lr 1: best mean loss among fully completed lrs.
      ("c", "o", 1.0, 0, "completed", 3.0), ("c", "o", 1.0, 1, "completed", 3.2),
      # lr 3: lower loss but one seed diverged -> not best.
      ("c", "o", 3.0, 0, "completed", 2.0), ("c", "o", 3.0, 1, "diverged", None),
      # lr 0.3: worse.
      ("c", "o", 0.3, 0, "completed", 3.5), ("c", "o", 0.3, 1, "completed", 3.5),
      # lr 10: missing only: ignored.
      ("c", "o", 10.0, 0, "missing", None),
      # other optimizer: everything diverged -> no best lr.
      ("c", "p", 1.0, 0, "diverged", None), ("c", "p", 2.0, 0, "diverged", None),
      # another: one lr with a missing seed is judged on the seed it has.
      ("c", "q", 1.0, 0, "completed", 2.0), ("c", "q", 1.0, 1, "missing", None),
      ("c", "q", 2.0, 0, "completed", 2.5), ("c", "q", 2.0, 1, "completed", 2.5),
  ]
  df = pd.DataFrame(rows, columns=["condition", "optimizer", "learning_rate", "seed", "status",
                                   "final_loss"])
  df["lr_multiplier"] = df["learning_rate"]
  best = report.select_best_lr(df).set_index("optimizer")
  assert best.loc["o", "best_lr"] == 1.0
  assert best.loc["o", "best_loss"] == pytest.approx(3.1)
  assert not best.loc["o", "at_grid_edge"]
  assert np.isnan(best.loc["p", "best_lr"]) and pd.isna(best.loc["p", "best_loss"])
  assert best.loc["q", "best_lr"] == 1.0


def test_frequency_losses():
  assert report.frequency_losses({"00": 1.0, "01": 2.0, "02": 5.0}) == (1.0, 5.0)
  assert report.frequency_losses({"00": 1.0, "01": 2.0, "02": 5.0}, 2, 2) == (1.5, 3.5)
  assert report.frequency_losses({}) == (None, None)


def test_read_metrics_last_record_wins(tmp_path):
  p = tmp_path / "metrics.jsonl"
  p.write_text('{"step": 1, "a": 1.0}\n{"step": 2, "a": 2.0, "b/param=x": 1}\n'
               '{"step": 1, "a": 5.0}\n{"step": 3, "a": NaN}\n{"step": 4, "a"')
  df = report.read_metrics(str(p))
  assert list(df.index) == [1, 2, 3]
  assert df.loc[1, "a"] == 5.0 and "b/param=x" not in df
  assert math.isnan(df.loc[3, "a"])


# ----------------------------------------------------------------------------- aggregation


def test_aggregation_of_hand_made_runs(fake_report):
  root, _ = fake_report
  runs = pd.read_csv(root / "results" / "runs.csv")
  assert len(runs) == 5 * 2 * 2 + 5 * 2  # every expected run, including the missing one
  st = runs.set_index(["condition", "optimizer", "lr_multiplier", "seed"])["status"]
  assert st[DIVERGED] == "diverged"
  assert st[FAILED] == "failed"
  assert st[MISSING] == "missing"
  assert (runs["status"] == "completed").sum() == 27

  best = pd.read_csv(root / "results" / "best_lr.csv")
  b = best[best["condition"] == "base"].set_index("optimizer")
  assert b.loc["adamw", "best_lr"] == pytest.approx(1.8e-3)  # x3
  assert b.loc["lion", "best_lr"] == pytest.approx(1e-4)  # x1 (x3 has a missing seed, worse)
  assert b.loc["sgd_momentum", "best_lr"] == pytest.approx(0.1)  # x3 lower loss but diverged
  assert b.loc["signsgd", "best_lr"] == pytest.approx(1e-4)  # x3 has a failed run

  f = pd.read_csv(root / "results" / "findings.csv")
  fb = f[f["condition"] == "base"].set_index("optimizer")
  # Final loss = mean over seeds of the last train loss + 0.05 (eval).
  exp = np.mean([_curve(4.0 + 0.01 * s, s)[1][-1] + 0.05 for s in (0, 1)])
  assert fb.loc["adamw", "final_loss"] == pytest.approx(exp)
  assert fb.loc["sgd_momentum", "diverged"] == 1 and fb.loc["sgd_momentum", "diverged_lrs"] == 0.3
  assert fb.loc["signsgd", "failed"] == 1 and fb.loc["lion", "missing"] == 1
  assert fb.loc["adamw", "spikes_best_lr"] == 1  # the injected spike at step 200, seed 0
  assert fb.loc["lion", "spikes_sweep"] == 0
  # Rare (last bucket) vs frequent (bucket 00).
  assert fb.loc["sgd_momentum", "rare_minus_frequent"] == pytest.approx(4.0)
  assert fb.loc["adamw", "rare_minus_frequent"] == pytest.approx(3.0)
  # Shift recovery: every completed best-lr run recovers from the shift at step 150.
  assert fb.loc["adamw", "shifts_seen"] == 2 and fb.loc["adamw", "shifts_recovered"] == 2
  assert 30 < fb.loc["adamw", "recovery_steps"] < 200
  # Staleness only where there is a second moment.
  assert fb.loc["adamw", "aging/log_staleness_q50"] == pytest.approx(0.5)
  assert np.isnan(fb.loc["lion", "aging/log_staleness_q50"])
  assert fb.loc["lion", "aging/mu_mass_older_than_H"] == pytest.approx(0.01)

  long = pd.read_csv(root / "results" / "scalars_long.csv")
  assert set(long.columns) == {"condition", "optimizer", "learning_rate", "seed", "step",
                               "tokens", "metric", "value"}
  assert not long["metric"].str.contains("/param=").any()
  one = long[(long["optimizer"] == "adamw") & (long["seed"] == 0) & (long["metric"] ==
             "train/grad_norm") & (long["condition"] == "base")]
  assert one["value"].tolist() == [1.0, 1.0]  # the repeated step 10 record, two adamw lrs
  res = json.loads((root / "results" / "results.json").read_text())
  assert len(res["runs"]) == len(runs) and res["literature"]


def test_literature_checks(fake_report):
  root, _ = fake_report
  lit = json.loads((root / "results" / "results.json").read_text())["literature"]
  by = {c["claim"].split()[0]: c for c in lit}
  assert by["Adam-family"]["verdict"] == "agrees"
  assert "18.00x" in by["Lion's"]["measured"] and by["Lion's"]["verdict"].startswith("disagrees")
  assert by["Post-LN"]["verdict"] == "agrees"


def test_report_has_every_figure_and_the_findings_table(fake_report):
  root, path = fake_report
  text = pathlib.Path(path).read_text()
  for name in plots.FIGURE_NAMES:
    if name == "heterogeneity_by_condition":
      files = [root / "plots" / f"{name}.png"]
    else:
      files = [root / "plots" / f"{name}__{c}.png" for c in ("base", "post_ln")]
    for fp in files:
      assert fp.exists() and fp.stat().st_size > 1000, fp
      assert f"]({fp.relative_to(root)})" in text
  assert "## Findings" in text and "| optimizer | best lr | stability |" in text
  for opt in OPTS:
    assert f"| **{opt}** |" in text
  assert "**diverged**" in text and "**missing**" in text and "**failed**" in text
  assert "## Against the literature" in text
  assert "python scripts/run_study.py" in text
  # The post_ln condition has no shift: the drift figure says so instead of crashing.
  assert "no distribution shift" in text


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
  for name in plots.FIGURE_NAMES:
    sfx = ".png" if name == "heterogeneity_by_condition" else "__base.png"
    assert (tmp_path / "plots" / f"{name}{sfx}").exists()
  # An empty study dir still produces a report.
  empty = tmp_path / "empty"
  empty.mkdir()
  assert "0 runs" in pathlib.Path(report.make_report(str(empty))).read_text()


# ----------------------------------------------------------------------------- runner


def test_expand_identical_conditions():
  from configs import study as study_configs
  from jaxopt_study.study import runner

  config = study_configs.get_config("small")
  runs = runner.expand(config)
  assert len(runs) == 5 * 3 * 2 + 5  # base sweep + post-LN at the default lr, seed 0
  assert {r.optimizer for r in runs} == set(OPTS)
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
  assert runs[0].relpath == "runs/base/sgd_momentum/lr=0.0333/seed=0"
  with pytest.raises(KeyError, match="model.no_such_field"):
    bad = study_configs.get_config("tiny")
    bad.conditions.base.overrides = {"model": {"no_such_field": 1}}
    runner.expand(bad)


def test_runner_reuses_resumes_and_records_failures(tmp_path, monkeypatch):
  from configs import study as study_configs
  from jaxopt_study import train
  from jaxopt_study.study import runner

  calls, failed_once = [], []

  def fake_train(config, workdir):
    calls.append(config.optimizer.name)
    if config.optimizer.name == "lion" and not failed_once:
      failed_once.append(1)
      raise RuntimeError("boom")
    status = "diverged" if config.optimizer.name == "sgd_momentum" else "completed"
    res = {"optimizer": config.optimizer.name, "status": status, "num_steps": config.num_steps,
           "steps_done": config.num_steps if status == "completed" else 7,
           "final_eval_loss": 3.0, "diverged_at_step": 7 if status == "diverged" else None}
    with open(os.path.join(workdir, "results.json"), "w") as f:
      json.dump(res, f)
    return res

  monkeypatch.setattr(train, "train_and_evaluate", fake_train)
  config = study_configs.get_config("tiny")
  config.make_report = False
  config.compilation_cache = False  # no global jax.config change inside the test process
  spec = runner.run_study(config, str(tmp_path), command="cmd", progress=False)
  st = {r["optimizer"]: r["status"] for r in spec["runs"]}
  assert st == {"sgd_momentum": "diverged", "adamw": "completed", "adafactor": "completed",
                "lion": "failed", "signsgd": "completed"}
  res = json.loads((tmp_path / spec["runs"][3]["workdir"] / "results.json").read_text())
  assert res["status"] == "failed" and "RuntimeError: boom" in res["error"]
  saved = json.loads((tmp_path / "study.json").read_text())
  assert saved["command"] == "cmd" and saved["conditions"]["base"]["shift_steps"] == [30, 60]
  assert len(saved["conditions"]["base"]["freq_buckets"]) >= 5
  # Again: finished and diverged runs are reused, the failed one is retried (and succeeds).
  calls.clear()
  spec = runner.run_study(config, str(tmp_path), progress=False)
  assert calls == ["lion"]
  assert all(r["status"] in ("completed", "diverged") for r in spec["runs"])
  res = json.loads((tmp_path / spec["runs"][3]["workdir"] / "results.json").read_text())
  assert "error" not in res and json.loads((tmp_path / "study.json").read_text())["command"] == "cmd"
  # A preempted run (SIGTERM) stops the study; an unfinished run is resumed next time.
  (tmp_path / spec["runs"][1]["workdir"] / "results.json").write_text(
      json.dumps({"status": "preempted", "steps_done": 3}))
  monkeypatch.setattr(train, "train_and_evaluate",
                      lambda c, w: calls.append(c.optimizer.name) or {"status": "preempted"})
  calls.clear()
  spec = runner.run_study(config, str(tmp_path), progress=False)
  assert calls == ["adamw"] and spec["stopped_early"]


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
    rel = f"plots/{name}.png" if name == "heterogeneity_by_condition" else f"plots/{name}__base.png"
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
