"""Layer scores of a run's latest checkpoint: RUN/analysis/analysis.json and one PNG per score.

  python scripts/analyze_checkpoint.py --workdir=runs/adamw_tiny

Restores the latest checkpoint (jaxopt_study/restore.py) and RUN/config.json, takes the
run's first validation batch, and computes (jaxopt_study/analysis/): token Jacobians of every
block, usefulness (affine-replacement loss increase), causal (skip-one-block) and permutation
(swap-two-blocks) scores.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=g-import-not-at-top,wrong-import-position
from jaxopt_study.analysis import report


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True, help="the training run's --workdir")
  parser.add_argument("--num_jacobian_tokens", type=int, default=32,
                      help="tokens of the batch whose D x D block Jacobians are taken")
  parser.add_argument("--max_rows", type=int, default=0,
                      help="use at most this many sequences of the validation batch (0: all)")
  parser.add_argument("--seed", type=int, default=0, help="seed of the Jacobian token sample")
  args = parser.parse_args(argv)
  if not os.path.isdir(args.workdir):
    parser.error(f"--workdir={args.workdir} is not a directory")
  if args.num_jacobian_tokens < 1:
    parser.error(f"--num_jacobian_tokens={args.num_jacobian_tokens} must be >= 1")
  res = report.analyze_run(args.workdir, num_jacobian_tokens=args.num_jacobian_tokens,
                           max_rows=args.max_rows, seed=args.seed)
  print(f"step {res['step']}: base loss {res['base_loss']:.4f}, "
        f"{res['usefulness']['share_useful']:.0%} of blocks useful; "
        f"written to {os.path.join(args.workdir, report.DIRNAME)}")


if __name__ == "__main__":
  main()
