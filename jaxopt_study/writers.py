"""Metric writers and progress reporting: CLU where it can run, the same interface where not.

CLU's ``metric_writers`` and ``periodic_actions`` import TensorFlow. Where TensorFlow is
installed we use them as they are (``SummaryWriter`` behind ``AsyncWriter``, ``ReportProgress``). Where it is not
(the lent GPU machines, a slim TPU VM), ``TensorboardXWriter`` writes the same TensorBoard event
files through tensorboardX and ``ReportProgress`` reports steps/s and ETA; both keep CLU's method
names, so ``train.py`` never knows which one it has.
"""

from __future__ import annotations

import collections
import json
import logging
import time
from typing import Any, Mapping

import jax
import numpy as np

from jaxopt_study import rundir


def _clu():
  """(metric_writers, periodic_actions) from CLU, or None where TensorFlow is missing."""
  try:
    from clu import metric_writers, periodic_actions  # pylint: disable=g-import-not-at-top

    return metric_writers, periodic_actions
  except ImportError:
    return None


class TensorboardXWriter:
  """CLU's ``MetricWriter`` interface over tensorboardX (TensorBoard event files, no TF)."""

  def __init__(self, logdir: str):
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top

    # Non-finite scalars are results (a diverged loss, a statistic of an empty set) and are
    # written as they are; tensorboardX would log one warning per such value.
    logging.getLogger("tensorboardX.x2num").setLevel(logging.ERROR)
    self._tb = SummaryWriter(logdir, flush_secs=30)

  def write_scalars(self, step: int, scalars: Mapping[str, Any]):
    # One event holding every value (TensorBoard reads each as a scalar): a full diagnostics
    # step has thousands, and add_scalar's event per value took ~90 us each (BENCHMARKS.md).
    from tensorboardX.proto.summary_pb2 import Summary  # pylint: disable=g-import-not-at-top

    values = [Summary.Value(tag=k, simple_value=float(v)) for k, v in scalars.items()]
    if values:
      self._tb.file_writer.add_summary(Summary(value=values), step)

  def write_histograms(self, step: int, arrays: Mapping[str, Any], num_buckets=None):
    for k, v in arrays.items():
      self._tb.add_histogram(k, np.asarray(v, np.float64), global_step=step, bins="auto")

  def write_texts(self, step: int, texts: Mapping[str, str]):
    for k, v in texts.items():
      self._tb.add_text(k, v, global_step=step)

  def write_hparams(self, hparams: Mapping[str, Any]):
    self._tb.add_hparams(dict(hparams), {})

  def flush(self):
    self._tb.flush()

  def close(self):
    self._tb.close()


class ConsoleWriter:
  """Logs the scalars whose names start with ``prefixes`` (the hundreds of diagnostics go only
  to TensorBoard and metrics.jsonl)."""

  def __init__(self, prefixes=("train/", "eval/", "steps_per_sec")):
    self._prefixes = tuple(prefixes)

  def write_scalars(self, step: int, scalars: Mapping[str, Any]):
    shown = {k: v for k, v in scalars.items() if k.startswith(self._prefixes)}
    if shown:
      logging.info("[%d] %s", step, ", ".join(f"{k}={float(v):.4g}" for k, v in sorted(shown.items())))

  def write_hparams(self, hparams: Mapping[str, Any]):
    logging.debug("hparams: %s", dict(hparams))  # config.json has them; -v 1 shows them

  def write_histograms(self, step, arrays, num_buckets=None):
    pass

  def write_texts(self, step, texts):
    pass

  def flush(self):
    pass

  def close(self):
    pass


class JsonlWriter:
  """Appends every scalar write as one JSON line ``{"step": s, name: value, ...}``.

  A plain-text copy of the scalars for the study report (``study/report.py``) that needs neither
  TensorFlow nor TensorBoard to read. A resumed run may append a step again; readers keep the
  last record of each (step, name).
  """

  def __init__(self, path: str):
    self._f = open(path, "a", buffering=1)

  def write_scalars(self, step: int, scalars: Mapping[str, Any]):
    row = {"step": int(step), **{k: float(v) for k, v in scalars.items()}}
    self._f.write(json.dumps(row) + "\n")

  def write_histograms(self, step, arrays, num_buckets=None):
    pass

  def write_texts(self, step, texts):
    pass

  def write_hparams(self, hparams):
    pass

  def flush(self):
    self._f.flush()

  def close(self):
    self._f.close()


class _Fanout:
  """Sends every call to several writers (CLU's MultiWriter, without its TensorFlow import)."""

  def __init__(self, writers):
    self._writers = writers

  def __getattr__(self, name):
    def call(*args, **kwargs):
      for w in self._writers:
        getattr(w, name)(*args, **kwargs)

    return call


def fanout(run_writers):
  """One writer that writes to all of ``run_writers`` (e.g. the progress of K runs' loop)."""
  return run_writers[0] if len(run_writers) == 1 else _Fanout(list(run_writers))


def create_writer(workdir: str, *, just_logging: bool = False, backend: str = "auto"):
  """TensorBoard (CLU's asynchronous SummaryWriter, or tensorboardX), console, metrics.jsonl.

  Args:
    workdir: where event files go.
    just_logging: True on non-zero processes of a multi-host run (one writer per run).
    backend: 'auto' (CLU if TensorFlow imports), 'clu' or 'tensorboardx'.
  """
  if backend not in ("auto", "clu", "tensorboardx"):
    raise ValueError(f"writer backend={backend!r}; valid: auto, clu, tensorboardx")
  clu = _clu() if backend != "tensorboardx" else None
  if clu is None and backend == "clu":
    raise ImportError("CLU metric writers need TensorFlow: pip install tensorflow-cpu")
  if just_logging:
    return ConsoleWriter()
  if clu is not None:
    tb = clu[0].AsyncWriter(clu[0].SummaryWriter(workdir))
  else:
    tb = TensorboardXWriter(workdir)
  return _Fanout([tb, ConsoleWriter(), JsonlWriter(rundir.path(workdir, rundir.METRICS))])


class _FallbackReportProgress:
  """Reports steps/s, ETA and step time like ``clu.periodic_actions.ReportProgress``."""

  def __init__(self, *, num_train_steps: int, writer=None, every_secs: float = 60.0):
    self._total, self._writer, self._every = num_train_steps, writer, every_secs
    self._last_time, self._last_step = None, None

  def __call__(self, step: int, t: float | None = None) -> bool:
    t = time.monotonic() if t is None else t
    if self._last_time is None:
      self._last_time, self._last_step = t, step
      return False
    if t - self._last_time < self._every:
      return False
    rate = (step - self._last_step) / (t - self._last_time)
    eta = (self._total - step) / rate if rate > 0 else float("inf")
    logging.info(
        "step %d/%d: %.2f steps/s, ETA %.0f min", step, self._total, rate, eta / 60
    )
    if self._writer is not None:
      self._writer.write_scalars(step, {"steps_per_sec": rate})
    self._last_time, self._last_step = t, step
    return True


def report_progress(num_train_steps: int, writer, every_secs: float = 60.0):
  """CLU's ``ReportProgress`` periodic action, or the fallback with the same call signature."""
  clu = _clu()
  if clu is not None:
    return clu[1].ReportProgress(
        num_train_steps=num_train_steps, writer=writer, every_secs=every_secs
    )
  return _FallbackReportProgress(
      num_train_steps=num_train_steps, writer=writer, every_secs=every_secs
  )


class ProgressBar:
  """The run's live console line (tqdm): step / total, rate and ETA from the first steps, and
  the last fetched train loss and tokens/s (updated at host syncs: reading the loss each step
  would sync each step). ``enabled=None`` shows it where stderr is a terminal (tqdm's rule), so
  logs and CI output stay line-based; TensorBoard gets ``steps_per_sec`` from ReportProgress."""

  def __init__(self, total: int, start: int = 0, *, desc: str | None = None,
               enabled: bool | None = None):
    import tqdm  # pylint: disable=g-import-not-at-top

    self._bar = tqdm.tqdm(total=total, initial=start, desc=desc, unit="step", leave=False,
                          dynamic_ncols=True, disable=None if enabled is None else not enabled)

  def __call__(self, step: int) -> None:
    if step > self._bar.n:
      self._bar.update(step - self._bar.n)

  def show(self, **values) -> None:
    """Sets the line's values (None: not yet known); 4 significant digits."""
    self._bar.set_postfix({k: f"{v:.4g}" for k, v in values.items() if v is not None},
                          refresh=False)

  def close(self) -> None:
    self._bar.close()


def hparams(config) -> dict[str, Any]:
  """A config as TensorBoard hparams: {dotted.field: bool/int/float/str}."""
  flat = rundir.flatten(config.to_dict())
  return {k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in flat.items()}


class MetricBuffer:
  """Per-step metrics of a loop's K runs, kept on the device until the next host sync, then
  fetched in one go and written to each run's own writer.

  ``add`` costs no device-to-host transfer, so a run can record every step's loss (the study's
  spike rule needs them) without syncing every step. A record is of every run (``run=None``: a
  step's metrics, with a leading run axis [K, ...] when the runs share a stacked step) or of one
  run (``run=k``: its evaluation, its tokens/s). ``fetch(runs)`` brings everything pending to
  the host in one transfer and hands every-run records to ``runs`` only (the loop's live runs:
  a diverged run records nothing after the sync that found it); ``write(limit)`` writes up to
  ``limit`` fetched records per run (scalars and histogram samples) and remembers each run's last
  finite ``train/*`` scalars of a step's record (one with ``train/loss``); ``flush`` is both.

  The train loop fetches at a sync and writes a record or two per run after queueing each later
  step, so the host writes while the device computes: a full diagnostics step's few hundred
  scalars and histograms take the host longer than a fast step, and writing a whole sync
  interval's records at once would leave the device idle. (A background writer thread measured
  slower: it contends for the GIL with the dispatch of the next steps, BENCHMARKS.md.)
  """

  def __init__(self, run_writers, *, stacked: bool = False):
    self._writers = list(run_writers)  # writer of run k
    self._stacked = stacked  # every-run records carry a leading run axis
    self._pending = []  # [(step, device metrics, run k or None: every run)]
    self._fetched = [collections.deque() for _ in self._writers]  # per run: [(step, host metrics)]
    self.last_train: list[dict[str, float]] = [{} for _ in self._writers]

  def add(self, step: int, metrics: Mapping[str, Any], run: int | None = None) -> None:
    self._pending.append((step, metrics, run))

  def fetch(self, runs=None) -> None:
    """Fetches every pending record (waits for the steps that computed them); records of every
    run go to the runs ``runs`` (default: all)."""
    runs = range(len(self._writers)) if runs is None else sorted(runs)
    for step, m, run in jax.device_get(self._pending):
      if run is not None:
        self._fetched[run].append((step, m))
        continue
      for k in runs:
        self._fetched[k].append((step, jax.tree.map(lambda x: x[k], m) if self._stacked else m))
    self._pending = []

  def write(self, limit: int | None = None) -> None:
    """Writes up to ``limit`` fetched records of each run, oldest first (all if None)."""
    for k, fetched in enumerate(self._fetched):
      for _ in range(len(fetched) if limit is None else min(limit, len(fetched))):
        self._write(k, *fetched.popleft())

  def _write(self, k: int, step: int, m) -> None:
    m = dict(m)
    m.update(m.pop("diagnostics", {}))  # A diagnostics.Metrics: packed scalars and histograms
    scalars = {name: v for name, v in m.items() if np.ndim(v) == 0}
    # Histogram samples: drop non-finite entries (a diverged step's NaNs).
    hists = {name: v[np.isfinite(v)] for name, v in m.items() if np.ndim(v) == 1}
    hists = {name: v for name, v in hists.items() if v.size}
    self._writers[k].write_scalars(step, scalars)
    if hists:
      self._writers[k].write_histograms(step, hists)
    train = {name: float(v) for name, v in scalars.items() if name.startswith("train/")}
    if "train/loss" in train and all(np.isfinite(v) for v in train.values()):
      self.last_train[k] = train  # a step's record (not e.g. a sync's train/tokens_per_sec)

  def flush(self, runs=None) -> None:
    """Fetches (for ``runs``) and writes everything."""
    self.fetch(runs)
    self.write()


class Throughput:
  """Tokens per second between host syncs, counted from the first sync (compile excluded)."""

  def __init__(self, tokens_per_step: int):
    self._tokens_per_step = tokens_per_step
    self._t0 = self._step0 = self._last = None
    self.tokens_per_second: float | None = None

  def update(self, step: int) -> float | None:
    """Called at each host sync; returns tokens/s since the first sync (None at the first, and
    at a repeated sync of the same step, e.g. the loop's final one after the last evaluation,
    which would otherwise count that evaluation as training time)."""
    now = time.perf_counter()
    if self._t0 is None:
      self._t0, self._step0, self._last = now, step, step
    elif step > self._last:
      self._last = step
      self.tokens_per_second = (step - self._step0) * self._tokens_per_step / (now - self._t0)
      return self.tokens_per_second
    return None
