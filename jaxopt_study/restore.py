"""A finished (or interrupted) run's parameters, read back from its workdir.

``load_run(workdir)`` rebuilds the run exactly as ``train.setup`` builds it from the run's own
``config.json`` (mesh, dataset, model, optimizer and the initial train state, which is the
abstract target orbax restores into: shapes, dtypes, shardings), then restores the latest
checkpoint. Used by ``scripts/analyze_checkpoint.py`` and ``scripts/export_hf.py``.
"""

from __future__ import annotations

import json
import os
from typing import Any, NamedTuple

import ml_collections

from jaxopt_study import checkpointing
from jaxopt_study import train
from jaxopt_study.models import gpt

CONFIG, CHECKPOINTS = "config.json", "checkpoints"  # train.py's names in a workdir


class RestoredRun(NamedTuple):
  config: ml_collections.ConfigDict  # the run's config.json
  model_config: gpt.GPTConfig  # with the padded vocabulary the run trained with
  params: Any  # the latest checkpoint's parameters
  step: int  # the latest checkpoint's step
  dataset: Any  # data.pipeline.Dataset built from the run's config


def load_config(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, CONFIG)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: --workdir must be a training run's directory.")
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def load_run(workdir: str) -> RestoredRun:
  """The run's config, model config, latest parameters, their step, and its dataset."""
  config = load_config(workdir)
  setup = train.setup(config)
  mngr = checkpointing.manager(
      os.path.join(workdir, CHECKPOINTS), keep=config.keep_checkpoints, async_save=False
  )
  try:
    state = checkpointing.restore_latest(mngr, setup.state)
  finally:
    mngr.close()
  if state is None:
    raise FileNotFoundError(f"no checkpoint under {os.path.join(workdir, CHECKPOINTS)}")
  return RestoredRun(config, setup.model.cfg, state.params, int(state.step), setup.dataset)
