"""DiagState, init, update and the step modes (mode_for_step)."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxopt_study.diagnostics import context
from jaxopt_study.diagnostics import frequency
from jaxopt_study.diagnostics import opt_state as opt_state_lib
from jaxopt_study.diagnostics import paths as paths_lib
from jaxopt_study.diagnostics.families import FAMILIES

# The step modes (static): what one update() call does. See update() and mode_for_step().
MODES = ("off", "counters", "prev", "full")


class DiagState(NamedTuple):
  """The diagnostics' state: plain arrays only (orbax-safe). None = not allocated.

  Leaves marked (P) mirror the params tree: same shape, the param's path as a suffix of the
  leaf's path (shard them like the parameter). All others are small (replicate them).
  """
  count: jax.Array             # int32 (): number of update() calls so far (n - 1 during a call)
  prev_step: jax.Array         # int32 (): step at which prev_grad / prev_sign were stored
  last_active: Any = None      # (P) int32: last step with |g| > active_threshold (-1: never)
  update_count: Any = None     # (P) int32: number of steps with |g| > active_threshold
  update_ema: Any = None       # (P) float32: EMA of the active indicator (raw, not bias-corrected)
  sq_ema: Any = None           # (P) float32: EMA of g^2 (s_t, raw)
  prev_grad: Any = None        # (P) prev_grad_dtype: gradient of step prev_step
  prev_sign: Any = None        # (P) int8: sign(update) of step prev_step
  energy_short: Any = None     # float32 [num_tensors] (params flatten order): EMA of |g_b|^2
  energy_long: Any = None      # float32 [num_tensors]
  init_grad_sq: Any = None     # float32 [num_tensors]: |g_0|^2 per tensor, set by the full step
                               # at step 0 (NaN until then; heterogeneity at initialisation)
  rows: Any = None             # {path with '.' for '/': {'update_count': int32 [V],
                               #                          'update_ema': float32 [V]}}
  token_bucket: Any = None     # int32 [V]: token-frequency bucket of each token id


def _is_row_tensor(path: str, shape) -> bool:
  return paths_lib.kind_of(path) == "token_embedding" and len(shape) == 2


def _has_second_moment(opt_state, params) -> bool:
  return bool(opt_state_lib.find_moments(opt_state, params).second)


def init(params, cfg, token_frequencies=None, opt_state=None) -> DiagState:
  """Allocates the state for the families enabled in ``cfg``.

  Args:
    params: the parameter pytree (arrays or ShapeDtypeStructs under jax.eval_shape).
    cfg: ``default_config()``-like ConfigDict.
    token_frequencies: optional float [vocab] training unigram frequencies; builds the bucket
      table (``cfg.loss_by_frequency``) used by the row metrics and :func:`loss_by_frequency`.
    opt_state: optional optimizer state; if given and it has no second moment, the per-entry
      g^2 EMA used only by the staleness metric is not allocated (saves 4 bytes/param).
  """
  count = jnp.zeros((), jnp.int32)
  prev_step = jnp.full((), -(2 ** 30), jnp.int32)
  if not cfg.enabled:
    return DiagState(count=count, prev_step=prev_step)
  like = lambda dtype, fill=0: jax.tree.map(
      lambda p: jnp.full(p.shape, fill, dtype), params)
  num_tensors = len(jax.tree.leaves(params))
  counters = cfg.sparsity or cfg.aging
  want_sq = cfg.aging and (opt_state is None or _has_second_moment(opt_state, params))
  rows = None
  if cfg.sparsity and (cfg.update_count or cfg.update_ema):
    rows = {}
    for path, p in paths_lib.flatten(params).items():
      if _is_row_tensor(path, p.shape):
        r = {}
        if cfg.update_count:
          r["update_count"] = jnp.zeros((p.shape[0],), jnp.int32)
        if cfg.update_ema:
          r["update_ema"] = jnp.zeros((p.shape[0],), jnp.float32)
        rows[path.replace("/", ".")] = r
  token_bucket = token_bucket_table(params, cfg, token_frequencies)
  token_bucket = None if token_bucket is None else jnp.asarray(token_bucket)
  return DiagState(
      count=count,
      prev_step=prev_step,
      last_active=like(jnp.int32, -1) if counters else None,
      update_count=like(jnp.int32) if cfg.sparsity and cfg.update_count else None,
      update_ema=like(jnp.float32) if cfg.sparsity and cfg.update_ema else None,
      sq_ema=like(jnp.float32) if want_sq else None,
      prev_grad=like(jnp.dtype(cfg.prev_grad_dtype)) if cfg.drift else None,
      prev_sign=like(jnp.int8) if cfg.sign else None,
      energy_short=jnp.zeros((num_tensors,), jnp.float32) if cfg.drift else None,
      energy_long=jnp.zeros((num_tensors,), jnp.float32) if cfg.drift else None,
      init_grad_sq=jnp.full((num_tensors,), jnp.nan, jnp.float32) if cfg.heterogeneity else None,
      rows=rows,
      token_bucket=token_bucket,
  )


def token_bucket_table(params, cfg, token_frequencies) -> np.ndarray | None:
  """``DiagState.token_bucket``: int32 [vocab] frequency bucket of every token id
  (``frequency.bucket_table``), or None without ``cfg.loss_by_frequency`` or frequencies. Host
  NumPy; ``params`` may be abstract."""
  if not (cfg.enabled and cfg.loss_by_frequency) or token_frequencies is None:
    return None
  vocab = next((p.shape[0] for path, p in paths_lib.flatten(params).items()
                if _is_row_tensor(path, p.shape)), None)
  return np.asarray(frequency.bucket_table(
      token_frequencies, cfg.num_freq_buckets, cfg.bucket_scheme, vocab_size=vocab))


def _needs_prev(cfg) -> bool:
  """Whether a 'prev' step (store g and sign(u) for the next full step) is needed."""
  return bool(cfg.enabled and (cfg.drift or cfg.sign))


def mode_for_step(step: int, cfg) -> str:
  """Host-side choice of the compiled variant for train step ``step`` (a Python int).

  'full' when step % every == 0; 'prev' on the step just before ((step + 1) % every == 0) if
  drift or sign is on (they need g_{t-1} / sign(u_{t-1}) of exactly the previous step);
  'counters' otherwise; 'off' when cfg.enabled is False.
  """
  if not cfg.enabled:
    return "off"
  every = int(cfg.every)
  if step % every == 0:
    return "full"
  if (step + 1) % every == 0 and _needs_prev(cfg):
    return "prev"
  return "counters"


def _rebuild(tree, values: dict[str, Any]):
  """``tree`` with each leaf replaced by ``values[its path]`` (the inverse of paths.flatten)."""
  return jax.tree_util.tree_map_with_path(lambda kp, _: values[paths_lib.path_str(kp)], tree)


def update(params, grads, updates, opt_state, diag_state: DiagState, step, cfg, *, mode: str):
  """One diagnostics step. Returns (metrics, new_diag_state).

  Args:
    params: theta_t, the parameters the gradient was taken at (before this step's update).
    grads: g_t, the gradient fed to the optimizer (same tree as params).
    updates: u_t, the optimizer's output for g_t (params_{t+1} = params_t + u_t).
    opt_state: the optimizer state passed to ``tx.update`` together with g_t (i.e. BEFORE this
      step's update: first moment m_{t-1}, second moment v_{t-1}).
    diag_state: from :func:`init` or the previous call.
    step: t, the train step (int or int32 scalar; may be traced).
    cfg: the diagnostics config (static).
    mode: static, one of MODES, chosen by :func:`mode_for_step`: 'counters': per-step counters
      only, metrics = {}; 'prev': counters + store g_t and sign(u_t) for the next step's
      drift/sign metrics; 'full': counters + store + every metric; 'off': no-op.
  """
  if mode not in MODES:
    raise ValueError(f"diagnostics.update: mode={mode!r}; valid: {MODES} "
                     "(use diagnostics.mode_for_step(step, cfg))")
  st = diag_state
  if not cfg.enabled or mode == "off":
    return {}, st
  f32 = jnp.float32
  step = jnp.asarray(step, jnp.int32)
  n = st.count + 1
  pflat = paths_lib.flatten(params)
  gflat = paths_lib.flatten(grads)
  keys = list(pflat)
  g = {k: jnp.asarray(gflat[k]).astype(f32) for k in keys}
  active = {k: jnp.abs(g[k]) > cfg.active_threshold for k in keys}

  new = {"count": n}
  la = seen = None
  if st.last_active is not None:
    old = paths_lib.flatten(st.last_active)
    la = {k: jnp.where(active[k], step, old[k]) for k in keys}
    seen = {k: old[k] >= 0 for k in keys}  # active at some step < t
    new["last_active"] = _rebuild(st.last_active, la)
  cnt = None
  if st.update_count is not None:
    old = paths_lib.flatten(st.update_count)
    cnt = {k: old[k] + active[k].astype(jnp.int32) for k in keys}
    new["update_count"] = _rebuild(st.update_count, cnt)
  ema = None
  if st.update_ema is not None:
    d = cfg.update_ema_decay
    old = paths_lib.flatten(st.update_ema)
    ema = {k: d * old[k] + (1 - d) * active[k].astype(f32) for k in keys}
    new["update_ema"] = _rebuild(st.update_ema, ema)
  sq = None
  if st.sq_ema is not None:
    d = cfg.sq_ema_decay
    old = paths_lib.flatten(st.sq_ema)
    sq = {k: d * old[k] + (1 - d) * jnp.square(g[k]) for k in keys}
    new["sq_ema"] = _rebuild(st.sq_ema, sq)
  e = jnp.stack([jnp.sum(jnp.square(g[k])) for k in keys])  # |g_b|^2; fuses with the counters
  if st.energy_short is not None:
    ds, dl = cfg.energy_short_decay, cfg.energy_long_decay
    new["energy_short"] = ds * st.energy_short + (1 - ds) * e
    new["energy_long"] = dl * st.energy_long + (1 - dl) * e
  rows_new = None
  if st.rows is not None:
    rows_new = {}
    for rk, r in st.rows.items():
      k = rk.replace(".", "/")
      ra = jnp.any(active[k].reshape(active[k].shape[0], -1), axis=1)
      nr = {}
      if "update_count" in r:
        nr["update_count"] = r["update_count"] + ra.astype(jnp.int32)
      if "update_ema" in r:
        d = cfg.update_ema_decay
        nr["update_ema"] = d * r["update_ema"] + (1 - d) * ra.astype(f32)
      rows_new[rk] = nr
    new["rows"] = rows_new
  if mode in ("prev", "full"):
    uflat = paths_lib.flatten(updates)
    if st.prev_grad is not None:
      dt = jnp.dtype(cfg.prev_grad_dtype)
      new["prev_grad"] = _rebuild(st.prev_grad, {k: g[k].astype(dt) for k in keys})
    if st.prev_sign is not None:
      new["prev_sign"] = _rebuild(
          st.prev_sign, {k: jnp.sign(jnp.asarray(uflat[k])).astype(jnp.int8) for k in keys})
    new["prev_step"] = step
  if mode == "full" and st.init_grad_sq is not None:
    new["init_grad_sq"] = jnp.where(step == 0, e, st.init_grad_sq)
  new_state = st._replace(**new)
  if mode != "full":
    return {}, new_state

  # ---- full step: every metric ----
  uflat = paths_lib.flatten(updates)
  want_moments = cfg.drift or cfg.aging
  mom = (opt_state_lib.find_moments(opt_state, params) if want_moments and opt_state is not None
         else opt_state_lib.Moments({}, None, {}, None, ()))
  per_path = {
      "g": g,
      "p": {k: jnp.asarray(pflat[k]).astype(f32) for k in keys},
      "u": {k: jnp.asarray(uflat[k]).astype(f32) for k in keys},
      "m": {k: jnp.asarray(x).astype(f32) for k, x in mom.first.items()},
      "v": {k: jnp.asarray(x).astype(f32) for k, x in mom.second.items()},
      "age": {k: step - la[k] for k in keys} if la is not None else {},
      "seen": seen or {},
      "count": cnt or {}, "ema": ema or {}, "s": sq or {},
      "prev_g": paths_lib.flatten(st.prev_grad) if st.prev_grad is not None else {},
      "prev_sign": paths_lib.flatten(st.prev_sign) if st.prev_sign is not None else {},
  }
  roles: dict[tuple, list[str]] = {}
  for k in keys:
    x = pflat[k]
    role = (context.role_of(k), tuple(np.shape(x)), str(jnp.asarray(x).dtype),
            paths_lib.kind_of(k), tuple(q for q in per_path if k in per_path[q]))
    roles.setdefault(role, []).append(k)
  groups, start = [], 0
  for (_, shape, _, kind, _), members in roles.items():
    # per_path's keys are Group's array fields (the constructor rejects any other name).
    groups.append(context.Group(
        paths=members, kind=kind, layers=[paths_lib.layer_of(k) for k in members],
        shape=shape, size=int(np.prod(shape, dtype=np.int64)), start=start,
        **{q: jnp.stack([d[k] for k in members]) for q, d in per_path.items() if members[0] in d}))
    start += len(members)
  order = [k for grp in groups for k in grp.paths]
  perm = np.asarray([keys.index(k) for k in order])
  rows = []
  for grp in groups:
    if grp.n == 1 and _is_row_tensor(grp.paths[0], grp.shape):
      r = (rows_new or {}).get(grp.paths[0].replace("/", "."), {})
      rows.append(context.Rows(path=grp.paths[0], group=grp,
                            count=r.get("update_count"), ema=r.get("update_ema")))
  ctx = context.Context(
      cfg=cfg, groups=groups, rows=rows, step=step, n=n,
      prev_valid=st.prev_step == step - 1, token_bucket=st.token_bucket,
      energy_short=new["energy_short"][perm] if "energy_short" in new else None,
      energy_long=new["energy_long"][perm] if "energy_long" in new else None,
      init_grad_sq=new["init_grad_sq"][perm] if "init_grad_sq" in new else None)
  for name, compute in FAMILIES.items():
    if cfg[name]:
      compute(ctx)
  return ctx.result(), new_state


def available_families(opt_state, params=None, cfg=None) -> dict[str, Any]:
  """What the diagnostics can read from this optimizer state.

  Returns a dict with ``first_moment`` / ``second_moment`` (the state field found, e.g.
  ``'ScaleByAdamState.nu'``, or None), ``factored`` (param paths reconstructed from Adafactor
  factors), ``families`` (families enabled in ``cfg`` (all if None) that run) and ``absent``
  (metric names that will be missing because a moment is missing). Without ``params``, moments
  are detected by field name only (no path/shape matching).
  """
  if params is not None:
    mom = opt_state_lib.find_moments(opt_state, params)
    first = mom.first_field if mom.first else None
    second = mom.second_field if mom.second else None
    factored = mom.factored
  else:
    def _label(fields):
      for f in fields:
        hits = optax.tree_utils.tree_get_all_with_path(opt_state, f)
        hits = [h for h in hits if jax.tree_util.tree_leaves(h[1])]
        if hits:
          return opt_state_lib.field_label(hits[0][0])
      return None
    first = _label(opt_state_lib.FIRST_MOMENT_FIELDS)
    second = _label(opt_state_lib.SECOND_MOMENT_FIELDS) or (
        "factored" if _label(("v_row",)) and _label(("v_col",)) else None)
    factored = ()
  fams = tuple(f for f in FAMILIES if cfg is None or cfg.get(f, True))
  absent = []
  if first is None:
    absent += ["drift/cos_grad_mu"]
  if second is None:
    absent += ["aging/log_staleness_*",
               "aging/emb_row_log_staleness*"]
  return {"first_moment": first, "second_moment": second, "factored": factored,
          "families": fams, "absent": tuple(absent)}


def state_bytes_per_param(cfg, has_second_moment: bool = True) -> dict[str, float]:
  """Bytes of diag_state per parameter entry, per state leaf, and 'total'.

  Small leaves are extra and not per parameter: 8 bytes per parameter tensor (drift energy
  EMAs), 4 bytes per parameter tensor (heterogeneity at initialisation), 8 bytes per
  token-embedding row (row counters), 4 bytes per vocab entry (bucket table).
  """
  if not cfg.enabled:
    return {"total": 0.0}
  out = {}
  if cfg.sparsity or cfg.aging:
    out["last_active"] = 4.0
  if cfg.sparsity and cfg.update_count:
    out["update_count"] = 4.0
  if cfg.sparsity and cfg.update_ema:
    out["update_ema"] = 4.0
  if cfg.aging and has_second_moment:
    out["sq_ema"] = 4.0
  if cfg.drift:
    out["prev_grad"] = float(jnp.dtype(cfg.prev_grad_dtype).itemsize)
  if cfg.sign:
    out["prev_sign"] = 1.0
  out["total"] = float(sum(out.values()))
  return out


def state_nbytes(diag_state) -> int:
  """Exact bytes of a diag_state (all leaves)."""
  return int(sum(np.dtype(x.dtype).itemsize * int(np.prod(x.shape))
                 for x in jax.tree.leaves(diag_state)))
