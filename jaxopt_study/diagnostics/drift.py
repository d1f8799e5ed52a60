r"""Drift (non-stationarity) family.

For a group G of tensors (global / kind / layer / param), vectors are the concatenation over G;
``<a, b>`` is the dot product, ``|a|`` the Euclidean norm. ``g_{t-1}`` is the gradient stored by
the previous step (mode 'prev' or 'full' at step t-1); if the stored one is not from t-1
(``prev_step != t-1``, e.g. the first full step), the metrics that need it are NaN.

* ``drift/cos_grad_prev``    = <g_t, g_{t-1}> / (|g_t| |g_{t-1}|).
* ``drift/grad_rel_change``  = |g_t - g_{t-1}| / |g_{t-1}|.
* ``drift/grad_sign_flip_frac`` = #{g_t g_{t-1} < 0} / #{g_t g_{t-1} != 0}.
* ``drift/cos_grad_mu``      = <g_t, m_{t-1}> / (|g_t| |m_{t-1}|), m = the optimizer's first
  moment (``mu``/``trace``/``ema``) before this step's update; absent without a first moment.
  Is momentum pointing where the gradient now points?
* ``drift/energy_ratio``     = Es_t / El_t, a shift detector: per tensor b,
  ``E_t(b) = d E_{t-1}(b) + (1-d) |g_t(b)|^2`` with d = energy_short_decay (Es) or
  energy_long_decay (El), each bias-corrected by 1/(1-d^n); group values sum E over the group.
  ~1 when stationary; a jump above 1 when the gradient energy rises (e.g. a distribution shift).
  Updated every step (one scalar per tensor).
"""

from __future__ import annotations

import jax.numpy as jnp

from jaxopt_study.diagnostics import _agg


def compute(ctx: _agg.Ctx):
  ts = ctx.tensors
  nan_unless_valid = lambda f: (lambda *a: jnp.where(ctx.prev_valid, f(*a), _agg.NAN))
  if ts and ts[0].prev_g is not None:
    cos, rel, flip = {}, {}, {}
    for t in ts:
      gp = t.prev_g.astype(jnp.float32)
      cos[t.path] = (jnp.vdot(t.g, gp), jnp.vdot(t.g, t.g), jnp.vdot(gp, gp))
      rel[t.path] = (jnp.sum(jnp.square(t.g - gp)), jnp.vdot(gp, gp))
      prod = jnp.sign(t.g) * jnp.sign(gp)
      flip[t.path] = (jnp.sum(prod < 0), jnp.sum(prod != 0))
    _agg.emit(ctx, "drift/cos_grad_prev", cos, nan_unless_valid(_agg.cosine))
    _agg.emit(ctx, "drift/grad_rel_change", rel, nan_unless_valid(_agg.sqrt_ratio))
    _agg.emit(ctx, "drift/grad_sign_flip_frac", flip, nan_unless_valid(_agg.ratio))
  mom = {t.path: (jnp.vdot(t.g, t.m), jnp.vdot(t.g, t.g), jnp.vdot(t.m, t.m))
         for t in ts if t.m is not None}
  _agg.emit(ctx, "drift/cos_grad_mu", mom, _agg.cosine)
  if ctx.energy_short is not None:
    bs = ctx.bias_correction(ctx.cfg.energy_short_decay)
    bl = ctx.bias_correction(ctx.cfg.energy_long_decay)
    parts = {t.path: (ctx.energy_short[i] / bs, ctx.energy_long[i] / bl)
             for i, t in enumerate(ts)}
    _agg.emit(ctx, "drift/energy_ratio", parts, _agg.ratio)
