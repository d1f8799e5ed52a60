"""Figures of one checkpoint's layer scores (matplotlib figures without pyplot, PNG), from analysis.json."""

from __future__ import annotations

import os

import matplotlib
import matplotlib.figure
from matplotlib.backends import backend_agg
import numpy as np

DPI = 90


def _subplots(*args, figsize=None, **kwargs):
  """``plt.subplots`` without pyplot: a Figure on an Agg canvas of its own (importing this
  module sets no matplotlib backend or global state; nothing to close)."""
  fig = matplotlib.figure.Figure(figsize=figsize)
  backend_agg.FigureCanvasAgg(fig)
  return fig, fig.subplots(*args, **kwargs)


def _array(x):
  return np.array([[np.nan if v is None else v for v in row] for row in x], float)


def _heatmap(ax, m, title, label):
  im = ax.imshow(m, cmap="viridis", origin="upper")
  ax.set_xlabel("block j")
  ax.set_ylabel("block i")
  ax.set_title(title)
  ax.set_xticks(range(m.shape[1]))
  ax.set_yticks(range(m.shape[0]))
  ax.figure.colorbar(im, ax=ax, label=label)


def jacobian(res, path):
  jac = res["jacobian"]
  layers = np.arange(len(jac["identity_deviation"]))
  fig, axes = _subplots(1, 2, figsize=(10, 3.5))
  axes[0].plot(layers, jac["identity_deviation"], "o-")
  axes[0].set_title("||J - I||_F / ||I||_F")
  root_d = np.sqrt(res["d_model"])
  for key in ("diag_norm", "offdiag_norm", "frobenius"):
    axes[1].plot(layers, np.asarray(jac[key], float) / root_d, "o-", label=f"{key} / sqrt(D)")
  axes[1].plot(layers, jac["spectral"], "o--", label="spectral")
  axes[1].axhline(1.0, color="k", lw=0.5)
  axes[1].set_title("token Jacobian norms (identity: 1, 0, 1, 1)")
  axes[1].legend(fontsize=8)
  for ax in axes:
    ax.set_xlabel("block")
    ax.set_xticks(layers)
  _save(fig, path)


def usefulness(res, path):
  use = res["usefulness"]
  inc = np.asarray(use["loss_increase"], float) * 100
  layers = np.arange(len(inc))
  fig, ax = _subplots(figsize=(6, 3.5))
  ax.bar(layers, inc, color=["tab:red" if v > use["threshold"] * 100 else "tab:gray" for v in inc])
  ax.axhline(use["threshold"] * 100, color="k", ls="--", lw=1)
  ax.set_xlabel("block replaced by its least-squares affine map")
  ax.set_ylabel("loss increase (%)")
  ax.set_title(f"usefulness: {use['share_useful']:.0%} of blocks above {use['threshold']:.0%}")
  ax.set_xticks(layers)
  _save(fig, path)


def causal(res, path):
  c = res["causal"]
  fig, axes = _subplots(1, 2, figsize=(10, 4))
  _heatmap(axes[0], _array(c["output_change"]), "skip i: change of h after block j", "relative")
  _heatmap(axes[1], _array(c["update_change"]), "skip i: change of block j's update", "relative")
  _save(fig, path)


def permutation(res, path):
  fig, ax = _subplots(figsize=(5, 4))
  _heatmap(ax, _array(res["permutation"]["loss_change"]), "swap i <-> j: (L' - L) / L", "relative")
  _save(fig, path)


FIGURES = {
    "jacobian": jacobian,
    "usefulness": usefulness,
    "causal": causal,
    "permutation": permutation,
}


def make_all(res, directory) -> list[str]:
  """Writes every figure as ``directory/<name>.png``; returns the paths."""
  paths = []
  for name, fn in FIGURES.items():
    path = os.path.join(directory, f"{name}.png")
    fn(res, path)
    paths.append(path)
  return paths


def _save(fig, path):
  fig.tight_layout()
  fig.savefig(path, dpi=DPI)
