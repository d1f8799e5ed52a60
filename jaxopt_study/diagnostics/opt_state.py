"""Find an optimizer's first and second moments in its state, generically, by field name.

The optax state is walked with :func:`optax.tree_utils.tree_get_all_with_path` (no optimizer
is special-cased; ``optax.tree_utils.tree_get`` is not used because it raises when a name such as
``count`` occurs more than once in a chain). A found subtree is matched to the parameters by
key path (the moment's path below the field must equal the parameter's path) and shape, so
wrappers (``optax.chain``, ``MultiSteps``, ``inject_hyperparams``...) and partial trees
(``optax.masked``) work, and a new optax optimizer whose state uses the same field names works
without new code.

* First moment  m: fields :data:`FIRST_MOMENT_FIELDS` (``mu``: Adam/AdamW/Lion/...; ``trace``:
  SGD momentum / Nesterov; ``ema``: ``optax.ema``, e.g. Adafactor's optional momentum).
  Note the scales differ (``trace`` = sum_k beta^k g_{t-k}, ``mu`` = an EMA); every metric built on
  m is scale-invariant (cosines, mass shares).
* Second moment v: fields :data:`SECOND_MOMENT_FIELDS` (``nu``), or Adafactor's factored state
  (a NamedTuple with fields :data:`FACTORED_FIELDS`). optax's ``scale_by_factored_rms`` factors a
  tensor iff its second-largest dim is >= ``min_dim_size_to_factor`` (128); with (d1, d0) the
  (second-largest, largest) axes from ``np.argsort(shape)``, ``v_row = EMA(mean_{d0} (g^2+eps))``
  (mean over the LARGEST axis) and ``v_col = EMA(mean_{d1} (g^2+eps))``; unused fields hold
  ``(1,)`` placeholders. The full-shape second moment Adafactor actually divides by is
  reconstructed exactly as optax applies it::

      v_hat = expand(v_row / mean_{d1}(v_row), d0) * expand(v_col, d1)   (0 while v_row == 0)

  (its mean over d1 equals v_col: for a (V, D) embedding with V > D, ``v_col`` (V,) is the
  per-token statistic). Adafactor adds eps=1e-30 to g^2, so v is never exactly 0; Adam's ``nu``
  of an inactive entry decays by exactly b2 per step.

SGD, Lion and sign-SGD have no second moment: the metrics that need one are absent from the
metrics dict (not faked); ``diagnostics.available_families`` says what was found.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxopt_study.diagnostics import paths as paths_lib

FIRST_MOMENT_FIELDS: tuple[str, ...] = ("mu", "trace", "ema")
SECOND_MOMENT_FIELDS: tuple[str, ...] = ("nu",)
FACTORED_FIELDS: tuple[str, str, str] = ("v_row", "v_col", "v")


@dataclasses.dataclass(frozen=True)
class Moments:
  """Moments matched to parameter paths ('/'-joined), each with the parameter's shape."""
  first: dict[str, jax.Array]
  first_field: Optional[str]   # e.g. 'ScaleByAdamState.mu'
  second: dict[str, jax.Array]
  second_field: Optional[str]  # e.g. 'ScaleByAdamState.nu' or 'FactoredState.v_row/v_col/v'
  factored: tuple[str, ...]    # paths whose second moment was reconstructed from v_row/v_col


def field_label(key_path) -> str:
  last = key_path[-1]
  tname = getattr(last, "tuple_name", None)
  name = paths_lib.key_name(last)
  return f"{tname}.{name}" if tname else name


def _match(subtree, shapes: dict[str, tuple]) -> dict[str, Any]:
  out = {}
  for path, leaf in paths_lib.flatten(subtree).items():
    if path in shapes and tuple(np.shape(leaf)) == shapes[path]:
      out[path] = leaf
  return out


def _find_plain(opt_state, fields, shapes):
  best, best_label = {}, None
  for field in fields:
    for kp, sub in optax.tree_utils.tree_get_all_with_path(opt_state, field):
      m = _match(sub, shapes)
      if len(m) > len(best):
        best, best_label = m, field_label(kp)
  return best, best_label


def factored_dims(shape: tuple) -> tuple[int, int]:
  """(d1, d0) = (second-largest, largest) axis, exactly as optax's ``_factored_dims``."""
  sorted_dims = np.argsort(shape)
  return int(sorted_dims[-2]), int(sorted_dims[-1])


def reconstruct_factored(v_row, v_col, shape) -> Optional[jax.Array]:
  """Full-shape Adafactor second moment from its factors (None if shapes don't fit)."""
  if len(shape) < 2:
    return None
  d1, d0 = factored_dims(shape)
  if (tuple(v_row.shape) != tuple(np.delete(shape, d0)) or
      tuple(v_col.shape) != tuple(np.delete(shape, d1))):
    return None
  v_row = v_row.astype(jnp.float32)
  v_col = v_col.astype(jnp.float32)
  reduced_d1 = d1 - 1 if d1 > d0 else d1
  row_col_mean = jnp.mean(v_row, axis=reduced_d1, keepdims=True)
  # 0 (not 0/0) before the first update, like Adam's nu.
  row = jnp.where(row_col_mean > 0, v_row / jnp.where(row_col_mean > 0, row_col_mean, 1.0), 0.0)
  return jnp.expand_dims(row, d0) * jnp.expand_dims(v_col, d1)


def _find_factored(opt_state, shapes):
  rows, cols, vs = (
      {tuple(kp[:-1]): (kp, sub)
       for kp, sub in optax.tree_utils.tree_get_all_with_path(opt_state, f)}
      for f in FACTORED_FIELDS)
  best, best_label, best_fact = {}, None, ()
  for parent, (kp, vr_tree) in rows.items():
    if parent not in cols:
      continue
    vr = paths_lib.flatten(vr_tree)
    vc = paths_lib.flatten(cols[parent][1])
    vv = paths_lib.flatten(vs[parent][1]) if parent in vs else {}
    out, fact = {}, []
    for path, shape in shapes.items():
      if path in vv and tuple(np.shape(vv[path])) == shape:
        out[path] = vv[path]  # unfactored: full v
      elif path in vr and path in vc:
        rec = reconstruct_factored(vr[path], vc[path], shape)
        if rec is not None:
          out[path] = rec
          fact.append(path)
    if len(out) > len(best):
      label = field_label(kp)
      best, best_label, best_fact = out, label.rsplit(".", 1)[0] + ".v_row/v_col/v", tuple(fact)
  return best, best_label, best_fact


def find_moments(opt_state, params) -> Moments:
  """Match the optimizer's moments to ``params`` (see module docstring)."""
  shapes = {p: tuple(np.shape(x)) for p, x in paths_lib.flatten(params).items()}
  first, first_label = _find_plain(opt_state, FIRST_MOMENT_FIELDS, shapes)
  second, second_label = _find_plain(opt_state, SECOND_MOMENT_FIELDS, shapes)
  factored = ()
  if not second:
    second, second_label, factored = _find_factored(opt_state, shapes)
  return Moments(first, first_label, second, second_label, factored)
