r"""Sparsity family: how many gradient entries / embedding rows are touched, and how often.

Notation: tensor b with N_b entries, gradient g_t at step t, ``a_t = |g_t| > active_threshold``
(elementwise; default threshold 0: any non-zero gradient), n = number of update() calls so far
including this one (n = t + 1 when the diagnostics run from step 0: every mode but 'off' updates
the counters), ``rms_b = sqrt(mean(g_b^2))``.

* ``sparsity/zero_frac``            = #{g == 0} / N.
* ``sparsity/small_frac``           = #{|g| <= rel_threshold * rms_b} / N (each entry judged
  against its own tensor's rms; includes exact zeros).
* ``sparsity/update_freq_mean``     = mean_entries c / n, with c = sum_{k<=t} a_k (per-entry count);
  ``sparsity/update_freq_q<Q>`` its quantiles (global, per kind).
* ``sparsity/update_freq_ema_mean`` = mean_entries e_hat, e_k = d e_{k-1} + (1-d) a_k,
  e_hat = e_t / (1 - d^n), d = update_ema_decay; ``..._ema_q<Q>`` its quantiles.
* ``sparsity/active_frac_window``   = #{entries active at least once in steps max(0, t-W+1)..t}
  / N (W = window); an entry never active is not counted, also in the first W steps.

The per-entry counters (c, e, the last active step) are kept for every entry, or, with
``entry_sample_size`` > 0, for a fixed strided grid of entries of each tensor
(``core.entry_strides``): then N in update_freq*, active_frac_window is the grid's size and
those metrics estimate the all-entry values. zero_frac, small_frac and every row metric use all
entries in both cases.

Token-embedding rows (each ``(V, D)`` tensor of kind ``token_embedding``; a row is active at a
step iff any of its entries is active):

* ``sparsity/emb_row_zero_frac``    = #{rows whose gradient is all exactly zero at t} / V.
* ``sparsity/emb_row_update_freq_mean`` / ``_q<Q>`` = row count / n;
  ``sparsity/emb_row_update_freq_ema_mean`` / ``_q<Q>`` (bias-corrected EMA of row activity);
  ``sparsity/emb_row_active_frac_window`` = #{rows active in steps max(0, t-W+1)..t} / V.
* With a token-frequency bucket table (``init(..., token_frequencies=...)``), the per-bucket
  means of those four row statistics (00 = most frequent tokens):
  ``sparsity/emb_row_zero_frac/freq_bucket=BB``, ``sparsity/emb_row_active_frac_window/...``,
  ``sparsity/emb_row_update_freq_mean/...``, ``sparsity/emb_row_update_freq_ema_mean/...``.

With tied embeddings, ``wte`` also receives the output layer's gradient, which is dense: every
row is non-zero at every step, so row sparsity is only informative for untied embeddings (or a
gradient restricted to the lookup). With more than one token-embedding tensor, the row metrics
get a ``/param=<path>`` suffix.
"""

from __future__ import annotations

import jax.numpy as jnp

from jaxopt_study.diagnostics import context


def compute(ctx: context.Context):
  cfg = ctx.cfg
  red = context.red
  nf = ctx.n.astype(jnp.float32)
  size = lambda g: jnp.full((g.n,), g.size, jnp.float32)

  def small(g):
    rms = jnp.sqrt(jnp.mean(jnp.square(g.g), axis=tuple(range(1, g.g.ndim)), keepdims=True))
    return red(jnp.abs(g.g) <= cfg.rel_threshold * rms), size(g)
  ctx.emit("sparsity/zero_frac", lambda g: (red(g.g == 0), size(g)), context.safe_div)
  ctx.emit("sparsity/small_frac", small, context.safe_div)
  # Per-entry counters live on each tensor's grid (all entries unless entry_sample_size > 0).
  freq = lambda g: None if g.count is None else g.count.astype(jnp.float32) / nf
  ctx.emit("sparsity/update_freq_mean",
           lambda g: None if g.count is None else (red(freq(g)), g.grid_size()), context.safe_div)
  ctx.emit_quantiles("sparsity/update_freq", freq, hist=True)
  bc = ctx.bias_correction(cfg.update_ema_decay)
  ema = lambda g: None if g.ema is None else g.ema / bc
  ctx.emit("sparsity/update_freq_ema_mean",
           lambda g: None if g.ema is None else (red(ema(g)), g.grid_size()), context.safe_div)
  ctx.emit_quantiles("sparsity/update_freq_ema", ema)
  # age <= t: active at some step 0..t (a never-active entry has age t + 1).
  window = lambda age: (age < cfg.window) & (age <= ctx.step)
  ctx.emit("sparsity/active_frac_window",
           lambda g: None if g.age is None else (red(window(g.age)), g.grid_size()),
           context.safe_div)

  for r in ctx.rows:
    sfx = f"/param={r.path}" if len(ctx.rows) > 1 else ""
    g = r.group.g[0].reshape(r.group.shape[0], -1)
    zero_rows = jnp.all(g == 0, axis=1).astype(jnp.float32)
    stats = [("zero_frac", zero_rows, False)]
    if r.last_active is not None:
      stats.append(("active_frac_window", window(ctx.step - r.last_active).astype(jnp.float32),
                    False))
    if r.count is not None:
      stats.append(("update_freq", r.count.astype(jnp.float32) / nf, True))
    if r.ema is not None:
      stats.append(("update_freq_ema", r.ema / bc, True))
    for name, x, quant in stats:
      full = f"sparsity/emb_row_{name}" + ("_mean" if quant else "")
      ctx.add_scalar(full + sfx, jnp.mean(x))
      if quant:
        ctx.quantiles(f"sparsity/emb_row_{name}", row_sample(ctx, x), sfx)
      ctx.emit_buckets(full + sfx, x)


def row_sample(ctx, x):
  return x[::context.grid_stride(x.shape, int(ctx.cfg.quantile_sample_size))]
