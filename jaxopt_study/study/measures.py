r"""Per-run measures computed from a run's per-step scalars and final numbers.

* **Loss spike** (the rule Levanter and MaxText use): a logged train loss ``L_s`` with
  ``L_s > mean(W) + num_sigma * std(W)``, where W = the finite losses logged at the
  ``window`` steps before s (steps ``[s - window, s)``, population std), counted only when W
  holds at least ``min_history`` points. Defaults: window 128, num_sigma 6.
* **Rare vs frequent loss**: from ``eval_loss_by_frequency`` (index 0 = most frequent target
  tokens, the last = rarest; equal-mass buckets by default): mean of the ``frequent_buckets``
  first and of the ``rare_buckets`` last non-empty buckets.
* **Adaptation after a shift** at step S (metrics step s = steps done, so the loss logged at s
  was computed on batch s - 1; batches >= S are shifted, i.e. logged steps > S): the pre-shift
  level is the mean train loss logged at steps in ``(S - pre_window, S]``; the post-shift curve
  is smoothed by a trailing mean over ``smooth`` steps; recovery = the first logged step s > S
  (before the next shift) with smoothed loss <= pre-level * (1 + tolerance); steps to recover
  = s - S. None when it never recovers before the next shift / the end.
* **Staleness**: the ``aging/*`` diagnostics averaged over the last ``tail_fraction`` of the run.
* **Selection loss** (:func:`validation_loss`): the final loss on the validation split, on which
  the best learning rate is chosen; **report loss** (:func:`test_loss`): the final loss on the
  separate test split, on which optimizers are compared.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np

from jaxopt_study.study.loading import Run

# Optimizer-state metrics reported per run (the last full diagnostics step's value).
STALENESS_METRICS = [
    "aging/log_staleness_q50",  # log(nu / s_hat), median entry (second moment only)
    "aging/frac_older_than_H",  # share of entries whose last gradient is >= H steps old
    "aging/emb_row_log_staleness_mean",  # embedding rows' log staleness (second moment)
    "aging/age_q90",  # 90th percentile of steps since an entry's last gradient
    # Movement of idle entries: share of |u|^2 on token-embedding entries with zero gradient
    # (Adam and Lion keep moving absent tokens' rows through their momentum; SGD does not).
    "idle/update_sq_share/kind=token_embedding",
    "sign/descent_agree_frac",  # share of entries with sign(u) = -sign(g) (Adam as sign descent)
]
HETEROGENEITY_METRICS = [
    "heterogeneity/grad_norm_cv",  # CV of per-tensor gradient norms (arXiv 2502.00213)
    "heterogeneity/grad_norm_cv_at_init",  # the same at step 0, before any update
    "heterogeneity/step_size_cv",  # CV of per-tensor |u|/|g|
]


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


def frequency_losses(by_bucket: Optional[Sequence[Optional[float]]], rare_buckets: int = 1,
                     frequent_buckets: int = 1) -> tuple[Optional[float], Optional[float]]:
  """(frequent, rare) eval loss from the per-bucket list (index 0 = most frequent)."""
  vals = [float(v) for v in (by_bucket or []) if v is not None and math.isfinite(float(v))]
  if not vals:
    return None, None
  return float(np.mean(vals[:frequent_buckets])), float(np.mean(vals[-rare_buckets:]))


def finite(v) -> Optional[float]:
  """float(v), or None when v is None or not finite (a diverged number is no number)."""
  return float(v) if v is not None and math.isfinite(float(v)) else None


def validation_loss(run: Run) -> Optional[float]:
  """The run's final validation loss (the selection loss); None when absent or non-finite."""
  return finite(run.results.final_eval_loss)


def test_loss(run: Run) -> Optional[float]:
  """The run's final test-split loss (the reported loss); None when absent or non-finite."""
  return finite(run.results.final_eval_losses.get("test"))



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
