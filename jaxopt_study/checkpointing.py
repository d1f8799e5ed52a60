"""Orbax checkpoints of the whole train state (params, optimizer and diagnostic state, step, RNG).

The data position needs no entry of its own: batch ``s`` is a pure function of ``(seed, s)``
(see ``data/``), so restoring ``step`` restores it. Orbax writes each checkpoint into a temporary
directory and renames it when complete, so a run killed mid-save keeps its previous checkpoint.
Only finite states are ever saved (``train.py`` checks before saving), so the latest checkpoint
of a diverged run is its last good one.
"""

from __future__ import annotations

import jax
import orbax.checkpoint as ocp


def manager(directory: str, *, keep: int, async_save: bool = True) -> ocp.CheckpointManager:
  """A CheckpointManager keeping the last ``keep`` checkpoints under ``directory``."""
  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, create=True, enable_async_checkpointing=async_save
  )
  return ocp.CheckpointManager(directory, options=options)


def save(mngr: ocp.CheckpointManager, step: int, state, *, force: bool = False) -> bool:
  """Saves ``state`` (asynchronously where enabled) as checkpoint ``step``."""
  return mngr.save(step, args=ocp.args.StandardSave(state), force=force)


def restore_latest(mngr: ocp.CheckpointManager, abstract_state):
  """The latest checkpoint restored into ``abstract_state``'s shapes, dtypes and shardings.

  Returns None when the directory holds no checkpoint.
  """
  step = mngr.latest_step()
  if step is None:
    return None
  target = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), abstract_state
  )
  return mngr.restore(step, args=ocp.args.StandardRestore(target))
