"""Orbax checkpoints of the whole train state (params, optimizer and diagnostic state, step, RNG).

The data position needs no entry of its own: batch ``s`` is a pure function of ``(seed, s)``
(see ``data/``), so restoring ``step`` restores it. Orbax writes each checkpoint into a temporary
directory and renames it when complete, so a run killed mid-save keeps its previous checkpoint.
Only finite states are ever saved (``train.py`` checks before saving), so the latest checkpoint
of a diverged run is its last good one.

A checkpoint that cannot be restored (truncated, flipped bytes, missing metadata) is moved aside
to ``<step>.corrupt`` (never deleted) and the next older one is tried, with a warning.

Preemption: ``Preemption.reached(step)`` is orbax's ``CheckpointManager.reached_preemption``,
which in a multi-process run (``jax.distributed``) returns True on the same step on every host,
or a local SIGTERM flag where no preemption service runs (a single process).
"""

from __future__ import annotations

import logging
import os
import signal

import jax
import orbax.checkpoint as ocp

CORRUPT_SUFFIX = ".corrupt"


def manager(directory: str, *, keep: int, async_save: bool = True) -> ocp.CheckpointManager:
  """A CheckpointManager keeping the last ``keep`` checkpoints under ``directory`` (a relative
  path is taken from the working directory: orbax refuses relative paths)."""
  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, create=True, enable_async_checkpointing=async_save
  )
  return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def save(mngr: ocp.CheckpointManager, step: int, state, *, force: bool = False) -> bool:
  """Saves ``state`` (asynchronously where enabled) as checkpoint ``step``."""
  return mngr.save(step, args=ocp.args.StandardSave(state), force=force)


def restore_latest(directory: str, abstract_state):
  """The newest checkpoint in ``directory`` that restores into ``abstract_state``'s shapes,
  dtypes and shardings; None when there is none.

  A checkpoint that fails to restore is renamed ``<step>.corrupt`` (on process 0), a warning
  names it, and the next older one is tried: a bad latest checkpoint costs the steps since the
  previous one, never the run. Each attempt uses a fresh read-only manager, because a manager
  infers the checkpoint layout from the first step directory it reads.
  """
  directory = os.path.abspath(directory)  # orbax refuses relative paths
  if not os.path.isdir(directory):
    return None
  target = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), abstract_state
  )
  read_only = ocp.CheckpointManagerOptions(
      read_only=True, save_interval_steps=0, max_to_keep=None)
  with ocp.CheckpointManager(directory, options=read_only) as mngr:
    steps = sorted(mngr.all_steps(), reverse=True)
  for step in steps:
    try:
      with ocp.CheckpointManager(directory, options=read_only) as mngr:
        return mngr.restore(step, args=ocp.args.StandardRestore(target))
    except Exception as e:  # pylint: disable=broad-except  # orbax/tensorstore raise many kinds
      path = os.path.join(directory, str(step))
      reason = (str(e).splitlines() or [""])[0][:200]
      logging.warning("checkpoint %s cannot be restored (%s: %s); moving it aside to %s%s and "
                      "trying an older one", path, type(e).__name__, reason, path, CORRUPT_SUFFIX)
      if jax.process_index() == 0 and os.path.exists(path):
        os.replace(path, _free_name(path + CORRUPT_SUFFIX))
  return None


def _free_name(path: str) -> str:
  n, candidate = 0, path
  while os.path.exists(candidate):
    n += 1
    candidate = f"{path}.{n}"
  return candidate


class Preemption:
  """Whether to stop for a preemption at ``step``: orbax's sync point, or a local SIGTERM."""

  def __init__(self, mngr: ocp.CheckpointManager):
    self._mngr = mngr
    self.sigterm = False
    try:
      self._old = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # Not the main thread (e.g. some notebook runners).
      self._old = None

  def _handle(self, signum, frame):
    logging.warning("SIGTERM: checkpointing and stopping.")
    self.sigterm = True
    if callable(self._old):  # e.g. the study runner's: it stops after this run
      self._old(signum, frame)

  def reached(self, step: int) -> bool:
    # With jax.distributed's preemption service every host gets True at the same step; without
    # it (one process) orbax returns False and the local flag decides.
    return self._mngr.reached_preemption(step) or (jax.process_count() == 1 and self.sigterm)

  def close(self):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)
