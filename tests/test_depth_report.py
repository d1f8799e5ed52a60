"""The report's depth section against hand-built runs, and the runner's layer-scores hook.

The hand-built study: conditions base (2 blocks), depth_4 (4 blocks) and no_weight_decay (2
blocks); AdamW and Lion; a best rate (x1, seeds 0-2) and a worse rate (x3, seed 0) whose
values are absurd, so any leak from it shows. Probes are logged at steps 10 and 20 (step 10's
values are absurd too: only the final probe step counts) and a train-loss-only step 21 follows.
Layer scores (analysis.json) exist for base and depth_4, not for no_weight_decay. Expected
numbers are computed here from the formulas below with NumPy and scipy's t quantile.
"""

import json
import os
import pathlib
import shutil
import signal

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from jaxopt_study import rundir
from jaxopt_study.study import depth
from jaxopt_study.study import loading
from jaxopt_study.study import report

CONDS = {"base": 2, "depth_4": 4, "no_weight_decay": 2}
OPTS = ("adamw", "lion")
LR = {"adamw": 1e-3, "lion": 1e-4}
SEEDS = (0, 1, 2)


def var(cond, opt, seed, l):
  return (1.0 + l) * (1.0 + 0.1 * seed) * (2.0 if opt == "lion" else 1.0) * (
      1.5 if cond == "depth_4" else 1.0)


def slope(cond, opt, seed):
  return 0.3 + 0.02 * seed + (0.2 if opt == "lion" else 0.0)


def small_frac(cond, opt, seed):
  # Weight decay off: clearly more small weights (disjoint intervals); depth_4: overlapping.
  return {"base": 0.20, "depth_4": 0.21, "no_weight_decay": 0.50}[cond] + 0.01 * seed


def entropy_norm(cond, opt, seed, l):
  return 0.9 - 0.1 * l + 0.01 * seed


def top1(cond, opt, seed, l):
  return 0.1 + 0.05 * l + 0.02 * seed


def usefulness(cond, opt, seed, i):
  return 0.05 * (i + 1) + 0.01 * seed + (0.1 if opt == "lion" else 0.0)


def later_change(i, j, seed):
  return 0.1 * (j - i) + 0.01 * seed


def perm(i, j, seed):
  return 0.01 * (i + j) + 0.001 * seed


def analysis_json(cond, opt, seed):
  n = CONDS[cond]
  use = [usefulness(cond, opt, seed, i) for i in range(n)]
  return {
      "num_layers": n, "d_model": 16, "batch_shape": [4, 8], "base_loss": 3.0 + 0.1 * seed,
      "step": 20, "workdir": "/somewhere/local",
      "jacobian": {"identity_deviation": [0.5 + 0.1 * i + 0.01 * seed for i in range(n)],
                   "diag_norm": [1.0] * n, "offdiag_norm": [0.1] * n, "frobenius": [1.0] * n,
                   "spectral": [1.1] * n, "num_tokens": 4},
      "usefulness": {"loss_increase": use, "loss": [3.0] * n, "fit_r2": [0.9] * n,
                     "share_useful": float(np.mean(np.array(use) > 0.1)), "threshold": 0.1},
      "causal": {"output_change": [[later_change(i, j, seed) if j > i else None
                                    for j in range(n)] for i in range(n)],
                 "update_change": [[None] * n for _ in range(n)],
                 "loss_increase": [0.2 + 0.01 * i + 0.01 * seed for i in range(n)]},
      "permutation": {"loss_change": [[perm(i, j, seed) if i != j else 0.0 for j in range(n)]
                                      for i in range(n)]},
  }


def _write_run(root, cond, opt, mult, seed):
  lr = float(rundir.lr_str(LR[opt] * mult))
  rel = rundir.run_relpath(cond, opt, lr, seed)
  d = root / rel
  d.mkdir(parents=True)
  bad = mult != 1.0  # the worse rate: absurd values that must not reach the section
  n = CONDS[cond]
  with open(d / "metrics.jsonl", "w") as f:
    for step in (10, 20):
      final = step == 20 and not bad
      rec = {"step": step, "train/loss": 4.0,
             "depth/log_var_slope": slope(cond, opt, seed) if final else 99.0,
             "weights/small_frac_0.1": small_frac(cond, opt, seed) if final else 0.99,
             "weights/small_frac_0.01": 0.02 if final else 0.99}
      for l in range(n):
        rec[f"depth/var/layer={l:02d}"] = var(cond, opt, seed, l) if final else 1e6
        rec[f"weights/small_frac_0.1/layer={l:02d}/kind=mlp"] = 0.1 * (l + 1) if final else 0.9
        rec[f"attention/entropy_norm/layer={l:02d}"] = (entropy_norm(cond, opt, seed, l)
                                                        if final else 0.0)
        rec[f"attention/top1_mass/layer={l:02d}"] = top1(cond, opt, seed, l) if final else 1.0
        rec[f"attention/entropy_norm/layer={l:02d}/head=00"] = 0.5  # heads: CSV-free
      f.write(json.dumps(rec) + "\n")
    f.write(json.dumps({"step": 21, "train/loss": 3.9}) + "\n")
  val = (3.0 if not bad else 5.0) + 0.01 * seed
  rundir.RunResults(optimizer=opt, learning_rate=lr, seed=seed, status="completed",
                    num_steps=21, steps_done=21, final_eval_loss=val,
                    final_eval_losses={"validation": val, "test": val + 0.02}).save(str(d))
  if cond != "no_weight_decay":
    (d / "analysis").mkdir()
    ana = analysis_json(cond, opt, seed)
    if bad:
      ana["usefulness"]["loss_increase"] = [9.0] * n
    (d / "analysis" / "analysis.json").write_text(json.dumps(ana))
  return {"condition": cond, "optimizer": opt, "learning_rate": lr, "lr_multiplier": mult,
          "seed": seed, "workdir": rel, "phase": "sweep" if seed == 0 else "seeds"}


def make_study(root: pathlib.Path):
  runs = []
  for cond in CONDS:
    for opt in OPTS:
      runs.append(_write_run(root, cond, opt, 3.0, 0))
      runs += [_write_run(root, cond, opt, 1.0, s) for s in SEEDS]
  spec = {"name": "depth", "optimizers": list(OPTS), "sweep_seeds": [0], "seeds": list(SEEDS),
          "lr_multipliers": [1.0, 3.0], "learning_rates": LR,
          "conditions": {"base": {"overrides": {}},
                         "depth_4": {"overrides": {"model.num_layers": 4}},
                         "no_weight_decay": {"overrides": {"optimizer.weight_decay": 0.0}}},
          "runs": runs}
  (root / "study.json").write_text(json.dumps(spec))


@pytest.fixture(scope="module")
def made(tmp_path_factory):
  root = tmp_path_factory.mktemp("depth_study")
  make_study(root)
  path = report.make_report(str(root))
  return root, pathlib.Path(path).read_text(), pd.read_csv(root / "results" / "depth.csv")


def _ci(values):
  """Mean and 95% Student-t half-width, written independently of study/stats.py."""
  x = np.asarray(values, float)
  return x.mean(), sps.t.ppf(0.975, x.size - 1) * x.std(ddof=1) / np.sqrt(x.size)


def _row(table, cond, opt, part, measure, layer=None):
  sel = table[(table["condition"] == cond) & (table["optimizer"] == opt)
              & (table["part"] == part) & (table["measure"] == measure)]
  sel = sel[sel["layer"].isna()] if layer is None else sel[sel["layer"] == layer]
  assert len(sel) == 1, (cond, opt, part, measure, layer, sel)
  return sel.iloc[0]


def _check(table, cond, opt, part, measure, layer, values):
  row = _row(table, cond, opt, part, measure, layer)
  mean, half = _ci(values)
  assert row["n"] == len(SEEDS)
  np.testing.assert_allclose([row["mean"], row["ci95"]], [mean, half], rtol=1e-6)
  np.testing.assert_allclose([row["lo"], row["hi"]], [mean - half, mean + half], rtol=1e-6)


def test_depth_table_matches_numpy(made):
  _, _, table = made
  for cond, n in CONDS.items():
    for opt in OPTS:
      for l in range(n):
        _check(table, cond, opt, "variance", "residual_variance", l,
               [var(cond, opt, s, l) for s in SEEDS])
        _check(table, cond, opt, "attention", "entropy_norm", l,
               [entropy_norm(cond, opt, s, l) for s in SEEDS])
        _check(table, cond, opt, "weights", "small_frac_0.1/mlp", l, [0.1 * (l + 1)] * 3)
      _check(table, cond, opt, "variance", "log_var_slope", None,
             [slope(cond, opt, s) for s in SEEDS])
      _check(table, cond, opt, "weights", "small_frac_0.1", None,
             [small_frac(cond, opt, s) for s in SEEDS])
      # Whole model: the mean over layers per run, then over the seeds.
      _check(table, cond, opt, "attention", "top1_mass", None,
             [np.mean([top1(cond, opt, s, l) for l in range(n)]) for s in SEEDS])
  for cond in ("base", "depth_4"):
    n = CONDS[cond]
    for opt in OPTS:
      for i in range(n):
        _check(table, cond, opt, "layer_scores", "usefulness_loss_increase", i,
               [usefulness(cond, opt, s, i) for s in SEEDS])
      for i in range(n - 1):
        _check(table, cond, opt, "layer_scores", "causal_later_output_change", i,
               [np.mean([later_change(i, j, s) for j in range(i + 1, n)]) for s in SEEDS])
      _check(table, cond, opt, "layer_scores", "share_useful", None,
             [np.mean([usefulness(cond, opt, s, i) > 0.1 for i in range(n)]) for s in SEEDS])
      _check(table, cond, opt, "layer_scores", "permutation_loss_change", None,
             [np.mean([perm(i, j, s) for i in range(n) for j in range(i + 1, n)])
              for s in SEEDS])
  assert table[(table["part"] == "layer_scores") & (table["condition"] == "no_weight_decay")
               ].empty
  assert not table["measure"].str.contains("head").any()
  study = loading.load_study(str(made[0]))
  assert depth.depth_conditions(study, table) == {"base": 2, "depth_4": 4}
  # The last block has no later block: no causal later-output change for it.
  assert _row(table, "base", "adamw", "layer_scores", "usefulness_loss_increase", 1)["n"] == 3
  with pytest.raises(AssertionError):
    _row(table, "base", "adamw", "layer_scores", "causal_later_output_change", 1)


def test_depth_section_and_condition_verdicts(made):
  root, text, _ = made
  sec = text.split("## Depth and sparsity")[1].split("\n## ")[0]
  for cond in CONDS:
    assert f"#### Condition `{cond}`" in sec
  assert "No probe data" not in sec and "No layer scores" not in sec
  assert "| block 3 |" in sec and "| log-var slope |" in sec
  mean, half = _ci([var("base", "adamw", s, 1) for s in SEEDS])
  assert f"{mean:.3f} ± {half:.3f}" in sec
  cmp = pd.read_csv(root / "results" / "depth_comparisons.csv")
  verdict = {(r.condition, r.optimizer, r.measure): r.verdict for r in cmp.itertuples()}
  assert set(cmp["reference"]) == {"base"}
  assert verdict[("no_weight_decay", "adamw", "small_frac_0.1")] == "higher"
  assert verdict[("depth_4", "adamw", "small_frac_0.1")] == "tie"
  assert verdict[("depth_4", "lion", "share_useful")] in ("higher", "lower", "tie")
  assert ("no_weight_decay", "adamw", "share_useful") not in verdict  # no layer scores there
  assert "| `no_weight_decay` | **adamw** |" in sec and "**higher**" in sec
  for name in ("depth_variance", "layer_scores", "sparsity_by_layer", "depth_scaling"):
    fig = [s for s in text.split("### ") if f"plots/{name}.png" in s][0]
    assert "Data absent" not in fig
    assert (root / "plots" / f"{name}.png").stat().st_size > 5000


def test_depth_regenerates_from_the_archive_alone(made, tmp_path):
  root, _, table = made
  copy = tmp_path / "committed"
  (copy / "results").mkdir(parents=True)
  shutil.copy(root / "study.json", copy / "study.json")
  for name in (loading.ARCHIVE_RESULTS, loading.ARCHIVE_SCALARS, loading.ARCHIVE_LAYER_SCORES):
    shutil.copy(root / "results" / name, copy / "results" / name)
  study = loading.load_study(str(copy))  # no runs/ directory
  assert not (copy / "runs").exists()
  assert all("workdir" not in r.analysis for r in study.runs if r.analysis)
  from jaxopt_study.study import tables  # pylint: disable=g-import-not-at-top
  best = tables.select_best_lr(tables.runs_table(study), [0])
  again = depth.depth_table(study, best)
  pd.testing.assert_frame_equal(table, again.reset_index(drop=True), check_dtype=False)


def test_missing_data_and_smoke_test_say_so(made, tmp_path):
  root, _, table = made
  empty = loading.load_study(str(tmp_path))
  none = depth.depth_table(empty, pd.DataFrame(columns=["condition", "optimizer", "best_lr"]))
  lines = "\n".join(report.depth_section(empty, none, depth.condition_comparisons(none, [])))
  assert lines.count("No probe data") == 2 and "No layer scores" in lines
  assert "analyze_layers=True" in lines
  smoke = loading.load_study(str(root), {"smoke_test": True})
  cmp = depth.condition_comparisons(table, smoke.conditions, smoke_test=True)
  assert len(cmp) and cmp["verdict"].isna().all()
  lines = "\n".join(report.depth_section(smoke, table, cmp))
  assert "a smoke test compares nothing" in lines and "**higher**" not in lines


# ----------------------------------------------------------------------------- runner hook


def test_runner_scores_best_rate_runs_and_survives_a_failure(tmp_path, monkeypatch):
  """A tiny real study: 2 rates x seed 0, then seed 1 at the best; analysis of seed 1 fails."""
  from jaxopt_study.analysis import files as analysis_files
  from jaxopt_study.analysis import report as analysis_report
  from jaxopt_study.study import presets as study_configs
  from jaxopt_study.study import runner

  config = study_configs.get_config("tiny")
  config.optimizers = ("adamw",)
  config.lr_multipliers, config.lr_grid_max_extensions = (1.0, 30.0), 0
  config.sweep_seeds, config.seeds = (0,), (0, 1)
  b = config.base
  b.model.num_layers, b.model.d_model, b.model.num_heads = 2, 16, 2
  b.model.max_len = b.seq_len = 8
  b.batch_size, b.data.vocab_size, b.data.eval_batches = 4, 64, 2
  b.schedule.warmup_steps = 2
  b.log_every = b.eval_every = b.checkpoint_every = 4
  b.diagnostics.enabled = False
  config.token_budget = 4 * 4 * 8  # 4 steps
  config.make_report, config.compilation_cache = False, False
  config.analyze_layers = True
  real, calls = analysis_report.analyze_run, []

  def analyze(workdir, **kw):
    calls.append(os.path.basename(workdir))
    if workdir.endswith("seed=1"):
      raise RuntimeError("analysis boom")
    return real(workdir, num_jacobian_tokens=4)

  monkeypatch.setattr(analysis_report, "analyze_run", analyze)
  spec = runner.run_study(config, str(tmp_path), progress=False)
  assert [r["status"] for r in spec["runs"]] == ["completed"] * 3
  best = [r for r in spec["runs"] if r["seed"] == 1][0]["learning_rate"]
  by = {(r["learning_rate"], r["seed"]): r for r in spec["runs"]}
  assert sorted(calls) == ["seed=0", "seed=1"]  # the best rate's runs only
  assert by[(best, 0)]["analysis"] == "done" and "analysis boom" in by[(best, 1)]["analysis"]
  for (lr, seed), r in by.items():
    assert analysis_files.is_current(str(tmp_path / r["workdir"])) == (lr == best and seed == 0)
  res = analysis_files.read(str(tmp_path / by[(best, 0)]["workdir"]))
  assert res["step"] == 4 and res["num_layers"] == 2
  # Again: the current analysis is kept, the failed one retried.
  calls.clear()
  runner.run_study(config, str(tmp_path), progress=False)
  assert calls == ["seed=1"]
  # A run whose checkpoints are not here (trained elsewhere) is skipped, and says so.
  shutil.rmtree(tmp_path / by[(best, 1)]["workdir"] / "checkpoints")
  calls.clear()
  again = {(r["learning_rate"], r["seed"]): r for r in
           runner.run_study(config, str(tmp_path), progress=False)["runs"]}
  assert calls == [] and again[(best, 1)]["analysis"].startswith("skipped: no checkpoint")
  assert again[(best, 0)]["analysis"] == "done"
  # A checkpoint newer than analysis.json makes it stale.
  rd = tmp_path / by[(best, 0)]["workdir"]
  newest = analysis_files.latest_checkpoint_mtime(str(rd))
  os.utime(rd / "analysis" / "analysis.json", (newest - 10, newest - 10))
  assert not analysis_files.is_current(str(rd))
  # The section reads the scores (and says the untrained probes are absent).
  study = loading.load_study(str(tmp_path))
  from jaxopt_study.study import tables  # pylint: disable=g-import-not-at-top
  tab = depth.depth_table(study, tables.select_best_lr(tables.runs_table(study), [0]))
  row = _row(tab, "base", "adamw", "layer_scores", "usefulness_loss_increase", 0)
  assert row["n"] == 1 and np.isclose(row["mean"], res["usefulness"]["loss_increase"][0])
  assert not depth.has(tab, "variance")
  # retrain_for_layer_scores trains it again beside its record, which stays as it was.
  rd1 = tmp_path / by[(best, 1)]["workdir"]
  recorded = (rd1 / "results.json").read_text()
  config.retrain_for_layer_scores = True
  calls.clear()
  again = {(r["learning_rate"], r["seed"]): r for r in
           runner.run_study(config, str(tmp_path), progress=False)["runs"]}
  assert sorted(calls) == ["retrain", "seed=0"]  # seed 0's stale analysis is redone too
  assert again[(best, 1)]["analysis"].startswith("done (retrained")
  assert analysis_files.read(str(rd1))["step"] == 4 and not (rd1 / "retrain").exists()
  assert (rd1 / "results.json").read_text() == recorded and not (rd1 / "checkpoints").exists()
  calls.clear()  # a later pass keeps the note and retrains nothing
  again = {(r["learning_rate"], r["seed"]): r for r in
           runner.run_study(config, str(tmp_path), progress=False)["runs"]}
  assert calls == [] and again[(best, 1)]["analysis"].startswith("done (retrained")
  # A run whose scores came with a seeded archive (seed_from_archive) is not trained again.
  scores = {by[(best, 1)]["workdir"]: analysis_files.read(str(rd1))}
  shutil.rmtree(rd1 / "analysis")
  os.makedirs(tmp_path / loading.RESULTS_DIR, exist_ok=True)
  loading.write_layer_scores(
      str(tmp_path / loading.RESULTS_DIR / loading.ARCHIVE_LAYER_SCORES), scores)
  calls.clear()
  again = {(r["learning_rate"], r["seed"]): r for r in
           runner.run_study(config, str(tmp_path), progress=False)["runs"]}
  assert calls == [] and again[(best, 1)]["analysis"] == "done (archived)"
  # SIGTERM during a retrain: it returns preempted; the scores are marked stopped, no other starts.
  (tmp_path / loading.RESULTS_DIR / loading.ARCHIVE_LAYER_SCORES).unlink()
  for seed in (0, 1):
    shutil.rmtree(tmp_path / by[(best, seed)]["workdir"] / "checkpoints", ignore_errors=True)
    shutil.rmtree(tmp_path / by[(best, seed)]["workdir"] / "analysis", ignore_errors=True)
  trained = []

  def preempted(config, workdir):
    trained.append(workdir)
    os.kill(os.getpid(), signal.SIGTERM)  # the runner's handler: study stopped
    return rundir.RunResults(status="preempted")

  monkeypatch.setattr(runner.train, "train_and_evaluate", preempted)
  again = {(r["learning_rate"], r["seed"]): r for r in
           runner.run_study(config, str(tmp_path), progress=False)["runs"]}
  assert len(trained) == 1 and calls == []
  assert again[(best, 0)]["analysis"] == runner.STOPPED_ANALYSIS


def test_the_report_says_which_layer_scores_come_from_a_retrain():
  runs = [{"analysis": "done (retrained here: final validation loss 4.5000, recorded 4.4000)"},
          {"analysis": "done (retrained here: final validation loss 4.0000, recorded 4.0200)"},
          {"analysis": "done (retrained here)"}, {"analysis": "done"}, {}]
  (line, blank) = report.retrained_note({"runs": runs})
  assert line.startswith("3 runs' layer scores come from training their config again")
  assert "for 2 of them" in line and "+0.0400 on average" in line
  assert "largest |difference| 0.1000" in line and blank == ""
  assert report.retrained_note({"runs": runs[3:]}) == []
