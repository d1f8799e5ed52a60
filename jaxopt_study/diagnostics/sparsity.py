r"""Sparsity family: how many gradient entries / embedding rows are touched, and how often.

Notation: tensor b with N_b entries, gradient g_t at step t, ``a_t = |g_t| > active_threshold``
(elementwise; default threshold 0: any non-zero gradient), n = number of steps observed so far
(including t), ``rms_b = sqrt(mean(g_b^2))``.

* ``sparsity/zero_frac``            = #{g == 0} / N.
* ``sparsity/small_frac``           = #{|g| <= rel_threshold * rms_b} / N (each entry judged
  against its own tensor's rms; includes exact zeros).
* ``sparsity/update_freq_mean``     = mean_entries c / n, with c = sum_{k<=t} a_k (per-entry count);
  ``sparsity/update_freq_q<Q>`` its quantiles (global, per kind).
* ``sparsity/update_freq_ema_mean`` = mean_entries e_hat, e_k = d e_{k-1} + (1-d) a_k,
  e_hat = e_t / (1 - d^n), d = update_ema_decay; ``..._ema_q<Q>`` its quantiles.
* ``sparsity/active_frac_window``   = #{entries active at least once in steps t-W+1..t} / N
  (= #{age < W}; W = window).

Token-embedding rows (each ``(V, D)`` tensor of kind ``token_embedding``; a row is active at a
step iff any of its entries is active):

* ``sparsity/emb_row_zero_frac``    = #{rows whose gradient is all exactly zero at t} / V.
* ``sparsity/emb_row_update_freq_mean`` / ``_q<Q>`` = row count / n;
  ``sparsity/emb_row_update_freq_ema_mean`` / ``_q<Q>`` (bias-corrected EMA of row activity);
  ``sparsity/emb_row_active_frac_window`` = #{rows active in the last W steps} / V.
* With a token-frequency bucket table (``init(..., token_frequencies=...)``), the per-bucket
  means of those four row statistics: ``<name>/freq_bucket=BB`` (00 = most frequent tokens).

With tied embeddings, ``wte`` also receives the output layer's gradient, which is dense: every
row is non-zero at every step, so row sparsity is only informative for untied embeddings (or a
gradient restricted to the lookup). With more than one token-embedding tensor, the row metrics
get a ``/param=<path>`` suffix.
"""

from __future__ import annotations

import jax.numpy as jnp

from jaxopt_study.diagnostics import _agg


def compute(ctx: _agg.Ctx):
  cfg = ctx.cfg
  ts = ctx.tensors
  nf = ctx.n.astype(jnp.float32)
  zero, small = {}, {}
  for t in ts:
    zero[t.path] = (jnp.sum(t.g == 0), t.size)
    rms = jnp.sqrt(jnp.mean(jnp.square(t.g)))
    small[t.path] = (jnp.sum(jnp.abs(t.g) <= cfg.rel_threshold * rms), t.size)
  _agg.emit(ctx, "sparsity/zero_frac", zero, _agg.ratio)
  _agg.emit(ctx, "sparsity/small_frac", small, _agg.ratio)

  stride = ctx.stride(sum(t.size for t in ts))
  if ts and ts[0].count is not None:
    freq = {t.path: t.count.astype(jnp.float32) / nf for t in ts}
    _agg.emit(ctx, "sparsity/update_freq_mean",
              {p: (jnp.sum(f), f.size) for p, f in freq.items()}, _agg.ratio)
    _agg.emit_quantiles(ctx, "sparsity/update_freq",
                        {p: _agg.sample(f, stride) for p, f in freq.items()}, hist=True)
  if ts and ts[0].ema is not None:
    bc = ctx.bias_correction(cfg.update_ema_decay)
    ema = {t.path: t.ema / bc for t in ts}
    _agg.emit(ctx, "sparsity/update_freq_ema_mean",
              {p: (jnp.sum(e), e.size) for p, e in ema.items()}, _agg.ratio)
    _agg.emit_quantiles(ctx, "sparsity/update_freq_ema",
                        {p: _agg.sample(e, stride) for p, e in ema.items()})
  _agg.emit(ctx, "sparsity/active_frac_window",
            {t.path: (jnp.sum(t.age < cfg.window), t.size) for t in ts}, _agg.ratio)

  for r in ctx.rows:
    sfx = f"/param={r.path}" if len(ctx.rows) > 1 else ""
    g = r.tensor.g.reshape(r.tensor.shape[0], -1)
    v = g.shape[0]
    zero_rows = jnp.all(g == 0, axis=1)
    row_age = jnp.min(r.tensor.age.reshape(v, -1), axis=1)
    rstride = ctx.stride(v)
    ctx.metrics["sparsity/emb_row_zero_frac" + sfx] = jnp.mean(zero_rows.astype(jnp.float32))
    active_w = (row_age < cfg.window).astype(jnp.float32)
    ctx.metrics["sparsity/emb_row_active_frac_window" + sfx] = jnp.mean(active_w)
    _bucket(ctx, "sparsity/emb_row_zero_frac" + sfx, zero_rows, v)
    _bucket(ctx, "sparsity/emb_row_active_frac_window" + sfx, active_w, v)
    if r.count is not None:
      f = r.count.astype(jnp.float32) / nf
      ctx.metrics["sparsity/emb_row_update_freq_mean" + sfx] = jnp.mean(f)
      _agg.emit_quantiles(ctx, "sparsity/emb_row_update_freq" + sfx,
                          {r.path: _agg.sample(f, rstride)}, per_kind=False)
      _bucket(ctx, "sparsity/emb_row_update_freq" + sfx, f, v)
    if r.ema is not None:
      e = r.ema / ctx.bias_correction(cfg.update_ema_decay)
      ctx.metrics["sparsity/emb_row_update_freq_ema_mean" + sfx] = jnp.mean(e)
      _agg.emit_quantiles(ctx, "sparsity/emb_row_update_freq_ema" + sfx,
                          {r.path: _agg.sample(e, rstride)}, per_kind=False)
      _bucket(ctx, "sparsity/emb_row_update_freq_ema" + sfx, e, v)


def _bucket(ctx, name, values, v):
  if ctx.token_bucket is not None and ctx.token_bucket.shape[0] == v:
    _agg.emit_buckets(ctx, name, values)
