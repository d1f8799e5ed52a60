"""The study protocol as pure functions: the runs a study config asks for, and their configs.

A run's config is ``study.base`` + the condition's overrides + the optimizer's default block
(``optimizers.default_config``) with ``optimizer_overrides`` and the grid's learning rate + the
seed, and ``num_steps = token_budget // (batch_size * seq_len)`` (:func:`run_config`).
:func:`expand` lists the sweep's runs, :func:`next_multipliers` extends a grid whose best rate
is on an edge, :func:`validate` enforces the protocol minima (waived for a smoke test). The
runner (``runner.py``) trains what these return; nothing here trains or reads a run directory.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import ml_collections

from jaxopt_study import optimizers
from jaxopt_study import rundir
from jaxopt_study.study import tables

# Protocol minima (waived for a smoke test, config.report.smoke_test).
MIN_GRID_POINTS = 5  # learning rates per optimizer before any extension
MIN_SEEDS = 3  # seeds at each optimizer's best rate


@dataclasses.dataclass
class RunSpec:
  condition: str
  optimizer: str
  learning_rate: float
  lr_multiplier: float
  seed: int
  phase: str  # 'sweep', 'extension' or 'seeds'
  relpath: str
  config: ml_collections.ConfigDict


# ----------------------------------------------------------------------------- configs


def apply_overrides(config: ml_collections.ConfigDict, overrides: dict[str, Any],
                    what: str) -> None:
  """Sets dotted fields (``ConfigDict.update_from_flattened_dict`` on the locked config, so
  that ml_collections' type checks apply); a field missing from the run config is a KeyError
  naming ``what`` and the field."""
  was_locked = config.is_locked
  config.lock()
  try:
    for dotted, value in overrides.items():
      try:
        config.update_from_flattened_dict({dotted: tuple(value) if isinstance(value, list)
                                           else value})
      except KeyError as e:
        raise KeyError(f"{what}: '{dotted}' is not a field of the run config ({e.args[0]})"
                       ) from None
  finally:
    if not was_locked:
      config.unlock()


def parse_overrides(text: str) -> dict[str, Any]:
  """``'field=python_literal,...'`` (the scripts' override syntax) as {dotted field: value},
  for :func:`apply_overrides` (ml_collections parses one field per flag, not a list in a
  string). Values hold no commas (a scalar, a string, a bool).

  >>> parse_overrides("diagnostics.enabled=False,optimizer.b1=0.95")
  {'diagnostics.enabled': False, 'optimizer.b1': 0.95}
  """
  import ast  # pylint: disable=g-import-not-at-top

  out = {}
  for item in filter(None, (i.strip() for i in text.split(","))):
    field, value = item.split("=", 1)
    out[field.strip()] = ast.literal_eval(value.strip())
  return out


def round_lr(lr: float) -> float:
  """Learning rates are rounded to 3 significant digits (the run directory's spelling)."""
  return float(rundir.lr_str(lr))


def num_steps_of(config: ml_collections.ConfigDict, token_budget: int) -> int:
  tokens_per_step = config.batch_size * config.seq_len
  if token_budget <= 0:
    return int(config.num_steps)
  steps = int(token_budget // tokens_per_step)
  if steps < 1:
    raise ValueError(f"token_budget={token_budget} is less than one step "
                     f"({tokens_per_step} tokens); raise config.token_budget.")
  return steps


def run_config(study: ml_collections.ConfigDict, condition: str, optimizer: str, lr: float,
               seed: int) -> ml_collections.ConfigDict:
  """The full run config of one run of the study (see the module docstring)."""
  config = study.base.copy_and_resolve_references()
  with config.unlocked():
    config.optimizer = optimizers.default_config(optimizer)
    overrides = study.optimizer_overrides.get(optimizer) if "optimizer_overrides" in study else None
    if overrides:
      apply_overrides(config.optimizer, rundir.flatten(overrides.to_dict()),
                      f"config.optimizer_overrides.{optimizer}")
    config.optimizer.learning_rate = float(lr)
    config.seed = int(seed)
    apply_overrides(config, rundir.flatten(study.conditions[condition].overrides.to_dict()),
                    f"config.conditions.{condition}.overrides")
    config.num_steps = num_steps_of(config, int(study.token_budget))
  return config


def grid_ratio(multipliers) -> Optional[float]:
  """The constant ratio of a log-spaced grid (None for a single point)."""
  m = [float(x) for x in multipliers]
  return m[1] / m[0] if len(m) > 1 else None


def validate(study: ml_collections.ConfigDict) -> None:
  """Errors naming the field and the fix, before anything trains."""
  if not study.conditions:
    raise ValueError("config.conditions is empty: a study needs at least one condition.")
  unknown = [c for c in tuple(study.only_conditions or ()) if c not in study.conditions]
  if unknown:
    raise ValueError(f"config.only_conditions={unknown} not in config.conditions "
                     f"{list(study.conditions)}")
  for opt in study.optimizers:
    if opt not in optimizers.NAMES:
      raise ValueError(f"config.optimizers: unknown optimizer {opt!r}; valid: "
                       f"{list(optimizers.NAMES)}")
    if opt not in study.learning_rates:
      raise ValueError(f"config.learning_rates has no entry for optimizer {opt!r}")
  mults = [float(m) for m in study.lr_multipliers]
  if not mults or any(m <= 0 for m in mults):
    raise ValueError(f"config.lr_multipliers={tuple(mults)} must be positive numbers")
  ratio = grid_ratio(mults)
  if ratio is not None and (ratio <= 1 or any(
      not math.isclose(b / a, ratio, rel_tol=1e-3) for a, b in zip(mults, mults[1:]))):
    raise ValueError(f"config.lr_multipliers={tuple(mults)} must increase by one constant "
                     "ratio (log-spaced), e.g. (1/9, 1/3, 1, 3, 9)")
  if not study.sweep_seeds or not study.seeds:
    raise ValueError("config.sweep_seeds and config.seeds need at least one seed each")
  if study.on_config_change not in ("refuse", "rerun"):
    raise ValueError(f"config.on_config_change={study.on_config_change!r}; valid: 'refuse', "
                     "'rerun'")
  if int(study.lr_grid_max_extensions) < 0:
    raise ValueError("config.lr_grid_max_extensions must be >= 0")
  if int(study.lr_grid_extension_points) < 1:
    raise ValueError("config.lr_grid_extension_points must be >= 1 (grid points added at once "
                     "on an edge)")
  if not study.report.smoke_test:
    if len(mults) < MIN_GRID_POINTS:
      raise ValueError(
          f"config.lr_multipliers has {len(mults)} points; the protocol needs >= "
          f"{MIN_GRID_POINTS} log-spaced points, e.g. (1/9, 1/3, 1, 3, 9) (or set "
          "config.report.smoke_test=True: a report without verdicts)")
    if len(study.seeds) < MIN_SEEDS:
      raise ValueError(
          f"config.seeds={tuple(study.seeds)}; the protocol needs >= {MIN_SEEDS} seeds at each "
          "best rate, e.g. (0, 1, 2) (or set config.report.smoke_test=True)")


def conditions_of(study: ml_collections.ConfigDict) -> list[str]:
  only = tuple(study.only_conditions or ())
  return [c for c in study.conditions if not only or c in only]


def make_run(study, condition: str, optimizer: str, multiplier: float, seed: int,
             phase: str) -> RunSpec:
  lr = round_lr(study.learning_rates[optimizer] * multiplier)
  return RunSpec(condition, optimizer, lr, float(multiplier), int(seed), phase,
                 rundir.run_relpath(condition, optimizer, lr, seed),
                 run_config(study, condition, optimizer, lr, seed))


def expand(study: ml_collections.ConfigDict) -> list[RunSpec]:
  """The sweep runs (condition x optimizer x lr multiplier x sweep seed), in training order.

  Grid extensions and the seeds at each best rate depend on the results; :func:`run_study`
  adds them as it goes.
  """
  validate(study)
  runs = [make_run(study, cond, opt, mult, seed, "sweep")
          for cond in conditions_of(study) for opt in study.optimizers
          for mult in study.lr_multipliers for seed in study.sweep_seeds]
  keys = [r.relpath for r in runs]
  if len(set(keys)) != len(keys):
    raise ValueError("two runs of the study share a workdir (lr multipliers that round to the "
                     "same learning rate?)")
  return runs


def reachable_lrs(study: ml_collections.ConfigDict, optimizer: str) -> set[float]:
  """Every learning rate the study can train for ``optimizer``: its grid and every extension."""
  grid = sorted(float(m) for m in study.lr_multipliers)
  ratio, k = grid_ratio(grid), int(study.lr_grid_max_extensions)
  ext = [] if ratio is None else [
      m for i in range(1, k + 1) for m in (grid[0] / ratio ** i, grid[-1] * ratio ** i)]
  return {round_lr(study.learning_rates[optimizer] * m) for m in grid + ext}


def next_multipliers(study, multipliers: list[float], records, extended: dict[str, int]
                     ) -> list[float]:
  """The grid points to add when the best lr of ``records`` is on an edge, else [].

  ``lr_grid_extension_points`` points at once (the same ratio, going outwards), so that a
  stacked study trains them in one step (one compile), at most ``lr_grid_max_extensions`` per
  side in all. One point at a time and two at once give the same grid whenever the optimum is
  bracketed before the limit, except possibly one point beyond it.

  Args:
    study: the study config (lr_grid_max_extensions, lr_grid_extension_points).
    multipliers: the (sorted) grid so far.
    records: (lr, status, validation loss) of the sweep runs.
    extended: points added so far per side ('low', 'high'); updated.
  """
  ratio = grid_ratio(multipliers)
  side = tables.unbracketed_side(tables.swept_lrs(records), tables.choose_lr(records))
  if ratio is None or side not in ("low", "high"):
    return []
  n = min(int(study.lr_grid_extension_points),
          int(study.lr_grid_max_extensions) - extended[side])
  if n <= 0:
    return []
  extended[side] += n
  if side == "low":
    return [multipliers[0] / ratio ** (i + 1) for i in range(n)]
  return [multipliers[-1] * ratio ** (i + 1) for i in range(n)]
