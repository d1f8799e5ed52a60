"""``scripts/run_study.py --processes=N``: a study's work units in N processes sharing one device.

A unit is a condition (every optimizer), or one (condition, optimizer) when processes outnumber
conditions (:func:`work_units`, longest first); each keeps its study.json in
``WORKDIR/parts/<unit>`` (:func:`part_dir`), merged into ``WORKDIR/study.json`` at the end
(:func:`merge_parts`).
"""

from __future__ import annotations

import collections
import glob
import os
from typing import Optional

from jaxopt_study import rundir
from jaxopt_study.study import loading
from jaxopt_study.study.protocol import conditions_of, run_config

def part_dir(workdir: str, unit: tuple[str, tuple[str, ...]]) -> str:
  """A work unit's study directory (its study.json; its runs/ links to WORKDIR/runs):
  ``parts/<condition>`` for a whole condition, ``parts/<condition>-<optimizer>`` for one."""
  cond, opts = unit
  return os.path.join(workdir, "parts", cond if len(opts) != 1 else f"{cond}-{opts[0]}")


def work_units(config, n: int, workdir: Optional[str] = None
               ) -> list[tuple[str, tuple[str, ...]]]:
  """The (condition, optimizers) units that ``--processes=n`` trains, the most work first.

  With ``n`` at most the number of conditions a unit is a whole condition (every optimizer);
  with more processes than conditions, one (condition, optimizer) each, so that N processes
  stay busy when a study has few conditions (the protocol of one optimizer never reads
  another's runs). A unit's work is its block matmul FLOPs per run (num_steps * batch_size *
  seq_len * num_layers * d_model^2) times its sweep runs not yet finished in ``workdir``
  (lr_multipliers x sweep_seeds per optimizer, less the run directories whose results.json
  says completed or diverged; at least 1: extensions, seeds and layer scores may remain). The
  processes take the units in this order as they free up (longest first), so a study resumed
  with most units done spreads the ones left over the processes.
  """
  finished = collections.Counter()  # (condition, optimizer) -> finished runs
  if workdir:
    for res_path in glob.glob(os.path.join(workdir, "runs", "*", "*", "*", "*", rundir.RESULTS)):
      if (rundir.read_json(res_path) or {}).get("status") in ("completed", "diverged"):
        finished[tuple(res_path.split(os.sep)[-5:-3])] += 1
  planned = len(config.lr_multipliers) * len(config.sweep_seeds)  # per optimizer
  conds = conditions_of(config)
  per_opt = n > len(conds)
  units = [(c, (o,)) for c in conds for o in config.optimizers] if per_opt else [
      (c, tuple(config.optimizers)) for c in conds]

  def work(unit):
    cond, opts = unit
    c = run_config(config, cond, config.optimizers[0], 1e-3, 0)
    per_run = c.num_steps * c.batch_size * c.seq_len * c.model.num_layers * c.model.d_model ** 2
    return per_run * max(sum(planned - finished[cond, o] for o in opts), 1)

  return sorted(units, key=work, reverse=True)  # stable: config order among equals


def merge_parts(workdir: str) -> None:
  """WORKDIR/study.json from every part's (WORKDIR/parts/*): their runs (with their wall times),
  conditions and optimizers.

  The final pass (runner.run_study over all conditions) rewrites it; this is what it starts from,
  and what a report reads if that pass never ran.
  """
  path = os.path.join(workdir, loading.STUDY_FILE)
  merged = rundir.read_json(path) or {}
  runs = {r["workdir"]: r for r in merged.get("runs", [])}
  for part_path in sorted(glob.glob(os.path.join(workdir, "parts", "*", loading.STUDY_FILE))):
    part = rundir.read_json(part_path) or {}
    for key, value in part.items():
      if key == "conditions":
        merged.setdefault("conditions", {}).update(value)
      elif key == "optimizers":  # a unit of one optimizer lists only its own
        merged[key] = list(dict.fromkeys([*merged.get(key, []), *value]))
      elif key == "updated":  # the latest part's
        merged[key] = max(value, merged.get(key, value))
      elif key not in ("runs", "command"):
        merged.setdefault(key, value)
    for r in part.get("runs", []):
      if r.get("wall_s") is not None or r["workdir"] not in runs:
        runs[r["workdir"]] = r
      elif r.get("analysis"):  # layer scores of a run trained earlier (e.g. retrained here)
        runs[r["workdir"]]["analysis"] = r["analysis"]
  for r in runs.values():  # a run's results.json is the truth (parts may predate a re-split)
    res = rundir.read_json(rundir.path(os.path.join(workdir, r["workdir"]), rundir.RESULTS))
    if res and res.get("status"):
      r["status"] = res["status"]
  merged["runs"] = list(runs.values())
  rundir.write_json(path, merged)
