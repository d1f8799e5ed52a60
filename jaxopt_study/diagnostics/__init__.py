r"""Diagnostics of sparse, non-stationary gradients and of the optimizer state.

Pure, jit-compatible functions over pytrees; depends only on jax, numpy, optax, ml_collections.

Usage (the train step is compiled once per mode in ``compile_modes(cfg)``)::

    cfg = diagnostics.default_config()
    diag_state = diagnostics.init(params, cfg, token_frequencies)       # or None
    # in the jitted step (mode is static):
    grads = ...; updates, new_opt_state = tx.update(grads, opt_state, params)
    metrics, diag_state = diagnostics.update(params, grads, updates, opt_state, diag_state,
                                             step, cfg, full=mode)  # opt_state BEFORE the update
    # host loop: mode = diagnostics.mode_for_step(step, cfg)
    # eval: sums, counts = diagnostics.loss_by_frequency(per_token_loss, targets, diag_state)

Modes (``full=``, a static Python value):

* ``'counters'`` / ``False``: per-step counters only (ages, update counts, update EMA, g^2 EMA,
  per-tensor gradient-energy EMAs, token-embedding row counters). Returns ``{}``: no host sync.
* ``'prev'``: counters + store g_t and sign(u_t) (read by the next step's drift/sign metrics).
  Used only on the step before a full step, so g_{t-1} is written once per ``every`` steps.
* ``'full'`` / ``True``: counters + store + every metric (every ``cfg.every`` steps).
* ``'off'``: no-op.

``mode_for_step(step, cfg)`` picks 'full' at step % every == 0, 'prev' at (step+1) % every == 0
(only if drift or sign is on; otherwise 'counters'), else 'counters'. Hence 3 compiled variants
with drift/sign on and every > 2; 2 variants without them (or with every == 2); 1 with every == 1.

``metrics`` of a full step is a :class:`Metrics`: a read-only Mapping name -> 0-d array (scalars are
packed in ONE float32 vector, so the jitted step has 1 + #histograms metric outputs instead of
thousands; thousands of scalar outputs make XLA compile for minutes). Call
``metrics.to_numpy()`` (one transfer) on the host before writing. Non-full modes return ``{}``.

Metric names: ``family/metric`` (global aggregate over all tensors), ``.../kind=<kind>``,
``.../layer=<NN>``, ``.../param=<path>``, ``..._q<Q>`` quantile scalars, ``..._hist`` 1-d
histogram samples (<= cfg.histogram_size), ``.../freq_bucket=<BB>`` token-frequency buckets
(00 = most frequent). Values: 0-d (scalars) or 1-d float32 arrays. Families and formulas:
:mod:`.sparsity`, :mod:`.drift`, :mod:`.aging`, :mod:`.norms`, :mod:`.heterogeneity`,
:mod:`.sign`, :mod:`.frequency`; aggregation: :mod:`._agg`; moments: :mod:`.opt_state`;
kinds/layers: :mod:`.paths` (``KIND_RULES`` is overridable).

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

plus small replicated leaves: 8 B per parameter tensor (energy EMAs), 8 B per token-embedding
row (row count and EMA), 4 B per vocab entry (bucket table). Per-step traffic of a 'counters'
step: read g once, read+write last_active, update_count, update_ema, sq_ema (32 B/param); a
'prev' step also writes prev_grad and prev_sign (5 B/param).
"""

from jaxopt_study.diagnostics import paths
from jaxopt_study.diagnostics._agg import Metrics
from jaxopt_study.diagnostics.config import FAMILIES
from jaxopt_study.diagnostics.config import default_config
from jaxopt_study.diagnostics.core import DiagState
from jaxopt_study.diagnostics.core import MODES
from jaxopt_study.diagnostics.core import compile_modes
from jaxopt_study.diagnostics.core import init
from jaxopt_study.diagnostics.core import mode_for_step
from jaxopt_study.diagnostics.core import needs_prev
from jaxopt_study.diagnostics.core import state_bytes_per_param
from jaxopt_study.diagnostics.core import state_nbytes
from jaxopt_study.diagnostics.core import update
from jaxopt_study.diagnostics.frequency import bucket_table
from jaxopt_study.diagnostics.frequency import loss_by_frequency
from jaxopt_study.diagnostics.frequency import loss_by_frequency_metrics
from jaxopt_study.diagnostics.opt_state import available_families
from jaxopt_study.diagnostics.opt_state import find_moments

__all__ = [
    "DiagState", "FAMILIES", "Metrics", "MODES", "available_families", "bucket_table", "compile_modes",
    "default_config", "find_moments", "init", "loss_by_frequency", "loss_by_frequency_metrics",
    "mode_for_step", "needs_prev", "paths", "state_bytes_per_param", "state_nbytes", "update",
]
