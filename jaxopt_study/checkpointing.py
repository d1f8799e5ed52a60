"""Orbax checkpoints of the whole train state (params, optimizer and diagnostic state, step, RNG).

The data position needs no entry of its own: batch ``s`` is a pure function of ``(seed, s)``
(see ``data/``), so restoring ``step`` restores it. Orbax writes each checkpoint into a temporary
directory and renames it when complete, so a run killed mid-save keeps its previous checkpoint.
Only finite states are ever saved (``train.py`` checks before saving), so the latest checkpoint
of a diverged run is its last good one.

A checkpoint that cannot be restored (truncated, missing metadata) or whose restored content
differs from the digest recorded when it was saved (flipped bytes: :func:`digest`, kept in
orbax's per-step ``custom_metadata``) is moved aside to ``<step>.corrupt`` (never deleted) and
the next older one is tried, with a warning. An intact checkpoint of another state layout (a
changed field that the trajectory fingerprint ignores, e.g. ``diagnostics.enabled``) is no
corruption: :class:`StateMismatch` is raised and nothing is renamed.

Preemption: ``Preemption.reached(step)`` is orbax's ``CheckpointManager.reached_preemption``,
which in a multi-process run (``jax.distributed``) returns True on the same step on every host,
or a local SIGTERM/SIGINT flag where no preemption service runs (a single process).
"""

from __future__ import annotations

import logging
import os
import signal

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

CORRUPT_SUFFIX = ".corrupt"
_UINT = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}


class StateMismatch(ValueError):
  """An intact checkpoint whose arrays (shapes, dtypes) differ from the state to restore."""


@jax.jit
def digest(state) -> jax.Array:
  """(leaves, 2) uint32: per leaf, the sum of its elements' bit patterns and their
  position-weighted sum (weights 1, 2, ...), both mod 2^32.

  Any one flipped bit changes the first sum (by +-2^k, never 0 mod 2^32); two changes that
  cancel in it change the second unless their positions collide as well. It reads the logical
  values, so it does not depend on the sharding or the device count.
  """
  def leaf(x):
    x = jnp.ravel(x)
    x = x.astype(jnp.uint8) if x.dtype == jnp.bool_ else x
    u = jax.lax.bitcast_convert_type(x, _UINT[x.dtype.itemsize]).astype(jnp.uint32)
    weights = jnp.arange(1, u.size + 1, dtype=jnp.uint32)
    return jnp.stack([jnp.sum(u, dtype=jnp.uint32), jnp.sum(u * weights, dtype=jnp.uint32)])

  leaves = jax.tree.leaves(state)
  return jnp.stack([leaf(x) for x in leaves]) if leaves else jnp.zeros((0, 2), jnp.uint32)


def _digest_list(state) -> list:
  return jax.device_get(digest(state)).tolist()


def manager(directory: str, *, keep: int, async_save: bool = True) -> ocp.CheckpointManager:
  """A CheckpointManager keeping the last ``keep`` checkpoints under ``directory`` (a relative
  path is taken from the working directory: orbax refuses relative paths)."""
  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, create=True, enable_async_checkpointing=async_save
  )
  return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def save(mngr: ocp.CheckpointManager, step: int, state, *, force: bool = False) -> bool:
  """Saves ``state`` (asynchronously where enabled) as checkpoint ``step``, with its
  :func:`digest` (which waits for ``state``: callers save at a host sync anyway)."""
  return mngr.save(step, args=ocp.args.StandardSave(state), force=force,
                   custom_metadata={"digest": _digest_list(state)})


def _leaf_layout(tree) -> list:
  return sorted((tuple(int(d) for d in x.shape), str(x.dtype)) for x in jax.tree.leaves(tree))


def restore_latest(directory: str, abstract_state):
  """The newest checkpoint in ``directory`` that restores into ``abstract_state``'s shapes,
  dtypes and shardings; None when there is none.

  A checkpoint that fails to restore or to match its recorded digest is renamed
  ``<step>.corrupt`` (on process 0), a warning names it, and the next older one is tried: a bad
  latest checkpoint costs the steps since the previous one, never the run. One whose readable
  metadata lists other arrays than ``abstract_state``'s raises :class:`StateMismatch`. Each
  attempt uses a fresh read-only manager, because a manager infers the checkpoint layout from
  the first step directory it reads.
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
      with ocp.CheckpointManager(directory, options=read_only,
                                 item_handlers=ocp.StandardCheckpointHandler()) as mngr:
        layout = None
        try:
          metadata = mngr.item_metadata(step)
          layout = _leaf_layout(getattr(metadata, "tree", metadata))
        except Exception:  # pylint: disable=broad-except  # unreadable: restore decides
          pass
        if layout and layout != _leaf_layout(target):  # [] or None: unreadable metadata
          raise StateMismatch(
              f"checkpoint {os.path.join(directory, str(step))} holds {len(layout)} arrays of "
              f"other shapes than this run's state ({len(jax.tree.leaves(target))} arrays)")
        state = mngr.restore(step, args=ocp.args.StandardRestore(target))
        recorded = (mngr.metadata(step).custom_metadata or {}).get("digest")
      if recorded is not None and _digest_list(state) != recorded:
        raise ValueError("its content differs from the digest recorded at save (flipped bytes)")
      return state
    except StateMismatch:
      raise
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
  """Whether to stop for a preemption at ``step``: orbax's sync point, or a local SIGTERM or
  SIGINT (Ctrl-C): the run checkpoints its current step and ends as ``preempted`` (exit 75).
  A second Ctrl-C stops at once (KeyboardInterrupt), keeping the previous checkpoint."""

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self, mngr: ocp.CheckpointManager):
    self._mngr = mngr
    self.sigterm = False
    self._old = {}
    for signum in self.SIGNALS:
      try:
        self._old[signum] = signal.signal(signum, self._handle)
      except ValueError:  # Not the main thread (e.g. some notebook runners).
        pass

  def _handle(self, signum, frame):
    if signum == signal.SIGINT and self.sigterm:
      raise KeyboardInterrupt
    logging.warning("%s: checkpointing and stopping.", signal.Signals(signum).name)
    self.sigterm = True
    old = self._old.get(signum)
    if signum == signal.SIGTERM and callable(old):  # e.g. the study runner's: it stops after this run
      old(signum, frame)

  def reached(self, step: int) -> bool:
    # With jax.distributed's preemption service every host gets True at the same step; without
    # it (one process) orbax returns False and the local flag decides.
    return self._mngr.reached_preemption(step) or (jax.process_count() == 1 and self.sigterm)

  def close(self):
    for signum, old in self._old.items():
      signal.signal(signum, old)
