"""Causal score: what skipping one block does to every later block.

Skip block ``i`` (``h_{i+1} = h_i``, everything else unchanged) and compare each later block
``j > i`` with the unmodified run (norms over all tokens of the batch):

    output_change[i, j] = ||h~_{j+1} - h_{j+1}||_F / ||h_{j+1}||_F    (residual stream after j)
    update_change[i, j] = ||delta~_j - delta_j||_F / ||delta_j||_F    (what block j adds,
                                                                        delta_j = h_{j+1} - h_j)

where ``~`` marks the run with block ``i`` skipped; entries with ``j <= i`` are NaN (undefined),
and so are update changes of a block whose own update is zero. ``output_change`` includes the
missing contribution of block ``i`` itself; ``update_change`` measures how much later blocks
*react* to its absence. ``loss_increase[i] = (L_skip_i - L) / L`` is the relative loss change.
Skipping a block that is exactly the identity changes nothing: every entry is 0.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxopt_study.analysis import blocks as blocks_lib


class CausalScores(NamedTuple):
  output_change: jax.Array  # [L, L] (skipped block i, later block j)
  update_change: jax.Array  # [L, L]
  loss_increase: jax.Array  # [L]


@functools.partial(jax.jit, static_argnums=0)
def causal_scores(parts: blocks_lib.ModelParts, params, batch) -> CausalScores:
  """Skip-one-block effects on later blocks (module doc); batch int [B, T + 1]."""
  num_layers = parts.num_layers
  inputs, targets = blocks_lib.split_batch(batch)
  base = blocks_lib.forward(parts, params, inputs)
  base_loss = blocks_lib.mean_loss(base.logits, targets)
  tokens_axes = (1, 2, 3)

  def skip_one(i):
    run = blocks_lib.forward(parts, params, inputs, skip=jnp.arange(num_layers) == i)
    out = blocks_lib.relative_change(run.hs[1:], base.hs[1:], tokens_axes)  # [L]
    upd = blocks_lib.relative_change(
        jnp.diff(run.hs, axis=0), jnp.diff(base.hs, axis=0), tokens_axes
    )  # [L]
    return out, upd, blocks_lib.mean_loss(run.logits, targets)

  out, upd, losses = jax.lax.map(skip_one, jnp.arange(num_layers))  # [L, L], [L, L], [L]
  later = jnp.arange(num_layers)[None, :] > jnp.arange(num_layers)[:, None]
  return CausalScores(
      jnp.where(later, out, jnp.nan),
      jnp.where(later, upd, jnp.nan),
      (losses - base_loss) / base_loss,
  )
