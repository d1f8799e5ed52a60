"""Permutation score: does the order of two blocks matter?

Swap the weights of blocks ``i`` and ``j`` (block ``i``'s position applies block ``j``'s weights
and vice versa; the embedding, head and every other block unchanged) and measure the normalised
loss change

    P[i, j] = (L_{i<->j} - L) / L,        L = the unmodified model's mean cross-entropy,

symmetric with a zero diagonal. Near-zero entries mean the two blocks commute on this data
(each acts on features the other neither writes nor reads); large ones mean the network relies
on their order. Swapping two blocks with identical weights changes nothing: P[i, j] = 0.
"""

from __future__ import annotations

import functools
import itertools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxopt_study.analysis import blocks as blocks_lib


class PermutationScores(NamedTuple):
  base_loss: jax.Array  # []
  loss_change: jax.Array  # [L, L]: P[i, j], symmetric, zero diagonal


@functools.partial(jax.jit, static_argnums=0)
def permutation_scores(parts: blocks_lib.ModelParts, params, batch) -> PermutationScores:
  """Normalised loss change of every pairwise block swap (module doc); batch int [B, T + 1]."""
  num_layers = parts.num_layers
  inputs, targets = blocks_lib.split_batch(batch)
  base = blocks_lib.mean_loss(blocks_lib.forward(parts, params, inputs).logits, targets)
  pairs = np.array(list(itertools.combinations(range(num_layers), 2)), np.int32).reshape(-1, 2)
  if not len(pairs):
    return PermutationScores(base, jnp.zeros((num_layers, num_layers)))

  def swapped_loss(pair):
    i, j = pair[0], pair[1]
    order = jnp.arange(num_layers)
    order = order.at[i].set(j).at[j].set(i)
    return blocks_lib.mean_loss(
        blocks_lib.forward(parts, params, inputs, order=order).logits, targets
    )

  change = (jax.lax.map(swapped_loss, jnp.asarray(pairs)) - base) / base  # [pairs]
  p = jnp.zeros((num_layers, num_layers)).at[pairs[:, 0], pairs[:, 1]].set(change)
  return PermutationScores(base, p + p.T)
