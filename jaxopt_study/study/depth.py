r"""The report's depth section: variance, layer scores and sparsity by layer (issue 11).

Per (condition, optimizer), over every completed seed at its best learning rate
(``tables.best_lr_of``), each value below is taken per run, then averaged over the seeds with
its 95% Student-t interval (:func:`stats.mean_ci`, the report's rule). Layer ``l`` is block
``l`` (0 = the first block after the embedding).

*Probes* (``jaxopt_study/probes.py``: a fixed probe batch, logged at full diagnostics steps;
the value at the run's **final probe step**, the last step where the series is finite):

* part ``variance``: ``residual_variance`` = ``depth/var/layer=NN`` (Var of the residual
  stream after block l), ``variance_ratio`` = ``depth/var_ratio/layer=NN``,
  ``embedding_variance`` = ``depth/var/embed``, ``log_var_slope`` = ``depth/log_var_slope``
  (least-squares slope of ln Var against l; exp(slope) is the growth per block).
* part ``weights``: ``small_frac_<tau>`` = ``weights/small_frac_<tau>`` (share of weights with
  |w| <= tau * rms of their tensor, pooled over the model), ``small_frac_<tau>/<kind>`` per
  kind (``.../kind=<kind>``) and per layer (``.../layer=NN/kind=<kind>``).
* part ``attention``: ``entropy``, ``entropy_norm`` (1 = uniform over the visible keys) and
  ``top<k>_mass`` per layer (``attention/<name>/layer=NN``, the mean over heads); their
  whole-model value is the run's mean over layers.

*Layer scores* (``RUN/analysis/analysis.json``, ``jaxopt_study/analysis/``, of the run's last
checkpoint), part ``layer_scores``, per block: ``usefulness_loss_increase`` (relative loss
increase when the block is replaced by its least-squares affine map), ``usefulness_fit_r2``,
``causal_skip_loss_increase`` (relative loss change when the block is skipped),
``causal_later_output_change`` (mean over later blocks j of the relative change of their
output when the block is skipped; none for the last block), ``jacobian_identity_deviation``
(||J - I||_F / sqrt(D)) and ``jacobian_spectral``; whole model: ``share_useful`` (share of
blocks whose usefulness exceeds the threshold, 10%), ``permutation_loss_change`` (mean over
block pairs of the normalised loss change of swapping them), ``base_loss``, and the mean over
blocks of the per-block scores.

:func:`depth_table` (``results/depth.csv``) has one row per (condition, optimizer, part,
measure, layer); ``layer`` is empty for a whole-model value. :func:`condition_comparisons`
(``results/depth_comparisons.csv``) sets every other condition against the primary one (the
first: ``base``), per optimizer, on the whole-model measures of :data:`COMPARED`: *higher* /
*lower* when the 95% intervals are disjoint, else *tie*; no verdict in a smoke test.
"""

from __future__ import annotations

import math
import re
from typing import Iterable, Optional

import numpy as np
import pandas as pd

from jaxopt_study.study import stats
from jaxopt_study.study import tables
from jaxopt_study.study.loading import FINISHED, Run, Study

PARTS = ("variance", "layer_scores", "weights", "attention")  # the table's (and section's) order
COLUMNS = ["condition", "optimizer", "best_lr", "part", "measure", "layer", "n", "mean", "ci95",
           "lo", "hi"]

# Probe series: (regex over the metric name, part, measure template over the regex's groups).
PROBE_SERIES = [
    (r"depth/var/layer=(?P<layer>\d+)", "variance", "residual_variance"),
    (r"depth/var_ratio/layer=(?P<layer>\d+)", "variance", "variance_ratio"),
    (r"depth/var/embed", "variance", "embedding_variance"),
    (r"depth/log_var_slope", "variance", "log_var_slope"),
    (r"weights/small_frac_(?P<tau>[^/]+)", "weights", "small_frac_{tau}"),
    (r"weights/small_frac_(?P<tau>[^/]+)/kind=(?P<kind>\w+)", "weights", "small_frac_{tau}/{kind}"),
    (r"weights/small_frac_(?P<tau>[^/]+)/layer=(?P<layer>\d+)/kind=(?P<kind>\w+)", "weights",
     "small_frac_{tau}/{kind}"),
    (r"attention/(?P<name>entropy|entropy_norm|top\d+_mass)/layer=(?P<layer>\d+)", "attention",
     "{name}"),
]
_PROBE_RE = [(re.compile(p), part, m) for p, part, m in PROBE_SERIES]
PROBE_PREFIXES = ("depth/", "weights/", "attention/")

# Whole-model measures set against the primary condition (e.g. depth_8 / depth_16 vs base,
# weight decay off vs on, GQA vs MHA, MoE vs dense). A callable picks the weights' pooled
# small_frac_<tau> (no kind) and the attention's top<k>_mass.
COMPARED = (
    ("variance", "log_var_slope"),
    ("layer_scores", "share_useful"),
    ("layer_scores", "usefulness_loss_increase"),
    ("layer_scores", "causal_skip_loss_increase"),
    ("layer_scores", "jacobian_identity_deviation"),
    ("weights", re.compile(r"small_frac_[^/]+")),
    ("attention", "entropy_norm"),
    ("attention", re.compile(r"top\d+_mass")),
)

Key = tuple[str, str, Optional[int]]  # (part, measure, layer or None for the whole model)


# ----------------------------------------------------------------------------- one run


def probe_values(run: Run) -> dict[Key, float]:
  """The run's probe values at its final probe step (module docstring)."""
  out: dict[Key, float] = {}
  for col in run.columns():
    if not col.startswith(PROBE_PREFIXES):
      continue
    for regex, part, template in _PROBE_RE:
      m = regex.fullmatch(col)
      if not m:
        continue
      _, vals = run.series(col)
      if vals.size:
        g = m.groupdict()
        layer = int(g.pop("layer")) if g.get("layer") is not None else None
        out[(part, template.format(**g), layer)] = float(vals[-1])
      break
  by_measure: dict[str, list[float]] = {}
  for (part, measure, layer), v in out.items():
    if part == "attention" and layer is not None:
      by_measure.setdefault(measure, []).append(v)
  for measure, vals in by_measure.items():
    out[("attention", measure, None)] = float(np.mean(vals))
  return out


def _finite(v) -> Optional[float]:
  return float(v) if v is not None and math.isfinite(float(v)) else None


def score_values(analysis: Optional[dict]) -> dict[Key, float]:
  """The run's layer scores from its analysis.json dict (module docstring); {} without one."""
  if not analysis:
    return {}
  out: dict[Key, float] = {}

  def per_block(measure, values):
    vals = [_finite(v) for v in values or []]
    for i, v in enumerate(vals):
      if v is not None:
        out[("layer_scores", measure, i)] = v
    finite = [v for v in vals if v is not None]
    if finite:
      out[("layer_scores", measure, None)] = float(np.mean(finite))

  use = analysis.get("usefulness", {})
  cau = analysis.get("causal", {})
  jac = analysis.get("jacobian", {})
  per_block("usefulness_loss_increase", use.get("loss_increase"))
  per_block("usefulness_fit_r2", use.get("fit_r2"))
  per_block("causal_skip_loss_increase", cau.get("loss_increase"))
  later = []
  for i, row in enumerate(cau.get("output_change") or []):
    vals = [_finite(v) for v in row[i + 1:]]
    vals = [v for v in vals if v is not None]
    later.append(float(np.mean(vals)) if vals else None)
  per_block("causal_later_output_change", later)
  per_block("jacobian_identity_deviation", jac.get("identity_deviation"))
  per_block("jacobian_spectral", jac.get("spectral"))
  for measure, value in (("share_useful", use.get("share_useful")),
                         ("base_loss", analysis.get("base_loss"))):
    if _finite(value) is not None:
      out[("layer_scores", measure, None)] = float(value)
  perm = analysis.get("permutation", {}).get("loss_change") or []
  pairs = [_finite(perm[i][j]) for i in range(len(perm)) for j in range(i + 1, len(perm[i]))]
  pairs = [v for v in pairs if v is not None]
  if pairs:
    out[("layer_scores", "permutation_loss_change", None)] = float(np.mean(pairs))
  return out


def run_values(run: Run) -> dict[Key, float]:
  return {**probe_values(run), **score_values(run.analysis)}


# ----------------------------------------------------------------------------- the tables


def best_runs(study: Study, best: pd.DataFrame, condition: str, optimizer: str) -> list[Run]:
  """The completed runs (every seed) of (condition, optimizer) at its best learning rate."""
  lr = tables.best_lr_of(best, condition, optimizer)
  if lr is None:
    return []
  return [r for r in study.select(condition, optimizer, lr) if r.status in FINISHED]


def _sort_key(key: Key):
  part, measure, layer = key
  return (PARTS.index(part), measure, -1 if layer is None else layer)


def depth_table(study: Study, best: pd.DataFrame) -> pd.DataFrame:
  """One row per (condition, optimizer, part, measure, layer): n, mean, 95% t interval."""
  rows = []
  for cond in study.conditions:
    for opt in study.optimizers:
      runs = best_runs(study, best, cond, opt)
      values = [run_values(r) for r in runs]
      keys = sorted({k for v in values for k in v}, key=_sort_key)
      for key in keys:
        ci = stats.mean_ci(v.get(key) for v in values)
        rows.append({"condition": cond, "optimizer": opt,
                     "best_lr": tables.best_lr_of(best, cond, opt), "part": key[0],
                     "measure": key[1], "layer": key[2], "n": ci.n, "mean": ci.mean,
                     "ci95": ci.half_width, "lo": ci.lo, "hi": ci.hi})
  df = pd.DataFrame(rows, columns=COLUMNS)
  df["layer"] = pd.array(df["layer"], dtype="Int64")
  return df


def select(table: pd.DataFrame, part: str, measure: Optional[str] = None, *,
           condition: Optional[str] = None, optimizer: Optional[str] = None,
           per_layer: Optional[bool] = None) -> pd.DataFrame:
  """Rows of ``table``; ``per_layer`` True keeps layer rows, False whole-model rows."""
  sel = table["part"] == part
  if measure is not None:
    sel &= table["measure"] == measure
  if condition is not None:
    sel &= table["condition"] == condition
  if optimizer is not None:
    sel &= table["optimizer"] == optimizer
  if per_layer is not None:
    sel &= table["layer"].notna() if per_layer else table["layer"].isna()
  return table[sel]


def has(table: pd.DataFrame, part: str, measure: Optional[str] = None) -> bool:
  return not select(table, part, measure).empty


def depth_conditions(study: Study, table: pd.DataFrame) -> dict[str, int]:
  """{condition: number of blocks} of the depth-scaling conditions: the primary (first)
  condition and every condition whose overrides (study.json) set ``model.num_layers`` alone;
  the number of blocks is read off the table's per-layer rows."""
  conds = study.conditions
  if not conds:
    return {}
  chosen = [conds[0]] + [c for c in conds[1:] if set(
      (study.condition_info(c).get("overrides") or {})) == {"model.num_layers"}]
  out = {}
  for c in chosen:
    layers = table.loc[(table["condition"] == c) & table["layer"].notna(), "layer"]
    if len(layers):
      out[c] = int(layers.max()) + 1
  return out


def mean_ci_of(row) -> stats.MeanCI:
  """A table row back as a MeanCI."""
  half = row["ci95"]
  half = None if half is None or not np.isfinite(half) else float(half)
  return stats.MeanCI(float(row["mean"]), half, int(row["n"]))


def _compared(part: str, measure: str) -> bool:
  for p, m in COMPARED:
    if p == part and (m == measure if isinstance(m, str) else m.fullmatch(measure)):
      return True
  return False


def condition_comparisons(table: pd.DataFrame, conditions: Iterable[str],
                          smoke_test: bool = False) -> pd.DataFrame:
  """Every other condition against the primary (first) one, per optimizer (module docstring).

  ``verdict``: 'higher' / 'lower' (the condition's 95% interval entirely above / below the
  primary's), 'tie' (overlap), 'no interval' (fewer than 2 seeds on a side); None in a smoke
  test (no verdicts).
  """
  cols = ["condition", "reference", "optimizer", "part", "measure", "value", "reference_value",
          "verdict"]
  conditions = list(conditions)
  rows = []
  whole = table[table["layer"].isna()]
  if len(conditions) > 1 and len(whole):
    ref = conditions[0]
    keyed = {(r["condition"], r["optimizer"], r["part"], r["measure"]): r
             for _, r in whole.iterrows() if _compared(r["part"], r["measure"])}
    for cond in conditions[1:]:
      for (c, opt, part, measure), row in keyed.items():
        other = keyed.get((ref, opt, part, measure))
        if c != cond or other is None:
          continue
        a, b = mean_ci_of(row), mean_ci_of(other)
        verdict = None if smoke_test else (stats.compare(a, b) or "no interval")
        rows.append({"condition": cond, "reference": ref, "optimizer": opt, "part": part,
                     "measure": measure, "value": a.format(), "reference_value": b.format(),
                     "verdict": verdict})
  return pd.DataFrame(rows, columns=cols)
