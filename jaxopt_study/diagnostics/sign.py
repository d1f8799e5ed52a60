r"""Sign family: Adam as sign descent (Tomihari & Sato 2025, arXiv 2502.00213; Kunstner et al.
2023, arXiv 2304.13960), Lion and SignSGD, and a reference for the other optimizers.

Over the group (global / kind / ``layer=<NN>`` / param), u = u_t the update, g = g_t:

* ``sign/descent_agree_frac``  = #{g != 0 and sign(u) = -sign(g)} / #{g != 0}: agreement of the
  update's sign with the descent direction -g. 1 for SGD without momentum, SignSGD and
  Adafactor without momentum (up to weight decay); momentum (SGD, Adam, Lion, signum) lowers it
  where the gradient's sign has changed and the momentum still points the old way.
* ``sign/update_sign_likeness`` = |u|_1 / sqrt(N |u|_2^2): 1 iff every entry moves by the same
  magnitude (a pure sign step: Lion, SignSGD on non-zero entries); sqrt(2/pi) = 0.80 for
  Gaussian-like u; lower for heavy-tailed u (SGD on heterogeneous gradients). How close Adam's
  step is to sign descent, per layer. NaN when u = 0 on the whole group.
* ``sign/update_flip_frac``    = #{sign(u_t) sign(u_{t-1}) < 0} / #{sign(u_t) sign(u_{t-1}) != 0}:
  share of coordinates (non-zero at both steps) whose update sign flipped since step t-1
  (NaN when the stored sign is not from t-1, e.g. at the first full step). sign(u_{t-1}) is
  stored as int8 by the 'prev' step.
"""

from __future__ import annotations

import jax.numpy as jnp

from jaxopt_study.diagnostics import context


def compute(ctx: context.Context):
  red = context.red

  def flip(g):
    if g.prev_sign is None:
      return None
    prod = jnp.sign(g.u) * g.prev_sign.astype(jnp.float32)
    return red(prod < 0), red(prod != 0)
  ctx.emit("sign/update_flip_frac", flip,
           lambda a, b: jnp.where(ctx.prev_valid, context.safe_div(a, b), context.NAN))
  ctx.emit("sign/descent_agree_frac",
           lambda g: (red((g.g != 0) & (jnp.sign(g.u) == -jnp.sign(g.g))), red(g.g != 0)),
           context.safe_div)
  size = lambda g: jnp.full((g.n,), g.size, jnp.float32)
  ctx.emit("sign/update_sign_likeness",
           lambda g: (red(jnp.abs(g.u)), red(jnp.square(g.u)), size(g)),
           lambda l1, l2sq, n: context.safe_div(l1, jnp.sqrt(n * l2sq)))
