"""DiagState, init, update and the step modes (mode_for_step)."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxopt_study.diagnostics import context
from jaxopt_study.diagnostics import experts as experts_lib
from jaxopt_study.diagnostics import frequency
from jaxopt_study.diagnostics import opt_state as opt_state_lib
from jaxopt_study.diagnostics import paths as paths_lib
from jaxopt_study.diagnostics.families import FAMILIES

# The step modes (static): what one update() call does. See update() and mode_for_step().
MODES = ("off", "counters", "prev", "full")


class DiagState(NamedTuple):
  """The diagnostics' state: plain arrays only (orbax-safe). None = not allocated.

  Leaves marked (P) mirror the params tree: same shape, the param's path as a suffix of the
  leaf's path (shard them like the parameter). All others are small (replicate them). Leaves
  marked (E) are per-entry counters: (P) trees when ``cfg.entry_sample_size`` is 0, else ONE
  float32/int32 vector over the fixed strided grid of entries of every tensor
  (:func:`entry_strides`, params flatten order; small, replicated).
  """
  count: jax.Array             # int32 (): number of update() calls so far (n - 1 during a call)
  prev_step: jax.Array         # int32 (): step at which prev_grad / prev_sign were stored
  last_active: Any = None      # (E) int32: last step with |g| > active_threshold (-1: never)
  update_count: Any = None     # (E) int32: number of steps with |g| > active_threshold
  update_ema: Any = None       # (E) float32: EMA of the active indicator (raw, not bias-corrected)
  sq_ema: Any = None           # (E) float32: EMA of g^2 (s_t, raw)
  prev_grad: Any = None        # (P) prev_grad_dtype: gradient of step prev_step
  prev_sign: Any = None        # (P) int8: sign(update) of step prev_step
  energy_short: Any = None     # float32 [num_tensors] (params flatten order): EMA of |g_b|^2
  energy_long: Any = None      # float32 [num_tensors]
  init_grad_sq: Any = None     # float32 [num_tensors]: |g_0|^2 per tensor, set by the full step
                               # at step 0 (NaN until then; heterogeneity at initialisation)
  rows: Any = None             # {path with '.' for '/': {'last_active': int32 [V],
                               #   'update_count': int32 [V], 'update_ema': float32 [V] (row
                               #   active = any entry active), 'sq_ema': float32 [V] (EMA of
                               #   the row mean of g^2)}}: exact for every entry_sample_size
  token_bucket: Any = None     # int32 [V]: token-frequency bucket of each token id
  experts: Any = None          # {'layer_NN': {'last_active': int32 [E] (any entry active),
                               #   'active_frac': float32 [E] (sum over steps of the share of
                               #   the expert's entries active), 'active_frac_ema': float32 [E]
                               #   (EMA of that share), 'sq_ema': float32 [E] (EMA of the sum of
                               #   g^2 over the expert's entries)}}: exact, as rows


def _is_row_tensor(path: str, shape) -> bool:
  return paths_lib.kind_of(path) == "token_embedding" and len(shape) == 2


def _has_second_moment(opt_state, params) -> bool:
  return bool(opt_state_lib.find_moments(opt_state, params).second)


def entry_strides(params, cfg) -> dict[str, int]:
  """Stride s of the fixed grid ``x[::s, ::s, ...]`` on which each tensor keeps its per-entry
  counters ({path: s}, params flatten order).

  s = 1 (every entry, exact) for every tensor when ``cfg.entry_sample_size`` is 0. Otherwise
  the same rule as the quantile subsample (:func:`.context.grid_stride`): tensor b of N_b
  entries gets the smallest s with at most ceil(N_b * entry_sample_size / N_total) grid
  entries, so the sample spreads over the tensors in proportion to their sizes (a tensor with
  fewer entries than its share keeps all of them). A strided grid is a fixed systematic sample:
  per-entry means and quantiles over it estimate those over all entries (sampling error about
  1/sqrt(grid size) for a share), and the same entries are followed at every step.
  """
  flat = paths_lib.flatten(params)
  k = int(cfg.entry_sample_size)
  if k <= 0:
    return {p: 1 for p in flat}
  sizes = {p: int(np.prod(x.shape, dtype=np.int64)) for p, x in flat.items()}
  total = max(sum(sizes.values()), 1)
  return {p: context.grid_stride(tuple(x.shape), max(1, math.ceil(sizes[p] * k / total)))
          for p, x in flat.items()}


def _grid_shapes(params, strides) -> dict[str, tuple]:
  return {p: context.grid_shape(x.shape, strides[p])
          for p, x in paths_lib.flatten(params).items()}


def _read_entries(leaf, shapes: dict[str, tuple], sampled: bool) -> dict[str, Any]:
  """{path: counter array on the tensor's grid} from a per-entry (E) state leaf."""
  if not sampled:
    return paths_lib.flatten(leaf)
  out, i = {}, 0
  for path, shape in shapes.items():
    size = int(np.prod(shape, dtype=np.int64))
    out[path] = leaf[i:i + size].reshape(shape)
    i += size
  return out


def _write_entries(leaf, values: dict[str, Any], sampled: bool):
  """The inverse of :func:`_read_entries` (``values`` in params flatten order)."""
  if not sampled:
    return _rebuild(leaf, values)
  return jnp.concatenate([jnp.reshape(x, (-1,)) for x in values.values()])


def _expert_layers(params) -> dict[str, tuple[list[str], int, int]]:
  """{'layer_NN': (expert tensor paths, E, entries per expert)} of the MoE layers."""
  out: dict[str, tuple[list[str], int, int]] = {}
  for path, p in paths_lib.flatten(params).items():
    layer = paths_lib.layer_of(path)
    if paths_lib.kind_of(path) != experts_lib.EXPERT_KIND or layer is None:
      continue
    members, e, size = out.get(f"layer_{layer:02d}", ([], p.shape[0], 0))
    out[f"layer_{layer:02d}"] = (members + [path], e,
                                 size + int(np.prod(p.shape[1:], dtype=np.int64)))
  return out


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
  sampled = int(cfg.entry_sample_size) > 0
  num_grid = sum(int(np.prod(s, dtype=np.int64))
                 for s in _grid_shapes(params, entry_strides(params, cfg)).values())
  entries = lambda dtype, fill=0: (jnp.full((num_grid,), fill, dtype) if sampled
                                   else like(dtype, fill))
  num_tensors = len(jax.tree.leaves(params))
  counters = cfg.sparsity or cfg.aging
  want_count = cfg.sparsity and cfg.update_count
  want_ema = cfg.sparsity and cfg.update_ema
  want_sq = cfg.aging and (opt_state is None or _has_second_moment(opt_state, params))
  zeros = lambda n, dtype=jnp.float32: jnp.zeros((n,), dtype)
  rows = experts = None
  if counters:
    rows = {}
    for path, p in paths_lib.flatten(params).items():
      if _is_row_tensor(path, p.shape):
        v = p.shape[0]
        r = {"last_active": jnp.full((v,), -1, jnp.int32)}
        if want_count:
          r["update_count"] = zeros(v, jnp.int32)
        if want_ema:
          r["update_ema"] = zeros(v)
        if want_sq:
          r["sq_ema"] = zeros(v)
        rows[path.replace("/", ".")] = r
    layers = _expert_layers(params) if cfg.experts else {}
    if layers:
      experts = {}
      for name, (_, e, _) in layers.items():
        x = {"last_active": jnp.full((e,), -1, jnp.int32)}
        if want_count:
          x["active_frac"] = zeros(e)
        if want_ema:
          x["active_frac_ema"] = zeros(e)
        if want_sq:
          x["sq_ema"] = zeros(e)
        experts[name] = x
  token_bucket = token_bucket_table(params, cfg, token_frequencies)
  token_bucket = None if token_bucket is None else jnp.asarray(token_bucket)
  return DiagState(
      count=count,
      prev_step=prev_step,
      last_active=entries(jnp.int32, -1) if counters else None,
      update_count=entries(jnp.int32) if want_count else None,
      update_ema=entries(jnp.float32) if want_ema else None,
      sq_ema=entries(jnp.float32) if want_sq else None,
      prev_grad=like(jnp.dtype(cfg.prev_grad_dtype)) if cfg.drift else None,
      prev_sign=like(jnp.int8) if cfg.sign else None,
      energy_short=jnp.zeros((num_tensors,), jnp.float32) if cfg.drift else None,
      energy_long=jnp.zeros((num_tensors,), jnp.float32) if cfg.drift else None,
      init_grad_sq=jnp.full((num_tensors,), jnp.nan, jnp.float32) if cfg.heterogeneity else None,
      rows=rows,
      token_bucket=token_bucket,
      experts=experts,
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


def _unit_counters(old: dict, any_active, share, sq, step, cfg, names: tuple[str, str]) -> dict:
  """One step of a unit's counters (``old``'s keys): last_active (step where ``any_active``),
  ``names[0]`` (running sum of ``share``: an int32 count of active steps for rows), ``names[1]``
  (EMA of ``share``, decay update_ema_decay) and sq_ema (EMA of ``sq``, decay sq_ema_decay)."""
  new = {"last_active": jnp.where(any_active, step, old["last_active"])}
  if names[0] in old:
    new[names[0]] = old[names[0]] + share.astype(old[names[0]].dtype)
  if names[1] in old:
    d = cfg.update_ema_decay
    new[names[1]] = d * old[names[1]] + (1 - d) * share
  if "sq_ema" in old:
    d = cfg.sq_ema_decay
    new["sq_ema"] = d * old["sq_ema"] + (1 - d) * sq
  return new


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
  thr = cfg.active_threshold

  # Per-entry counters, on each tensor's grid (every entry unless cfg.entry_sample_size > 0).
  strides = entry_strides(params, cfg)
  sampled = int(cfg.entry_sample_size) > 0
  ge = {k: context.on_grid(g[k], strides[k]) for k in keys}
  shapes = _grid_shapes(params, strides)
  active = {k: jnp.abs(ge[k]) > thr for k in keys}
  new = {"count": n}
  la = seen = cnt = ema = sq = None
  if st.last_active is not None:
    old = _read_entries(st.last_active, shapes, sampled)
    la = {k: jnp.where(active[k], step, old[k]) for k in keys}
    seen = {k: old[k] >= 0 for k in keys}  # active at some step < t
    new["last_active"] = _write_entries(st.last_active, la, sampled)
  if st.update_count is not None:
    old = _read_entries(st.update_count, shapes, sampled)
    cnt = {k: old[k] + active[k].astype(jnp.int32) for k in keys}
    new["update_count"] = _write_entries(st.update_count, cnt, sampled)
  if st.update_ema is not None:
    d = cfg.update_ema_decay
    old = _read_entries(st.update_ema, shapes, sampled)
    ema = {k: d * old[k] + (1 - d) * active[k].astype(f32) for k in keys}
    new["update_ema"] = _write_entries(st.update_ema, ema, sampled)
  if st.sq_ema is not None:
    d = cfg.sq_ema_decay
    old = _read_entries(st.sq_ema, shapes, sampled)
    sq = {k: d * old[k] + (1 - d) * jnp.square(ge[k]) for k in keys}
    new["sq_ema"] = _write_entries(st.sq_ema, sq, sampled)
  e = jnp.stack([jnp.sum(jnp.square(g[k])) for k in keys])  # |g_b|^2; fuses with the counters
  if st.energy_short is not None:
    ds, dl = cfg.energy_short_decay, cfg.energy_long_decay
    new["energy_short"] = ds * st.energy_short + (1 - ds) * e
    new["energy_long"] = dl * st.energy_long + (1 - dl) * e

  # Exact unit counters: token-embedding rows and MoE experts (a unit is active iff any of its
  # entries is). Linear in g, so they need no per-entry state.
  rows_new = rows_seen = None
  if st.rows is not None:
    rows_new, rows_seen = {}, {}
    for rk, r in st.rows.items():
      gk = g[rk.replace(".", "/")]
      gk = gk.reshape(gk.shape[0], -1)
      ra = jnp.any(jnp.abs(gk) > thr, axis=1)
      rows_seen[rk] = r["last_active"] >= 0
      rows_new[rk] = _unit_counters(r, ra, ra.astype(f32), jnp.mean(jnp.square(gk), axis=1),
                                    step, cfg, ("update_count", "update_ema"))
    new["rows"] = rows_new
  experts_new = None
  if st.experts is not None:
    experts_new = {}
    for name, (members, _, size) in _expert_layers(params).items():
      axes = lambda x: tuple(range(1, x.ndim))
      nact = sum(jnp.sum(jnp.abs(g[k]) > thr, axis=axes(g[k]), dtype=f32) for k in members)
      sumsq = sum(jnp.sum(jnp.square(g[k]), axis=axes(g[k])) for k in members)
      experts_new[name] = _unit_counters(st.experts[name], nact > 0, nact / size, sumsq, step,
                                         cfg, ("active_frac", "active_frac_ema"))
    new["experts"] = experts_new
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
        grid=strides[members[0]],
        **{q: jnp.stack([d[k] for k in members]) for q, d in per_path.items() if members[0] in d}))
    start += len(members)
  order = [k for grp in groups for k in grp.paths]
  perm = np.asarray([keys.index(k) for k in order])
  rows = []
  for grp in groups:
    if grp.n == 1 and _is_row_tensor(grp.paths[0], grp.shape):
      rk = grp.paths[0].replace("/", ".")
      r = (rows_new or {}).get(rk, {})
      rows.append(context.Rows(
          path=grp.paths[0], group=grp, count=r.get("update_count"), ema=r.get("update_ema"),
          last_active=r.get("last_active"), seen=(rows_seen or {}).get(rk), s=r.get("sq_ema")))
  ctx = context.Context(
      cfg=cfg, groups=groups, rows=rows, step=step, n=n,
      prev_valid=st.prev_step == step - 1, token_bucket=st.token_bucket,
      energy_short=new["energy_short"][perm] if "energy_short" in new else None,
      energy_long=new["energy_long"][perm] if "energy_long" in new else None,
      init_grad_sq=new["init_grad_sq"][perm] if "init_grad_sq" in new else None,
      experts=experts_new or {},
      experts_seen={k: x["last_active"] >= 0 for k, x in (st.experts or {}).items()})
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
  EMAs), 4 bytes per parameter tensor (heterogeneity at initialisation), 16 bytes per
  token-embedding row and per expert (unit counters), 4 bytes per vocab entry (bucket table),
  and with ``entry_sample_size`` = N > 0 the per-entry counters: 16 bytes per grid entry (about
  N), not per parameter (they are left out here).
  """
  if not cfg.enabled:
    return {"total": 0.0}
  out = {}
  per_entry = 0.0 if int(cfg.entry_sample_size) > 0 else 4.0
  if cfg.sparsity or cfg.aging:
    out["last_active"] = per_entry
  if cfg.sparsity and cfg.update_count:
    out["update_count"] = per_entry
  if cfg.sparsity and cfg.update_ema:
    out["update_ema"] = per_entry
  if cfg.aging and has_second_moment:
    out["sq_ema"] = per_entry
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
