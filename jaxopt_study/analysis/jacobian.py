"""Token Jacobians of each block: how far a block is from the identity map.

For block ``i`` with input residual stream ``h_i`` [B, T, D] and output ``h_{i+1} = f_i(h_i)``,
the token Jacobian at sampled position ``(b, t)`` is the D x D matrix

    J = d h_{i+1}[b, t] / d h_i[b, t]          (other positions of h_i held fixed),

the map's sensitivity to its own token (attention also makes ``h_{i+1}[b, t]`` depend on earlier
positions; those cross-token Jacobians are not taken). A pre-LN block is ``I + d(branch)``, so
``J - I`` is what the block adds on top of passing its input through. Per sampled token:

    identity_deviation  ||J - I||_F / ||I||_F = ||J - I||_F / sqrt(D)
    diag_norm           ||diag(J)||_2          (Frobenius norm of the diagonal part)
    offdiag_norm        ||J - diag(J)||_F
    frobenius           ||J||_F
    spectral            ||J||_2 = sigma_max(J)

each averaged over the sampled tokens (``jacobian_stats`` returns [L] arrays). A block that is
exactly the identity has J = I: deviation 0, diag_norm = sqrt(D), offdiag_norm 0, spectral 1.

Cost: ``jax.jacfwd`` pushes D tangents through one block over one sequence per sample, samples
one after another (``lax.map``); S samples and L blocks cost about S * L * D block-sequence
forward passes.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxopt_study.analysis import blocks as blocks_lib


class JacobianStats(NamedTuple):
  """Means over the sampled tokens; each [L]."""

  identity_deviation: jax.Array
  diag_norm: jax.Array
  offdiag_norm: jax.Array
  frobenius: jax.Array
  spectral: jax.Array


def token_jacobian(block_fn, block_params, h, b, t):
  """d block(h)[b, t] / d h[b, t]: h [B, T, D], b and t int scalars -> [D, D] (out, in)."""
  seq = jax.lax.dynamic_index_in_dim(h, b, axis=0, keepdims=True)  # [1, T, D]

  def f(v):  # [D] -> [D]
    x = jax.lax.dynamic_update_index_in_dim(seq, v[None, None, :], t, axis=1)
    return jax.lax.dynamic_index_in_dim(block_fn(block_params, x), t, axis=1, keepdims=False)[0]

  return jax.jacfwd(f)(seq[0, t])


def matrix_stats(j) -> JacobianStats:
  """The five statistics (module doc) of one Jacobian j [D, D]."""
  d = j.shape[-1]
  diag = jnp.diagonal(j)
  eye = jnp.eye(d, dtype=j.dtype)
  return JacobianStats(
      identity_deviation=jnp.linalg.norm(j - eye) / jnp.sqrt(d),
      diag_norm=jnp.linalg.norm(diag),
      offdiag_norm=jnp.linalg.norm(j - jnp.diag(diag)),
      frobenius=jnp.linalg.norm(j),
      spectral=jnp.linalg.svd(j, compute_uv=False)[0],
  )


@functools.partial(jax.jit, static_argnums=0)
def jacobian_stats(parts: blocks_lib.ModelParts, params, tokens, sample_b, sample_t):
  """Per-block token-Jacobian statistics averaged over the sampled tokens.

  Args:
    parts: the model's pieces (``blocks.gpt_parts``).
    params: the model's parameters.
    tokens: int [B, T] inputs.
    sample_b, sample_t: int [S]: the sampled tokens' rows and positions.

  Returns:
    JacobianStats of [L] arrays.
  """
  hs = blocks_lib.forward(parts, params, tokens).hs  # [L + 1, B, T, D]
  per_block = []
  for i, name in enumerate(parts.block_names):
    jac = lambda bt, i=i, name=name: token_jacobian(parts.block, params[name], hs[i], *bt)
    stats = jax.lax.map(lambda bt: matrix_stats(jac(bt)), (sample_b, sample_t))  # each [S]
    per_block.append(jax.tree.map(jnp.mean, stats))
  return jax.tree.map(lambda *xs: jnp.stack(xs), *per_block)


def sample_tokens(key, batch_size: int, seq_len: int, num_samples: int):
  """``num_samples`` distinct (row, position) pairs, uniform over the batch: two int32 [S]."""
  flat = jax.random.choice(
      key, batch_size * seq_len, (min(num_samples, batch_size * seq_len),), replace=False
  )
  return (flat // seq_len).astype(jnp.int32), (flat % seq_len).astype(jnp.int32)
