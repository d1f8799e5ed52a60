r"""Second-moment (and momentum) aging family.

Per entry, ``last_t`` = the last step <= t at which the entry was active (``|g| >
active_threshold``; -1 if never), ``age_t = t - last_t`` (0 = received a gradient now). v = the
optimizer's second moment *before* this step's update (``nu``; Adafactor: the full-shape
reconstruction from ``v_row``/``v_col``, or ``v`` for unfactored tensors), m = its first moment,
``s_t = d s_{t-1} + (1-d) g_t^2`` with d = sq_ema_decay, ``s_hat = s_t / (1 - d^n)``.

* ``aging/age_mean``, ``aging/age_q<Q>`` (global, per kind), ``aging/age_hist`` (1-d sample).
* ``aging/frac_older_than_H`` = #{age >= H} / N.
* ``aging/log_staleness_mean`` / ``_q<Q>`` / ``_hist`` = log(v / s_hat) over entries with v > 0
  and s > 0: how far the optimizer's second moment lags the current gradient scale (> 0: v
  remembers larger, older gradients; an inactive entry's log-staleness grows by
  log(b2 / d) per step for Adam). Raw optax ``nu`` is not bias-corrected: early in training
  (t << 1/(1-b2)) the value includes log(1 - b2^t). Absent without a second moment.
* ``aging/nu_mass_older_than_H`` = sum_{age >= H} v / sum v: share of the second moment's mass
  held by entries whose every contributing gradient is at least H steps old. (Entries with a
  recent gradient also keep some old mass; this counts only the certainly-old part, a lower
  bound of the share of v coming from gradients older than H steps.)
* ``aging/mu_mass_older_than_H`` = sum_{age >= H} m^2 / sum m^2: the same for momentum, for every
  optimizer with a first moment.

Token-embedding rows (age of a row = min over its entries; v and s_hat row means):

* ``aging/emb_row_age_mean``, ``aging/emb_row_age_q<Q>``, ``aging/emb_row_frac_older_than_H``;
* ``aging/emb_row_log_staleness_mean`` = mean over rows of log(mean_row v / mean_row s_hat)
  (for Adafactor, mean_row v of a (V, D) embedding is exactly ``v_col``);
* per token-frequency bucket means: ``aging/emb_row_age_mean/freq_bucket=BB``,
  ``aging/emb_row_frac_older_than_H/freq_bucket=BB``,
  ``aging/emb_row_log_staleness_mean/freq_bucket=BB``.
"""

from __future__ import annotations

import jax.numpy as jnp

from jaxopt_study.diagnostics import context


def compute(ctx: context.Context):
  cfg = ctx.cfg
  red = context.red
  h = int(cfg.horizon)
  size = lambda g: jnp.full((g.n,), g.size, jnp.float32)
  ctx.emit("aging/age_mean", lambda g: (red(g.age.astype(jnp.float32)), size(g)), context.safe_div)
  ctx.emit_quantiles("aging/age", lambda g: g.age, hist=True)
  ctx.emit("aging/frac_older_than_H", lambda g: (red(g.age >= h), size(g)), context.safe_div)

  s_bc = ctx.bias_correction(cfg.sq_ema_decay)

  def log_stale(g):
    if g.v is None or g.s is None:
      return None
    ok = (g.v > 0) & (g.s > 0)
    return jnp.where(ok, jnp.log(jnp.where(ok, g.v, 1.0))
                     - jnp.log(jnp.where(ok, g.s / s_bc, 1.0)), jnp.nan)
  ctx.emit("aging/log_staleness_mean",
           lambda g: None if log_stale(g) is None else (
               red(jnp.nan_to_num(log_stale(g), nan=0.0)), red(~jnp.isnan(log_stale(g)))),
           context.safe_div)
  ctx.emit_quantiles("aging/log_staleness", log_stale, hist=True)
  ctx.emit("aging/nu_mass_older_than_H",
           lambda g: None if g.v is None else (red(jnp.where(g.age >= h, g.v, 0.0)), red(g.v)),
           context.safe_div)
  ctx.emit("aging/mu_mass_older_than_H",
           lambda g: None if g.m is None else (
               red(jnp.where(g.age >= h, jnp.square(g.m), 0.0)), red(jnp.square(g.m))),
           context.safe_div)

  for r in ctx.rows:
    sfx = f"/param={r.path}" if len(ctx.rows) > 1 else ""
    grp = r.group
    v = grp.shape[0]
    row_age = jnp.min(grp.age[0].reshape(v, -1), axis=1).astype(jnp.float32)
    old = (row_age >= h).astype(jnp.float32)
    ctx.add_scalar("aging/emb_row_age_mean" + sfx, jnp.mean(row_age))
    ctx.add_scalar("aging/emb_row_frac_older_than_H" + sfx, jnp.mean(old))
    ctx.quantiles("aging/emb_row_age",
                  row_age[::context.grid_stride((v,), int(cfg.quantile_sample_size))], sfx)
    ctx.emit_buckets("aging/emb_row_age_mean" + sfx, row_age)
    ctx.emit_buckets("aging/emb_row_frac_older_than_H" + sfx, old)
    if grp.v is not None and grp.s is not None:
      vm = jnp.mean(grp.v[0].reshape(v, -1), axis=1)
      sm = jnp.mean(grp.s[0].reshape(v, -1), axis=1) / s_bc
      ok = (vm > 0) & (sm > 0)
      x = jnp.log(jnp.where(ok, vm, 1.0)) - jnp.log(jnp.where(ok, sm, 1.0))
      ctx.add_scalar("aging/emb_row_log_staleness_mean" + sfx,
                     context.safe_div(jnp.sum(jnp.where(ok, x, 0.0)), jnp.sum(ok)))
      ctx.emit_buckets("aging/emb_row_log_staleness_mean" + sfx, x, ok)
