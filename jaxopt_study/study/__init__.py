"""The study layer: many runs under identical conditions (runner), their aggregation and report.

* :mod:`jaxopt_study.study.runner`: expands a study config (configs/study.py) into runs
  (condition x optimizer x learning rate x seed) and trains them one after the other through
  ``train.train_and_evaluate``, reusing finished runs and resuming interrupted ones.
* :mod:`jaxopt_study.study.report`: reads the run directories (``results.json`` +
  ``metrics.jsonl``), writes ``results/`` (tidy CSV/JSON), ``plots/`` and ``REPORT.md``.
* :mod:`jaxopt_study.study.plots`: the matplotlib figures (Agg backend, PNG).

The report needs neither JAX nor the data pipeline, so it is importable on its own; the runner
is imported lazily (it imports ``train`` and JAX).
"""

from jaxopt_study.study.report import make_report  # noqa: F401


def run_study(*args, **kwargs):
  """See :func:`jaxopt_study.study.runner.run_study` (imported lazily: it pulls in JAX)."""
  from jaxopt_study.study import runner  # pylint: disable=g-import-not-at-top

  return runner.run_study(*args, **kwargs)
