"""A study as found on disk: its settings, its runs (results.json + metrics.jsonl), study.json.

:func:`load_study` reads

* ``study_dir/study.json`` (written by :mod:`.runner`; optional): the expected runs, the
  conditions (with their shift steps and token-frequency buckets) and the report settings;
* every run directory ``runs/<condition>/<optimizer>/lr=<lr>/seed=<seed>/`` (see
  :mod:`jaxopt_study.rundir`) with its ``results.json`` and ``metrics.jsonl`` (a resumed run may
  repeat a step: the last record of each (step, name) wins);
* a run's layer scores, ``RUN/analysis/analysis.json`` (:mod:`jaxopt_study.analysis`), when
  it was analysed;
* for runs whose directory is absent, or holds just the archived results.json (seeded by
  ``runner.seed_from_archive``), the study's compact archive written beside each report,
  ``results/run_results.json``, ``results/scalars_long.parquet`` and
  ``results/layer_scores.json.gz``: a committed report is regenerated from those alone.

A run listed in study.json with neither is *missing*. Nothing here imports JAX.
"""

from __future__ import annotations

import dataclasses
import glob
import gzip
import json
import math
import os
from typing import Any, Mapping, Optional

import numpy as np
import pandas as pd

from jaxopt_study import rundir
from jaxopt_study.analysis import files as analysis_files

STUDY_FILE = "study.json"
SESSIONS_FILE = "sessions.json"  # each invocation of scripts/run_study.py: device, wall time
RESULTS_DIR = "results"
# The compact archive of every run (regenerates the report without the run directories).
ARCHIVE_RESULTS = "run_results.json"  # {relpath: results.json dict}
ARCHIVE_SCALARS = "scalars_long.parquet"  # long format (tables.scalars_long), zstd parquet
# The same table as gzipped CSV, as archives were written before parquet (read if present).
LEGACY_ARCHIVE_SCALARS = "scalars_long.csv.gz"
# {relpath: analysis.json dict} of the runs with layer scores (compact JSON, gzip).
ARCHIVE_LAYER_SCORES = "layer_scores.json.gz"

# Statuses a run can have in the report. 'missing' = expected by study.json, no results.json.
FINISHED = ("completed",)
UNSTABLE = ("diverged", "failed")


@dataclasses.dataclass(frozen=True)
class Settings:
  """The report's settings (configs/study.py's ``report`` block; these are the defaults)."""

  # Loss-spike rule (Levanter / MaxText): a logged train loss above mean + spike_sigma * std of
  # the losses logged in the spike_window steps before it, once that history holds at least
  # spike_min_history points.
  spike_window: int = 128
  spike_sigma: float = 6.0
  spike_min_history: int = 8
  shift_pre_window: int = 20  # Steps before a shift whose mean train loss is the pre-shift level.
  shift_smooth: int = 10  # Trailing-mean window (steps) of the post-shift train loss.
  shift_tolerance: float = 0.02  # Recovered when smoothed loss <= pre-level * (1 + tolerance).
  rare_buckets: int = 1  # Rarest non-empty frequency buckets averaged as the 'rare' loss.
  frequent_buckets: int = 1  # Most frequent buckets averaged as the 'frequent' loss.
  tail_fraction: float = 0.25  # Staleness metrics: mean over the last 25% of each run.
  keep_param_metrics: bool = False  # Keep '/param=' series (large) in the scalars archive.
  # A smoke test (the tiny preset) runs the machinery, not the protocol: its report states no
  # verdict and no comparison.
  smoke_test: bool = False

  @classmethod
  def from_dicts(cls, *overrides: Optional[Mapping[str, Any]]) -> "Settings":
    """Defaults updated by each mapping in turn; an unknown key is an error naming it."""
    names = {f.name for f in dataclasses.fields(cls)}
    kw = {}
    for o in overrides:
      for k, v in (o or {}).items():
        if k not in names:
          raise ValueError(f"report setting {k!r} is unknown (study.json 'report' block or "
                           f"config.report); valid: {sorted(names)}")
        kw[k] = v
    return cls(**kw)


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
  return _wide(rows)


def _wide(rows: dict[int, dict[str, float]]) -> pd.DataFrame:
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
  results: rundir.RunResults = dataclasses.field(default_factory=rundir.RunResults)
  metrics: Optional[pd.DataFrame] = None
  config: Optional[dict] = None
  analysis: Optional[dict] = None  # analysis.json (layer scores of the last checkpoint)

  @property
  def tokens_per_step(self) -> Optional[int]:
    t = self.results.tokens_per_step
    if t is None and self.config:
      try:
        t = int(self.config["batch_size"]) * int(self.config["seq_len"])
      except (KeyError, TypeError, ValueError):
        t = None
    return t

  @property
  def num_steps(self) -> Optional[int]:
    n = self.results.num_steps
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
  settings: Settings

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

  def baselines(self, condition: str) -> dict[str, float]:
    """The dataset's reference losses (results.json 'baselines') of the condition's runs."""
    for r in self.runs:
      if r.condition == condition and r.results.baselines:
        return {k: float(v) for k, v in r.results.baselines.items()
                if v is not None and math.isfinite(float(v))}
    return {}

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


def write_layer_scores(path: str, scores: Mapping[str, dict]) -> None:
  """Writes {relpath: analysis.json dict} as compact gzip JSON (atomically: temp + rename).

  The gzip header's time is 0, so the same scores give the same bytes (no churn in git)."""
  tmp = f"{path}.tmp"
  text = json.dumps(scores, separators=(",", ":"), sort_keys=True).encode()
  with open(tmp, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as f:
    f.write(text)
  os.replace(tmp, path)


def read_layer_scores(path: str) -> dict[str, dict]:
  """The archive :func:`write_layer_scores` wrote; {} when absent or unreadable."""
  try:
    with gzip.open(path, "rt") as f:
      scores = json.load(f)
  except (OSError, ValueError):
    return {}
  return scores if isinstance(scores, dict) else {}


def _read_archive(study_dir: str, keep_param_metrics: bool):
  """({relpath: results dict}, {relpath: wide metrics}, {relpath: analysis dict}) of results/'s
  archive (empty if none)."""
  results = rundir.read_json(os.path.join(study_dir, RESULTS_DIR, ARCHIVE_RESULTS)) or {}
  scores = read_layer_scores(os.path.join(study_dir, RESULTS_DIR, ARCHIVE_LAYER_SCORES))
  path = os.path.join(study_dir, RESULTS_DIR, ARCHIVE_SCALARS)
  legacy = os.path.join(study_dir, RESULTS_DIR, LEGACY_ARCHIVE_SCALARS)
  metrics = {}
  long = (pd.read_parquet(path) if os.path.exists(path) else
          pd.read_csv(legacy) if os.path.exists(legacy) else None)
  if long is not None:
    long = long.astype({"workdir": str, "metric": str})
    if not keep_param_metrics:
      long = long[~long["metric"].str.contains("/param=", regex=False)]
    for rel, g in long.groupby("workdir", sort=False):
      wide = g.pivot_table(index="step", columns="metric", values="value", aggfunc="last")
      wide.columns.name = None
      metrics[rel] = _wide({int(s): row.dropna().to_dict() for s, row in wide.iterrows()})
  return results, metrics, scores


def load_study(study_dir: str, settings: Optional[Mapping[str, Any]] = None) -> Study:
  """Every expected run of study.json plus every run directory on disk (or archived), loaded.

  Args:
    study_dir: the study's workdir.
    settings: overrides of the report settings (:class:`Settings` field names); on top of
      study.json's 'report' block, itself on top of the defaults.
  """
  study_dir = os.path.abspath(study_dir)
  spec = rundir.read_json(os.path.join(study_dir, STUDY_FILE)) or {}
  merged = Settings.from_dicts(spec.get("report"), settings)

  runs: dict[str, Run] = {}
  for entry in spec.get("runs", []):
    rel = entry.get("workdir") or rundir.run_relpath(
        entry["condition"], entry["optimizer"], entry["learning_rate"], entry["seed"])
    runs[rel] = Run(
        condition=entry["condition"], optimizer=entry["optimizer"],
        learning_rate=float(entry["learning_rate"]), seed=int(entry["seed"]), relpath=rel,
        path=os.path.join(study_dir, rel), lr_multiplier=entry.get("lr_multiplier"),
    )
  archived_results, archived_metrics, archived_scores = _read_archive(
      study_dir, merged.keep_param_metrics)
  on_disk = [os.path.relpath(d, study_dir).replace(os.sep, "/") for d in
             sorted(glob.glob(os.path.join(study_dir, "runs", "*", "*", "lr=*", "seed=*")))
             if os.path.isdir(d)]
  for rel in on_disk + list(archived_results):
    ident = rundir.parse_run_relpath(rel)
    if ident and rel not in runs:
      runs[rel] = Run(relpath=rel, path=os.path.join(study_dir, rel), **ident)

  for run in runs.values():
    res = rundir.read_json(os.path.join(run.path, rundir.RESULTS))
    metrics = read_metrics(os.path.join(run.path, rundir.METRICS),
                           keep_param_metrics=merged.keep_param_metrics)
    analysis = analysis_files.read(run.path)
    archived = archived_results.get(run.relpath)
    if (res is None and metrics is None) or (res is not None and archived is not None and (
        json.dumps(res, sort_keys=True) == json.dumps(archived, sort_keys=True))):
      # No run directory, or one seeded from the archive (runner.seed_from_archive): the
      # archive's series and layer scores, if it has the run.
      res = archived if res is None else res
      metrics = archived_metrics.get(run.relpath) if metrics is None else metrics
      analysis = analysis or archived_scores.get(run.relpath)
    run.analysis = analysis
    if isinstance(res, dict):
      run.results = rundir.RunResults.from_dict(res)
      run.status = str(run.results.status or "unknown")
    run.metrics = metrics
    run.config = rundir.read_json(os.path.join(run.path, rundir.CONFIG))
    if res is None and run.metrics is not None and len(run.metrics):
      run.status = "running"  # started, no results yet (killed before its first results.json)
  return Study(study_dir, spec, list(runs.values()), merged)
