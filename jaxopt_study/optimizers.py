"""The study's optimizers as optax chains, built from ``config.optimizer`` by name.

Every optimizer is ``chain(clip_by_global_norm, <core>, add_decayed_weights(mask),
scale_by_learning_rate(schedule), scale(peak_lr))`` built from optax primitives, so the state field names are
optax's own (``trace``, ``mu``, ``nu``, ``v_row``/``v_col``/``v``) and the diagnostics can find
them. Weight decay is decoupled (Loshchilov & Hutter 2019, arXiv 1711.05101): the update is
``-lr_t * (core(g) + wd * theta)`` on masked leaves, for every optimizer; Adafactor keeps optax's own chain, whose decay is applied after its
relative step size and so is multiplied by the peak rate but not by the schedule.

| name         | core update u_t (before -lr_t)                          | optax reference         |
|--------------|---------------------------------------------------------|-------------------------|
| sgd_momentum | m_t = g_t + b m_{t-1};  u = m_t  (Nesterov: g_t + b m_t)| optax.sgd               |
| adamw        | m,v EMAs of g, g^2 (b1, b2); u = m_hat/(sqrt(v_hat)+eps)| optax.adamw             |
| adafactor    | factored RMS of g (v_row, v_col), clipped, param-scaled | optax.adafactor         |
| lion         | u = sign(b1 m + (1-b1) g);  m <- b2 m + (1-b2) g        | optax.lion              |
| signsgd      | u = sign(g), or sign(m_t) with m_t = g_t + b m_{t-1}     | optax.sign_sgd / signum |

(signum's EMA and our trace differ by the factor 1-b, so their signs, and updates, are equal.)
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax

Schedule = Callable[[jax.Array], jax.Array]

# A peak rate above this is a typo (1e39 overflows float32 updates), not an experiment.
MAX_LEARNING_RATE = 100.0


# ----------------------------------------------------------------------------- schedules


def _cosine(s, warmup: int, num_steps: int) -> Schedule:
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0,
      peak_value=1.0,
      warmup_steps=warmup,
      decay_steps=max(num_steps, warmup + 1),
      end_value=s.min_lr_ratio,
  )


def _constant(s, warmup: int, num_steps: int) -> Schedule:
  del s, num_steps
  if warmup == 0:
    return optax.constant_schedule(1.0)
  return optax.join_schedules(
      [optax.linear_schedule(0.0, 1.0, warmup), optax.constant_schedule(1.0)], [warmup]
  )


SCHEDULES = {"cosine": _cosine, "constant": _constant}  # config.schedule.name -> unit shape


def unit_schedule(config: ml_collections.ConfigDict) -> Schedule:
  """The shape of the learning-rate schedule, peaking at 1 (``config.schedule``).

  'cosine': linear warmup 0 -> 1 over ``warmup_steps``, then cosine decay to ``min_lr_ratio`` at
  ``num_steps`` (GPT-2/Chinchilla practice). 'constant': linear warmup then constant.
  The peak rate multiplies it inside the optimizer state (see ``build``).
  """
  s = config.schedule
  if s.name not in SCHEDULES:
    raise ValueError(f"config.schedule.name={s.name!r}; valid: {sorted(SCHEDULES)}")
  return SCHEDULES[s.name](s, min(s.warmup_steps, config.num_steps), config.num_steps)


# ----------------------------------------------------------------------------- masks


def weight_decay_mask(params, decay_embeddings: bool):
  """True on leaves that get weight decay: matrices, and embeddings if ``decay_embeddings``.

  Biases and LayerNorm scales/offsets are never decayed (GPT-2, OLMo, MaxText practice).
  """

  def decays(path, leaf):
    name = getattr(path[-1], "key", str(path[-1]))
    if name == "embedding":
      return decay_embeddings
    return name == "kernel" and leaf.ndim >= 2

  return jax.tree_util.tree_map_with_path(decays, params)


# ----------------------------------------------------------------------------- builders


def _decoupled(core, o, schedule, mask):
  return optax.chain(
      core,
      optax.add_decayed_weights(o.weight_decay, mask) if o.weight_decay else optax.identity(),
      optax.scale_by_learning_rate(schedule),
  )


def _sgd_momentum(o, schedule, mask):
  return _decoupled(optax.trace(decay=o.momentum, nesterov=o.nesterov), o, schedule, mask)


def _adamw(o, schedule, mask):
  return _decoupled(optax.scale_by_adam(b1=o.b1, b2=o.b2, eps=o.eps), o, schedule, mask)


def _lion(o, schedule, mask):
  return _decoupled(optax.scale_by_lion(b1=o.b1, b2=o.b2), o, schedule, mask)


def _signsgd(o, schedule, mask):
  core = optax.scale_by_sign()
  if o.momentum:
    core = optax.chain(optax.trace(decay=o.momentum, nesterov=False), core)
  return _decoupled(core, o, schedule, mask)


def _adafactor(o, schedule, mask):
  return optax.adafactor(
      learning_rate=schedule,
      min_dim_size_to_factor=o.min_dim_size_to_factor,
      decay_rate=o.decay_rate,
      multiply_by_parameter_scale=o.multiply_by_parameter_scale,
      clipping_threshold=o.clipping_threshold,
      momentum=o.momentum or None,
      weight_decay_rate=o.weight_decay or None,
      weight_decay_mask=mask,
  )


OPTIMIZERS = {
    "sgd_momentum": _sgd_momentum,
    "adamw": _adamw,
    "adafactor": _adafactor,
    "lion": _lion,
    "signsgd": _signsgd,
}
NAMES = tuple(OPTIMIZERS)  # The study's optimizers, in report order; the only list of names.


# ----------------------------------------------------------------------------- defaults


def _common(name, learning_rate, weight_decay, clip_norm=1.0):
  o = ml_collections.ConfigDict()
  o.name = name  # Key into OPTIMIZERS.
  o.learning_rate = learning_rate  # Peak rate of the schedule (> 0, finite).
  o.weight_decay = weight_decay  # Decoupled: theta -= lr * wd * theta on masked leaves (>= 0).
  o.decay_embeddings = False  # Embeddings undecayed (rare rows would only ever shrink).
  o.clip_norm = clip_norm  # Global-norm clipping before the optimizer (> 0); 0 disables.
  return o


def _adamw_defaults():
  # GPT-2/OLMo/MaxText practice: b1 0.9, b2 0.95, wd 0.1, clip 1.0; lr 6e-4 at 124M (GPT-3 paper).
  o = _common("adamw", 6e-4, 0.1)
  o.b1 = 0.9  # First-moment decay.
  o.b2 = 0.95  # Second-moment decay; 0.95 rather than 0.999 for stability at scale.
  o.eps = 1e-8  # Added to sqrt(nu_hat).
  return o


def _lion_defaults():
  # Chen et al. 2023 (arXiv 2302.06675): b1 0.95, b2 0.98 for LMs; lr 3-10x smaller and weight
  # decay 3-10x larger than AdamW, keeping lr * wd about the same. Here 6x both.
  o = _common("lion", 1e-4, 0.6)
  o.b1 = 0.95  # Interpolation between momentum and gradient inside the sign.
  o.b2 = 0.98  # Momentum decay.
  return o


def _sgd_momentum_defaults():
  # SGD needs far larger rates than Adam on transformers; 0.1 with Nesterov momentum 0.9 is a
  # common starting point (Kunstner et al. 2023); the study sweeps it.
  o = _common("sgd_momentum", 0.1, 0.0)
  o.momentum = 0.9  # Heavy-ball coefficient.
  o.nesterov = True  # Nesterov look-ahead.
  return o


def _adafactor_defaults():
  # optax.adafactor defaults (Shazeer & Stern 2018, arXiv 1804.04235): relative step sizes with
  # parameter scaling, decay rate 0.8, update clipping 1.0, no momentum.
  o = _common("adafactor", 1e-2, 0.0)
  o.decay_rate = 0.8  # beta2_t = 1 - t^(-decay_rate).
  o.min_dim_size_to_factor = 128  # Tensors whose 2nd-largest dim is smaller keep a full v.
  o.multiply_by_parameter_scale = True  # Step relative to the parameter's RMS.
  o.clipping_threshold = 1.0  # Block-RMS update clipping d.
  o.momentum = 0.0  # 0: no first moment (the memory-saving original); else its decay.
  return o


def _signsgd_defaults():
  # Bernstein et al. 2018 (arXiv 1802.04434): sign of the gradient (momentum 0) or of its
  # momentum (signum). Steps have Lion's magnitude, so Lion's rate is the starting point.
  o = _common("signsgd", 1e-4, 0.0)
  o.momentum = 0.0  # 0: signSGD; e.g. 0.9: signum.
  return o


_DEFAULTS = {
    "sgd_momentum": _sgd_momentum_defaults,
    "adamw": _adamw_defaults,
    "adafactor": _adafactor_defaults,
    "lion": _lion_defaults,
    "signsgd": _signsgd_defaults,
}


def _unknown(name) -> ValueError:
  return ValueError(
      f"config.optimizer.name={name!r} is not a known optimizer; valid: {list(NAMES)}."
  )


def default_config(name: str) -> ml_collections.ConfigDict:
  """The ``config.optimizer`` block of optimizer ``name`` with the study's default settings."""
  if name not in _DEFAULTS:
    raise _unknown(name)
  return _DEFAULTS[name]()


def _finite_number(value) -> bool:
  return isinstance(value, (int, float)) and math.isfinite(value)


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises before any compile on an optimizer or schedule block that cannot train as meant.

  Errors name the field and the fix. A rate of ``nan``, ``inf`` or above ``MAX_LEARNING_RATE``,
  a negative clip norm (gradient *ascent* through ``clip_by_global_norm``) or a negative warmup
  (a schedule that starts part-way up) would otherwise run and produce numbers that look real.
  """
  o, s = config.optimizer, config.schedule
  if o.name not in OPTIMIZERS:
    raise _unknown(o.name)
  lr = o.learning_rate
  if not _finite_number(lr) or not 0 < lr <= MAX_LEARNING_RATE:
    raise ValueError(
        f"config.optimizer.learning_rate={lr!r} must be a finite number in (0, "
        f"{MAX_LEARNING_RATE:g}]; e.g. --config.optimizer.learning_rate="
        f"{default_config(o.name).learning_rate:g}."
    )
  checks = (
      ("optimizer.weight_decay", o.weight_decay, "0 disables it"),
      ("optimizer.clip_norm", o.clip_norm, "0 disables clipping; a negative norm ascends"),
      ("schedule.warmup_steps", s.warmup_steps, "0 disables warmup"),
  )
  for field, value, fix in checks:
    if not _finite_number(value) or value < 0:
      raise ValueError(f"config.{field}={value!r} must be a finite number >= 0 ({fix}).")
  if not _finite_number(s.min_lr_ratio) or not 0 <= s.min_lr_ratio <= 1:
    raise ValueError(
        f"config.schedule.min_lr_ratio={s.min_lr_ratio!r} must be in [0, 1] (the cosine's end "
        "as a fraction of the peak rate)."
    )
  if s.name not in SCHEDULES:
    raise ValueError(f"config.schedule.name={s.name!r}; valid: {sorted(SCHEDULES)}")


def build(config: ml_collections.ConfigDict, params) -> tuple[optax.GradientTransformation, Callable]:
  """Returns ``(tx, learning_rate)`` for ``config.optimizer`` applied to ``params``' structure.

  The peak learning rate is not a constant of the compiled step: the chain ends in
  ``inject_hyperparams(scale)(step_size=peak)``, so it lives in the optimizer state and every
  rate of a sweep shares one compiled step (and one persistent-cache entry). The result equals
  optax's alias with ``learning_rate = peak * unit_schedule`` (tests/test_optimizers.py).
  ``learning_rate(opt_state, step)`` reads the current rate from the state, for logging.
  Call ``validate(config)`` first (``train.setup`` does).
  """
  o = config.optimizer
  unit = unit_schedule(config)
  mask = weight_decay_mask(params, o.decay_embeddings)
  tx = optax.chain(
      optax.clip_by_global_norm(o.clip_norm) if o.clip_norm else optax.identity(),
      OPTIMIZERS[o.name](o, unit, mask),
      optax.inject_hyperparams(optax.scale)(step_size=o.learning_rate),
  )

  def learning_rate(opt_state, step):
    return opt_state[-1].hyperparams["step_size"] * unit(step)

  return tx, learning_rate


def with_peak_lr(opt_state, peak):
  """``opt_state`` of ``build``'s chain with its peak learning rate set to ``peak`` (any shape
  that broadcasts, e.g. [K] for K stacked runs; same dtype and sharding as before)."""
  last = opt_state[-1]
  old = last.hyperparams["step_size"]
  new = jax.device_put(jnp.broadcast_to(jnp.asarray(peak, old.dtype), old.shape), old.sharding)
  return (*opt_state[:-1], last._replace(hyperparams={**last.hyperparams, "step_size": new}))
