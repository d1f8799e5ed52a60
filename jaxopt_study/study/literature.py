"""Claims from the literature, checked against a study: agrees / disagrees / inconclusive.

Every check returns ``{"claim", "measured", "verdict", "reason"}`` and is **inconclusive**, with
the reason, whenever its inputs cannot carry a verdict:

* the study is a smoke test (the tiny preset): no verdicts at all;
* a side has no usable number: no best lr (every run diverged, failed or missing), or a run at
  the best lr diverged/failed: a check never compares against a diverged or missing run;
* the input is fixed by the configuration: a single learning rate (a "best lr" or a ratio of
  best lrs is then the configured grid centre), a best lr on the edge of its grid (not
  bracketed), a single seed (no interval);
* the 95% intervals overlap (a tie; for losses, the paired interval of the per-seed
  differences contains 0), or the grid is too coarse to resolve the claimed range.

References: Adam vs SGD on transformers (Zhang et al. 2020, "Why are adaptive methods good for
attention models?"; Kunstner et al. 2023/2024); Lion's learning rate 3-10x smaller than AdamW's
(Chen et al. 2023, "Symbolic discovery of optimization algorithms"); post-LN raises gradient
heterogeneity (Tomihari & Sato 2025, arXiv 2502.00213).
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import pandas as pd

from jaxopt_study import rundir
from jaxopt_study.study import stats
from jaxopt_study.study import tables
from jaxopt_study.study.loading import FINISHED, Study

ADAM_FAMILY = ("adamw", "adafactor")
LION_RANGE = (3.0, 10.0)  # Chen et al. 2023: Lion's lr is 3-10x smaller than AdamW's.
HETEROGENEITY = "heterogeneity/grad_norm_cv"
NOT_IN_STUDY = "not in the study"  # the reason's tail when a claim's optimizers are absent


def _check(claim, measured, verdict, reason) -> dict:
  assert verdict in ("agrees", "disagrees", "inconclusive"), verdict
  return {"claim": claim, "measured": measured, "verdict": verdict, "reason": reason}


def _unusable(findings: pd.DataFrame, condition: str, opt: str) -> Optional[str]:
  """Why (condition, opt)'s best-lr numbers cannot enter a check; None when they can."""
  f = findings[(findings["condition"] == condition) & (findings["optimizer"] == opt)]
  if f.empty:
    return f"{opt} has no run"
  r = f.iloc[0]
  if r["best_lr"] is None or not np.isfinite(r["best_lr"]):
    return (f"{opt} has no completed run with a finite validation loss "
            f"({r['diverged']} diverged, {r['failed']} failed, {r['missing']} missing)")
  if r["unstable_at_best_lr"]:
    return (f"{opt}: {r['unstable_at_best_lr']} run(s) at its best lr "
            f"{rundir.lr_str(r['best_lr'])} diverged or failed")
  if r["num_lrs"] < 2:
    return f"{opt} ran a single learning rate (fixed by the configuration)"
  if not r["bracketed"]:
    return (f"{opt}'s best lr {rundir.lr_str(r['best_lr'])} is on the {r['unbracketed_side']} "
            "edge of its grid (optimum not bracketed)")
  return None


def adam_beats_sgd(study, runs, best, findings, condition) -> dict:
  claim = "Adam-family (AdamW, Adafactor) reaches a lower loss than SGD-momentum on transformers"
  opts = [o for o in ADAM_FAMILY if o in study.optimizers]
  if "sgd_momentum" not in study.optimizers or not opts:
    return _check(claim, "–", "inconclusive", f"SGD-momentum or the Adam family {NOT_IN_STUDY}")
  col = tables.report_column(runs)
  split = "test" if col == tables.TEST_COLUMN else "validation"
  cis = {o: tables.best_lr_ci(runs, best, condition, o, col) for o in opts + ["sgd_momentum"]}
  measured = (f"final {split} loss at the best lr ({condition}): " +
              ", ".join(f"{o} {cis[o].format()}" for o in opts) +
              f" vs sgd_momentum {cis['sgd_momentum'].format()}")
  for o in opts + ["sgd_momentum"]:
    why = _unusable(findings, condition, o)
    if why:
      return _check(claim, measured, "inconclusive", why)
  # Paired over seeds (a seed fixes the initial parameters and data order of every optimizer):
  # the per-seed difference's 95% t interval against 0 (tables.comparisons_table).
  diffs = {o: tables.paired_ci(runs, best, condition, o, "sgd_momentum", col) for o in opts}
  measured += "; paired " + ", ".join(f"{o} - sgd_momentum {d.format()}" for o, d in diffs.items())
  verdicts = {o: tables.paired_verdict(d) for o, d in diffs.items()}
  if any(v is None for v in verdicts.values()):
    return _check(claim, measured, "inconclusive",
                  "fewer than 2 common seeds at the best lrs: no interval")
  return _from_verdicts(claim, measured, verdicts,
                        ("lower", "paired 95% interval below 0: "),
                        ("higher", "paired 95% interval above 0: "),
                        "paired 95% interval contains 0: ")


def _spacing(runs: pd.DataFrame, condition: str, opt: str, lr: float) -> float:
  """Ratio between the best lr and its farther swept neighbour (the grid's local resolution)."""
  g = runs[(runs["condition"] == condition) & (runs["optimizer"] == opt)]
  lrs = tables.swept_lrs(zip(g["learning_rate"], g["status"], g[tables.SELECTION_COLUMN]))
  i = min(range(len(lrs)), key=lambda k: abs(math.log(lrs[k] / lr)))
  ratios = [lrs[j + 1] / lrs[j] for j in (i - 1, i) if 0 <= j < len(lrs) - 1]
  return max(ratios)


def lion_lr_ratio(study, runs, best, findings, condition) -> dict:
  claim = "Lion's best learning rate is 3-10x smaller than AdamW's"
  if not {"lion", "adamw"} <= set(study.optimizers):
    return _check(claim, "–", "inconclusive", f"Lion or AdamW {NOT_IN_STUDY}")
  lrs = {o: tables.best_lr_of(best, condition, o) for o in ("adamw", "lion")}
  measured = "–"
  if all(lrs.values()):
    ratio = lrs["adamw"] / lrs["lion"]
    measured = (f"best lr adamw {rundir.lr_str(lrs['adamw'])} / lion "
                f"{rundir.lr_str(lrs['lion'])} = {ratio:.2f}x ({condition}, validation)")
  for o in ("adamw", "lion"):
    why = _unusable(findings, condition, o)
    if why:
      return _check(claim, measured, "inconclusive", why)
  # Each optimum lies within half a grid step (in log lr) of its best lr, so the true ratio is
  # within ratio / k .. ratio * k, k = sqrt(spacing_adamw * spacing_lion).
  k = math.sqrt(_spacing(runs, condition, "adamw", lrs["adamw"]) *
                _spacing(runs, condition, "lion", lrs["lion"]))
  lo, hi = ratio / k, ratio * k
  rng = f"resolved by the grids to {lo:.2f}x-{hi:.2f}x"
  if LION_RANGE[0] <= lo and hi <= LION_RANGE[1]:
    return _check(claim, measured, "agrees", rng)
  if hi < LION_RANGE[0] or lo > LION_RANGE[1]:
    return _check(claim, measured, "disagrees", rng)
  return _check(claim, measured, "inconclusive",
                f"{rng}, which overlaps 3-10x only in part: the grids are too coarse")


def ln_pairs(study: Study) -> list[tuple[str, str]]:
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
  return [(a, b) for a, (pa, oa) in ln.items() for b, (pb, ob) in ln.items()
          if pa == "pre" and pb == "post" and oa == ob]


def post_ln_heterogeneity(study, runs, pair: Optional[tuple[str, str]]) -> dict:
  """The claim on one (pre-LN, post-LN) condition pair (:func:`ln_pairs`), over their whole
  sweeps matched on (lr, seed); ``pair`` None: the study has no such pair."""
  claim = "Post-LN raises gradient heterogeneity (CV of per-tensor gradient norms) over pre-LN"
  if pair is None:
    return _check(claim, "–", "inconclusive", "no pre-/post-LN condition pair in the study")
  if HETEROGENEITY not in runs:
    return _check(claim, "–", "inconclusive", "no heterogeneity metrics in the runs")
  pre_c, post_c = pair
  done = runs[runs["status"].isin(FINISHED)]
  parts, verdicts, fixed = [], {}, []
  for opt in study.optimizers:
    a = done[(done["condition"] == pre_c) & (done["optimizer"] == opt)]
    b = done[(done["condition"] == post_c) & (done["optimizer"] == opt)]
    m = a.merge(b, on=["learning_rate", "seed"], suffixes=("_pre", "_post"))
    d = (pd.to_numeric(m[f"{HETEROGENEITY}_post"], errors="coerce") -
         pd.to_numeric(m[f"{HETEROGENEITY}_pre"], errors="coerce")).dropna()
    if d.empty:
      continue
    ci = stats.mean_ci(d.tolist())
    nlr = m.loc[d.index, "learning_rate"].nunique()
    parts.append(f"{opt} {ci.format(2)} over {nlr} lr(s)")
    if nlr < 2:
      fixed.append(opt)
    verdicts[opt] = (None if ci.half_width is None else "raised" if ci.lo > 0
                     else "lowered" if ci.hi < 0 else "tie")
  if not verdicts:
    return _check(claim, "–", "inconclusive",
                  f"no completed runs matched on (lr, seed) in {pre_c} and {post_c}")
  measured = (f"CV(post-LN) - CV(pre-LN), matched (lr, seed), mean ± 95% t ({pre_c} -> "
              f"{post_c}): " + "; ".join(parts))
  if fixed:
    return _check(claim, measured, "inconclusive",
                  f"a single learning rate for {', '.join(fixed)} (fixed by the configuration: "
                  "the lr moves this statistic too)")
  if any(v is None for v in verdicts.values()):
    return _check(claim, measured, "inconclusive", "a single matched run: no interval")
  return _from_verdicts(claim, measured, verdicts, ("raised", "every interval above 0: "),
                        ("lowered", ""), "an interval contains 0: ")


# Checks of one condition, run on every condition: the literature measured these claims on
# stationary pretraining data, and whether they survive a shifting corpus is this study's
# question. The LN check compares conditions: it runs once per pair (ln_pairs).
PER_CONDITION = (adam_beats_sgd, lion_lr_ratio)


def literature_checks(study: Study, runs: pd.DataFrame, best: pd.DataFrame,
                      findings: pd.DataFrame) -> list[dict]:
  """Every check of :data:`PER_CONDITION` on every condition (the primary, first, condition
  first), then the post-LN check; each dict also names its ``condition`` ("–" for a claim the
  study cannot measure at all: its optimizers or condition pair are absent)."""
  if not study.conditions:
    return []
  out = []
  for check in PER_CONDITION:
    rows = [dict(check(study, runs, best, findings, cond), condition=cond)
            for cond in study.conditions]
    if all(r["reason"].endswith(NOT_IN_STUDY) for r in rows):  # its optimizers are absent:
      rows = [dict(rows[0], condition="–")]  # one row saying so, not one per condition
    out += rows
  for pair in ln_pairs(study) or [None]:  # one row per pair (e.g. per model size)
    out.append(dict(post_ln_heterogeneity(study, runs, pair),
                    condition=" -> ".join(pair) if pair else "–"))
  if study.settings.smoke_test:  # (a claim not measured at all keeps its reason)
    out = [c if c["condition"] == "–" else dict(
        c, verdict="inconclusive",
        reason="smoke test (a preset that exercises the machinery): no verdicts") for c in out]
  return out


def _from_verdicts(claim, measured, verdicts, agree, disagree, tie_why):
  """agrees if every verdict is ``agree[0]``, disagrees if any is ``disagree[0]``, else
  inconclusive; each reason is its prefix followed by the per-optimizer verdicts."""
  detail = ", ".join(f"{o} {v}" for o, v in verdicts.items())
  if all(v == agree[0] for v in verdicts.values()):
    return _check(claim, measured, "agrees", agree[1] + detail)
  if any(v == disagree[0] for v in verdicts.values()):
    return _check(claim, measured, "disagrees", disagree[1] + detail)
  return _check(claim, measured, "inconclusive", tie_why + detail)
