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

from jaxopt_study.diagnostics import _agg


def compute(ctx: _agg.Ctx):
  cfg = ctx.cfg
  ts = ctx.tensors
  h = int(cfg.horizon)
  stride = ctx.stride(sum(t.size for t in ts))
  _agg.emit(ctx, "aging/age_mean",
            {t.path: (jnp.sum(t.age.astype(jnp.float32)), t.size) for t in ts}, _agg.ratio)
  _agg.emit_quantiles(ctx, "aging/age", {t.path: _agg.sample(t.age, stride) for t in ts},
                      hist=True)
  _agg.emit(ctx, "aging/frac_older_than_H",
            {t.path: (jnp.sum(t.age >= h), t.size) for t in ts}, _agg.ratio)

  s_bc = ctx.bias_correction(cfg.sq_ema_decay)
  with_v = [t for t in ts if t.v is not None]
  if with_v and with_v[0].s is not None:
    ls = {}
    for t in with_v:
      ok = (t.v > 0) & (t.s > 0)
      ls[t.path] = jnp.where(ok, jnp.log(jnp.where(ok, t.v, 1.0))
                             - jnp.log(jnp.where(ok, t.s / s_bc, 1.0)), jnp.nan)
    _agg.emit(ctx, "aging/log_staleness_mean",
              {p: (jnp.nansum(x), jnp.sum(~jnp.isnan(x))) for p, x in ls.items()}, _agg.ratio)
    vstride = ctx.stride(sum(t.size for t in with_v))
    _agg.emit_quantiles(ctx, "aging/log_staleness",
                        {p: _agg.sample(x, vstride) for p, x in ls.items()}, hist=True)
  _agg.emit(ctx, "aging/nu_mass_older_than_H",
            {t.path: (jnp.sum(jnp.where(t.age >= h, t.v, 0.0)), jnp.sum(t.v)) for t in with_v},
            _agg.ratio)
  _agg.emit(ctx, "aging/mu_mass_older_than_H",
            {t.path: (jnp.sum(jnp.where(t.age >= h, jnp.square(t.m), 0.0)),
                      jnp.sum(jnp.square(t.m))) for t in ts if t.m is not None},
            _agg.ratio)

  for r in ctx.rows:
    sfx = f"/param={r.path}" if len(ctx.rows) > 1 else ""
    t = r.tensor
    v = t.shape[0]
    row_age = jnp.min(t.age.reshape(v, -1), axis=1).astype(jnp.float32)
    old = (row_age >= h).astype(jnp.float32)
    ctx.metrics["aging/emb_row_age_mean" + sfx] = jnp.mean(row_age)
    ctx.metrics["aging/emb_row_frac_older_than_H" + sfx] = jnp.mean(old)
    _agg.emit_quantiles(ctx, "aging/emb_row_age" + sfx,
                        {r.path: _agg.sample(row_age, ctx.stride(v))}, per_kind=False)
    buckets = ctx.token_bucket is not None and ctx.token_bucket.shape[0] == v
    if buckets:
      _agg.emit_buckets(ctx, "aging/emb_row_age_mean" + sfx, row_age)
      _agg.emit_buckets(ctx, "aging/emb_row_frac_older_than_H" + sfx, old)
    if t.v is not None and t.s is not None:
      vm = jnp.mean(t.v.reshape(v, -1), axis=1)
      sm = jnp.mean(t.s.reshape(v, -1), axis=1) / s_bc
      ok = (vm > 0) & (sm > 0)
      x = jnp.log(jnp.where(ok, vm, 1.0)) - jnp.log(jnp.where(ok, sm, 1.0))
      ctx.metrics["aging/emb_row_log_staleness_mean" + sfx] = _agg.safe_div(
          jnp.sum(jnp.where(ok, x, 0.0)), jnp.sum(ok))
      if buckets:
        _agg.emit_buckets(ctx, "aging/emb_row_log_staleness_mean" + sfx, x, ok)
