"""The study's tables: one row per run, the best learning rate, the findings, the comparisons.

* **Best learning rate** of (condition, optimizer), chosen on the **validation** split over the
  sweep seeds (study.json's ``sweep_seeds``; every seed without study.json): the lr whose runs
  have the lowest share that did not complete (diverged/failed), then the lowest mean final
  validation loss over its completed runs. Missing / unfinished runs are ignored; an lr with no
  completed run with a finite validation loss cannot be best (all diverged: no best lr).
  :func:`choose_lr` is the rule; the runner uses it to extend the grid, the report to read it.
* **Bracketed**: the best lr has a swept lr on each side (a diverged neighbour counts: its loss
  is effectively infinite); otherwise the optimum may lie outside the grid.
* **Reported numbers** are on the **test** split (``final_eval_losses["test"]``), over every
  completed seed at the best lr, as mean ± the 95% Student-t interval (:mod:`.stats`). A study
  whose runs recorded no test split reports the validation split and says so.
"""

from __future__ import annotations

import math
from typing import Iterable, Optional, Sequence

import numpy as np
import pandas as pd

from jaxopt_study import data as data_lib
from jaxopt_study import rundir
from jaxopt_study.study import measures
from jaxopt_study.study import stats
from jaxopt_study.study.loading import FINISHED, Run, Study, UNSTABLE

SELECTION_COLUMN = "final_eval_loss"  # validation split
TEST_COLUMN = "final_test_loss"
TRAIN_GAP_COLUMN = "train_sample_minus_test"  # final train-sample loss - final test loss


def split_column(split: str) -> str:
  """runs.csv's column of the final loss on an eval split other than validation."""
  return f"final_{split}_loss"


def other_split_columns(df: pd.DataFrame) -> list[str]:
  """Columns of the eval splits besides validation and test (e.g. the synthetic corpus's
  'current' and 'past' topics: adaptation and forgetting)."""
  return [c for c in df.columns if c.startswith("final_") and c.endswith("_loss")
          and c[len("final_"):-len("_loss")] and  # not findings' own 'final_loss'
          c not in (SELECTION_COLUMN, TEST_COLUMN, "final_train_loss")]


# ----------------------------------------------------------------------------- runs


def run_row(run: Run, study: Study) -> dict:
  """One tidy row of runs.csv: identity, status, final numbers and derived measures."""
  st = study.settings
  res = run.results
  row = {
      "condition": run.condition, "optimizer": run.optimizer,
      "learning_rate": run.learning_rate, "lr_multiplier": run.lr_multiplier,
      "seed": run.seed, "status": run.status, "workdir": run.relpath,
      "steps_done": res.steps_done, "num_steps": run.num_steps,
      "tokens_seen": res.tokens_seen, "diverged_at_step": res.diverged_at_step,
      "final_train_loss": res.final_train_loss,
      SELECTION_COLUMN: measures.validation_loss(run),
      TEST_COLUMN: measures.test_loss(run),
      "final_eval_perplexity": res.final_eval_perplexity,
      "tokens_per_second": res.tokens_per_second,
      "num_params": res.num_params, "error": res.error,
      "config_fingerprint": res.config_fingerprint,
      "train_text_sha256": (res.data_sha256 or {}).get("train"),  # None: synthetic, or older
  }
  for split, loss in sorted(res.final_eval_losses.items()):
    if split not in ("validation", "test"):
      row[split_column(split)] = measures.finite(loss)
  # The memorisation gap per run, so that its mean over seeds pairs the two losses of each run
  # (runs from before the train sample have none).
  sample, test = row.get(split_column(data_lib.TRAIN_SAMPLE)), row[TEST_COLUMN]  # finite or None
  row[TRAIN_GAP_COLUMN] = sample - test if sample is not None and test is not None else None
  steps, loss = run.series("train/loss")
  spikes = measures.count_loss_spikes(steps, loss, st.spike_window, st.spike_sigma,
                                      st.spike_min_history)
  row["loss_spikes"] = len(spikes) if steps.size else None
  row["spike_steps"] = " ".join(map(str, spikes))
  _, e_loss = run.series("eval/loss")
  row["best_eval_loss"] = float(e_loss.min()) if e_loss.size else row[SELECTION_COLUMN]
  row["best_train_loss"] = float(loss.min()) if loss.size else None
  freq, rare = measures.frequency_losses(res.eval_loss_by_frequency, st.rare_buckets,
                                         st.frequent_buckets)
  row["frequent_token_loss"], row["rare_token_loss"] = freq, rare
  shifts = study.shift_steps(run.condition)
  recs = []
  for i, s in enumerate(shifts):
    until = shifts[i + 1] if i + 1 < len(shifts) else None
    rec = measures.shift_recovery(steps, loss, s, pre_window=st.shift_pre_window,
                                  smooth=st.shift_smooth, tolerance=st.shift_tolerance,
                                  until=until)
    if rec["pre_level"] is not None and rec["peak"] is not None:
      recs.append(rec)
  row["shifts_seen"] = len(recs)
  row["shifts_recovered"] = sum(r["recovered"] for r in recs)
  row["recovery_steps_mean"] = _mean(r["recovery_steps"] for r in recs if r["recovered"])
  row["shift_loss_jump_mean"] = _mean(r["peak"] for r in recs)
  for name in measures.STALENESS_METRICS:
    row[name] = measures.tail_mean(run, name, st.tail_fraction)
  for name in measures.HETEROGENEITY_METRICS:
    row[name] = measures.series_mean(run, name)
  return row


def runs_table(study: Study) -> pd.DataFrame:
  rows = [run_row(r, study) for r in study.runs]
  cols = list(dict.fromkeys(k for r in rows for k in r)) if rows else [
      "condition", "optimizer", "learning_rate", "lr_multiplier", "seed", "status",
      SELECTION_COLUMN, TEST_COLUMN]
  df = pd.DataFrame(rows, columns=cols)
  if len(df):
    df["_c"] = df["condition"].map({c: i for i, c in enumerate(study.conditions)})
    df["_o"] = df["optimizer"].map({o: i for i, o in enumerate(study.optimizers)})
    df = df.sort_values(["_c", "_o", "learning_rate", "seed"]).drop(columns=["_c", "_o"])
    df = df.reset_index(drop=True)
  return df


# Per-step series that no table or figure of the report reads (they stay in each run's
# metrics.jsonl and TensorBoard): left out of the archive, where they were a third of its bytes.
# A report that starts reading one must take it off this list.
NOT_ARCHIVED = ("train/learning_rate", "train/grad_norm", "train/param_norm", "train/update_norm")


def scalars_long(study: Study) -> pd.DataFrame:
  """Long format: condition, optimizer, learning_rate, seed, workdir, step, tokens, metric, value.

  Written beside every report (``results/scalars_long.parquet``, zstd; parquet's dictionary
  encoding stores each repeated name once): with
  ``results/run_results.json`` it regenerates the report without the run directories. Every
  series but :data:`NOT_ARCHIVED`, sorted by (metric, workdir, step): one metric's values side
  by side compress about 1.3x better, and the same runs give the same rows in the same order.
  """
  frames = []
  for r in study.runs:
    if r.metrics is None or r.metrics.empty:
      continue
    # melt before reset_index: pandas 3's drop leaves one block per column, and inserting the
    # index into that frame warns "highly fragmented" (once per run).
    m = r.metrics.drop(columns=list(NOT_ARCHIVED), errors="ignore").melt(
        var_name="metric", value_name="value", ignore_index=False).reset_index()
    m = m.dropna(subset=["value"])
    tps = r.tokens_per_step
    m["tokens"] = m["step"] * tps if tps else np.nan
    m["condition"], m["optimizer"], m["learning_rate"] = r.condition, r.optimizer, r.learning_rate
    m["seed"], m["workdir"] = r.seed, r.relpath
    frames.append(m)
  cols = ["condition", "optimizer", "learning_rate", "seed", "workdir", "step", "tokens",
          "metric", "value"]
  if not frames:
    return pd.DataFrame(columns=cols)
  long = pd.concat(frames, ignore_index=True)[cols]
  return long.sort_values(["metric", "workdir", "step"], kind="stable").reset_index(drop=True)


# ----------------------------------------------------------------------------- best lr


def choose_lr(records: Iterable[tuple[float, str, Optional[float]]]) -> Optional[float]:
  """The best lr of (lr, status, validation loss) records (module docstring), or None."""
  by_lr: dict[float, list[tuple[str, Optional[float]]]] = {}
  for lr, status, loss in records:
    by_lr.setdefault(float(lr), []).append((status, loss))
  cands = []
  for lr, recs in by_lr.items():
    done = [l for s, l in recs if s in FINISHED]
    bad = sum(s in UNSTABLE for s, _ in recs)
    scored = [float(l) for l in done if l is not None and math.isfinite(float(l))]
    if not scored:
      continue
    cands.append((bad / (len(done) + bad), float(np.mean(scored)), lr))
  return min(cands)[2] if cands else None


def swept_lrs(records: Iterable[tuple[float, str, Optional[float]]]) -> list[float]:
  """The lrs with at least one finished or unstable run (missing-only lrs are not swept)."""
  return sorted({float(lr) for lr, s, _ in records if s in FINISHED + UNSTABLE})


def unbracketed_side(lrs: Sequence[float], best: Optional[float]) -> Optional[str]:
  """None when ``best`` has a swept lr on each side; else 'low', 'high' or 'single'."""
  if best is None or not lrs:
    return None
  if len(lrs) == 1:
    return "single"
  if math.isclose(best, lrs[0], rel_tol=1e-9):
    return "low"
  if math.isclose(best, lrs[-1], rel_tol=1e-9):
    return "high"
  return None


def select_best_lr(runs: pd.DataFrame, sweep_seeds: Optional[Sequence[int]] = None
                   ) -> pd.DataFrame:
  """Best learning rate per (condition, optimizer): see the module docstring.

  Args:
    runs: a runs table (condition, optimizer, learning_rate, lr_multiplier, seed, status,
      final_eval_loss).
    sweep_seeds: the seeds the lr grid was swept with (None: every seed).

  Returns:
    one row per (condition, optimizer) with best_lr (NaN when no lr has a finished run),
    best_lr_multiplier, best_val_loss (mean over its completed sweep seeds), num_lrs,
    at_grid_edge, bracketed, unbracketed_side.
  """
  cols = ["condition", "optimizer", "num_lrs", "best_lr", "best_lr_multiplier", "best_val_loss",
          "at_grid_edge", "bracketed", "unbracketed_side"]
  out = []
  for (cond, opt), g in runs.groupby(["condition", "optimizer"], sort=False):
    if sweep_seeds is not None:
      g = g[g["seed"].isin(list(sweep_seeds))]
    recs = list(zip(g["learning_rate"], g["status"], g[SELECTION_COLUMN]))
    lrs = swept_lrs(recs)
    lr = choose_lr(recs)
    row = {"condition": cond, "optimizer": opt, "num_lrs": len(lrs), "best_lr": math.nan,
           "best_lr_multiplier": None, "best_val_loss": None, "at_grid_edge": None,
           "bracketed": False, "unbracketed_side": None}
    if lr is not None:
      at = g[np.isclose(g["learning_rate"], lr)]
      mult = at["lr_multiplier"].dropna()
      side = unbracketed_side(lrs, lr)
      row.update(best_lr=lr, best_lr_multiplier=float(mult.iloc[0]) if len(mult) else None,
                 best_val_loss=_mean(at.loc[at["status"].isin(FINISHED), SELECTION_COLUMN]),
                 at_grid_edge=side is not None, bracketed=side is None, unbracketed_side=side)
    out.append(row)
  return pd.DataFrame(out, columns=cols)


def best_lr_of(best: pd.DataFrame, condition: str, optimizer: str) -> Optional[float]:
  sel = best[(best["condition"] == condition) & (best["optimizer"] == optimizer)]
  if sel.empty or not np.isfinite(sel["best_lr"].iloc[0]):
    return None
  return float(sel["best_lr"].iloc[0])


def report_column(runs: pd.DataFrame) -> str:
  """The test-loss column when any run recorded a test split, else the validation column."""
  if TEST_COLUMN in runs and pd.to_numeric(runs[TEST_COLUMN], errors="coerce").notna().any():
    return TEST_COLUMN
  return SELECTION_COLUMN


def at_best_lr(runs: pd.DataFrame, best: pd.DataFrame, condition: str,
               optimizer: str) -> pd.DataFrame:
  """The runs (every seed) of (condition, optimizer) at its best lr; empty without one."""
  lr = best_lr_of(best, condition, optimizer)
  g = runs[(runs["condition"] == condition) & (runs["optimizer"] == optimizer)]
  return g.iloc[0:0] if lr is None else g[np.isclose(g["learning_rate"], lr)]


def best_lr_ci(runs: pd.DataFrame, best: pd.DataFrame, condition: str, optimizer: str,
               column: str) -> stats.MeanCI:
  """Mean ± 95% t interval of ``column`` over the completed seeds at the best lr."""
  g = at_best_lr(runs, best, condition, optimizer)
  return stats.mean_ci(pd.to_numeric(g.loc[g["status"].isin(FINISHED), column],
                                     errors="coerce").tolist())


# ----------------------------------------------------------------------------- findings


def findings_table(runs: pd.DataFrame, best: pd.DataFrame) -> pd.DataFrame:
  """Per (condition, optimizer): stability over the sweep, and the best lr's numbers.

  Losses at the best lr come with their 95% t interval half-width (``*_ci95``) and the number
  of completed seeds; the other measures are means over those seeds.
  """
  split_col = report_column(runs)
  out = []
  for _, b in best.iterrows():
    cond, opt = b["condition"], b["optimizer"]
    g = runs[(runs["condition"] == cond) & (runs["optimizer"] == opt)]
    row = {
        "condition": cond, "optimizer": opt,
        "best_lr": b["best_lr"] if np.isfinite(b["best_lr"]) else None,
        "best_lr_multiplier": b["best_lr_multiplier"], "lr_at_grid_edge": b["at_grid_edge"],
        "bracketed": bool(b["bracketed"]), "unbracketed_side": b["unbracketed_side"],
        "num_lrs": int(b["num_lrs"]),
        "runs": len(g), "completed": int((g["status"] == "completed").sum()),
        "diverged": int((g["status"] == "diverged").sum()),
        "failed": int((g["status"] == "failed").sum()),
        "missing": int((g["status"] == "missing").sum()),
        "unfinished": int((~g["status"].isin(FINISHED + UNSTABLE + ("missing",))).sum()),
        "diverged_lrs": " ".join(rundir.lr_str(x) for x in sorted(
            g.loc[g["status"] == "diverged", "learning_rate"].unique())),
        "spikes_sweep": int(g["loss_spikes"].fillna(0).sum()) if "loss_spikes" in g else 0,
        "report_split": "test" if split_col == TEST_COLUMN else "validation",
    }
    gb = at_best_lr(runs, best, cond, opt)
    done = gb[gb["status"].isin(FINISHED)]
    row["seeds"] = len(done)
    row["unstable_at_best_lr"] = int(gb["status"].isin(UNSTABLE).sum())
    row["spikes_best_lr"] = int(gb["loss_spikes"].fillna(0).sum()) if len(gb) else None
    for name, col in (("final_loss", split_col), ("val_loss", SELECTION_COLUMN)):
      ci = best_lr_ci(runs, best, cond, opt, col)
      row[name], row[f"{name}_ci95"], row[f"{name}_n"] = ci.mean, ci.half_width, ci.n
    for col, new in (("final_train_loss", "final_train_loss"),
                     (TRAIN_GAP_COLUMN, TRAIN_GAP_COLUMN),
                     ("num_params", "num_params"), ("tokens_seen", "tokens_seen"),
                     ("best_eval_loss", "best_eval_loss"),
                     ("frequent_token_loss", "frequent_token_loss"),
                     ("rare_token_loss", "rare_token_loss"),
                     ("recovery_steps_mean", "recovery_steps"),
                     ("shift_loss_jump_mean", "shift_loss_jump"),
                     *[(m, m) for m in measures.STALENESS_METRICS +
                       measures.HETEROGENEITY_METRICS + other_split_columns(runs)]):
      row[new] = _mean(done[col]) if col in done else None
    row["shifts_seen"] = int(done["shifts_seen"].fillna(0).sum()) if len(done) else 0
    row["shifts_recovered"] = int(done["shifts_recovered"].fillna(0).sum()) if len(done) else 0
    if row["rare_token_loss"] is not None and row["frequent_token_loss"] is not None:
      row["rare_minus_frequent"] = row["rare_token_loss"] - row["frequent_token_loss"]
    else:
      row["rare_minus_frequent"] = None
    out.append(row)
  return pd.DataFrame(out)


def comparisons_table(runs: pd.DataFrame, best: pd.DataFrame, condition: str,
                      optimizers: Sequence[str]) -> pd.DataFrame:
  """Every pair of optimizers of a condition on the reported loss at their best lrs.

  ``verdict``: 'lower' / 'higher' (a's 95% interval entirely below / above b's), 'tie'
  (overlapping intervals), or 'no interval' (fewer than 2 completed seeds on a side).
  ``paired_verdict``: the same on the paired difference. A seed fixes the initial parameters
  and the data order for every optimizer, so the per-seed differences d_s = loss_a(s) -
  loss_b(s) over the seeds both completed remove the seed's share of the variance; ``paired``
  is mean(d) with its 95% t interval, and the verdict is 'lower' / 'higher' when the interval
  lies below / above 0, else 'tie' ('no interval' with fewer than 2 common seeds).
  """
  col = report_column(runs)
  cis = {o: best_lr_ci(runs, best, condition, o, col) for o in optimizers}
  rows = []
  for i, a in enumerate(optimizers):
    for b in optimizers[i + 1:]:
      if cis[a].mean is None or cis[b].mean is None:
        continue
      d = paired_ci(runs, best, condition, a, b, col)
      rows.append({"condition": condition, "a": a, "b": b, "a_loss": cis[a].format(),
                   "b_loss": cis[b].format(),
                   "verdict": stats.compare(cis[a], cis[b]) or "no interval",
                   "paired": d.format(), "paired_verdict": paired_verdict(d) or "no interval"})
  return pd.DataFrame(rows, columns=["condition", "a", "b", "a_loss", "b_loss", "verdict",
                                     "paired", "paired_verdict"])


def paired_ci(runs: pd.DataFrame, best: pd.DataFrame, condition: str, a: str, b: str,
              column: str) -> stats.MeanCI:
  """Mean ± 95% t interval of loss_a(s) - loss_b(s) over the seeds s both completed at their
  best lrs (see ``comparisons_table``)."""
  la, lb = (_per_seed(runs, best, condition, o, column) for o in (a, b))
  return stats.mean_ci([la[s] - lb[s] for s in sorted(set(la) & set(lb))])


def paired_verdict(d: stats.MeanCI) -> Optional[str]:
  """'lower' / 'higher' when ``d``'s interval lies below / above 0, 'tie', or None (no
  interval)."""
  return stats.compare(d, stats.MeanCI(0.0, 0.0, 2))  # a point at 0


def _per_seed(runs, best, condition, optimizer, column) -> dict[int, float]:
  """seed -> finite ``column`` of the completed runs of (condition, optimizer) at its best lr."""
  g = at_best_lr(runs, best, condition, optimizer)
  g = g[g["status"].isin(FINISHED)]
  values = pd.to_numeric(g[column], errors="coerce")
  return {int(s): float(v) for s, v in zip(g["seed"], values) if np.isfinite(v)}


def _mean(xs: Iterable) -> Optional[float]:
  vals = pd.to_numeric(pd.Series(list(xs), dtype=object), errors="coerce")
  vals = vals[np.isfinite(vals)]
  return float(vals.mean()) if len(vals) else None
