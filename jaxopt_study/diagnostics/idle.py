r"""Idle-entry movement family: how far the optimizer moves entries that got no gradient.

The central question of sparse gradients: a row of a token absent from the batch has g = 0, yet
its update u (params_{t+1} = theta_t + u_t) is not 0 when the optimizer carries momentum: SGD
with momentum moves it by lr b m_{t-1}, Adam by lr m_hat / (sqrt(v_hat) + eps), Lion by the full
lr (it takes the sign of its momentum), while plain SGD, SignSGD and Adafactor without momentum
leave it in place (apart from weight decay, which moves every decayed entry).

An entry is *idle* at step t iff ``|g_t| <= active_threshold`` (default: g_t = 0), else
*active*; never-active entries are idle. Over the group (global / kind / layer / param):

* ``idle/update_sq_share``        = sum_{idle} u^2 / sum u^2: the share of the update's squared
  norm that lands on idle entries (NaN when u = 0 on the whole group);
* ``idle/update_abs_mean_idle``   = sum_{idle} |u| / #idle (NaN without idle entries);
* ``idle/update_abs_mean_active`` = sum_{active} |u| / #active (NaN without active entries).

Per token-frequency bucket (entries of the token-embedding rows of the tokens in bucket BB, with
a bucket table; 00 = most frequent): ``idle/emb_update_sq_share/freq_bucket=BB``,
``idle/emb_update_abs_mean_idle/freq_bucket=BB``, ``idle/emb_update_abs_mean_active/freq_bucket=BB``
(same formulas restricted to those rows; with several token-embedding tensors, a
``/param=<path>`` suffix before the bucket). Full steps only; no state.
"""

from __future__ import annotations

import jax.numpy as jnp

from jaxopt_study.diagnostics import context


def compute(ctx: context.Context):
  red, thr = context.red, ctx.cfg.active_threshold
  idle = lambda g: jnp.abs(g.g) <= thr
  ctx.emit("idle/update_sq_share",
           lambda g: (red(jnp.where(idle(g), jnp.square(g.u), 0.0)), red(jnp.square(g.u))),
           context.safe_div)
  ctx.emit("idle/update_abs_mean_idle",
           lambda g: (red(jnp.where(idle(g), jnp.abs(g.u), 0.0)), red(idle(g))),
           context.safe_div)
  ctx.emit("idle/update_abs_mean_active",
           lambda g: (red(jnp.where(idle(g), 0.0, jnp.abs(g.u))), red(~idle(g))),
           context.safe_div)

  for r in ctx.rows:
    sfx = f"/param={r.path}" if len(ctx.rows) > 1 else ""
    v = r.group.shape[0]
    g, u = r.group.g[0].reshape(v, -1), r.group.u[0].reshape(v, -1)
    rest = jnp.abs(g) <= thr
    row = lambda x: jnp.sum(x, axis=1)  # [V] per-row sums
    ctx.emit_bucket_ratio("idle/emb_update_sq_share" + sfx,
                          row(jnp.where(rest, jnp.square(u), 0.0)), row(jnp.square(u)))
    ctx.emit_bucket_ratio("idle/emb_update_abs_mean_idle" + sfx,
                          row(jnp.where(rest, jnp.abs(u), 0.0)), row(rest))
    ctx.emit_bucket_ratio("idle/emb_update_abs_mean_active" + sfx,
                          row(jnp.where(rest, 0.0, jnp.abs(u))), row(~rest))
