r"""Layer-wise norms family (Euclidean norms of the concatenation over the group).

* ``norms/param``              = |theta_t| (parameters before this step's update).
* ``norms/grad``               = |g_t|.
* ``norms/update``             = |u_t| (u_t = the optimizer's output, params_{t+1} = theta_t + u_t).
* ``norms/update_param_ratio`` = |u_t| / |theta_t|.
"""

from __future__ import annotations

import jax.numpy as jnp

from jaxopt_study.diagnostics import _agg


def compute(ctx: _agg.Ctx):
  sq = lambda x: jnp.vdot(x, x)
  p = {t.path: (sq(t.p),) for t in ctx.tensors}
  g = {t.path: (sq(t.g),) for t in ctx.tensors}
  u = {t.path: (sq(t.u),) for t in ctx.tensors}
  _agg.emit(ctx, "norms/param", p, jnp.sqrt)
  _agg.emit(ctx, "norms/grad", g, jnp.sqrt)
  _agg.emit(ctx, "norms/update", u, jnp.sqrt)
  _agg.emit(ctx, "norms/update_param_ratio",
            {k: (u[k][0], p[k][0]) for k in p}, _agg.sqrt_ratio)
