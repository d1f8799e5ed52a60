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

from typing import Callable

import jax
import ml_collections
import optax

Schedule = Callable[[jax.Array], jax.Array]


# ----------------------------------------------------------------------------- schedules


def unit_schedule(config: ml_collections.ConfigDict) -> Schedule:
  """The shape of the learning-rate schedule, peaking at 1 (``config.schedule``).

  'cosine': linear warmup 0 -> 1 over ``warmup_steps``, then cosine decay to ``min_lr_ratio`` at
  ``num_steps`` (GPT-2/Chinchilla practice). 'constant': linear warmup then constant.
  The peak rate multiplies it inside the optimizer state (see ``build``).
  """
  s = config.schedule
  warmup = min(s.warmup_steps, config.num_steps)
  if s.name == "cosine":
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=1.0,
        warmup_steps=warmup,
        decay_steps=max(config.num_steps, warmup + 1),
        end_value=s.min_lr_ratio,
    )
  if s.name == "constant":
    if warmup == 0:
      return optax.constant_schedule(1.0)
    return optax.join_schedules(
        [optax.linear_schedule(0.0, 1.0, warmup), optax.constant_schedule(1.0)], [warmup]
    )
  raise ValueError(f"config.schedule.name={s.name!r}; valid: ['constant', 'cosine']")


def make_schedule(config: ml_collections.ConfigDict) -> Schedule:
  """The learning rate at each step: ``config.optimizer.learning_rate * unit_schedule``."""
  unit, peak = unit_schedule(config), config.optimizer.learning_rate
  return lambda step: peak * unit(step)


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


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises before any compile if the optimizer block names an unknown optimizer."""
  name = config.optimizer.name
  if name not in OPTIMIZERS:
    raise ValueError(
        f"config.optimizer.name={name!r} is not a known optimizer; valid: {sorted(OPTIMIZERS)}. "
        "Use one of configs/{sgd_momentum,adamw,adafactor,lion,signsgd}.py."
    )
  if config.optimizer.learning_rate <= 0:
    raise ValueError(
        f"config.optimizer.learning_rate={config.optimizer.learning_rate} must be > 0."
    )


def build(config: ml_collections.ConfigDict, params) -> tuple[optax.GradientTransformation, Callable]:
  """Returns ``(tx, learning_rate)`` for ``config.optimizer`` applied to ``params``' structure.

  The peak learning rate is not a constant of the compiled step: the chain ends in
  ``inject_hyperparams(scale)(step_size=peak)``, so it lives in the optimizer state and every
  rate of a sweep shares one compiled step (and one persistent-cache entry). The result equals
  optax's alias with ``learning_rate = peak * unit_schedule`` (tests/test_optimizers.py).
  ``learning_rate(opt_state, step)`` reads the current rate from the state, for logging.
  """
  validate(config)
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
