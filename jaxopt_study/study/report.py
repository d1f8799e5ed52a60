r"""Aggregates a study's run directories into ``results/``, ``plots/`` and ``REPORT.md``.

``make_report(study_dir)`` needs neither JAX nor the data pipeline: it reads

* ``study_dir/study.json`` (written by :mod:`.runner`; optional): the expected runs, the
  conditions (with their shift steps and token-frequency buckets) and the report settings;
* every run directory ``runs/<condition>/<optimizer>/lr=<lr>/seed=<seed>/`` with its
  ``results.json`` (final numbers, status) and ``metrics.jsonl`` (per-step scalars; a resumed run
  may repeat a step: the last record of each (step, name) wins).

A run listed in study.json with no results.json is *missing*; a run whose results.json says
``diverged`` / ``failed`` is kept and marked. Nothing is hand-written: every number in REPORT.md
is computed here from those files.

Definitions (all settings live in study.json's ``report`` block, defaults in
:data:`DEFAULT_SETTINGS`):

* **Loss spike** (the rule Levanter and MaxText use): a logged train loss ``L_s`` with
  ``L_s > mean(W) + num_sigma * std(W)``, where W = the finite losses logged at the
  ``window`` steps before s (steps ``[s - window, s)``, population std), counted only when W
  holds at least ``min_history`` points. Defaults: window 128, num_sigma 6.
* **Best learning rate** of (condition, optimizer): the lr whose seeds have the lowest share of
  runs that did not complete (diverged/failed), then the lowest mean final loss (eval loss, or
  train loss where a run has no eval) over its completed seeds. Missing / unfinished runs are
  ignored; an lr with no completed run cannot be best (all diverged: no best lr).
* **Rare vs frequent loss**: from ``eval_loss_by_frequency`` (bucket 00 = most frequent target
  tokens, the last = rarest; equal-mass buckets by default): mean of the ``frequent_buckets``
  first buckets and of the ``rare_buckets`` last non-empty ones.
* **Adaptation after a shift** at step S (metrics step s = steps done, so the loss logged at s
  was computed on batch s - 1; batches >= S are shifted, i.e. logged steps > S): the pre-shift
  level is the mean train loss logged at steps in ``(S - pre_window, S]``; the post-shift curve
  is smoothed by a trailing mean over ``smooth`` steps; recovery = the first logged step s > S
  (before the next shift) with smoothed loss <= pre-level * (1 + tolerance); steps to recover
  = s - S. None when it never recovers before the next shift / the end.
* **Staleness**: the ``aging/*`` diagnostics averaged over the last ``tail_fraction`` of the run.
"""

from __future__ import annotations

import dataclasses
import datetime
import glob
import json
import math
import os
import re
from typing import Any, Iterable, Optional, Sequence

import numpy as np
import pandas as pd

from jaxopt_study import rundir
from jaxopt_study.rundir import lr_str, read_json, run_relpath  # noqa: F401

STUDY_FILE = "study.json"

# Statuses a run can have in the report. 'missing' = expected by study.json, no results.json.
FINISHED = ("completed",)
UNSTABLE = ("diverged", "failed")

DEFAULT_SETTINGS = {
    "spike_window": 128,  # steps of history for the spike rule (Levanter / MaxText)
    "spike_sigma": 6.0,  # a spike is above mean + spike_sigma * std of that history
    "spike_min_history": 8,  # logged points the history must hold before a spike can count
    "shift_pre_window": 20,  # steps before a shift whose mean train loss is the pre-shift level
    "shift_smooth": 10,  # trailing-mean window (steps) of the post-shift train loss
    "shift_tolerance": 0.02,  # recovered when smoothed loss <= pre-level * (1 + tolerance)
    "rare_buckets": 1,  # last (rarest) non-empty frequency buckets averaged as 'rare' loss
    "frequent_buckets": 1,  # first (most frequent) buckets averaged as 'frequent' loss
    "tail_fraction": 0.25,  # staleness / final diagnostics: mean over the last 25% of the run
    "keep_param_metrics": False,  # keep '/param=' series (large) in scalars_long.csv
}

def read_metrics(path: str, keep_param_metrics: bool = False) -> Optional[pd.DataFrame]:
  """Wide DataFrame (index: step, one column per scalar) of a metrics.jsonl; None if absent.

  The last record of each (step, name) wins (a resumed run rewrites the steps it replays). A
  truncated last line (a run killed mid-write) is skipped.
  """
  if not os.path.exists(path):
    return None
  rows: dict[int, dict[str, float]] = {}
  with open(path) as f:
    for line in f:
      line = line.strip()
      if not line:
        continue
      try:
        rec = json.loads(line)
      except ValueError:
        continue
      if not isinstance(rec, dict) or "step" not in rec:
        continue
      step = int(rec.pop("step"))
      dst = rows.setdefault(step, {})
      for k, v in rec.items():
        if not keep_param_metrics and "/param=" in k:
          continue
        try:
          dst[k] = float(v)
        except (TypeError, ValueError):
          pass
  if not rows:
    return pd.DataFrame(index=pd.Index([], name="step", dtype=np.int64))
  df = pd.DataFrame.from_dict(rows, orient="index").sort_index()
  df.index = df.index.astype(np.int64)
  df.index.name = "step"
  return df


@dataclasses.dataclass
class Run:
  """One run of the study, as found on disk (or not)."""

  condition: str
  optimizer: str
  learning_rate: float
  seed: int
  relpath: str
  path: str
  lr_multiplier: Optional[float] = None
  status: str = "missing"
  results: dict = dataclasses.field(default_factory=dict)
  metrics: Optional[pd.DataFrame] = None
  config: Optional[dict] = None

  @property
  def tokens_per_step(self) -> Optional[int]:
    t = self.results.get("tokens_per_step")
    if t is None and self.config:
      try:
        t = int(self.config["batch_size"]) * int(self.config["seq_len"])
      except (KeyError, TypeError, ValueError):
        t = None
    return t

  @property
  def num_steps(self) -> Optional[int]:
    n = self.results.get("num_steps")
    if n is None and self.config:
      n = self.config.get("num_steps")
    return n

  def series(self, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of one scalar, NaN/inf dropped; empty arrays when absent."""
    if self.metrics is None or name not in self.metrics.columns:
      return np.zeros(0, np.int64), np.zeros(0)
    s = self.metrics[name].dropna()
    s = s[np.isfinite(s.values)]
    return s.index.values.astype(np.int64), s.values.astype(np.float64)

  def has(self, name: str) -> bool:
    return self.series(name)[0].size > 0

  def columns(self, prefix: str = "") -> list[str]:
    if self.metrics is None:
      return []
    return [c for c in self.metrics.columns if c.startswith(prefix)]


@dataclasses.dataclass
class Study:
  study_dir: str
  spec: dict
  runs: list[Run]
  settings: dict

  @property
  def conditions(self) -> list[str]:
    order = list(self.spec.get("conditions", {}))
    for r in self.runs:
      if r.condition not in order:
        order.append(r.condition)
    return order

  @property
  def optimizers(self) -> list[str]:
    order = list(self.spec.get("optimizers", []))
    for r in self.runs:
      if r.optimizer not in order:
        order.append(r.optimizer)
    return order

  def condition_info(self, condition: str) -> dict:
    return dict(self.spec.get("conditions", {}).get(condition, {}))

  def shift_steps(self, condition: str) -> list[int]:
    info = self.condition_info(condition)
    if "shift_steps" in info:
      return [int(s) for s in info["shift_steps"] or []]
    for r in self.runs:  # no study.json: derive from a run's resolved config
      if r.condition == condition and r.config:
        return shift_steps_from_config(r.config)
    return []

  def select(self, condition=None, optimizer=None, lr=None, seed=None) -> list[Run]:
    out = []
    for r in self.runs:
      if condition is not None and r.condition != condition:
        continue
      if optimizer is not None and r.optimizer != optimizer:
        continue
      if lr is not None and not math.isclose(r.learning_rate, lr, rel_tol=1e-6):
        continue
      if seed is not None and r.seed != seed:
        continue
      out.append(r)
    return out


def shift_steps_from_config(config: dict) -> list[int]:
  """Topic-boundary steps of the synthetic corpus's schedule (empty for none / other corpora).

  'switch': the topic changes at every multiple of shift_every; 'drift': the mixture reaches the
  next topic fully at those steps (the shift is gradual in between).
  """
  try:
    data = config["data"]
    syn = data.get("synthetic", {}) if isinstance(data, dict) else {}
    name = data.get("name", "synthetic")
    shift, every = syn.get("shift", "none"), int(syn.get("shift_every", 0))
    topics = int(syn.get("num_topics", 1))
    num_steps = int(config["num_steps"])
  except (KeyError, TypeError, ValueError, AttributeError):
    return []
  if name != "synthetic" or shift == "none" or every <= 0 or topics <= 1:
    return []
  return list(range(every, num_steps, every))


def load_study(study_dir: str, settings: Optional[dict] = None) -> Study:
  """Every expected run of study.json plus every run directory on disk, loaded."""
  study_dir = os.path.abspath(study_dir)
  spec = read_json(os.path.join(study_dir, STUDY_FILE)) or {}
  merged = dict(DEFAULT_SETTINGS)
  merged.update(spec.get("report", {}) or {})
  merged.update(settings or {})

  runs: dict[str, Run] = {}
  for entry in spec.get("runs", []):
    rel = entry.get("workdir") or run_relpath(
        entry["condition"], entry["optimizer"], entry["learning_rate"], entry["seed"])
    runs[rel] = Run(
        condition=entry["condition"], optimizer=entry["optimizer"],
        learning_rate=float(entry["learning_rate"]), seed=int(entry["seed"]), relpath=rel,
        path=os.path.join(study_dir, rel), lr_multiplier=entry.get("lr_multiplier"),
    )
  for d in sorted(glob.glob(os.path.join(study_dir, "runs", "*", "*", "lr=*", "seed=*"))):
    rel = os.path.relpath(d, study_dir).replace(os.sep, "/")
    ident = rundir.parse_run_relpath(rel)
    if not ident or rel in runs or not os.path.isdir(d):
      continue
    runs[rel] = Run(relpath=rel, path=d, **ident)

  for run in runs.values():
    res = read_json(os.path.join(run.path, rundir.RESULTS))
    if res is not None:
      run.results = res
      run.status = str(res.get("status", "unknown"))
    run.metrics = read_metrics(os.path.join(run.path, rundir.METRICS),
                               keep_param_metrics=merged["keep_param_metrics"])
    run.config = read_json(os.path.join(run.path, rundir.CONFIG))
    if res is None and run.metrics is not None and len(run.metrics):
      run.status = "running"  # started, no results yet (killed before its first results.json)
  return Study(study_dir, spec, list(runs.values()), merged)


# ----------------------------------------------------------------------------- measures


def count_loss_spikes(steps: Sequence[int], losses: Sequence[float], window: int = 128,
                      num_sigma: float = 6.0, min_history: int = 8) -> list[int]:
  """Steps whose loss exceeds mean + num_sigma * std of the losses of the preceding window.

  Args:
    steps: increasing logged steps.
    losses: the train loss at each step (non-finite values are never spikes nor history).
    window: history = losses logged at steps in [s - window, s).
    num_sigma: threshold in (population) standard deviations.
    min_history: fewer finite points in the history: no verdict at s.
  """
  steps = np.asarray(steps, np.int64)
  losses = np.asarray(losses, np.float64)
  finite = np.isfinite(losses)
  spikes = []
  for i in range(steps.size):
    if not finite[i]:
      continue
    lo = np.searchsorted(steps, steps[i] - window, side="left")
    hist = losses[lo:i][finite[lo:i]]
    if hist.size < min_history:
      continue
    if losses[i] > hist.mean() + num_sigma * hist.std():
      spikes.append(int(steps[i]))
  return spikes


def shift_recovery(steps: Sequence[int], losses: Sequence[float], shift_step: int, *,
                   pre_window: int = 20, smooth: int = 10, tolerance: float = 0.02,
                   until: Optional[int] = None) -> dict:
  """How the train loss reacts to a distribution shift at ``shift_step`` (module docstring).

  Returns:
    dict with pre_level (mean loss in (S - pre_window, S]), peak (max post-shift loss minus the
    pre-level, the jump), recovery_steps (int, or None if it never recovers before ``until``),
    and recovered (bool). Values are None when there is no data on one side of the shift.
  """
  steps = np.asarray(steps, np.int64)
  losses = np.asarray(losses, np.float64)
  ok = np.isfinite(losses)
  steps, losses = steps[ok], losses[ok]
  out = {"shift_step": int(shift_step), "pre_level": None, "peak": None,
         "recovery_steps": None, "recovered": False}
  pre = losses[(steps > shift_step - pre_window) & (steps <= shift_step)]
  post_mask = steps > shift_step
  if until is not None:
    post_mask &= steps <= until
  if pre.size == 0 or not post_mask.any():
    return out
  pre_level = float(pre.mean())
  out["pre_level"] = pre_level
  post_steps = steps[post_mask]
  out["peak"] = float(losses[post_mask].max() - pre_level)
  threshold = pre_level * (1.0 + tolerance) if pre_level >= 0 else pre_level * (1.0 - tolerance)
  for s in post_steps:
    # Trailing mean over the window (s - smooth, s], post-shift points only.
    win = losses[(steps > max(s - smooth, shift_step)) & (steps <= s)]
    if win.mean() <= threshold:
      out["recovery_steps"] = int(s - shift_step)
      out["recovered"] = True
      break
  return out


def frequency_losses(by_bucket: Optional[dict], rare_buckets: int = 1,
                     frequent_buckets: int = 1) -> tuple[Optional[float], Optional[float]]:
  """(frequent, rare) eval loss from {bucket: loss} (bucket 00 = most frequent)."""
  if not by_bucket:
    return None, None
  items = []
  for k, v in by_bucket.items():
    try:
      v = float(v)
    except (TypeError, ValueError):
      continue
    if math.isfinite(v):
      items.append((int(str(k).split("=")[-1]), v))
  if not items:
    return None, None
  items.sort()
  vals = [v for _, v in items]
  return float(np.mean(vals[:frequent_buckets])), float(np.mean(vals[-rare_buckets:]))


def run_final_loss(run: Run) -> Optional[float]:
  """Final eval loss, or final train loss for a run without eval."""
  for key in ("final_eval_loss", "final_train_loss"):
    v = run.results.get(key)
    if v is not None and isinstance(v, (int, float)) and math.isfinite(v):
      return float(v)
  return None


def tail_mean(run: Run, name: str, fraction: float = 0.25) -> Optional[float]:
  steps, vals = run.series(name)
  if steps.size == 0:
    return None
  total = run.num_steps or int(steps.max())
  sel = vals[steps >= total * (1.0 - fraction)]
  if sel.size == 0:
    sel = vals[-1:]
  return float(sel.mean())


def series_mean(run: Run, name: str) -> Optional[float]:
  steps, vals = run.series(name)
  return float(vals.mean()) if vals.size else None


def _mean(xs: Iterable[Optional[float]]) -> Optional[float]:
  xs = [x for x in xs if x is not None and math.isfinite(x)]
  return float(np.mean(xs)) if xs else None


def _std(xs: Iterable[Optional[float]]) -> Optional[float]:
  xs = [x for x in xs if x is not None and math.isfinite(x)]
  return float(np.std(xs)) if len(xs) > 1 else None


def run_row(run: Run, study: Study) -> dict:
  """One tidy row of runs.csv: identity, status, final numbers and derived measures."""
  st = study.settings
  res = run.results
  row = {
      "condition": run.condition, "optimizer": run.optimizer,
      "learning_rate": run.learning_rate, "lr_multiplier": run.lr_multiplier,
      "seed": run.seed, "status": run.status, "workdir": run.relpath,
      "steps_done": res.get("steps_done"), "num_steps": run.num_steps,
      "tokens_seen": res.get("tokens_seen"), "diverged_at_step": res.get("diverged_at_step"),
      "final_train_loss": res.get("final_train_loss"),
      "final_eval_loss": res.get("final_eval_loss"),
      "final_eval_perplexity": res.get("final_eval_perplexity"),
      "final_loss": run_final_loss(run),
      "tokens_per_second": res.get("tokens_per_second"),
      "num_params": res.get("num_params"), "error": res.get("error"),
  }
  steps, loss = run.series("train/loss")
  spikes = count_loss_spikes(steps, loss, st["spike_window"], st["spike_sigma"],
                             st["spike_min_history"])
  row["loss_spikes"] = len(spikes) if steps.size else None
  row["spike_steps"] = " ".join(map(str, spikes))
  e_steps, e_loss = run.series("eval/loss")
  row["best_eval_loss"] = float(e_loss.min()) if e_loss.size else row["final_eval_loss"]
  row["best_train_loss"] = float(loss.min()) if loss.size else None
  freq, rare = frequency_losses(res.get("eval_loss_by_frequency"), st["rare_buckets"],
                                st["frequent_buckets"])
  row["frequent_token_loss"], row["rare_token_loss"] = freq, rare
  shifts = study.shift_steps(run.condition)
  recs = []
  for i, s in enumerate(shifts):
    until = shifts[i + 1] if i + 1 < len(shifts) else None
    rec = shift_recovery(steps, loss, s, pre_window=st["shift_pre_window"],
                         smooth=st["shift_smooth"], tolerance=st["shift_tolerance"], until=until)
    if rec["pre_level"] is not None and rec["peak"] is not None:
      recs.append(rec)
  row["shifts_seen"] = len(recs)
  row["shifts_recovered"] = sum(r["recovered"] for r in recs)
  row["recovery_steps_mean"] = _mean(r["recovery_steps"] for r in recs if r["recovered"])
  row["shift_loss_jump_mean"] = _mean(r["peak"] for r in recs)
  frac = st["tail_fraction"]
  for name in STALENESS_METRICS + HETEROGENEITY_METRICS:
    row[name] = tail_mean(run, name, frac) if name in STALENESS_METRICS else series_mean(run, name)
  return row


# Global (not per-kind/layer) aging metrics reported as staleness of the moments.
STALENESS_METRICS = [
    "aging/log_staleness_q50",  # log(nu / s_hat), median entry (second moment only)
    "aging/nu_mass_older_than_H",  # share of nu's mass on entries idle >= H steps
    "aging/mu_mass_older_than_H",  # the same for the first moment
    "aging/emb_row_log_staleness_mean",  # embedding rows' log staleness (second moment)
    "aging/age_q90",  # 90th percentile of steps since an entry's last gradient
]
HETEROGENEITY_METRICS = [
    "heterogeneity/grad_norm_cv",  # CV of per-tensor gradient norms (arXiv 2502.00213)
    "heterogeneity/step_size_cv",  # CV of per-tensor |u|/|g|
]


def runs_table(study: Study) -> pd.DataFrame:
  rows = [run_row(r, study) for r in study.runs]
  cols = list(rows[0]) if rows else ["condition", "optimizer", "learning_rate", "seed", "status"]
  df = pd.DataFrame(rows, columns=cols)
  if len(df):
    df["_c"] = df["condition"].map({c: i for i, c in enumerate(study.conditions)})
    df["_o"] = df["optimizer"].map({o: i for i, o in enumerate(study.optimizers)})
    df = df.sort_values(["_c", "_o", "learning_rate", "seed"]).drop(columns=["_c", "_o"])
    df = df.reset_index(drop=True)
  return df


def select_best_lr(runs: pd.DataFrame) -> pd.DataFrame:
  """Best learning rate per (condition, optimizer): see the module docstring.

  Args:
    runs: a runs table with condition, optimizer, learning_rate, lr_multiplier, seed, status,
      final_loss.

  Returns:
    one row per (condition, optimizer) with best_lr (NaN when no lr has a finished run),
    best_lr_multiplier, best_loss (mean over its completed seeds), num_lrs, at_grid_edge.
  """
  out = []
  for (cond, opt), g in runs.groupby(["condition", "optimizer"], sort=False):
    lrs = sorted(g["learning_rate"].unique())
    cands = []
    for lr, gl in g.groupby("learning_rate"):
      done = gl[gl["status"].isin(FINISHED)]
      bad = gl[gl["status"].isin(UNSTABLE)]
      scored = done["final_loss"].dropna()
      if scored.empty:  # no finished run with a loss: cannot be best
        continue
      bad_share = len(bad) / (len(done) + len(bad))
      loss = float(scored.mean()) if len(scored) else math.inf
      mult = gl["lr_multiplier"].dropna()
      cands.append((bad_share, loss, lr, float(mult.iloc[0]) if len(mult) else None))
    row = {"condition": cond, "optimizer": opt, "num_lrs": len(lrs), "best_lr": math.nan,
           "best_lr_multiplier": None, "best_loss": None, "at_grid_edge": None}
    if cands:
      bad_share, loss, lr, mult = min(cands)
      row.update(best_lr=lr, best_lr_multiplier=mult,
                 best_loss=loss if math.isfinite(loss) else None,
                 at_grid_edge=len(lrs) > 1 and lr in (lrs[0], lrs[-1]))
    out.append(row)
  return pd.DataFrame(out, columns=["condition", "optimizer", "num_lrs", "best_lr",
                                    "best_lr_multiplier", "best_loss", "at_grid_edge"])


def best_lr_of(best: pd.DataFrame, condition: str, optimizer: str) -> Optional[float]:
  sel = best[(best["condition"] == condition) & (best["optimizer"] == optimizer)]
  if sel.empty or not np.isfinite(sel["best_lr"].iloc[0]):
    return None
  return float(sel["best_lr"].iloc[0])


def findings_table(runs: pd.DataFrame, best: pd.DataFrame) -> pd.DataFrame:
  """Per (condition, optimizer): stability over the sweep, and the best lr's numbers."""
  out = []
  for _, b in best.iterrows():
    g = runs[(runs["condition"] == b["condition"]) & (runs["optimizer"] == b["optimizer"])]
    row = {
        "condition": b["condition"], "optimizer": b["optimizer"],
        "best_lr": b["best_lr"] if np.isfinite(b["best_lr"]) else None,
        "best_lr_multiplier": b["best_lr_multiplier"], "lr_at_grid_edge": b["at_grid_edge"],
        "runs": len(g), "completed": int((g["status"] == "completed").sum()),
        "diverged": int((g["status"] == "diverged").sum()),
        "failed": int((g["status"] == "failed").sum()),
        "missing": int((g["status"] == "missing").sum()),
        "unfinished": int((~g["status"].isin(("completed", "diverged", "failed", "missing"))).sum()),
        "diverged_lrs": " ".join(lr_str(x) for x in sorted(
            g.loc[g["status"] == "diverged", "learning_rate"].unique())),
        "spikes_sweep": int(g["loss_spikes"].fillna(0).sum()),
    }
    gb = g[np.isclose(g["learning_rate"], b["best_lr"])] if row["best_lr"] else g.iloc[0:0]
    done = gb[gb["status"] == "completed"]
    row["seeds"] = len(done)
    row["spikes_best_lr"] = int(gb["loss_spikes"].fillna(0).sum()) if len(gb) else None
    for col, new in (("final_loss", "final_loss"), ("final_eval_loss", "final_eval_loss"),
                     ("final_train_loss", "final_train_loss"),
                     ("best_eval_loss", "best_eval_loss"),
                     ("frequent_token_loss", "frequent_token_loss"),
                     ("rare_token_loss", "rare_token_loss"),
                     ("recovery_steps_mean", "recovery_steps"),
                     ("shift_loss_jump_mean", "shift_loss_jump"),
                     *[(m, m) for m in STALENESS_METRICS + HETEROGENEITY_METRICS]):
      vals = pd.to_numeric(done[col], errors="coerce") if col in done else pd.Series([])
      row[new] = _mean(vals.tolist())
    row["final_loss_std"] = _std(pd.to_numeric(done["final_loss"], errors="coerce").tolist())
    seen = int(done["shifts_seen"].fillna(0).sum()) if len(done) else 0
    row["shifts_seen"], row["shifts_recovered"] = seen, (
        int(done["shifts_recovered"].fillna(0).sum()) if len(done) else 0)
    if row["rare_token_loss"] is not None and row["frequent_token_loss"] is not None:
      row["rare_minus_frequent"] = row["rare_token_loss"] - row["frequent_token_loss"]
    else:
      row["rare_minus_frequent"] = None
    out.append(row)
  return pd.DataFrame(out)


def scalars_long(study: Study) -> pd.DataFrame:
  """Long format: condition, optimizer, learning_rate, seed, step, tokens, metric, value."""
  frames = []
  for r in study.runs:
    if r.metrics is None or r.metrics.empty:
      continue
    m = r.metrics.reset_index().melt(id_vars="step", var_name="metric", value_name="value")
    m = m.dropna(subset=["value"])
    tps = r.tokens_per_step
    m.insert(0, "seed", r.seed)
    m.insert(0, "learning_rate", r.learning_rate)
    m.insert(0, "optimizer", r.optimizer)
    m.insert(0, "condition", r.condition)
    m.insert(5, "tokens", m["step"] * tps if tps else np.nan)
    frames.append(m)
  cols = ["condition", "optimizer", "learning_rate", "seed", "step", "tokens", "metric", "value"]
  if not frames:
    return pd.DataFrame(columns=cols)
  return pd.concat(frames, ignore_index=True)[cols]


# ----------------------------------------------------------------------------- literature


ADAM_FAMILY = ("adamw", "adafactor")


def literature_checks(study: Study, findings: pd.DataFrame, runs: pd.DataFrame) -> list[dict]:
  """Each claim from the literature with the measured numbers and a verdict (computed)."""
  checks = []
  primary = study.conditions[0] if study.conditions else None
  f = findings[findings["condition"] == primary] if primary else findings.iloc[0:0]
  loss = {r["optimizer"]: r["final_loss"] for _, r in f.iterrows()}
  lr = {r["optimizer"]: r["best_lr"] for _, r in f.iterrows()}
  edge = {r["optimizer"]: r["lr_at_grid_edge"] for _, r in f.iterrows()}

  # 1. Adam-family beats SGD on transformers (Zhang et al. 2020; Kunstner et al. 2023/2024).
  claim = "Adam-family (AdamW, Adafactor) reaches a lower loss than SGD-momentum on transformers"
  sgd = loss.get("sgd_momentum")
  adam = {o: loss.get(o) for o in ADAM_FAMILY if loss.get(o) is not None}
  if sgd is None or not adam:
    checks.append({"claim": claim, "measured": "not measured (missing runs)", "verdict": "n/a"})
  else:
    wins = [o for o, v in adam.items() if v < sgd]
    measured = ", ".join(f"{o} {v:.3f}" for o, v in adam.items()) + f" vs sgd_momentum {sgd:.3f}"
    verdict = ("agrees" if len(wins) == len(adam) else
               "partly agrees" if wins else "disagrees")
    checks.append({"claim": claim, "measured": f"final loss at best lr ({primary}): {measured}",
                   "verdict": verdict})

  # 2. Lion needs a 3-10x smaller lr than AdamW (Chen et al. 2023).
  claim = "Lion's best learning rate is 3-10x smaller than AdamW's"
  nlrs = {r["optimizer"]: r.get("num_lrs") for _, r in best_rows(study, runs, primary).iterrows()}
  if lr.get("lion") and lr.get("adamw") and min(nlrs.get("lion") or 1, nlrs.get("adamw") or 1) < 2:
    checks.append({"claim": claim,
                   "measured": "not measured: a single learning rate per optimizer (the ratio "
                               "would only be the configured defaults')", "verdict": "n/a"})
  elif lr.get("lion") and lr.get("adamw"):
    ratio = lr["adamw"] / lr["lion"]
    note = ""
    if edge.get("lion") or edge.get("adamw"):
      note = " (a best lr at the edge of its grid: the true optimum may lie outside)"
    verdict = "agrees" if 3.0 - 1e-6 <= ratio <= 10.0 + 1e-6 else "disagrees"
    checks.append({
        "claim": claim,
        "measured": f"best lr adamw {lr_str(lr['adamw'])} / lion {lr_str(lr['lion'])} = "
                    f"{ratio:.2f}x{note}",
        "verdict": verdict + ("?" if note else "")})
  else:
    checks.append({"claim": claim, "measured": "not measured (missing runs)", "verdict": "n/a"})

  # 3. Post-LN raises gradient heterogeneity (arXiv 2502.00213).
  claim = "Post-LN raises gradient heterogeneity (CV of per-tensor gradient norms) over pre-LN"
  pairs = _ln_pairs(study)
  name = "heterogeneity/grad_norm_cv"
  if not pairs:
    checks.append({"claim": claim, "measured": "not measured (no pre/post-LN condition pair)",
                   "verdict": "n/a"})
  else:
    pre_c, post_c = pairs[0]
    diffs, parts = [], []
    for opt in study.optimizers:
      a = runs[(runs["condition"] == pre_c) & (runs["optimizer"] == opt)]
      b = runs[(runs["condition"] == post_c) & (runs["optimizer"] == opt)]
      m = a.merge(b, on=["learning_rate", "seed"], suffixes=("_pre", "_post"))
      m = m[[f"{name}_pre", f"{name}_post"]].apply(pd.to_numeric, errors="coerce").dropna()
      if len(m):
        pre_v, post_v = float(m[f"{name}_pre"].mean()), float(m[f"{name}_post"].mean())
        diffs.append(post_v > pre_v)
        parts.append(f"{opt} {pre_v:.2f} -> {post_v:.2f}")
    if not diffs:
      checks.append({"claim": claim, "measured": "no heterogeneity metrics in the runs",
                     "verdict": "n/a"})
    else:
      k = sum(diffs)
      verdict = "agrees" if k == len(diffs) else ("partly agrees" if k else "disagrees")
      checks.append({"claim": claim,
                     "measured": f"mean CV {pre_c} -> {post_c}: " + "; ".join(parts)
                                 + f" (higher under post-LN for {k}/{len(diffs)} optimizers)",
                     "verdict": verdict})
  return checks


def best_rows(study: Study, runs: pd.DataFrame, condition: Optional[str]) -> pd.DataFrame:
  """select_best_lr's rows of one condition."""
  if condition is None or runs.empty:
    return pd.DataFrame(columns=["optimizer", "num_lrs"])
  return select_best_lr(runs[runs["condition"] == condition])


def _ln_pairs(study: Study) -> list[tuple[str, str]]:
  """(pre-LN condition, post-LN condition) pairs that differ only in ln_position."""
  ln = {}
  for c in study.conditions:
    info = study.condition_info(c)
    pos = info.get("ln_position")
    if pos is None:
      runs = [r for r in study.runs if r.condition == c and r.config]
      pos = runs[0].config.get("model", {}).get("ln_position") if runs else None
    ln[c] = (pos, {k: v for k, v in (info.get("overrides") or {}).items()
                   if k != "model.ln_position"})
  pairs = []
  for a, (pa, oa) in ln.items():
    for b, (pb, ob) in ln.items():
      if pa == "pre" and pb == "post" and oa == ob:
        pairs.append((a, b))
  return pairs


# ----------------------------------------------------------------------------- writing


def _fmt(v, digits=3) -> str:
  if v is None or (isinstance(v, float) and not math.isfinite(v)):
    return "–"
  if isinstance(v, (bool, np.bool_)):
    return "yes" if v else "no"
  if isinstance(v, (int, np.integer)):
    return str(int(v))
  if isinstance(v, (float, np.floating)):
    v = float(v)
    if v != 0 and (abs(v) < 1e-2 or abs(v) >= 1e4):
      return f"{v:.{digits - 1}e}"
    return f"{v:.{digits}f}"
  return str(v)


def _int(v) -> str:
  v = pd.to_numeric(v, errors="coerce")
  return "–" if v is None or not np.isfinite(v) else str(int(round(float(v))))


def _md_table(headers: list[str], rows: list[list[Any]]) -> str:
  lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
  for r in rows:
    lines.append("| " + " | ".join(_fmt(x) if not isinstance(x, str) else x for x in r) + " |")
  return "\n".join(lines)


def _jsonable(obj):
  if isinstance(obj, dict):
    return {str(k): _jsonable(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [_jsonable(v) for v in obj]
  if isinstance(obj, (np.integer,)):
    return int(obj)
  if isinstance(obj, (np.floating, float)):
    return float(obj) if math.isfinite(float(obj)) else None
  if isinstance(obj, np.bool_):
    return bool(obj)
  return obj


def _records(df: pd.DataFrame) -> list[dict]:
  return _jsonable(df.astype(object).where(pd.notna(df), None).to_dict(orient="records"))


def make_report(study_dir: str, settings: Optional[dict] = None) -> str:
  """Writes results/, plots/ and REPORT.md into ``study_dir``; returns REPORT.md's path."""
  from jaxopt_study.study import plots  # pylint: disable=g-import-not-at-top

  study = load_study(study_dir, settings)
  results_dir = os.path.join(study.study_dir, "results")
  plots_dir = os.path.join(study.study_dir, "plots")
  os.makedirs(results_dir, exist_ok=True)
  os.makedirs(plots_dir, exist_ok=True)

  runs = runs_table(study)
  best = select_best_lr(runs) if len(runs) else select_best_lr(
      pd.DataFrame(columns=["condition", "optimizer", "learning_rate", "lr_multiplier", "seed",
                            "status", "final_loss"]))
  findings = findings_table(runs, best)
  checks = literature_checks(study, findings, runs)

  runs.to_csv(os.path.join(results_dir, "runs.csv"), index=False)
  findings.to_csv(os.path.join(results_dir, "findings.csv"), index=False)
  best.to_csv(os.path.join(results_dir, "best_lr.csv"), index=False)
  with open(os.path.join(results_dir, "results.json"), "w") as f:
    json.dump({"runs": _records(runs), "best_lr": _records(best),
               "findings": _records(findings), "literature": checks,
               "settings": _jsonable(study.settings)}, f, indent=1)
  scalars_long(study).to_csv(os.path.join(results_dir, "scalars_long.csv"), index=False)

  figures = plots.make_all(study, best, runs, plots_dir)
  text = render_markdown(study, runs, best, findings, checks, figures)
  path = os.path.join(study.study_dir, "REPORT.md")
  with open(path, "w") as f:
    f.write(text)
  return path


def render_markdown(study: Study, runs: pd.DataFrame, best: pd.DataFrame,
                    findings: pd.DataFrame, checks: list[dict], figures: list) -> str:
  spec, st = study.spec, study.settings
  name = spec.get("name") or os.path.basename(study.study_dir.rstrip("/"))
  out = [f"# Optimizer study: {name}", ""]
  out.append(f"Generated {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')} by "
             "`jaxopt_study.study.report.make_report` from the run directories; every number "
             "below is computed from `results.json` / `metrics.jsonl`.")
  out.append("")
  if spec.get("command"):
    out += ["Command:", "", "```", spec["command"], "```", ""]
  # Setup.
  setup = spec.get("setup", {})
  if setup or spec.get("optimizers"):
    out.append("## Setup")
    out.append("")
    items = [
        ("preset", spec.get("preset")),
        ("optimizers", ", ".join(spec.get("optimizers", []))),
        ("seeds", ", ".join(map(str, spec.get("seeds", [])))),
        ("lr multipliers", ", ".join(f"{x:.3g}" for x in spec.get("lr_multipliers", []))),
        ("token budget per run", spec.get("token_budget")),
        ("steps per run", spec.get("num_steps")),
        ("tokens per step", spec.get("tokens_per_step")),
    ] + list(setup.items())
    for k, v in items:
      if v not in (None, "", []):
        out.append(f"- **{k}**: {v}")
    if spec.get("conditions"):
      out.append("- **conditions**:")
      for c, info in spec["conditions"].items():
        ov = info.get("overrides") or {}
        desc = ", ".join(f"`{k}={v}`" for k, v in ov.items()) or "the base config"
        sh = info.get("shift_steps") or []
        shs = f"; shifts at steps {', '.join(map(str, sh))}" if sh else ""
        out.append(f"  - `{c}`: {desc}{shs}")
    out.append("")

  # Run status.
  out.append("## Runs")
  out.append("")
  counts = runs["status"].value_counts().to_dict() if len(runs) else {}
  out.append(f"{len(runs)} runs: " + (", ".join(f"{v} {k}" for k, v in counts.items()) or
                                      "none found") + ".")
  walls = [r.get("wall_s") for r in spec.get("runs", []) if r.get("wall_s") is not None]
  if walls:
    out.append(f"Training wall time: {sum(walls) / 60:.1f} min over {len(walls)} runs "
               f"(study.json, {spec.get('created', '?')} to {spec.get('updated', '?')}); "
               f"tokens/s per run: see the last table.")
  odd = runs[runs["status"] != "completed"] if len(runs) else runs
  if len(odd):
    out += ["", "Runs that did not complete (kept in every table and marked):", ""]
    rows = []
    for _, r in odd.iterrows():
      detail = ""
      if r["status"] == "diverged":
        at = pd.to_numeric(r["diverged_at_step"], errors="coerce")
        detail = f"non-finite loss at step {int(at) if np.isfinite(at) else '?'}"
      elif r["status"] == "failed":
        detail = str(r.get("error") or "")[:120].replace("|", "/").replace("\n", " ")
      elif r["status"] == "missing":
        detail = "no results.json"
      else:
        detail = f"{_int(r['steps_done'])} / {_int(r['num_steps'])} steps"
      rows.append([r["condition"], r["optimizer"], lr_str(r["learning_rate"]), r["seed"],
                   f"**{r['status']}**", detail])
    out.append(_md_table(["condition", "optimizer", "lr", "seed", "status", "detail"], rows))
  out.append("")

  # Findings.
  out.append("## Findings")
  out.append("")
  out.append(
      "Per optimizer at its best learning rate (mean over completed seeds). *Stability*: "
      "diverged runs over the whole lr sweep, and loss spikes (train loss above mean + "
      f"{_fmt(st['spike_sigma'], 1)} sigma of the preceding {st['spike_window']} steps) at the "
      "best lr / over the sweep. *Rare / frequent*: final eval loss on the rarest / most "
      "frequent token-frequency bucket. *Recovery*: steps until the train loss is back within "
      f"{100 * st['shift_tolerance']:g}% of its pre-shift level (recovered shifts / shifts "
      "seen). *Staleness*: median log(nu / short EMA of g^2), and share of the momentum's mass "
      f"on entries idle for at least H steps (last {100 * st['tail_fraction']:g}% of training).")
  out.append("")
  for cond in study.conditions:
    f = findings[findings["condition"] == cond]
    if f.empty:
      continue
    out.append(f"### Condition `{cond}`")
    out.append("")
    rows = []
    for _, r in f.iterrows():
      lr = "–" if r["best_lr"] is None else lr_str(r["best_lr"])
      if r["best_lr_multiplier"] is not None and r["best_lr"] is not None:
        lr += f" (x{r['best_lr_multiplier']:.3g}{', grid edge' if r['lr_at_grid_edge'] else ''})"
      stab = f"{r['diverged']}/{r['runs']} diverged"
      if r["diverged_lrs"]:
        stab += f" (lr {r['diverged_lrs']})"
      if r["failed"]:
        stab += f", {r['failed']} failed"
      if r["missing"]:
        stab += f", {r['missing']} missing"
      spikes = f"{_fmt(r['spikes_best_lr'])} / {r['spikes_sweep']}"
      final = _fmt(r["final_loss"])
      if r["final_loss_std"] is not None:
        final += f" ± {_fmt(r['final_loss_std'])}"
      rec = "–"
      if r["shifts_seen"]:
        rec = f"{_fmt(r['recovery_steps'], 1)} ({r['shifts_recovered']}/{r['shifts_seen']})"
      rows.append([f"**{r['optimizer']}**", lr, stab, spikes, final,
                   _fmt(r["best_eval_loss"]),
                   f"{_fmt(r['rare_token_loss'])} / {_fmt(r['frequent_token_loss'])}",
                   rec, _fmt(r["shift_loss_jump"]),
                   _fmt(r["aging/log_staleness_q50"]), _fmt(r["aging/mu_mass_older_than_H"]),
                   _fmt(r["heterogeneity/grad_norm_cv"])])
    out.append(_md_table(
        ["optimizer", "best lr", "stability", "spikes (best lr / sweep)", "final loss",
         "best eval loss", "rare / frequent loss", "recovery steps", "shift loss jump",
         "nu staleness (log)", "mu mass idle >= H", "grad-norm CV"], rows))
    out.append("")

  # Literature.
  out.append("## Against the literature")
  out.append("")
  out.append(_md_table(["claim", "measured here", "verdict"],
                       [[c["claim"], c["measured"], f"**{c['verdict']}**"] for c in checks]))
  out.append("")

  notes = os.path.join(study.study_dir, "NOTES.md")
  if os.path.exists(notes):  # optional hand-written reading of the tables above (no numbers)
    with open(notes) as f:
      out += ["## Notes", "", f.read().strip(), ""]

  # Figures.
  out.append("## Figures")
  out.append("")
  for fig in figures:
    out.append(f"### {fig.title}")
    out.append("")
    out.append(fig.caption)
    out.append("")
    if fig.note:
      out.append(f"> **Data absent or partial:** {fig.note}")
      out.append("")
    rel = os.path.relpath(fig.path, study.study_dir).replace(os.sep, "/")
    out.append(f"![{fig.title}]({rel})")
    out.append("")

  # Sweep table.
  out.append("## Every run")
  out.append("")
  rows = []
  for _, r in runs.iterrows():
    mult = "–" if pd.isna(r["lr_multiplier"]) else f"{r['lr_multiplier']:.3g}"
    rows.append([r["condition"], r["optimizer"], lr_str(r["learning_rate"]), mult, r["seed"],
                 r["status"], _int(r["steps_done"]), _fmt(r["final_train_loss"]),
                 _fmt(r["final_eval_loss"]), _int(r["loss_spikes"]),
                 _int(r["tokens_per_second"])])
  out.append(_md_table(["condition", "optimizer", "lr", "x", "seed", "status", "steps",
                        "final train loss", "final eval loss", "spikes", "tokens/s"], rows))
  out.append("")
  out.append("Tables: `results/runs.csv` (every run), `results/findings.csv`, "
             "`results/best_lr.csv`, `results/results.json`; per-step scalars in long format: "
             "`results/scalars_long.csv`.")
  out.append("")
  return "\n".join(out)
