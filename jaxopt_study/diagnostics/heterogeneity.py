r"""Gradient heterogeneity family (Tomihari & Sato 2025, arXiv 2502.00213).

Blocks are the parameter tensors b (of a kind, for ``/kind=<kind>``). For per-block values
x_b > 0 (blocks with x_b = 0 or undefined are excluded), over the B blocks left:

* ``..._cv``      = std(x) / mean(x)  (population std, ddof = 0): coefficient of variation;
* ``..._max_min`` = max(x) / min(x).

Values x_b:

* ``heterogeneity/grad_norm_*``   : |g_b|, the gradient norm of the block;
* ``heterogeneity/update_norm_*`` : |u_b|, the optimizer's per-block step;
* ``heterogeneity/step_size_*``   : |u_b| / |g_b|, the optimizer's effective per-block step size
  (constant across blocks for SGD without momentum, i.e. cv = 0; adaptive methods equalize
  |u_b| and so spread |u_b|/|g_b| as much as the gradient norms).

At initialisation, before any update: ``heterogeneity/grad_norm_cv_at_init`` and
``heterogeneity/grad_norm_max_min_at_init`` (and ``/kind=<kind>``) are the grad_norm statistics of
g_0, the gradient at the initial parameters theta_0 (the model's, not the optimizer's,
heterogeneity: pre-LN and post-LN compare on equal footing). The full step at step 0 (always a
full step, see mode_for_step) stores |g_0(b)|^2 per block (4 bytes per tensor of state) and
every full step reports them, so each run's record carries them at every full step; NaN if
step 0 was not observed (diagnostics enabled only after step 0). The update at step 0 is left
out: under a warmup from lr 0 it is zero.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jaxopt_study.diagnostics import context


def _spread(x):
  ok = jnp.isfinite(x) & (x > 0)
  k = jnp.sum(ok)
  mean = jnp.sum(jnp.where(ok, x, 0.0)) / k
  var = jnp.sum(jnp.where(ok, jnp.square(x - mean), 0.0)) / k
  cv = jnp.where(k > 0, jnp.sqrt(var) / mean, context.NAN)
  mx = jnp.max(jnp.where(ok, x, -jnp.inf))
  mn = jnp.min(jnp.where(ok, x, jnp.inf))
  return cv, jnp.where(k > 0, mx / mn, context.NAN)


def compute(ctx: context.Context):
  (gsq, usq), _ = ctx.per_tensor(
      lambda g: (context.red(jnp.square(g.g)), context.red(jnp.square(g.u))))
  gn, un = jnp.sqrt(gsq), jnp.sqrt(usq)
  step = jnp.where(gn > 0, un / jnp.where(gn > 0, gn, 1.0), context.NAN)
  kinds = ctx.kinds
  sel = [("", list(range(len(kinds))))]
  if ctx.cfg.per_kind:
    sel += [(f"/kind={k}", [i for i, kk in enumerate(kinds) if kk == k])
            for k in sorted(set(kinds))]
  for suffix, idx in sel:
    idx = np.asarray(idx)
    stats = [("grad_norm", gn, ""), ("update_norm", un, ""), ("step_size", step, "")]
    if ctx.init_grad_sq is not None:
      stats.append(("grad_norm", jnp.sqrt(ctx.init_grad_sq), "_at_init"))
    for name, x, at in stats:
      cv, mm = _spread(x[idx])
      ctx.add([f"heterogeneity/{name}_cv{at}{suffix}", f"heterogeneity/{name}_max_min{at}{suffix}"],
              jnp.stack([cv, mm]))
