"""The study layer: many runs under one protocol (runner), their tables, checks and report.

Imports flow one way, top to bottom (each module imports only those above it):

* :mod:`.loading`: a study on disk (``Run``, ``Study``, report ``Settings``, metrics.jsonl).
* :mod:`.stats`: Student-t intervals of a mean over seeds and interval comparisons.
* :mod:`.measures`: per-run measures (loss spikes, shift recovery, frequency losses).
* :mod:`.tables`: the runs table, best-lr selection (also used by the runner), findings,
  pairwise comparisons, the long-format scalars.
* :mod:`.literature`: claims from the literature, agrees / disagrees / inconclusive.
* :mod:`.depth`: the depth section's tables (variance, layer scores, sparsity by layer at
  the best rates; conditions against the primary one).
* :mod:`.plots`: the figures (from loading, tables and depth).
* :mod:`.report`: ``make_report``: results/, plots/, REPORT.md.
* :mod:`.presets`: the study presets (``configs/study.py:<preset>`` loads them).
* :mod:`.runner`: ``run_study``: expands configs/study.py into runs and trains them through
  ``train.train_and_evaluate`` (imports JAX; imported lazily here).

Nothing but the presets and the runner needs JAX or the data pipeline.
"""

from jaxopt_study.study.report import make_report  # noqa: F401


def run_study(*args, **kwargs):
  """See :func:`jaxopt_study.study.runner.run_study` (imported lazily: it pulls in JAX)."""
  from jaxopt_study.study import runner  # pylint: disable=g-import-not-at-top

  return runner.run_study(*args, **kwargs)
