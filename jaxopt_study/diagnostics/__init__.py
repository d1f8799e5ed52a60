r"""Diagnostics of sparse, non-stationary gradients and of the optimizer state.

Pure, jit-compatible functions over pytrees; depends only on jax, numpy, optax, ml_collections.

Usage (the train step is compiled once per step mode it meets)::

    cfg = diagnostics.default_config()
    diag_state = diagnostics.init(params, cfg, token_frequencies, opt_state=opt_state)
    # host loop, per step: mode = diagnostics.mode_for_step(step, cfg)
    # in the jitted step (mode is static):
    grads = ...; updates, new_opt_state = tx.update(grads, opt_state, params)
    metrics, diag_state = diagnostics.update(params, grads, updates, opt_state, diag_state,
                                             step, cfg, mode=mode)  # opt_state BEFORE the update
    # eval: sums, counts = diagnostics.loss_by_frequency(per_token_loss, targets, diag_state)

Step modes (``MODES``; ``mode=`` is static and required; :func:`mode_for_step` chooses it):

* ``'counters'``: per-step counters only (ages, update counts, update EMA, g^2 EMA, per-tensor
  gradient-energy EMAs, token-embedding row counters). Returns ``{}``: no host sync.
* ``'prev'``: counters + store g_t and sign(u_t) (read by the next step's drift/sign metrics).
  Used only on the step before a full step, so g_{t-1} is written once per ``every`` steps.
* ``'full'``: counters + store + every metric (at step % every == 0).
* ``'off'``: no-op (``cfg.enabled`` False).

Hence 3 compiled variants with drift/sign on and every > 2; 2 without them (or with every == 2);
1 with every == 1.

``metrics`` of a full step is a :class:`Metrics`: a read-only Mapping name -> 0-d array (scalars are
packed in ONE float32 vector, so the jitted step has 1 + #histograms metric outputs instead of
thousands; thousands of scalar outputs make XLA compile for minutes). Call
``metrics.to_numpy()`` (one transfer) on the host before writing. Other modes return ``{}``.

Metric names: ``family/metric`` (global aggregate over all tensors), ``.../kind=<kind>``,
``.../layer=<NN>``, ``.../param=<path>``, ``..._q<Q>`` quantile scalars, ``..._hist`` 1-d
histogram samples (<= cfg.histogram_size entries), ``.../freq_bucket=<BB>`` token-frequency buckets
(00 = most frequent). Values: 0-d (scalars) or 1-d float32 arrays. Families (registry
:data:`FAMILIES`) and their formulas: :mod:`.sparsity`, :mod:`.drift`, :mod:`.aging`,
:mod:`.norms`, :mod:`.heterogeneity`, :mod:`.sign`, :mod:`.idle`; token-frequency buckets:
:mod:`.frequency`; what a family computes in: :mod:`.context`; moments: :mod:`.opt_state`;
kinds/layers: :mod:`.paths` (``KIND_RULES`` is overridable). Histogram samples are evenly
spaced quantiles of the included entries (:mod:`.context`). Entries that never received a
gradient: age t + 1, inactive in every window, excluded from the staleness (see each family).

Adding a metric:

1. In a family module (or a new ``diagnostics/<family>.py``), inside ``compute(ctx)``, call
   ``ctx.emit(name, fn, combine)``: ``fn(group)`` returns per-member partial sums of the stacked
   arrays ``group.g, .u, .m, ...`` (or None where absent), ``combine`` maps group sums to values.
2. A new family: add ``"<family>": <family>.compute`` to ``FAMILIES`` (families.py); this also
   creates its switch ``config.diagnostics.<family>``.
3. Per-entry state it needs: a :class:`DiagState` leaf (core.init / core.update) and a
   :class:`~.context.Group` field of the same name.
4. State the formula, the first steps and the never-updated entries in the module docstring.
5. Test it in tests/test_diagnostics.py against a NumPy reference written independently.

Memory (``state_bytes_per_param``), bytes per parameter entry, all families on:

=================  =====  ==========================================================
leaf               bytes  family / when
=================  =====  ==========================================================
last_active        4      sparsity or aging (int32; ages, activation window)
update_count       4      sparsity and cfg.update_count (int32)
update_ema         4      sparsity and cfg.update_ema (float32)
sq_ema             4      aging, and the optimizer has a second moment (float32 s_t)
prev_grad          4 (2)  drift (float32, or bfloat16 with cfg.prev_grad_dtype)
prev_sign          1      sign (int8)
total              21     (17 for SGD / Lion / SignSGD when init gets their opt_state)
=================  =====  ==========================================================

With ``cfg.entry_sample_size`` = N > 0 the first four are not per parameter: each is one vector
over a fixed strided grid of at most ~N entries (``entry_strides``), 16 B per grid entry in all,
and the total is 5 B/param. Plus small replicated leaves: 8 B per parameter tensor (energy
EMAs), 4 B per parameter tensor (heterogeneity: gradient norms at step 0, written by the full
step at step 0 only), 16 B per token-embedding row and per expert (their exact counters: last
active step, count or summed active share, EMA, g^2 EMA), 4 B per vocab entry (bucket table).
Per-step traffic of a 'counters' step: read g once (the per-tensor energies, the row and expert
counters), read+write the four per-entry counters (32 B/param, or 32 B per grid entry when
sampled); a 'prev' step also writes prev_grad and prev_sign (5 B/param). Everything else (the
idle family, quantiles and histograms included) runs on full steps only.
``scripts/diag_cost.py`` prints XLA's bytes and kernel counts of each step variant (numbers in
BENCHMARKS.md).
"""

from jaxopt_study.diagnostics import paths
from jaxopt_study.diagnostics.config import default_config
from jaxopt_study.diagnostics.context import Metrics
from jaxopt_study.diagnostics.core import DiagState
from jaxopt_study.diagnostics.core import MODES
from jaxopt_study.diagnostics.core import available_families
from jaxopt_study.diagnostics.core import init
from jaxopt_study.diagnostics.core import mode_for_step
from jaxopt_study.diagnostics.core import state_bytes_per_param
from jaxopt_study.diagnostics.core import state_nbytes
from jaxopt_study.diagnostics.core import token_bucket_table
from jaxopt_study.diagnostics.core import update
from jaxopt_study.diagnostics.families import FAMILIES
from jaxopt_study.diagnostics.frequency import bucket_table
from jaxopt_study.diagnostics.frequency import loss_by_frequency
from jaxopt_study.diagnostics.opt_state import find_moments

__all__ = [
    "DiagState", "FAMILIES", "Metrics", "MODES", "available_families", "bucket_table",
    "default_config", "find_moments", "init", "loss_by_frequency", "mode_for_step", "paths",
    "state_bytes_per_param", "state_nbytes", "token_bucket_table", "update",
]
