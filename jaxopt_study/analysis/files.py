"""Where a run's layer scores live, and whether they are up to date (no JAX: the study's loading
reads them through this module).

``RUN/analysis/analysis.json`` is written by :func:`jaxopt_study.analysis.report.analyze_run`
from the run's latest checkpoint. It is *current* when it is at least as new as every file of
that checkpoint (``RUN/checkpoints/<step>/``): a run trained further, or trained again, makes it
stale.
"""

from __future__ import annotations

import os
from typing import Optional

from jaxopt_study import rundir

DIRNAME, FILENAME = "analysis", "analysis.json"


def analysis_path(workdir: str) -> str:
  return os.path.join(workdir, DIRNAME, FILENAME)


def latest_checkpoint_mtime(workdir: str) -> Optional[float]:
  """Newest modification time of the files of the run's latest checkpoint; None without one."""
  steps = rundir.checkpoint_steps(workdir)
  if not steps:
    return None
  latest = os.path.join(rundir.path(workdir, rundir.CHECKPOINTS), str(steps[-1]))
  times = [os.path.getmtime(latest)]
  for root, _, names in os.walk(latest):
    times += [os.path.getmtime(os.path.join(root, n)) for n in names]
  return max(times)


def is_current(workdir: str) -> bool:
  """analysis.json exists and is not older than the latest checkpoint (module docstring)."""
  path = analysis_path(workdir)
  if not os.path.exists(path):
    return False
  ckpt = latest_checkpoint_mtime(workdir)
  return ckpt is None or os.path.getmtime(path) >= ckpt


def read(workdir: str) -> Optional[dict]:
  """The run's analysis.json as a dict; None when absent or unreadable."""
  res = rundir.read_json(analysis_path(workdir))
  return res if isinstance(res, dict) else None
