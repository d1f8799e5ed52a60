"""A run's parameters, read back from its workdir without rebuilding its training state.

``load_run(workdir)`` reads the run's ``config.json`` and restores the latest orbax checkpoint
into a target built from the checkpoint's own metadata (shapes and dtypes; every array on one
device), so neither the model nor the optimizer is initialised or compiled: restoring takes
about a second whatever the optimizer and diagnostics state. The model config is rebuilt from
``config.model`` with the vocabulary the checkpoint holds (the padded one ``train.setup`` used).
``load_dataset(config)`` builds the run's dataset (same arguments as ``train.setup``, one
process). Used by ``scripts/analyze_checkpoint.py`` and ``scripts/export_hf.py``.
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple

import jax
import ml_collections
import orbax.checkpoint as ocp

from jaxopt_study import data as data_lib
from jaxopt_study import rundir
from jaxopt_study.models import gpt


class RestoredRun(NamedTuple):
  config: ml_collections.ConfigDict  # the run's config.json
  model_config: gpt.GPTConfig  # with the padded vocabulary the run trained with
  params: Any  # the latest checkpoint's parameters (nested dicts of arrays on one device)
  step: int  # the latest checkpoint's step


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The run's config.json as a ConfigDict."""
  path = rundir.path(workdir, rundir.CONFIG)
  config = rundir.read_json(path)
  if config is None:
    raise FileNotFoundError(f"{path} missing or unreadable: --workdir must be a training run.")
  return ml_collections.ConfigDict(config)


def load_run(workdir: str) -> RestoredRun:
  """The run's config, model config, and the parameters and step of its latest checkpoint."""
  config = load_config(workdir)
  directory = os.path.abspath(rundir.path(workdir, rundir.CHECKPOINTS))
  mngr = ocp.CheckpointManager(directory, item_handlers=ocp.StandardCheckpointHandler())
  try:
    step = mngr.latest_step() if os.path.isdir(directory) else None
    if step is None:
      raise FileNotFoundError(f"no checkpoint under {directory}")
    metadata = mngr.item_metadata(step)
    metadata = getattr(metadata, "tree", metadata)  # orbax >= 0.11 wraps the tree
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), metadata
    )
    state = mngr.restore(step, args=ocp.args.StandardRestore(target))
  finally:
    mngr.close()
  params = state["params"]
  vocab = params["wte"]["embedding"].shape[0]
  return RestoredRun(config, gpt.from_config(config.model, vocab), params, int(step))


def load_dataset(config: ml_collections.ConfigDict):
  """The run's dataset (``data.pipeline.Dataset``), as ``train.setup`` builds it, one process."""
  return data_lib.build_dataset(
      config.data, seq_len=config.seq_len, global_batch_size=config.batch_size, seed=config.seed,
      num_train_steps=config.num_steps,
  )
