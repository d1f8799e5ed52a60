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

A cosine or ratio whose denominator is 0 is NaN, not 0 or 1: a group whose gradient (or
moment, or stored previous gradient) is exactly zero, e.g. a layer of embedding rows none of
whose tokens occurred, has no direction (``context.safe_div``). Aggregates over steps should
skip NaN (the report does).
"""

from __future__ import annotations

import jax.numpy as jnp

from jaxopt_study.diagnostics import context


def compute(ctx: context.Context):
  red, sq = context.red, lambda x: context.red(jnp.square(x))
  valid = lambda f: (lambda *a: jnp.where(ctx.prev_valid, f(*a), context.NAN))

  def prev(fn):
    return lambda g: None if g.prev_g is None else fn(g, g.prev_g.astype(jnp.float32))
  ctx.emit("drift/cos_grad_prev", prev(lambda g, gp: (red(g.g * gp), sq(g.g), sq(gp))),
           valid(context.cosine))
  ctx.emit("drift/grad_rel_change", prev(lambda g, gp: (sq(g.g - gp), sq(gp))),
           valid(context.sqrt_ratio))
  ctx.emit("drift/grad_sign_flip_frac",
           prev(lambda g, gp: (red(jnp.sign(g.g) * jnp.sign(gp) < 0),
                               red(jnp.sign(g.g) * jnp.sign(gp) != 0))),
           valid(context.safe_div))
  ctx.emit("drift/cos_grad_mu",
           lambda g: None if g.m is None else (red(g.g * g.m), sq(g.g), sq(g.m)), context.cosine)
  if ctx.energy_short is not None:
    bs = ctx.bias_correction(ctx.cfg.energy_short_decay)
    bl = ctx.bias_correction(ctx.cfg.energy_long_decay)
    es, el = ctx.energy_short / bs, ctx.energy_long / bl
    ctx.emit("drift/energy_ratio",
             lambda g: (es[g.start:g.start + g.n], el[g.start:g.start + g.n]), context.safe_div)
