r"""Sign family (Lion and SignSGD, and a reference for the other optimizers).

* ``sign/update_flip_frac``   = #{sign(u_t) sign(u_{t-1}) < 0} / #{sign(u_t) sign(u_{t-1}) != 0}:
  share of coordinates (non-zero at both steps) whose update sign flipped since step t-1
  (NaN when the stored sign is not from t-1). sign(u_{t-1}) is stored as int8.
* ``sign/descent_agree_frac`` = #{g_t != 0 and sign(u_t) = -sign(g_t)} / #{g_t != 0}: agreement
  of the update with the descent direction -g (1 for plain SGD; Lion/SignSGD/momentum lower it).
"""

from __future__ import annotations

import jax.numpy as jnp

from jaxopt_study.diagnostics import context


def compute(ctx: context.Context):
  def flip(g):
    if g.prev_sign is None:
      return None
    prod = jnp.sign(g.u) * g.prev_sign.astype(jnp.float32)
    return context.red(prod < 0), context.red(prod != 0)
  ctx.emit("sign/update_flip_frac", flip,
           lambda a, b: jnp.where(ctx.prev_valid, context.safe_div(a, b), context.NAN))
  ctx.emit("sign/descent_agree_frac",
           lambda g: (context.red((g.g != 0) & (jnp.sign(g.u) == -jnp.sign(g.g))),
                      context.red(g.g != 0)), context.safe_div)
