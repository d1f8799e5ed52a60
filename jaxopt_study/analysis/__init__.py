"""Layer scores of a trained checkpoint: pure, jitted JAX functions over the parameters.

  blocks.py       the model as embed -> blocks -> head; one forward with per-block interventions
  jacobian.py     token Jacobians of each block: deviation from identity, diag/off-diag, norms
  usefulness.py   loss increase when a block is replaced by its least-squares affine map
  causal.py       skip one block: relative change of every later block's output
  permutation.py  swap two blocks' weights: normalised loss change
  report.py       all four on a run's validation batch -> RUN/analysis/analysis.json (+ plots.py)
  files.py        where analysis.json lives and whether it is current (no JAX; the study reads it)

``scripts/analyze_checkpoint.py --workdir=RUN`` is the command line.
"""
