"""All four layer scores of one checkpoint on one fixed validation batch -> analysis.json + plots.

``analyze`` computes them for any (parts, params, batch); ``analyze_run`` restores a run's
latest checkpoint, takes its first validation batch (the fit batch of the usefulness score is
the second one where there is one, so the affine maps are judged on data they were not fitted
on), and writes ``RUN/analysis/analysis.json`` and one PNG per score.
"""

from __future__ import annotations

import math
import os

import jax
import jax.numpy as jnp
import numpy as np

from jaxopt_study import restore
from jaxopt_study import rundir
from jaxopt_study.analysis import blocks as blocks_lib
from jaxopt_study.analysis import causal as causal_lib
from jaxopt_study.analysis import files
from jaxopt_study.analysis import jacobian as jacobian_lib
from jaxopt_study.analysis import permutation as permutation_lib
from jaxopt_study.analysis import plots
from jaxopt_study.analysis import usefulness as usefulness_lib

DIRNAME, FILENAME = files.DIRNAME, files.FILENAME


def _tolist(x):
  """Arrays -> nested lists with NaN/inf as None (valid JSON)."""
  a = np.asarray(jax.device_get(x), float)
  if a.ndim == 0:
    return float(a) if math.isfinite(a) else None
  return [_tolist(v) for v in a]


def analyze(parts: blocks_lib.ModelParts, params, batch, fit_batch=None, *,
            num_jacobian_tokens: int = 32, seed: int = 0,
            threshold: float = usefulness_lib.THRESHOLD) -> dict:
  """The four scores as a JSON-ready dict. batch, fit_batch: int [B, T + 1] windows."""
  batch = jnp.asarray(batch)
  fit_batch = batch if fit_batch is None else jnp.asarray(fit_batch)
  inputs, _ = blocks_lib.split_batch(batch)
  b, t = inputs.shape
  sample_b, sample_t = jacobian_lib.sample_tokens(
      jax.random.PRNGKey(seed), b, t, num_jacobian_tokens
  )
  jac = jacobian_lib.jacobian_stats(parts, params, inputs, sample_b, sample_t)
  use = usefulness_lib.usefulness(parts, params, batch, fit_batch, threshold=threshold)
  cau = causal_lib.causal_scores(parts, params, batch)
  perm = permutation_lib.permutation_scores(parts, params, batch)
  return {
      "num_layers": parts.num_layers,
      "d_model": int(jax.eval_shape(parts.embed, params, inputs[:1, :1]).shape[-1]),
      "batch_shape": [int(b), int(t)],
      "base_loss": _tolist(use.base_loss),
      "jacobian": {
          **{k: _tolist(v) for k, v in jac._asdict().items()},
          "num_tokens": int(sample_b.shape[0]),
      },
      "usefulness": {
          "loss_increase": _tolist(use.loss_increase),
          "loss": _tolist(use.loss),
          "fit_r2": _tolist(use.fit_r2),
          "share_useful": _tolist(use.share_useful),
          "threshold": threshold,
      },
      "causal": {k: _tolist(v) for k, v in cau._asdict().items()},
      "permutation": {"loss_change": _tolist(perm.loss_change)},
  }


def analyze_run(workdir: str, *, num_jacobian_tokens: int = 32, max_rows: int = 0,
                seed: int = 0) -> dict:
  """Restores ``workdir``'s latest checkpoint, analyzes it, writes analysis.json and plots.

  max_rows: use at most this many sequences of the validation batch (0: all of it).
  """
  run = restore.load_run(workdir)
  batches = iter(restore.load_dataset(run.config).eval_batches("validation"))
  batch = next(batches)
  second = next(batches, None)
  fit_batch = batch if second is None else second
  if max_rows:
    batch, fit_batch = batch[:max_rows], fit_batch[:max_rows]
  parts = blocks_lib.gpt_parts(run.model_config)
  res = analyze(parts, run.params, batch, fit_batch, num_jacobian_tokens=num_jacobian_tokens,
                seed=seed)
  res.update(workdir=os.path.abspath(workdir), step=run.step,
             fit_on_separate_batch=second is not None)
  out_dir = os.path.join(workdir, DIRNAME)
  os.makedirs(out_dir, exist_ok=True)
  rundir.write_json(os.path.join(out_dir, FILENAME), res)
  plots.make_all(res, out_dir)
  return res
