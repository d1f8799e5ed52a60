r"""Second-moment aging family: how old the entries' last gradients are, and how far the
optimizer's second moment lags the current gradient scale.

Per entry, ``last_t`` = the last step <= t at which the entry was active (``|g| >
active_threshold``; -1 if never), ``age_t = t - last_t`` (0 = received a gradient now; an entry
never active has age t + 1, i.e. it counts as last active just before step 0). v = the
optimizer's second moment *before* this step's update, v_{t-1} (Adam's ``nu``; Adafactor: the
full-shape reconstruction from ``v_row``/``v_col``, or ``v`` for unfactored tensors);
``s_t = d s_{t-1} + (1-d) g_t^2`` (s_{-1} = 0) with d = sq_ema_decay, ``s_hat = s_t / (1 - d^n)``,
n = number of update() calls including this one.

* ``aging/age_mean``, ``aging/age_q<Q>`` (global, per kind), ``aging/age_hist``.
* ``aging/frac_older_than_H`` = #{age >= H} / N (never-active entries count once t >= H - 1).
* ``aging/log_staleness_mean`` / ``_q<Q>`` / ``_hist`` = log(v / s_hat) over the entries that were
  active at some step before t (so v_{t-1} holds at least one of their gradients) and have
  v > 0 and s > 0. The rule is the same for every optimizer: an entry whose first gradient is
  g_t, or that never had one, is excluded, whether its v is exactly 0 (Adam's nu) or an epsilon
  floor (Adafactor adds 1e-30 to g^2, so its v is never 0 and log(1e-30 / s) ~ -65 would
  otherwise dominate the mean). > 0: v remembers larger, older gradients. Absent without a
  second moment. Raw optax ``nu`` is not bias-corrected: early in training (t << 1/(1-b2)) the
  value includes log(1 - b2^t).

  Growth while idle: for an entry inactive since step a (Adam, nu decaying by exactly b2 per
  step), log(v / s_hat) grows from call n to n + 1 by
  ``log(b2 / d) + log((1 - d^(n+1)) / (1 - d^n))``: the second term, from s_hat's bias
  correction, makes the growth log(b2 / d) only once d^n << 1 - d. For d = 0.9, b2 = 0.95
  (log(b2/d) = 0.054): 0.142 at n = 7, 0.068 at n = 20, within 0.005 of 0.054 from n = 30.
  Adafactor's decay 1 - t^-0.8 varies with t, so its idle growth has no constant rate.

Which gradient: g is the loss's gradient as the step computes it, *before* the chain's
global-norm clipping (``optimizers.build``: clip, then the optimizer's moments), while v is
built from the clipped gradients c_t g_t, c_t = min(1, clip_norm / |g_t|). Where clipping is
active, log_staleness carries an offset of about 2 log c (about -2 log(|g| / clip_norm); early
in training, with |g| ~ 100 and clip_norm 1, about -9), so compare it across optimizers that
share clip_norm, or with clipping off (``optimizer.clip_norm=0``), not with plain optax.

With ``entry_sample_size`` > 0 the per-entry statistics above (ages, s) are kept on a fixed
strided grid of entries of each tensor (``core.entry_strides``; v is read on the same grid) and
estimate the all-entry values; the row metrics below are exact in both cases (rows keep their
own last active step and EMA of the row mean of g^2).

Token-embedding rows (age of a row = min over its entries; v and s_hat row means):

* ``aging/emb_row_age_mean``, ``aging/emb_row_age_q<Q>``, ``aging/emb_row_frac_older_than_H``;
* ``aging/emb_row_log_staleness_mean`` = mean over rows of log(mean_row v / mean_row s_hat) over
  the rows with an active entry at some step before t and mean_row v > 0, mean_row s > 0 (for
  Adafactor, mean_row v of a (V, D) embedding is exactly ``v_col``);
* per token-frequency bucket means: ``aging/emb_row_age_mean/freq_bucket=BB``,
  ``aging/emb_row_frac_older_than_H/freq_bucket=BB``,
  ``aging/emb_row_log_staleness_mean/freq_bucket=BB`` (NaN for a bucket without such rows).

(The former ``aging/nu_mass_older_than_H`` / ``mu_mass_older_than_H`` are gone: they summed
the moment over entries idle >= H steps, a loose lower bound of the share of the moment from
gradients older than H. The exact share, b^(H-1) m_{t-H} / m_{t-1} for an EMA m of decay b,
needs the optimizer's decay, which optax keeps out of its state, and does not exist for
Adafactor's factored, step-dependent v.)
"""

from __future__ import annotations

import jax.numpy as jnp

from jaxopt_study.diagnostics import context


def compute(ctx: context.Context):
  cfg = ctx.cfg
  red = context.red
  h = int(cfg.horizon)
  # Ages and s live on each tensor's counters grid (all entries unless entry_sample_size > 0).
  ctx.emit("aging/age_mean", lambda g: (red(g.age.astype(jnp.float32)), g.grid_size()),
           context.safe_div)
  ctx.emit_quantiles("aging/age", lambda g: g.age, hist=True)
  ctx.emit("aging/frac_older_than_H", lambda g: (red(g.age >= h), g.grid_size()), context.safe_div)

  s_bc = ctx.bias_correction(cfg.sq_ema_decay)

  def log_stale(g):
    if g.v is None or g.s is None:
      return None
    v = g.on_grid(g.v)
    ok = g.seen & (v > 0) & (g.s > 0)
    return jnp.where(ok, jnp.log(jnp.where(ok, v, 1.0))
                     - jnp.log(jnp.where(ok, g.s / s_bc, 1.0)), jnp.nan)

  def log_stale_sums(g):
    x = log_stale(g)
    return None if x is None else (red(jnp.nan_to_num(x, nan=0.0)), red(~jnp.isnan(x)))
  ctx.emit("aging/log_staleness_mean", log_stale_sums, context.safe_div)
  ctx.emit_quantiles("aging/log_staleness", log_stale, hist=True)

  for r in ctx.rows:
    sfx = f"/param={r.path}" if len(ctx.rows) > 1 else ""
    grp = r.group
    v = grp.shape[0]
    if r.last_active is None:
      continue
    row_age = (ctx.step - r.last_active).astype(jnp.float32)
    old = (row_age >= h).astype(jnp.float32)
    ctx.add_scalar("aging/emb_row_age_mean" + sfx, jnp.mean(row_age))
    ctx.add_scalar("aging/emb_row_frac_older_than_H" + sfx, jnp.mean(old))
    ctx.quantiles("aging/emb_row_age",
                  row_age[::context.grid_stride((v,), int(cfg.quantile_sample_size))], sfx)
    ctx.emit_buckets("aging/emb_row_age_mean" + sfx, row_age)
    ctx.emit_buckets("aging/emb_row_frac_older_than_H" + sfx, old)
    if grp.v is not None and r.s is not None:
      vm = jnp.mean(grp.v[0].reshape(v, -1), axis=1)
      sm = r.s / s_bc  # the row mean of s (rows keep their own exact EMA of mean_row g^2)
      ok = r.seen & (vm > 0) & (sm > 0)
      x = jnp.log(jnp.where(ok, vm, 1.0)) - jnp.log(jnp.where(ok, sm, 1.0))
      ctx.add_scalar("aging/emb_row_log_staleness_mean" + sfx,
                     context.safe_div(jnp.sum(jnp.where(ok, x, 0.0)), jnp.sum(ok)))
      ctx.emit_buckets("aging/emb_row_log_staleness_mean" + sfx, x, ok)
