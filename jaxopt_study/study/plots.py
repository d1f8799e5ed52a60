"""The study's figures (matplotlib figures without pyplot, PNG), from the loaded study and its tables.

Every figure function takes ``(study, best, runs, condition, path)``, writes a PNG at ``path``
and returns a note (None, or what data was absent). A figure whose data is absent is still
written, as a panel that says so; a figure that raises becomes such a panel too, so the report
never stops on a plot. :func:`make_all` runs them all and returns :class:`Figure` records. Every
loss plot draws the data's reference losses (results.json ``baselines``: uniform, unigram,
entropy floor) when the runs recorded them.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Callable, Optional

import matplotlib
import matplotlib.figure
from matplotlib.backends import backend_agg
import matplotlib.colors
import matplotlib.ticker
import numpy as np
import pandas as pd

from jaxopt_study import rundir
from jaxopt_study.study import depth
from jaxopt_study.study import measures
from jaxopt_study.study import tables
from jaxopt_study.study.loading import Run, Study

DPI = 90
COLORS = {
    "sgd_momentum": "tab:gray",
    "adamw": "tab:blue",
    "adafactor": "tab:green",
    "lion": "tab:red",
    "signsgd": "tab:orange",
}


@dataclasses.dataclass
class Figure:
  name: str
  title: str
  caption: str
  path: str
  note: Optional[str]


def _subplots(*args, figsize=None, **kwargs):
  """``plt.subplots`` without pyplot: a Figure on an Agg canvas of its own (importing this
  module sets no matplotlib backend or global state; nothing to close)."""
  fig = matplotlib.figure.Figure(figsize=figsize)
  backend_agg.FigureCanvasAgg(fig)
  return fig, fig.subplots(*args, **kwargs)


def _color(opt: str, i: int = 0) -> str:
  return COLORS.get(opt, f"C{i % 10}")


def _placeholder(path: str, title: str, message: str) -> None:
  fig, ax = _subplots(figsize=(6, 2.2))
  ax.axis("off")
  ax.text(0.5, 0.6, title, ha="center", va="center", fontsize=11, weight="bold")
  ax.text(0.5, 0.3, f"no data: {message}", ha="center", va="center", fontsize=9, wrap=True)
  fig.savefig(path, dpi=DPI, bbox_inches="tight")


def _legend_outside(ax, fontsize=7, ncol=1) -> None:
  """The legend right of the axes, never over the data (savefig's tight bbox keeps it)."""
  ax.legend(fontsize=fontsize, ncol=ncol, loc="upper left", bbox_to_anchor=(1.01, 1.0),
            borderaxespad=0.0, frameon=False)


def _seeds(n: int) -> str:
  return f"{n} seed" if n == 1 else f"{n} seeds"


def _save(fig, path: str) -> None:
  fig.tight_layout()
  fig.savefig(path, dpi=DPI, bbox_inches="tight")


def _best_runs(study: Study, best: pd.DataFrame, cond: str, opt: str) -> list[Run]:
  """Runs of (cond, opt) at its best lr that have metrics."""
  lr = tables.best_lr_of(best, cond, opt)
  if lr is None:
    return []
  return [r for r in study.select(cond, opt, lr) if r.metrics is not None and len(r.metrics)]


def _seed_frame(runs: list[Run], name: str) -> pd.DataFrame:
  """Columns = seeds, index = step, values of `name` (outer-aligned)."""
  cols = {}
  for r in runs:
    steps, vals = r.series(name)
    if steps.size:
      cols[r.seed] = pd.Series(vals, index=steps)
  return pd.DataFrame(cols).sort_index() if cols else pd.DataFrame()


def _smooth(y: np.ndarray, k: int) -> np.ndarray:
  if k <= 1 or y.size < 3:
    return y
  return pd.Series(y).rolling(k, min_periods=1).mean().values


def _mark_shifts(ax, shifts, scale: float = 1.0, label: bool = True) -> None:
  for i, s in enumerate(shifts):
    ax.axvline(s * scale, color="k", ls=":", lw=0.8,
               label="distribution shift" if (label and i == 0) else None)


# Distribution shifts are dotted verticals (_mark_shifts): no baseline shares their style.
BASELINE_STYLE = {"uniform": (0, (6, 2, 1, 2, 1, 2)), "unigram": "--", "entropy_floor": "-.",
                  "marginal_entropy": (0, (10, 3))}


def _baselines(ax, study: Study, cond: str) -> None:
  """Horizontal lines at the data's reference losses (uniform, unigram, entropy floor)."""
  for name, value in study.baselines(cond).items():
    ax.axhline(value, color="0.35", lw=0.9, ls=BASELINE_STYLE.get(name, (0, (4, 4))),
               label=f"{name.replace('_', ' ')} ({value:.2f})")


def _layer_cols(run: Run, base: str) -> list[tuple[str, str]]:
  """(row label, column) for embedding, each layer, head of a metric family."""
  cols = run.columns(base)
  out = []
  emb = f"{base}/kind=token_embedding"
  if emb in cols:
    out.append(("wte", emb))
  layers = sorted((int(m.group(1)), c) for c in cols
                  if (m := re.fullmatch(re.escape(base) + r"/layer=(\d+)", c)))
  out += [(f"layer {i}", c) for i, c in layers]
  head = f"{base}/kind=head"
  if head in cols:
    out.append(("head", head))
  return out


# ----------------------------------------------------------------------------- figures


def loss_vs_tokens(study, best, runs, cond, path):
  shifts = study.shift_steps(cond)
  fig, ax = _subplots(figsize=(8, 4.5))
  plotted, absent = 0, []
  tps = None
  for i, opt in enumerate(study.optimizers):
    rs = _best_runs(study, best, cond, opt)
    df = _seed_frame(rs, "train/loss")
    if df.empty:
      absent.append(opt)
      continue
    tps = rs[0].tokens_per_step or 1
    x = df.index.values * tps
    k = max(1, len(df) // 60)
    mean, lo, hi = (_smooth(df.mean(axis=1).values, k), _smooth(df.min(axis=1).values, k),
                    _smooth(df.max(axis=1).values, k))
    c = _color(opt, i)
    lr = tables.best_lr_of(best, cond, opt)
    ax.plot(x, mean, color=c, lw=1.5, label=f"{opt} (lr {rundir.lr_str(lr)}, {_seeds(df.shape[1])})")
    if df.shape[1] > 1:
      ax.fill_between(x, lo, hi, color=c, alpha=0.2, lw=0)
    ev = _seed_frame(rs, "eval/loss")
    if not ev.empty:
      ax.plot(ev.index.values * tps, ev.mean(axis=1).values, "o", color=c, ms=4)
    plotted += 1
  if not plotted:
    _placeholder(path, f"Loss vs tokens ({cond})", "no train/loss in any run")
    return "no train/loss in any run"
  _mark_shifts(ax, shifts, tps or 1)
  _baselines(ax, study, cond)
  ax.set_xlabel("tokens")
  ax.set_ylabel("train loss (smoothed; dots: eval loss)")
  ax.set_title(f"Loss vs tokens at each optimizer's best lr, seed range shaded ({cond})")
  _legend_outside(ax, fontsize=8)
  ax.grid(alpha=0.3)
  _save(fig, path)
  return f"absent: {', '.join(absent)}" if absent else None


def lr_sweep(study, best, runs, cond, path):
  g = runs[runs["condition"] == cond]
  if g.empty:
    _placeholder(path, f"Learning-rate sweep ({cond})", "no runs")
    return "no runs"
  fig, ax = _subplots(figsize=(8, 4.5))
  col = tables.SELECTION_COLUMN
  finite = pd.to_numeric(g[col], errors="coerce").dropna()
  top = float(finite.max()) * 1.05 if len(finite) else 1.0
  bottom = float(finite.min()) * 0.97 if len(finite) else 0.0
  notes = []
  for i, opt in enumerate(study.optimizers):
    go = g[g["optimizer"] == opt]
    if go.empty:
      continue
    c = _color(opt, i)
    done = go[go["status"] == "completed"]
    agg = done.groupby("learning_rate")[col].mean().sort_index()
    ax.plot(agg.index, agg.values, "-o", color=c, label=opt, ms=5)
    ax.plot(done["learning_rate"], done[col], ".", color=c, alpha=0.5)
    bad = go[go["status"].isin(("diverged", "failed"))]
    if len(bad):
      ax.plot(bad["learning_rate"], [top] * len(bad), "x", color=c, ms=10, mew=2)
      notes.append(f"{opt}: {len(bad)} diverged/failed")
    miss = go[~go["status"].isin(("completed", "diverged", "failed"))]
    if len(miss):
      ax.plot(miss["learning_rate"], [bottom] * len(miss), "^", color=c, mfc="none", ms=8)
      notes.append(f"{opt}: {len(miss)} missing/unfinished")
    lr = tables.best_lr_of(best, cond, opt)
    if lr is not None and lr in agg.index:
      ax.plot([lr], [agg[lr]], "*", color=c, ms=16, mec="k")
      b = best[(best["condition"] == cond) & (best["optimizer"] == opt)]
      if len(b) and not b["bracketed"].iloc[0]:
        notes.append(f"{opt}: best lr not bracketed ({b['unbracketed_side'].iloc[0]})")
  _baselines(ax, study, cond)
  ax.set_xscale("log")
  ax.set_xlabel("peak learning rate")
  ax.set_ylabel("final validation loss")
  ax.set_title(f"LR sweep ({cond}): mean over seeds; star = best; x (top) = diverged/failed; "
               "triangle (bottom) = missing", fontsize=9)
  ax.legend(fontsize=8)
  ax.grid(alpha=0.3, which="both")
  _save(fig, path)
  return "; ".join(notes) or None


def grad_sparsity_heatmap(study, best, runs, cond, path):
  base = "sparsity/small_frac"
  panels = []
  for opt in study.optimizers:
    rs = _best_runs(study, best, cond, opt)
    if not rs:
      continue
    run = rs[0]
    rows = _layer_cols(run, base)
    if not rows:
      continue
    df = run.metrics[[c for _, c in rows]].dropna(how="all")
    if df.empty:
      continue
    panels.append((opt, run, [l for l, _ in rows], df))
  if not panels:
    _placeholder(path, f"Per-layer gradient sparsity ({cond})", f"no {base}/layer=NN metrics")
    return f"no {base}/layer=NN metrics"
  fig, axes = _subplots(len(panels), 1, figsize=(8, 1.2 + 1.0 * len(panels) *
                                                    max(1, len(panels[0][2]) / 4)),
                           squeeze=False, sharex=True)
  # Log colour scale: dense layers have small fractions (1e-4..1e-2), the embedding ~1.
  vals = np.concatenate([p[3].values.ravel() for p in panels])
  vals = vals[np.isfinite(vals) & (vals > 0)]
  vmin = max(float(vals.min()), 1e-5) if vals.size else 1e-5
  vmax = max(float(vals.max()), vmin * 10) if vals.size else 1.0
  norm = matplotlib.colors.LogNorm(vmin=vmin, vmax=vmax)
  im = None
  for ax, (opt, run, labels, df) in zip(axes[:, 0], panels):
    steps = df.index.values
    data = np.where(df.values.T > 0, df.values.T, vmin)  # exact 0 shown at the floor
    im = ax.imshow(data, aspect="auto", origin="lower", cmap="viridis", norm=norm,
                   interpolation="nearest",
                   extent=(steps.min(), steps.max(), -0.5, len(labels) - 0.5))
    ax.set_yticks(range(len(labels)))
    ax.set_yticklabels(labels, fontsize=7)
    ax.set_ylabel(f"{opt}\nseed {run.seed}", fontsize=8)
    _mark_shifts(ax, study.shift_steps(cond), label=False)
  axes[-1, 0].set_xlabel("step")
  axes[0, 0].set_title(f"Share of gradient entries with |g| <= 1e-3 rms(g of the tensor), "
                       f"layer x step ({cond})", fontsize=9)
  fig.colorbar(im, ax=axes[:, 0].tolist(), shrink=0.8, label="small-gradient fraction (log)")
  fig.savefig(path, dpi=DPI, bbox_inches="tight")
  return None


def _bucket_cols(run: Run, base: str) -> list[tuple[int, str]]:
  return sorted((int(m.group(1)), c) for c in run.columns(base)
                if (m := re.fullmatch(re.escape(base) + r"/freq_bucket=(\d+)", c)))


def embedding_update_frequency(study, best, runs, cond, path):
  info = study.condition_info(cond)
  buckets = {int(b["bucket"]): b for b in info.get("freq_buckets") or []}
  # The per-bucket mean row update frequency (count / steps); older diagnostics named it
  # without the '_mean'.
  base = "sparsity/emb_row_update_freq_mean"
  for cand in ("sparsity/emb_row_update_freq_mean", "sparsity/emb_row_update_freq"):
    if any(_bucket_cols(r, cand) for r in study.runs if r.condition == cond):
      base = cand
      break
  stale = "aging/emb_row_log_staleness_mean"
  fig, (ax1, ax2) = _subplots(1, 2, figsize=(11, 4.3))
  got, got2, notes = 0, 0, []
  use_freq = bool(buckets)
  if not use_freq:
    notes.append("token frequency per bucket unknown (study.json has no freq_buckets): "
                 "x axis is the bucket index")
  curves = {1: {}, 2: {}}  # panel -> {opt: (xs, ys)}
  for opt in study.optimizers:
    rs = _best_runs(study, best, cond, opt)
    if not rs:
      continue
    run = rs[0]
    for name, flag in ((base, 1), (stale, 2)):
      cols = _bucket_cols(run, name)
      if not cols:
        continue
      last = run.metrics[[c for _, c in cols]].ffill().iloc[-1]
      xy = [(buckets.get(b, {}).get("mean_token_freq") if use_freq else b, last[c])
            for b, c in cols]
      xy = [(x, y) for x, y in xy if x is not None and np.isfinite(y)]
      if xy:
        curves[flag][opt] = tuple(map(list, zip(*xy)))
  # A row gets a gradient iff its token is in the batch, and every optimizer sees the same
  # batches: the update frequencies coincide, so one line stands for all (five identical
  # lines would show only the last colour).
  freq = curves[1]
  same = len(freq) > 1 and all(c[0] == next(iter(freq.values()))[0] and np.allclose(
      c[1], next(iter(freq.values()))[1], rtol=1e-6) for c in freq.values())
  if same:
    xs, ys = next(iter(freq.values()))
    ax1.plot(xs, ys, "-o", color="0.2", ms=4,
             label=f"measured (every optimizer: {', '.join(freq)}; the same batches)")
  else:
    for opt, (xs, ys) in freq.items():
      ax1.plot(xs, ys, "-o", color=_color(opt, study.optimizers.index(opt)), label=opt, ms=4)
  for opt, (xs, ys) in curves[2].items():
    ax2.plot(xs, ys, "-o", color=_color(opt, study.optimizers.index(opt)), label=opt, ms=4)
  got, got2 = len(freq), len(curves[2])
  if use_freq:
    xs = [buckets[b]["mean_token_freq"] for b in sorted(buckets)]
    ex = [buckets[b].get("expected_update_freq") for b in sorted(buckets)]
    if all(e is not None for e in ex):
      # Averaged over the bucket's tokens and the topic schedule (runner.freq_buckets): a token
      # frequent in one topic is rare in the others, so this lies below 1-(1-x)^(B T) at the
      # bucket's mean frequency x.
      ax1.plot(xs, ex, "k--", lw=1,
               label="expected: 1-(1-q)^(tokens/step), mean over the bucket's tokens and topics")
  if not got:
    notes.append(f"no {base}/freq_bucket=BB metrics")
    ax1.text(0.5, 0.5, "no data", transform=ax1.transAxes, ha="center")
  if not got2:
    notes.append(f"no {stale}/freq_bucket=BB (optimizers without a second moment have none)")
    ax2.text(0.5, 0.5, "no data", transform=ax2.transAxes, ha="center")
  for ax in (ax1, ax2):
    if use_freq:
      ax.set_xscale("log")
      ax.set_xlabel("mean token frequency of the bucket (training corpus)")
    else:
      ax.set_xlabel("frequency bucket (0 = most frequent)")
    ax.grid(alpha=0.3, which="both")
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), frameon=False)
  if got and use_freq:
    ax1.set_yscale("log")
  ax1.set_ylabel("embedding-row update frequency (share of steps)")
  ax1.set_title(f"Embedding update frequency vs token frequency ({cond})", fontsize=9)
  ax2.set_ylabel("log(nu_row / short EMA of g^2)")
  ax2.set_title("Embedding-row second-moment staleness vs token frequency", fontsize=9)
  _save(fig, path)
  return "; ".join(notes) or None


def drift_around_shifts(study, best, runs, cond, path):
  shifts = study.shift_steps(cond)
  names = [("train/loss", "train loss"), ("drift/cos_grad_mu", "cos(g_t, m_{t-1})"),
           ("drift/energy_ratio", "short / long EMA of ||g||^2")]
  fig, axes = _subplots(len(names), 1, figsize=(8, 7), sharex=True)
  notes = []
  for ax, (name, label) in zip(axes, names):
    got = 0
    for i, opt in enumerate(study.optimizers):
      df = _seed_frame(_best_runs(study, best, cond, opt), name)
      if df.empty:
        continue
      y = df.mean(axis=1).values
      if name == "train/loss":
        y = _smooth(y, max(1, len(y) // 100))
      ax.plot(df.index.values, y, color=_color(opt, i), lw=1.2, label=opt)
      got += 1
    _mark_shifts(ax, shifts)
    if name == "train/loss":
      _baselines(ax, study, cond)
    ax.set_ylabel(label, fontsize=8)
    ax.grid(alpha=0.3)
    if not got:
      ax.text(0.5, 0.5, f"no {name}", transform=ax.transAxes, ha="center")
      notes.append(f"no {name}")
  if name == "drift/energy_ratio":
    axes[-1].axhline(1.0, color="k", lw=0.5)
  if axes[0].get_legend_handles_labels()[0]:
    _legend_outside(axes[0])
  axes[-1].set_xlabel("step")
  title = f"Drift around distribution shifts ({cond}, best lr, mean over seeds)"
  if not shifts:
    title += " - this condition has no shift"
    notes.append("this condition has no distribution shift")
  axes[0].set_title(title, fontsize=9)
  _save(fig, path)
  if len([n for n in notes if n.startswith("no ")]) == len(names):
    return "no drift metrics in any run"
  return "; ".join(notes) or None


def _quantile_band(ax, run, base, color, label, band_label, alpha) -> int:
  """Plots ``{base}_q50`` with a ``_q10``-``_q90`` band; returns 1 if there was data, else 0."""
  s10, q10 = run.series(f"{base}_q10")
  s50, q50 = run.series(f"{base}_q50")
  s90, q90 = run.series(f"{base}_q90")
  if not s50.size:
    return 0
  ax.plot(s50, q50, color=color, lw=1.3, label=label)
  if s10.size == s50.size == s90.size:
    ax.fill_between(s50, q10, q90, color=color, alpha=alpha, lw=0, label=band_label)
  return 1


def moment_staleness(study, best, runs, cond, path):
  fig, axes = _subplots(1, 3, figsize=(14, 4))
  notes = []
  # (a) Ages depend on the data only (which entries get a gradient), not on the optimizer: one
  # run's token-embedding row ages and all-entry ages, as q10-q90 bands.
  ax = axes[0]
  run0 = next((rs[0] for o in study.optimizers if (rs := _best_runs(study, best, cond, o))), None)
  got = 0
  for base, label, c in (("aging/emb_row_age", "token-embedding rows", "tab:purple"),
                         ("aging/age", "all entries", "tab:brown")):
    if run0 is None:
      break
    got += _quantile_band(ax, run0, base, c, f"{label}: median", f"{label}: q10-q90", 0.2)
  _mark_shifts(ax, study.shift_steps(cond), label=False)
  ax.set_xlabel("step")
  ax.set_ylabel("age: steps since the last non-zero gradient", fontsize=8)
  ax.grid(alpha=0.3)
  if got:
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), frameon=False)
    ax.set_title("Entry age (data-driven: the same for every optimizer)", fontsize=8)
  else:
    ax.text(0.5, 0.5, "no aging/age_q* metrics", transform=ax.transAxes, ha="center")
    notes.append("no aging/age_q* metrics")
  # (b) Staleness of the second moment, per optimizer that has one.
  ax = axes[1]
  got = 0
  for i, opt in enumerate(study.optimizers):
    rs = _best_runs(study, best, cond, opt)
    if not rs:
      continue
    got += _quantile_band(ax, rs[0], "aging/log_staleness", _color(opt, i), f"{opt} median",
                          None, 0.15)
  _mark_shifts(ax, study.shift_steps(cond), label=False)
  ax.set_xlabel("step")
  ax.set_ylabel("log(nu / short EMA of g^2) (q10-q90 band)", fontsize=8)
  ax.grid(alpha=0.3)
  ax.set_title("Second-moment staleness (SGD, Lion, SignSGD have no nu)", fontsize=8)
  if got:
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), frameon=False)
  else:
    ax.text(0.5, 0.5, "no aging/log_staleness_q*", transform=ax.transAxes, ha="center")
    notes.append("no aging/log_staleness_q* metrics (no optimizer with a second moment)")
  ax = axes[2]
  got = 0
  for i, opt in enumerate(study.optimizers):
    rs = _best_runs(study, best, cond, opt)
    if not rs:
      continue
    for name, ls in (("idle/update_sq_share/kind=token_embedding", "-"),
                     ("idle/update_sq_share", "--")):
      s, v = rs[0].series(name)
      if s.size:
        ax.plot(s, v, ls, color=_color(opt, i), lw=1.2,
                label=f"{opt} {'embedding' if 'kind=' in name else 'all'}")
        got += 1
  ax.set_xlabel("step")
  ax.set_ylabel("share of |u|^2 on entries with zero gradient", fontsize=8)
  ax.grid(alpha=0.3)
  if got:
    ax.legend(fontsize=6, ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.2),
              frameon=False)
  else:
    ax.text(0.5, 0.5, "no idle/update_sq_share", transform=ax.transAxes, ha="center")
    notes.append("no idle/update_sq_share metrics")
  ax.set_title("Movement of idle entries (update on zero-gradient entries)", fontsize=8)
  fig.suptitle(f"Age and staleness of the optimizer moments ({cond}, best lr, first seed)",
               fontsize=10)
  _save(fig, path)
  return "; ".join(notes) or None


def grad_heterogeneity(study, best, runs, cond, path):
  names = [("heterogeneity/grad_norm_cv", "CV of per-tensor ||g||"),
           ("heterogeneity/step_size_cv", "CV of per-tensor ||u|| / ||g||")]
  fig, axes = _subplots(1, 2, figsize=(12, 4))
  notes = []
  for ax, (name, label) in zip(axes, names):
    got = 0
    for i, opt in enumerate(study.optimizers):
      df = _seed_frame(_best_runs(study, best, cond, opt), name)
      if df.empty:
        continue
      ax.plot(df.index.values, df.mean(axis=1).values, color=_color(opt, i), lw=1.2, label=opt)
      got += 1
    _mark_shifts(ax, study.shift_steps(cond), label=False)
    ax.set_xlabel("step")
    ax.set_ylabel(label, fontsize=8)
    ax.grid(alpha=0.3)
    if got:
      ax.legend(fontsize=7)
    else:
      ax.text(0.5, 0.5, f"no {name}", transform=ax.transAxes, ha="center")
      notes.append(f"no {name}")
  axes[0].set_title(f"Gradient heterogeneity over training ({cond}, best lr, mean over seeds)",
                    fontsize=9, loc="left")
  _save(fig, path)
  return "; ".join(notes) or None


def layer_norms(study, best, runs, cond, path):
  opts = [o for o in study.optimizers if _best_runs(study, best, cond, o)]
  rows = [("norms/param", "||theta||"), ("norms/update_param_ratio", "||u|| / ||theta||")]
  panels = []
  for opt in opts:
    run = _best_runs(study, best, cond, opt)[0]
    if any(_layer_cols(run, base) for base, _ in rows):
      panels.append((opt, run))
  if not panels:
    _placeholder(path, f"Layer-wise norms ({cond})", "no norms/*/layer=NN metrics")
    return "no norms/*/layer=NN metrics"
  fig, axes = _subplots(2, len(panels), figsize=(3.2 * len(panels) + 1, 6), squeeze=False,
                           sharex=True)
  for j, (opt, run) in enumerate(panels):
    for i, (base, label) in enumerate(rows):
      ax = axes[i, j]
      cols = _layer_cols(run, base)
      cmap = matplotlib.colormaps["viridis"]
      for k, (lab, c) in enumerate(cols):
        s, v = run.series(c)
        ax.plot(s, v, color=cmap(k / max(1, len(cols) - 1)), lw=1, label=lab)
      if base == "norms/update_param_ratio" and cols:
        ax.set_yscale("log")
      ax.grid(alpha=0.3)
      if j == 0:
        ax.set_ylabel(label, fontsize=8)
      if i == 0:
        ax.set_title(opt, fontsize=9)
      if i == 1:
        ax.set_xlabel("step")
  axes[0, -1].legend(fontsize=6, loc="best")
  fig.suptitle(f"Layer-wise norm evolution ({cond}, best lr, first seed)", fontsize=10)
  _save(fig, path)
  return None


def loss_by_frequency(study, best, runs, cond, path):
  fig, ax = _subplots(figsize=(8, 4))
  got = 0
  for i, opt in enumerate(study.optimizers):
    lr = tables.best_lr_of(best, cond, opt)
    if lr is None:
      continue
    tabs = [r.results.eval_loss_by_frequency for r in study.select(cond, opt, lr)
            if r.status == "completed" and r.results.eval_loss_by_frequency]
    if not tabs:
      continue
    df = pd.DataFrame([[np.nan if v is None else float(v) for v in t] for t in tabs])
    ax.plot(df.columns, df.mean(axis=0).values, "-o", color=_color(opt, i), ms=4,
            label=f"{opt} (lr {rundir.lr_str(lr)})")
    got += 1
  if not got:
    _placeholder(path, f"Eval loss by token frequency ({cond})",
                 "no eval_loss_by_frequency in results.json")
    return "no eval_loss_by_frequency in results.json"
  _baselines(ax, study, cond)
  ax.set_xlabel("target-token frequency bucket (0 = most frequent, last = rarest)")
  ax.set_ylabel("final eval loss")
  ax.set_title(f"Eval loss by token frequency at the best lr ({cond})", fontsize=9)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  _save(fig, path)
  return None


def heterogeneity_by_condition(study, best, runs, cond, path):
  """Study-level: mean gradient-norm CV per optimizer and condition (matched lrs and seeds)."""
  name = "heterogeneity/grad_norm_cv"
  conds = study.conditions
  vals = {}
  for opt in study.optimizers:
    per = {c: {(round(r.learning_rate, 12), r.seed) for r in study.select(c, opt)
               if r.has(name)} for c in conds}
    common = set.intersection(*per.values()) if per and all(per.values()) else set()
    for c in conds:
      keys = common or per.get(c, set())
      xs = [measures.series_mean(r, name) for r in study.select(c, opt)
            if (round(r.learning_rate, 12), r.seed) in keys]
      xs = [x for x in xs if x is not None]
      if xs:
        vals[(opt, c)] = float(np.mean(xs))
  if not vals:
    _placeholder(path, "Gradient heterogeneity by condition", f"no {name} in any run")
    return f"no {name} in any run"
  fig, ax = _subplots(figsize=(8, 4))
  width = 0.8 / max(1, len(conds))
  for j, c in enumerate(conds):
    xs = np.arange(len(study.optimizers)) + j * width
    ys = [vals.get((o, c), np.nan) for o in study.optimizers]
    ax.bar(xs, ys, width, label=c)
  ax.set_xticks(np.arange(len(study.optimizers)) + width * (len(conds) - 1) / 2)
  ax.set_xticklabels(study.optimizers, fontsize=8)
  ax.set_ylabel("mean CV of per-tensor ||g|| over training")
  ax.set_title("Gradient heterogeneity by condition (runs matched on lr and seed)", fontsize=9)
  ax.legend(fontsize=8)
  ax.grid(alpha=0.3, axis="y")
  _save(fig, path)
  return None if len(conds) > 1 else "a single condition: nothing to compare against"


def gap_vs_heterogeneity(study, best, runs, cond, path):
  """Study-level: SGD's loss gap to SignSGD and to AdamW against the measured heterogeneity."""
  col = tables.report_column(runs)
  het = "heterogeneity/grad_norm_cv"
  points = {}  # other optimizer -> [(heterogeneity, gap, gap half-width, condition)]
  for c in study.conditions:
    sgd = tables.best_lr_ci(runs, best, c, "sgd_momentum", col)
    x = tables.best_lr_ci(runs, best, c, "sgd_momentum", het).mean if het in runs else None
    if sgd.mean is None or x is None:
      continue
    for other in ("signsgd", "adamw"):
      o = tables.best_lr_ci(runs, best, c, other, col)
      if o.mean is not None:
        # Half-widths add: a conservative interval of the difference of two means.
        hw = (None if sgd.half_width is None or o.half_width is None
              else sgd.half_width + o.half_width)
        points.setdefault(other, []).append((x, sgd.mean - o.mean, hw, c))
  if not points:
    _placeholder(path, "Gap to SGD vs gradient heterogeneity",
                 f"needs sgd_momentum and signsgd/adamw at a best lr, and {het}")
    return "no condition with SGD, SignSGD/AdamW results and the heterogeneity metric"
  fig, ax = _subplots(figsize=(7, 4.3))
  for i, (other, pts) in enumerate(sorted(points.items())):
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    err = [p[2] if p[2] is not None else 0.0 for p in pts]
    ax.errorbar(xs, ys, yerr=err, fmt="o", color=_color(other, i), capsize=3,
                label=f"loss(sgd_momentum) - loss({other})")
    for x, y, _, c in pts:
      ax.annotate(c, (x, y), fontsize=7, xytext=(4, 4), textcoords="offset points")
  ax.axhline(0.0, color="k", lw=0.6)
  ax.set_xlabel("SGD's mean CV of per-tensor ||g|| at its best lr")
  ax.set_ylabel(f"final {'test' if col == tables.TEST_COLUMN else 'validation'} loss gap")
  ax.set_title("SGD's gap to SignSGD / AdamW vs gradient heterogeneity (arXiv 2502.00213)",
               fontsize=9)
  ax.legend(fontsize=7)
  ax.grid(alpha=0.3)
  _save(fig, path)
  n = len(next(iter(points.values())))
  return None if n > 1 else "a single condition: no trend to read"


# ----------------------------------------------------------------------------- depth (issue 11)


def _layer_line(ax, table, part, measure, cond, opt, color, scale=1.0, label=None, ls="-"):
  """Mean by layer with its 95% t band (where there is one); True when something was drawn."""
  rows = depth.select(table, part, measure, condition=cond, optimizer=opt, per_layer=True)
  if rows.empty:
    return False
  rows = rows.sort_values("layer")
  x = rows["layer"].to_numpy(float)
  mean = rows["mean"].to_numpy(float) * scale
  ax.plot(x, mean, ls, color=color, marker="o", ms=3, lw=1.3, label=label)
  lo, hi = rows["lo"].to_numpy(float) * scale, rows["hi"].to_numpy(float) * scale
  if np.isfinite(lo).any():
    ax.fill_between(x, lo, hi, color=color, alpha=0.2, lw=0)
  ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
  return True


def _condition_grid(n: int, ncols: int, width: float = 3.6, height: float = 3.0):
  ncols = max(1, min(ncols, n))
  nrows = -(-n // ncols)
  fig, axes = _subplots(nrows, ncols, figsize=(width * ncols + 0.5, height * nrows),
                           squeeze=False)
  for ax in axes.flat[n:]:
    ax.axis("off")
  return fig, axes


def _n_label(table, cond, opt, part, measure):
  rows = depth.select(table, part, measure, condition=cond, optimizer=opt)
  return f"{opt} (n={int(rows['n'].max())})" if len(rows) else opt


def depth_variance(study, best, runs, cond, path):
  """Study-level: residual-stream variance by layer, a panel per condition."""
  table = depth.depth_table(study, best)
  conds = [c for c in study.conditions
           if not depth.select(table, "variance", "residual_variance", condition=c).empty]
  if not conds:
    _placeholder(path, "Residual-stream variance by layer", "no depth/var/layer=NN probes")
    return "no depth/var/layer=NN probes in any run at a best rate"
  fig, axes = _condition_grid(len(conds), 4)
  for ax, c in zip(axes.flat, conds):
    for i, opt in enumerate(study.optimizers):
      _layer_line(ax, table, "variance", "residual_variance", c, opt, _color(opt, i),
                  label=_n_label(table, c, opt, "variance", "residual_variance"))
    ax.set_yscale("log")
    ax.set_title(c, fontsize=9)
    ax.set_xlabel("block (0 = first)")
    ax.set_ylabel("Var(residual stream)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
  fig.suptitle("Residual-stream variance by layer at the final probe step (best lr; band: "
               "95% t interval over seeds)", fontsize=10)
  _save(fig, path)
  return None


LAYER_SCORE_PANELS = (  # (measure, y label, scale)
    ("usefulness_loss_increase", "loss increase, affine replacement (%)", 100.0),
    ("causal_skip_loss_increase", "loss increase, block skipped (%)", 100.0),
    ("jacobian_identity_deviation", "||J - I||_F / sqrt(D)", 1.0),
)


def layer_scores(study, best, runs, cond, path):
  """Study-level: usefulness, causal (skip) and Jacobian scores by block, a row per condition."""
  table = depth.depth_table(study, best)
  conds = [c for c in study.conditions
           if not depth.select(table, "layer_scores", condition=c, per_layer=True).empty]
  if not conds:
    _placeholder(path, "Layer scores by depth", "no analysis/analysis.json at a best rate")
    return "no run at a best rate has analysis/analysis.json (layer scores)"
  fig, axes = _subplots(len(conds), len(LAYER_SCORE_PANELS),
                           figsize=(4.2 * len(LAYER_SCORE_PANELS), 2.8 * len(conds) + 0.6),
                           squeeze=False)
  for r, c in enumerate(conds):
    for k, (measure, label, scale) in enumerate(LAYER_SCORE_PANELS):
      ax = axes[r, k]
      for i, opt in enumerate(study.optimizers):
        _layer_line(ax, table, "layer_scores", measure, c, opt, _color(opt, i), scale=scale,
                    label=_n_label(table, c, opt, "layer_scores", measure))
      if measure == "usefulness_loss_increase":
        ax.axhline(10.0, color="k", ls="--", lw=0.8, label="useful: > 10%")
      ax.set_title(f"{c}: {measure}", fontsize=8)
      ax.set_ylabel(label, fontsize=7)
      ax.set_xlabel("block (0 = first)", fontsize=7)
      ax.grid(alpha=0.3)
    axes[r, 0].legend(fontsize=6)
  fig.suptitle("Layer scores of the final checkpoint by depth (best lr; band: 95% t interval "
               "over seeds)", fontsize=10)
  _save(fig, path)
  return None


def sparsity_by_layer(study, best, runs, cond, path):
  """Study-level: attention entropy / top-k mass and weight sparsity by layer, per condition."""
  table = depth.depth_table(study, best)
  conds = [c for c in study.conditions
           if not depth.select(table, "attention", condition=c, per_layer=True).empty
           or not depth.select(table, "weights", condition=c, per_layer=True).empty]
  if not conds:
    _placeholder(path, "Attention and weight sparsity by layer", "no attention/ or weights/ "
                 "probes")
    return "no attention/* or weights/* probes in any run at a best rate"
  layered = depth.select(table, "weights", per_layer=True)["measure"].unique().tolist()
  # The largest threshold (the most informative share), one line style per kind.
  taus = sorted({m.split("/")[0] for m in layered}, key=lambda m: float(m[len("small_frac_"):]))
  weight_measures = [m for m in layered if taus and m.startswith(taus[-1] + "/")]
  tops = sorted({m for m in depth.select(table, "attention", per_layer=True)["measure"]
                 if m.startswith("top")}, key=lambda m: int(m[3:-5]))
  panels = [("attention", ["entropy_norm"], "attention entropy / log(#keys)"),
            ("attention", tops[:1], f"attention {tops[0][:-5]} mass" if tops else "top-k mass"),
            ("weights", weight_measures,
             f"share |w| <= {taus[-1][len('small_frac_'):]} rms" if taus else "weights")]
  styles = ["-", "--", ":", "-."]
  fig, axes = _subplots(len(conds), 3, figsize=(12.6, 2.8 * len(conds) + 0.6), squeeze=False)
  for r, c in enumerate(conds):
    for k, (part, measures_, label) in enumerate(panels):
      ax = axes[r, k]
      for i, opt in enumerate(study.optimizers):
        for j, m in enumerate(measures_):
          _layer_line(ax, table, part, m, c, opt, _color(opt, i), ls=styles[j % len(styles)],
                      label=f"{opt}" + (f" {m.split('/')[-1]}" if part == "weights" else ""))
      ax.set_title(c, fontsize=8)
      ax.set_ylabel(label, fontsize=7)
      ax.set_xlabel("block (0 = first)", fontsize=7)
      ax.grid(alpha=0.3)
      if ax.lines:
        ax.legend(fontsize=5)
  fig.suptitle("Attention and weight sparsity by layer at the final probe step (best lr; band: "
               "95% t interval over seeds)", fontsize=10)
  _save(fig, path)
  return None


DEPTH_SCALING_PANELS = (  # (part, measure, y label)
    ("layer_scores", "share_useful", "share of useful blocks (> 10%)"),
    ("layer_scores", "usefulness_loss_increase", "mean usefulness (loss increase)"),
    ("variance", "log_var_slope", "log-variance slope per block"),
)


def depth_scaling(study, best, runs, cond, path):
  """Study-level: whole-model depth measures against the number of blocks (depth conditions)."""
  table = depth.depth_table(study, best)
  depths = depth.depth_conditions(study, table)
  if len(set(depths.values())) < 2:
    _placeholder(path, "Layer usefulness vs depth", "needs conditions that differ only in "
                 "model.num_layers")
    return "fewer than two depths (conditions that differ from the primary in num_layers only)"
  fig, axes = _subplots(1, len(DEPTH_SCALING_PANELS), figsize=(4.2 * len(DEPTH_SCALING_PANELS),
                                                                  3.4), squeeze=False)
  order = sorted(depths, key=depths.get)
  for ax, (part, measure, label) in zip(axes[0], DEPTH_SCALING_PANELS):
    for i, opt in enumerate(study.optimizers):
      pts = []
      for c in order:
        r = depth.select(table, part, measure, condition=c, optimizer=opt, per_layer=False)
        if len(r):
          pts.append((depths[c], r["mean"].iloc[0], r["ci95"].iloc[0]))
      if pts:
        x, y, e = (np.array(v, float) for v in zip(*pts))
        ax.errorbar(x, y, yerr=np.where(np.isfinite(e), e, 0.0), color=_color(opt, i),
                    marker="o", capsize=3, lw=1.2, label=opt)
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(set(depths.values())))
    ax.set_xticklabels([str(d) for d in sorted(set(depths.values()))])
    ax.set_xlabel("number of blocks")
    ax.set_ylabel(label, fontsize=8)
    ax.grid(alpha=0.3)
  axes[0, 0].legend(fontsize=7)
  fig.suptitle("Depth scaling: " + ", ".join(f"{c} ({depths[c]})" for c in order) +
               " (best lr; bars: 95% t interval over seeds)", fontsize=9)
  _save(fig, path)
  return None


# (name, title, caption, function, per condition?)
FIGURES: list[tuple[str, str, str, Callable, bool]] = [
    ("loss_vs_tokens", "Loss vs tokens",
     "Train loss (smoothed) against tokens seen for each optimizer at its best learning rate; "
     "the band spans the seeds, dots are eval losses, dotted lines mark distribution shifts.",
     loss_vs_tokens, True),
    ("lr_sweep", "Learning-rate sweep",
     "Final validation loss (the selection loss) against the peak learning rate (mean over "
     "seeds, dots per seed). Stars mark the best rate; crosses at the top are diverged or failed "
     "runs; hollow triangles at the bottom are missing or unfinished runs; grey lines are the "
     "data's reference losses.", lr_sweep, True),
    ("grad_sparsity_heatmap", "Per-layer gradient sparsity",
     "Share of gradient entries below 1e-3 of their tensor's rms, per layer (and token "
     "embedding / head) and step, at each optimizer's best learning rate.",
     grad_sparsity_heatmap, True),
    ("embedding_update_frequency", "Embedding update frequency vs token frequency",
     "Left: share of steps in which an embedding row received a gradient, per token-frequency "
     "bucket (log-log; dashed: the probability that a token of that frequency appears in a "
     "batch). Right: the rows' second-moment staleness per bucket (optimizers with a second "
     "moment).", embedding_update_frequency, True),
    ("drift_around_shifts", "Drift around distribution shifts",
     "Train loss, cosine between the gradient and the optimizer's first moment, and the "
     "short/long gradient-energy ratio; dotted lines mark the shifts.",
     drift_around_shifts, True),
    ("moment_staleness", "Second-moment age and staleness",
     "Distributions (q10-q90 bands, median lines) of entry age and of log(nu / short EMA of "
     "g^2), and the share of the moments' mass on entries idle for at least H steps.",
     moment_staleness, True),
    ("grad_heterogeneity", "Gradient heterogeneity over training",
     "Coefficient of variation over parameter tensors of the gradient norm and of the "
     "effective step size ||u||/||g|| (arXiv 2502.00213).", grad_heterogeneity, True),
    ("layer_norms", "Layer-wise norm evolution",
     "Parameter norm and update/parameter norm ratio per layer over training.",
     layer_norms, True),
    ("loss_by_frequency", "Eval loss by token frequency",
     "Final eval loss per target-token frequency bucket (equal-mass buckets; 0 = most "
     "frequent).", loss_by_frequency, True),
    ("heterogeneity_by_condition", "Gradient heterogeneity by condition",
     "Mean gradient-norm CV per optimizer under each condition (e.g. pre- vs post-LN), over "
     "runs with the same learning rate and seed in every condition.",
     heterogeneity_by_condition, False),
    ("gap_vs_heterogeneity", "SGD's gap vs gradient heterogeneity",
     "Per condition: final loss of SGD-momentum minus that of SignSGD and of AdamW at their "
     "best learning rates (bars: sum of the two 95% t half-widths, a conservative interval of "
     "the difference), against SGD's measured gradient-norm CV. Tomihari & Sato (2025) relate "
     "a larger heterogeneity to a larger gap.", gap_vs_heterogeneity, False),
    ("depth_variance", "Residual-stream variance by layer",
     "Variance of the residual stream after each block on the fixed probe batch at the final "
     "probe step (log scale), per condition, one line per optimizer at its best learning rate "
     "(mean over seeds; band: 95% Student-t interval).", depth_variance, False),
    ("layer_scores", "Layer scores by depth",
     "Per block of the final checkpoint: loss increase when the block is replaced by its "
     "least-squares affine map (usefulness; dashed: the 10% threshold), loss increase when it "
     "is skipped (causal), and the token Jacobian's distance from the identity; per condition, "
     "one line per optimizer at its best learning rate (band: 95% t interval over seeds).",
     layer_scores, False),
    ("depth_scaling", "Layer usefulness vs depth",
     "Share of useful blocks, mean usefulness and the log-variance slope against the number "
     "of blocks, over the primary condition and the conditions that change only "
     "model.num_layers (bars: 95% t interval over seeds).", depth_scaling, False),
    ("sparsity_by_layer", "Attention and weight sparsity by layer",
     "Per layer at the final probe step: normalised attention entropy (1 = uniform over the "
     "visible keys), probability mass of the top key(s), and the share of weights below the "
     "largest threshold times their tensor's rms (line style: parameter kind).",
     sparsity_by_layer, False),
]
FIGURE_NAMES = [f[0] for f in FIGURES]
STUDY_FIGURES = [f[0] for f in FIGURES if not f[4]]  # one file, not one per condition


def make_all(study: Study, best: pd.DataFrame, runs: pd.DataFrame,
             plots_dir: str) -> list[Figure]:
  """Every figure of FIGURES (per condition where marked); failures become placeholders."""
  os.makedirs(plots_dir, exist_ok=True)
  out = []
  conds = study.conditions or ["(none)"]
  for name, title, caption, fn, per_cond in FIGURES:
    for cond in (conds if per_cond else [None]):
      fname = f"{name}__{cond}.png" if per_cond else f"{name}.png"
      path = os.path.join(plots_dir, fname)
      full_title = f"{title} ({cond})" if per_cond else title
      try:
        note = fn(study, best, runs, cond, path)
      except Exception as e:  # pylint: disable=broad-except
        note = f"plot failed: {type(e).__name__}: {e}"
        _placeholder(path, full_title, note)
      out.append(Figure(name, full_title, caption, path, note))
  return out
