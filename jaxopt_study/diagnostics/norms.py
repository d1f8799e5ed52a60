r"""Layer-wise norms family (Euclidean norms of the concatenation over the group).

* ``norms/param``              = |theta_t| (parameters before this step's update).
* ``norms/grad``               = |g_t|.
* ``norms/update``             = |u_t| (u_t = the optimizer's output, params_{t+1} = theta_t + u_t).
* ``norms/update_param_ratio`` = |u_t| / |theta_t|.
"""

from __future__ import annotations

import jax.numpy as jnp

from jaxopt_study.diagnostics import context


def compute(ctx: context.Context):
  sq = lambda x: context.red(jnp.square(x))
  ctx.emit("norms/param", lambda g: (sq(g.p),), jnp.sqrt)
  ctx.emit("norms/grad", lambda g: (sq(g.g),), jnp.sqrt)
  ctx.emit("norms/update", lambda g: (sq(g.u),), jnp.sqrt)
  ctx.emit("norms/update_param_ratio", lambda g: (sq(g.u), sq(g.p)), context.sqrt_ratio)
