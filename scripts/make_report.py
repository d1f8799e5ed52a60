"""Writes a study's report from its run directories: results/, plots/ and REPORT.md.

  python scripts/make_report.py studies/small

Needs only the run directories (results.json, metrics.jsonl) and study.json when present, or,
without run directories, the archive an earlier report wrote (results/run_results.json and
results/scalars_long.parquet): a committed report is regenerated from the committed files. Runs
that are missing, failed or diverged are marked, never dropped.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jaxopt_study.study import report  # pylint: disable=g-import-not-at-top,wrong-import-position


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("study_dir", help="the study's --workdir")
  parser.add_argument("--keep-param-metrics", action="store_true",
                      help="also keep '/param=' series in results/scalars_long.parquet (large)")
  args = parser.parse_args(argv)
  if not os.path.isdir(args.study_dir):
    parser.error(f"{args.study_dir} is not a directory")
  settings = {"keep_param_metrics": True} if args.keep_param_metrics else None
  path = report.make_report(args.study_dir, settings)
  print(f"report: {path}")


if __name__ == "__main__":
  main()
