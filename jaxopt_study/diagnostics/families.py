"""The registry of metric families: ``FAMILIES = {name: compute}``.

Each ``compute(ctx: context.Context)`` writes its metrics into ``ctx`` on a full step. The
registry is the only list of families: it defines the on/off switch ``config.diagnostics.<name>``
(:func:`config.default_config`) and the order in which a full step runs them (metric values do
not depend on that order).
"""

from __future__ import annotations

from typing import Callable

from jaxopt_study.diagnostics import aging
from jaxopt_study.diagnostics import context
from jaxopt_study.diagnostics import drift
from jaxopt_study.diagnostics import experts
from jaxopt_study.diagnostics import heterogeneity
from jaxopt_study.diagnostics import idle
from jaxopt_study.diagnostics import norms
from jaxopt_study.diagnostics import sign
from jaxopt_study.diagnostics import sparsity

FAMILIES: dict[str, Callable[[context.Context], None]] = {
    "sparsity": sparsity.compute,
    "drift": drift.compute,
    "aging": aging.compute,
    "norms": norms.compute,
    "heterogeneity": heterogeneity.compute,
    "sign": sign.compute,
    "idle": idle.compute,
    "experts": experts.compute,
}
