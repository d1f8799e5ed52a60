"""Layer scores (scripts/analyze_checkpoint.py) of every best-rate run of a study, in one process.

  python scripts/analyze_study.py studies/controls                      # every condition
  python scripts/analyze_study.py studies/controls --conditions=base,depth_8,depth_16

For each (condition, optimizer) of WORKDIR/study.json, the best learning rate is chosen by the
report's rule (``tables.choose_lr`` on the sweep seeds' validation losses); every completed run
at that rate gets RUN/analysis/analysis.json (``analysis.report.analyze_run``: block Jacobians,
usefulness, causal and permutation scores on the run's first validation batch). Runs that
already have it are skipped; a run that fails is logged and the others go on. The report's
depth section reads these files (and the compact archive keeps them).
"""

import argparse
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=g-import-not-at-top,wrong-import-position
from jaxopt_study import rundir
from jaxopt_study.analysis import report as analysis_report
from jaxopt_study.study import loading
from jaxopt_study.study import tables


def best_rate_runs(workdir: str, conditions=None) -> list[str]:
  """Run directories (relative) of the completed runs at each (condition, optimizer)'s best lr."""
  spec = rundir.read_json(os.path.join(workdir, loading.STUDY_FILE)) or {}
  sweep_seeds = set(spec.get("sweep_seeds", []))
  groups: dict[tuple[str, str], list[dict]] = {}
  for r in spec.get("runs", []):
    if conditions and r["condition"] not in conditions:
      continue
    groups.setdefault((r["condition"], r["optimizer"]), []).append(r)
  out = []
  for runs in groups.values():
    results = {r["workdir"]: rundir.RunResults.load(os.path.join(workdir, r["workdir"]))
               for r in runs}
    records = [(r["learning_rate"], res.status, res.final_eval_loss)
               for r in runs if r["seed"] in sweep_seeds
               for res in [results[r["workdir"]]] if res is not None]
    best = tables.choose_lr(records)
    out += [r["workdir"] for r in runs
            if best is not None and r["learning_rate"] == best and results[r["workdir"]]
            and results[r["workdir"]].status == "completed"]
  return sorted(out)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("workdir", help="the study directory (study.json, runs/)")
  parser.add_argument("--conditions", default="", help="comma-separated conditions (default all)")
  parser.add_argument("--num_jacobian_tokens", type=int, default=32)
  args = parser.parse_args(argv)
  conds = [c for c in args.conditions.split(",") if c] or None
  runs = best_rate_runs(args.workdir, conds)
  done = failed = 0
  for rel in runs:
    rd = os.path.join(args.workdir, rel)
    if os.path.exists(os.path.join(rd, analysis_report.DIRNAME, analysis_report.FILENAME)):
      continue
    try:
      analysis_report.analyze_run(rd, num_jacobian_tokens=args.num_jacobian_tokens)
      done += 1
    except Exception:  # pylint: disable=broad-except
      logging.exception("analysis of %s failed", rel)
      failed += 1
  print(f"{len(runs)} best-rate runs: {done} analysed now, {failed} failed, "
        f"{len(runs) - done - failed} already had analysis.json")


if __name__ == "__main__":
  main()
