r"""Sign family (Lion and SignSGD, and a reference for the other optimizers).

* ``sign/update_flip_frac``   = #{sign(u_t) sign(u_{t-1}) < 0} / #{sign(u_t) sign(u_{t-1}) != 0}:
  share of coordinates (non-zero at both steps) whose update sign flipped since step t-1
  (NaN when the stored sign is not from t-1). sign(u_{t-1}) is stored as int8.
* ``sign/descent_agree_frac`` = #{g_t != 0 and sign(u_t) = -sign(g_t)} / #{g_t != 0}: agreement
  of the update with the descent direction -g (1 for plain SGD; Lion/SignSGD/momentum lower it).
"""

from __future__ import annotations

import jax.numpy as jnp

from jaxopt_study.diagnostics import _agg


def compute(ctx: _agg.Ctx):
  ts = ctx.tensors
  if ts and ts[0].prev_sign is not None:
    flip = {}
    for t in ts:
      prod = jnp.sign(t.u) * t.prev_sign.astype(jnp.float32)
      flip[t.path] = (jnp.sum(prod < 0), jnp.sum(prod != 0))
    _agg.emit(ctx, "sign/update_flip_frac", flip,
              lambda a, b: jnp.where(ctx.prev_valid, _agg.ratio(a, b), _agg.NAN))
  agree = {t.path: (jnp.sum((t.g != 0) & (jnp.sign(t.u) == -jnp.sign(t.g))), jnp.sum(t.g != 0))
           for t in ts}
  _agg.emit(ctx, "sign/descent_agree_frac", agree, _agg.ratio)
