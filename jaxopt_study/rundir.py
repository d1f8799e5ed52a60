"""The run directory: its file names, its JSON files, and the run's results (one owner).

A run's workdir (``train.train_and_evaluate(config, workdir)``; a study puts each run at
``<study>/`` + :func:`run_relpath`) holds::

  config.json      CONFIG       the resolved run config
  results.json     RESULTS      final numbers and status (:class:`RunResults`)
  metrics.jsonl    METRICS      per-step scalars, one JSON object per line (writers.py)
  checkpoints/     CHECKPOINTS  orbax checkpoints (checkpointing.py)
  run.lock         LOCK         held by the process training in the workdir

Train, the study runner and the report read and write these through this module only. It
imports neither JAX nor the data pipeline.

**Config fingerprint.** :func:`config_fingerprint` hashes the fields that determine the
trajectory (every field but :data:`NON_TRAJECTORY`: logging, evaluation and checkpoint cadence,
prefetch depth, device mesh, diagnostics, cache location). Two configs with the same fingerprint
train the same parameters step for step; a workdir whose recorded fingerprint differs from the
config about to resume it would mix two runs.

**Resume merge.** A run can be trained in several segments (preemption, resume). Each segment
produces a :class:`RunResults`; :meth:`RunResults.merge` combines what the previous segment
wrote with the later one: the later segment's value wins for every field it produced (not
None, not empty); a field it did not produce (e.g. no eval in a segment that only ran a few
steps, no throughput in a segment that ran none) keeps the earlier value; per-split eval losses
and baselines merge key by key, the later winning. ``diverged_at_step`` belongs to the later
segment's outcome: it is reset when the later segment is not ``diverged`` (a run that diverged,
then completed from its last good checkpoint, records no divergence), as are ``error`` and
``traceback`` when it is not ``failed``.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import itertools
import json
import logging
import math
import os
import re
import socket
import tempfile
import time
from typing import Any, Mapping, Optional

import numpy as np

CONFIG = "config.json"
RESULTS = "results.json"
METRICS = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
LOCK = "run.lock"

# Dotted config paths that do not change the parameters a run trains (excluded from the
# fingerprint): cadence of logging / syncs / eval / checkpoints, input prefetch, how the steps
# compile, device mesh, diagnostics and probes (read-only over the train state), where the token
# cache and the local text files live (the text's identity is its content: results.json's
# ``data_sha256``, checked when a run resumes), and fault injection (it stands for a transient
# fault: a rerun without it must resume the same run).
NON_TRAJECTORY = ("log_every", "sync_every", "eval_every", "checkpoint_every", "keep_checkpoints",
                  "prefetch", "parallel_compile", "mesh", "diagnostics", "probes",
                  "data.cache_dir", "data.path", "inject_nan_at_step")
# Fields left out of the fingerprint after runs were recorded with them in it: such a run
# matches when the field holds the value it was recorded with (:func:`config_fingerprints`).
REMOVED_FIELDS = ("data.path",)

# Trajectory fields added after runs were recorded, with the value that reproduces what the code
# did before the field existed. A config holding that value also matches the fingerprint
# computed without the field (:func:`config_fingerprints`), so the runs recorded before keep
# their identity (e.g. the committed WikiText study, trained before the synthetic corpus got
# ``eval_at``). Add a field here only with the value that keeps the old behaviour.
ADDED_FIELDS = {"data.synthetic.eval_at": "seen", "model.use_bias": True,
                "data.synthetic.markov": 0.0, "data.synthetic.markov_successors": 4}


# ----------------------------------------------------------------------------- JSON files


def _json_default(x):
  if isinstance(x, np.ndarray):
    return x.tolist()
  if isinstance(x, np.bool_):
    return bool(x)
  if isinstance(x, np.integer):
    return int(x)
  if isinstance(x, np.floating):
    return float(x)
  return str(x)


def write_json(path: str, obj) -> None:
  """Writes ``obj`` as JSON atomically: a reader sees the old file or the new one, never half.

  The text goes to a temporary file in the same directory, is flushed to disk, then renamed
  over ``path`` (``os.replace`` is atomic on POSIX). NumPy scalars become Python numbers,
  arrays lists, anything else unknown its ``str``. Non-finite floats are written as JSON's
  ``NaN`` / ``Infinity`` extension, which :func:`read_json` reads back.
  """
  directory = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
  umask = os.umask(0)
  os.umask(umask)
  os.fchmod(fd, 0o666 & ~umask)  # mkstemp's 0600 would hide the file from other readers
  try:
    with os.fdopen(fd, "w") as f:
      json.dump(obj, f, indent=2, sort_keys=True, default=_json_default)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


class BadFile(ValueError):
  """A bookkeeping file that exists but cannot be read as JSON (truncated, overwritten)."""


def read_json(path: str, *, strict: bool = True) -> Optional[Any]:
  """The parsed JSON file; None when it is absent. A file that exists but is not valid JSON
  raises :class:`BadFile` naming it (``strict=False``: None, e.g. a half-written lock file):
  every file here is written atomically (:func:`write_json`), so an unreadable one was damaged
  from outside, and guessing its content would lose or invent results."""
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError:
    return None
  except (OSError, ValueError) as e:
    if not strict:
      return None
    raise BadFile(
        f"{path} is unreadable ({type(e).__name__}: {e}). Restore it from a copy, or move the "
        "run aside (--restart) and train it again; nothing was changed.") from e


# ----------------------------------------------------------------------------- layout


def lr_str(lr: float) -> str:
  """Directory spelling of a learning rate: 3 significant digits ('0.0006', '1.8e-05')."""
  return f"{float(lr):.3g}"


def run_relpath(condition: str, optimizer: str, lr: float, seed: int) -> str:
  """A study's run directory, relative to the study: runs/<cond>/<opt>/lr=<lr>/seed=<seed>."""
  return f"runs/{condition}/{optimizer}/lr={lr_str(lr)}/seed={int(seed)}"


_RUN_RE = re.compile(
    r"runs/(?P<condition>[^/]+)/(?P<optimizer>[^/]+)/lr=(?P<lr>[^/]+)/seed=(?P<seed>-?\d+)$")


def parse_run_relpath(relpath: str) -> Optional[dict]:
  """Inverse of :func:`run_relpath`: {condition, optimizer, learning_rate, seed}, or None."""
  m = _RUN_RE.match(relpath.replace(os.sep, "/"))
  if not m:
    return None
  try:
    lr = float(m["lr"])
  except ValueError:
    return None
  return {"condition": m["condition"], "optimizer": m["optimizer"], "learning_rate": lr,
          "seed": int(m["seed"])}


# ----------------------------------------------------------------------------- fingerprint


def _as_dict(config) -> dict:
  if isinstance(config, Mapping) and not hasattr(config, "to_json_best_effort"):
    return json.loads(json.dumps(dict(config), default=_json_default))
  return json.loads(config.to_json_best_effort())  # ConfigDict / FrozenConfigDict


def _canonical(x):
  """Numbers as floats (1 == 1.0 on the command line), tuples as lists, dict keys sorted."""
  if isinstance(x, dict):
    return {str(k): _canonical(v) for k, v in sorted(x.items())}
  if isinstance(x, (list, tuple)):
    return [_canonical(v) for v in x]
  if isinstance(x, bool) or x is None or isinstance(x, str):
    return x
  if isinstance(x, (int, float)):
    x = float(x)
    return x if math.isfinite(x) else repr(x)
  return str(x)


_MISSING = object()


def _get(tree: dict, dotted: str):
  """``tree[a][b]...`` (``dotted`` = 'a.b...'), or a sentinel when absent."""
  node = tree
  for p in dotted.split("."):
    if not isinstance(node, dict) or p not in node:
      return _MISSING
    node = node[p]
  return node


def _pop(tree: dict, dotted: str) -> None:
  """Removes ``tree[a][b]...`` (``dotted`` = 'a.b...') if present."""
  parent, _, last = dotted.rpartition(".")
  node = _get(tree, parent) if parent else tree
  if isinstance(node, dict):
    node.pop(last, None)


def trajectory_config(config, keep: tuple[str, ...] = ()) -> dict:
  """The config as a plain dict without the :data:`NON_TRAJECTORY` fields (but ``keep``)."""
  tree = _as_dict(config)
  for dotted in NON_TRAJECTORY:
    if dotted not in keep:
      _pop(tree, dotted)
  return tree


def _hash(tree: dict) -> str:
  text = json.dumps(_canonical(tree), sort_keys=True, separators=(",", ":"))
  return hashlib.sha256(text.encode()).hexdigest()


def config_fingerprint(config) -> str:
  """sha256 (hex) of the canonical JSON of :func:`trajectory_config` (ConfigDict or dict)."""
  return _hash(trajectory_config(config))


def config_fingerprints(config) -> set[str]:
  """Every fingerprint under which ``config``'s trajectory may have been recorded: today's
  :func:`config_fingerprint`, those without any subset of the :data:`ADDED_FIELDS` that
  hold their old-behaviour value (a run recorded before those fields existed), and the same
  with the :data:`REMOVED_FIELDS` still in (a run recorded while they were trajectory fields)."""
  out = set()
  for tree in (trajectory_config(config), trajectory_config(config, keep=REMOVED_FIELDS)):
    old = [d for d, before in ADDED_FIELDS.items() if _get(tree, d) == before]
    for k in range(len(old) + 1):  # a run may predate any subset of them
      for fields in itertools.combinations(old, k):
        t = copy.deepcopy(tree)
        for dotted in fields:
          _pop(t, dotted)
        out.add(_hash(t))
  return out


def same_trajectory(a, b) -> bool:
  """Whether configs ``a`` and ``b`` (ConfigDict or dict, e.g. a config.json) train the same
  parameters step for step (:func:`config_fingerprints` intersect)."""
  return bool(config_fingerprints(a) & config_fingerprints(b))


# ----------------------------------------------------------------------------- results.json


def _empty(v) -> bool:
  return v is None or (isinstance(v, (dict, list, tuple)) and not v)


@dataclasses.dataclass
class RunResults:
  """Everything results.json holds. Losses are nats/token; ``None`` = not produced (yet).

  ``status``: "running", "completed", "preempted", "diverged" or "failed" (the study runner
  records an exception as "failed" with ``error`` and ``traceback``).
  ``eval_loss_by_frequency[b]``: final validation loss on targets in frequency bucket b
  (0 = most frequent), None for an empty bucket. ``final_eval_losses``: {split: loss} of the
  last eval, every split of the dataset ("validation" is ``final_eval_loss``). ``baselines``:
  the dataset's reference losses ({"uniform", "unigram", "entropy_floor"}).
  """

  optimizer: Optional[str] = None
  learning_rate: Optional[float] = None
  seed: Optional[int] = None
  num_params: Optional[int] = None
  num_steps: Optional[int] = None
  tokens_per_step: Optional[int] = None
  status: Optional[str] = None
  steps_done: Optional[int] = None
  tokens_seen: Optional[int] = None
  final_train_loss: Optional[float] = None
  final_eval_loss: Optional[float] = None
  final_eval_perplexity: Optional[float] = None
  final_eval_losses: dict[str, float] = dataclasses.field(default_factory=dict)
  eval_loss_by_frequency: list[Optional[float]] = dataclasses.field(default_factory=list)
  baselines: dict[str, float] = dataclasses.field(default_factory=dict)
  tokens_per_second: Optional[float] = None
  devices: Optional[int] = None
  platform: Optional[str] = None
  diverged_at_step: Optional[int] = None
  init_params_fingerprint: Optional[list[float]] = None
  config_fingerprint: Optional[str] = None
  # {split part: sha256 of its text} of a text corpus (the identity of local files, wherever
  # they lie; None for the synthetic corpus, a function of the config).
  data_sha256: Optional[dict[str, str]] = None
  error: Optional[str] = None
  traceback: Optional[str] = None

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "RunResults":
    """From a results.json dict; unknown keys are dropped.

    An ``eval_loss_by_frequency`` written as {"00": loss, ...} (results.json files from before
    the list) becomes the list.
    """
    names = {f.name for f in dataclasses.fields(cls)}
    kw = {k: v for k, v in d.items() if k in names}
    by_freq = kw.get("eval_loss_by_frequency")
    if isinstance(by_freq, Mapping):
      idx = {int(k): v for k, v in by_freq.items()}
      kw["eval_loss_by_frequency"] = [idx.get(b) for b in range(max(idx, default=-1) + 1)]
    for k in ("final_eval_losses", "baselines", "eval_loss_by_frequency"):
      if kw.get(k) is None:
        kw.pop(k, None)
    return cls(**kw)

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def load(cls, workdir: str) -> Optional["RunResults"]:
    """The workdir's results.json, or None when there is none (:class:`BadFile` when it is
    not valid JSON)."""
    d = read_json(os.path.join(workdir, RESULTS))
    return cls.from_dict(d) if isinstance(d, Mapping) else None

  def save(self, workdir: str) -> None:
    """Writes workdir/results.json atomically (:func:`write_json`)."""
    write_json(os.path.join(workdir, RESULTS), self.to_dict())

  def merge(self, later: "RunResults") -> "RunResults":
    """``self`` (an earlier segment's results) updated by a later segment (module docstring)."""
    out = {}
    for f in dataclasses.fields(self):
      old, new = getattr(self, f.name), getattr(later, f.name)
      if isinstance(old, dict) and isinstance(new, dict):
        out[f.name] = {**old, **new}
      else:
        out[f.name] = old if _empty(new) else new
    if later.status != "diverged":
      out["diverged_at_step"] = later.diverged_at_step
    if later.status != "failed":
      out["error"], out["traceback"] = later.error, later.traceback
    return RunResults(**out)


# ----------------------------------------------------------------------------- one owner


def path(workdir: str, name: str) -> str:
  return os.path.join(workdir, name)


def checkpoint_steps(workdir: str) -> list[int]:
  """The steps saved in workdir/checkpoints/ (orbax names each step's directory by its number),
  sorted; [] without any. Read without orbax (the study layer imports no JAX)."""
  directory = path(workdir, CHECKPOINTS)
  if not os.path.isdir(directory):
    return []
  return sorted(int(n) for n in os.listdir(directory) if n.isdigit())


def write_config(workdir: str, config) -> None:
  """workdir/config.json: the resolved run config (atomic)."""
  write_json(path(workdir, CONFIG), _as_dict(config))


class Locked(RuntimeError):
  """Another live process is training in this workdir."""


# A lock whose holder has not touched it for this long is stale even if its host is another
# machine (the holder refreshes it at every host sync, see ``Lock.heartbeat``).
STALE_AFTER_S = 3600.0


class Lock:
  """``workdir/run.lock``: one training process per workdir.

  The file holds the holder's host and pid. It is stale, and taken over with a warning, when
  its holder ran on this host and that pid is gone (a killed run), or when it has not been
  refreshed for ``STALE_AFTER_S`` seconds. Otherwise a second process gets ``Locked`` before it
  compiles or writes anything.

  Why not ``filelock``: its ``FileLock`` (flock) is not honoured by every network filesystem a
  workdir may live on (GCS FUSE, some NFS), and only ``SoftFileLock`` of filelock >= 4 records
  its holder and breaks a dead holder's lock; the GPU image's filelock comes with its other
  packages, and these ~50 lines give the same rule on every version.
  """

  def __init__(self, workdir: str, enabled: bool = True):
    self._path, self._enabled = path(workdir, LOCK), enabled

  def __enter__(self) -> "Lock":
    if self._enabled:
      me = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
      while not self._create(me):
        holder = read_json(self._path, strict=False) or {}
        if not self._stale(holder):
          raise Locked(
              f"{self._path} is held by pid {holder.get('pid')} on {holder.get('host')}: another "
              "process is training in this workdir. Wait for it, or use another --workdir; if "
              "that process is gone, delete the lock file."
          )
        logging.warning("taking over the stale lock %s (holder %s)", self._path, holder)
        with contextlib.suppress(FileNotFoundError):
          os.remove(self._path)
    return self

  def _create(self, me) -> bool:
    try:
      fd = os.open(self._path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
      return False
    with os.fdopen(fd, "w") as f:
      json.dump(me, f)
    return True

  def _stale(self, holder) -> bool:
    try:
      age = time.time() - os.path.getmtime(self._path)
    except FileNotFoundError:
      return True
    if age > STALE_AFTER_S:
      return True
    if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int):
      try:
        os.kill(holder["pid"], 0)
      except ProcessLookupError:
        return True
      except PermissionError:  # alive, another user's
        return False
      return False
    return not holder  # an unreadable lock file (half-written by a killed process)

  def heartbeat(self) -> None:
    if self._enabled:
      with contextlib.suppress(FileNotFoundError):
        os.utime(self._path)

  def __exit__(self, *exc) -> None:
    if self._enabled:
      with contextlib.suppress(FileNotFoundError):
        os.remove(self._path)


class ConfigChanged(ValueError):
  """The workdir holds a run whose trajectory config differs from the one given."""


def flatten(tree: dict, prefix: str = "") -> dict:
  """{dotted.path: leaf} of a nested dict (``flax.traverse_util.flatten_dict(tree, sep='.')``,
  which would import JAX here: see the module docstring)."""
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def config_diff(old, new, *, trajectory: bool = True) -> dict[str, tuple]:
  """{dotted field: (old, new)} over the trajectory fields (``trajectory=False``: every field)
  that differ."""
  as_tree = trajectory_config if trajectory else _as_dict
  a, b = (flatten(_canonical(as_tree(c))) for c in (old, new))
  return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def check_same_trajectory(workdir: str, config) -> None:
  """Raises ``ConfigChanged`` if ``workdir`` already holds a run of another trajectory config.

  Resuming with a changed learning rate (say) would silently continue the old run under the
  new name. The fix is a fresh workdir, or ``--restart`` (``move_aside``), which keeps the old
  run's files under ``workdir/replaced-<time>/``.
  """
  old = read_json(path(workdir, CONFIG))
  if old is None:  # config.json lost: results.json still records the trajectory's fingerprint
    recorded = (read_json(path(workdir, RESULTS)) or {}).get("config_fingerprint")
    if recorded and recorded not in config_fingerprints(config):
      raise ConfigChanged(
          f"{workdir} holds a run of another config (its results.json fingerprint {recorded[:12]} "
          f"is not this config's; config.json, which would name the fields, is missing). Use a "
          "new --workdir, or pass --restart to move the old run aside and start fresh.")
    return
  if same_trajectory(old, config):
    return
  diff = config_diff(old, config)
  shown = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in list(diff.items())[:8])
  raise ConfigChanged(
      f"{workdir} holds a run with another config ({shown}). Resuming would mix two runs: use "
      "a new --workdir, or pass --restart to move the old run aside and start fresh."
  )


def check_same_text(workdir: str, previous: Optional[RunResults],
                    text_sha256: Optional[dict[str, str]]) -> None:
  """Raises ``ConfigChanged`` if ``workdir``'s run (``previous``, its results) trained on other
  text than ``text_sha256`` (the dataset's, ``ds.text_sha256``).

  Where the files lie is not part of a run's identity (``data.path`` is outside the config
  fingerprint, so a study resumes on another machine); what they hold is.
  """
  old, new = (previous.data_sha256 if previous else None), text_sha256
  if not old or not new or old == new:
    return
  parts = ", ".join(f"{k}: {str(old.get(k))[:12]} -> {str(new.get(k))[:12]}"
                    for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k))
  raise ConfigChanged(
      f"{workdir} holds a run trained on other text (sha256 of {parts}): point "
      "--config.data.path (and the split fields) at the files it trained on, or use a new "
      "--workdir, or pass --restart to move the old run aside and start fresh.")


def move_aside(workdir: str) -> Optional[str]:
  """Moves everything in ``workdir`` into ``workdir/replaced-<UTC time>/``; returns that path.

  Holds the workdir's :class:`Lock` while it moves: a run training there raises ``Locked``
  and nothing moves (moving a live run's files would leave two runs writing into one place).
  """
  if not os.path.isdir(workdir) or not os.listdir(workdir):
    return None
  with Lock(workdir):
    dest = path(workdir, time.strftime("replaced-%Y%m%dT%H%M%SZ", time.gmtime()))
    os.makedirs(dest)
    for name in os.listdir(workdir):
      if not name.startswith("replaced-") and name != LOCK:
        os.replace(path(workdir, name), os.path.join(dest, name))
  return dest


class BadWorkdir(ValueError):
  """A --workdir that cannot hold a run (a file, under a file, not writable)."""


def make_workdir(workdir: str) -> None:
  """Creates ``workdir`` (and its parents), or raises :class:`BadWorkdir` naming the problem,
  before any data is built or anything compiles."""
  try:
    os.makedirs(workdir, exist_ok=True)
  except FileExistsError:
    raise BadWorkdir(f"--workdir={workdir} is a file, not a directory: choose another "
                     "--workdir") from None
  except NotADirectoryError:
    raise BadWorkdir(f"--workdir={workdir}: a parent of it is a file: choose another "
                     "--workdir") from None
  except PermissionError as e:
    raise BadWorkdir(f"--workdir={workdir} cannot be created ({e.strerror}: {e.filename}): "
                     "choose a writable --workdir") from None
  if not os.access(workdir, os.W_OK | os.X_OK):
    raise BadWorkdir(f"--workdir={workdir} is not writable: choose a writable --workdir, or "
                     "fix its permissions")
