"""Usefulness: how much loss a block's non-linearity is worth.

Block ``i`` maps its input ``X = h_i`` to ``Y = h_{i+1}`` (both flattened over tokens to
[N, D], N = B * T). Fit the least-squares token-wise affine map on a *fit* batch,

    (A_i, b_i) = argmin_{A, b} || Y - (X A + 1 b^T) ||_F^2,

solved on centred data (A_i = lstsq(X - mean X, Y - mean Y), b_i = mean Y - (mean X) A_i), which
keeps the problem well conditioned when the residual stream has a large mean. Then, on the
*evaluation* batch, replace block ``i`` by ``h -> h A_i + b_i`` (everything else unchanged) and
measure the relative loss increase

    u_i = (L_i^affine - L) / L,        L = the unmodified model's mean cross-entropy.

The replacement loses everything the block does non-linearly and across tokens (attention). A
block is *useful* when u_i > threshold (10% by default); ``share_useful`` is the fraction of
such blocks. ``fit_r2`` is the fit's R^2 on the block's update ``Y - X`` (1: the update is
affine). A block that is the identity, or any affine token-wise map, gives u_i = 0 (up to the
float error of the fit) and R^2 = 1 where its update is not constant.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxopt_study.analysis import blocks as blocks_lib

THRESHOLD = 0.10  # The criterion: the loss rises by more than 10%.


class Usefulness(NamedTuple):
  base_loss: jax.Array  # []: L on the evaluation batch
  loss: jax.Array  # [L]: L_i^affine
  loss_increase: jax.Array  # [L]: u_i = (L_i^affine - L) / L
  fit_r2: jax.Array  # [L]: R^2 of the affine fit of the block's update (fit batch)
  share_useful: jax.Array  # []: mean_i [u_i > threshold]


def fit_affine(x, y):
  """Least-squares token-wise affine map: x, y [N, D] -> A [D, D], b [D] with y ~ x A + b."""
  mx, my = x.mean(0), y.mean(0)
  a = jnp.linalg.lstsq(x - mx, y - my)[0]
  return a, my - mx @ a


def _r2(x, y, a, b):
  """R^2 of the update fit: 1 - ||y - (x A + b)||^2 / ||(y - x) - mean(y - x)||^2."""
  u = y - x
  resid = jnp.sum(jnp.square(y - (x @ a + b)))
  total = jnp.sum(jnp.square(u - u.mean(0)))
  return jnp.where(total > 0, 1.0 - resid / jnp.where(total > 0, total, 1.0), 1.0)


@functools.partial(jax.jit, static_argnums=0, static_argnames="threshold")
def usefulness(parts: blocks_lib.ModelParts, params, batch, fit_batch, *,
               threshold: float = THRESHOLD) -> Usefulness:
  """Affine-replacement loss increase of every block (module doc).

  Args:
    parts: the model's pieces (``blocks.gpt_parts``).
    params: the model's parameters.
    batch: int [B, T + 1] windows the loss is measured on.
    fit_batch: int [B', T + 1] windows the affine maps are fitted on (may be ``batch``).
    threshold: u_i above which a block counts as useful.
  """
  num_layers = parts.num_layers
  fit_inputs, _ = blocks_lib.split_batch(fit_batch)
  hs = blocks_lib.forward(parts, params, fit_inputs).hs  # [L + 1, B', T, D]
  d = hs.shape[-1]
  flat = hs.reshape(num_layers + 1, -1, d)  # [L + 1, N, D]
  a, b = jax.vmap(fit_affine)(flat[:-1], flat[1:])  # [L, D, D], [L, D]
  r2 = jax.vmap(_r2)(flat[:-1], flat[1:], a, b)

  inputs, targets = blocks_lib.split_batch(batch)
  base = blocks_lib.mean_loss(blocks_lib.forward(parts, params, inputs).logits, targets)

  def replaced_loss(i):
    affine = blocks_lib.Affine(a, b, jnp.arange(num_layers) == i)
    logits = blocks_lib.forward(parts, params, inputs, affine=affine).logits
    return blocks_lib.mean_loss(logits, targets)

  losses = jax.lax.map(replaced_loss, jnp.arange(num_layers))
  increase = (losses - base) / base
  return Usefulness(base, losses, increase, r2, jnp.mean(increase > threshold))
