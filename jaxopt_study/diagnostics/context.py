"""The context a metric family computes in: its inputs, the aggregation API, the packed output.

A family's ``compute(ctx: Context)`` reads the stacked per-tensor arrays of ``ctx.groups``
(:class:`Group`: g, p, u, m, v, age, ... with a leading member axis) and writes metrics with
:meth:`Context.emit` (additive group aggregates), :meth:`Context.emit_quantiles` /
:meth:`Context.quantiles` (quantiles and histogram samples), :meth:`Context.emit_buckets`
(token-frequency buckets) or :meth:`Context.add` (named scalars). See the package docstring for
the recipe that adds a metric.

Compile-time matters: a GPT has ~200 parameter tensors and thousands of per-tensor metrics, and
XLA compiles thousands of scalar ops / outputs very slowly. So (i) tensors with the same *role*
(path with ``block_<i>`` replaced by ``block_*``, same shape, dtype and kind) are stacked along a
new leading axis and reduced together (same-role tensors share their sharding, so stacking needs
no communication); (ii) group aggregates are one matrix product of the per-tensor partial-sum
vectors with a static membership matrix; (iii) all scalars leave the step as ONE float32 vector
inside :class:`Metrics`, a read-only Mapping name -> value (a pytree whose names are static).

Memory traffic matters as much (the full step runs every ``every`` steps, on every parameter
entry): (iv) :func:`red` is deferred, and every per-tensor sum that all families ask of one group
is computed by ONE variadic reduction (:func:`member_sums`), so each of the group's arrays is read
once per full step and the sums are one kernel per group, not one per metric (~30); (v) quantile
functions are evaluated on the strided subsample of their inputs (:func:`strided`), never on
full-size intermediates. ``scripts/diag_cost.py`` prints XLA's bytes and kernel counts of the
step variants.

Every additive metric is ``combine(S_1, ..., S_k)`` of sums ``S_j = sum_{b in group} s_j(b)`` of
per-tensor partial sums. Groups: all tensors (``family/metric``), one kind (``/kind=<kind>``),
one layer (``/layer=<NN>``), one tensor (``/param=<path>``). E.g. a fraction is (count, size) ->
count/size, a norm (sum x^2,) -> sqrt, a cosine (<a,b>, |a|^2, |b|^2) -> <a,b>/sqrt(|a|^2 |b|^2)
(the cosine of the concatenated vectors).

Quantiles are ``np.nanquantile(x, q)`` (linear interpolation, NaN = excluded entry) of a
subsample: each tensor of size N_b contributes a strided grid ``x[::s, ::s, ...]`` with the
smallest stride s such that it has <= ceil(N_b * quantile_sample_size / N_total) entries (s = 1,
i.e. exact, when the tensors hold <= quantile_sample_size entries in all). The interpolation
position q (c - 1) (c = number of non-NaN samples) is computed in integer arithmetic from q = a/b
(a float32 position would round in steps of 2^-5 at c ~ 4e5), so the result equals NumPy's up to
float32 rounding of the interpolated value. Histogram samples (``<name>_hist``) are the K =
min(histogram_size, subsample length) quantiles at levels (i + 1/2) / K, i < K, of the same
subsample: excluded (NaN) entries never appear in them; all NaN if every entry is excluded.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import fractions
import math
import re
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

NAN = float("nan")


@jax.tree_util.register_pytree_node_class
class Metrics(collections.abc.Mapping):
  """Mapping metric name -> 0-d value (a slice of one packed vector) or 1-d histogram sample.

  A pytree (returned from jit as 1 + #histograms buffers; names are static aux data). Use
  ``jax.device_get(metrics)`` (or :meth:`to_numpy`) once before iterating on the host.
  """

  def __init__(self, names, values, hists):
    self._names = tuple(names)
    self.values = values
    self.hists = dict(hists)
    self._index = {n: i for i, n in enumerate(self._names)}

  def tree_flatten(self):
    return (self.values, self.hists), self._names

  @classmethod
  def tree_unflatten(cls, names, children):
    return cls(names, *children)

  def __getitem__(self, key):
    if key in self._index:
      return self.values[self._index[key]]
    return self.hists[key]

  def __iter__(self):
    yield from self._names
    yield from self.hists

  def __len__(self):
    return len(self._names) + len(self.hists)

  def __contains__(self, key):
    return key in self._index or key in self.hists

  def to_numpy(self) -> dict[str, np.ndarray]:
    """One device->host transfer; {name: numpy 0-d / 1-d array}."""
    values, hists = jax.device_get((self.values, self.hists))
    out = {n: np.asarray(values[i]) for n, i in self._index.items()}
    out.update({k: np.asarray(v) for k, v in hists.items()})
    return out

  def __repr__(self):
    return f"Metrics({len(self._names)} scalars, {len(self.hists)} histograms)"


def role_of(path: str) -> str:
  return re.sub(r"(^|/)block_\d+(/|$)", r"\1block_*\2", path)


class Sum:
  """A per-member sum of ``x`` [n, *shape] over all but the leading (stacking) axis, deferred
  (:func:`red`); ``value`` ([n]: int32 for bool or integer x, else float32) is set by
  :func:`member_sums` when the context evaluates its pending per-tensor requests."""
  __slots__ = ("x", "value")

  def __init__(self, x):
    self.x, self.value = x, None


def red(x) -> Sum:
  """Per-member sum over all but the leading (stacking) axis, deferred: every sum the families
  ask of one group is computed by ONE variadic reduction (:func:`member_sums`), so each of the
  group's arrays is read once per full step and the sums are one kernel, not one per metric.
  Use it only inside the ``fn`` of :meth:`Context.emit` / :meth:`Context.per_tensor`."""
  return Sum(x)


# Entries summed sequentially by the first stage of member_sums (a variadic reduce is a plain
# loop on XLA:CPU: a float32 running sum over millions of entries would lose digits; over <= 256
# entries its error is below that of the second stage's tree reduction).
SUM_CHUNK = 256


def member_sums(xs: list) -> list:
  """[jnp.sum(x, axis=1..) for x in xs] (bool / integer x summed in int32, exactly; float x in
  float32), each x read once: per distinct shape, one variadic ``lax.reduce`` over chunks of
  <= SUM_CHUNK consecutive entries (one kernel for all the sums of a group), then a sum of the
  [n, chunks] partial sums."""
  xs = [x.astype(jnp.int32) if (x.dtype == jnp.bool_ or jnp.issubdtype(x.dtype, jnp.integer))
        else x.astype(jnp.float32) for x in xs]
  by_shape: dict[tuple, list[int]] = {}
  for i, x in enumerate(xs):
    by_shape.setdefault(tuple(x.shape), []).append(i)
  out = [None] * len(xs)
  for shape, idx in by_shape.items():
    n, size = shape[0], int(np.prod(shape[1:], dtype=np.int64))
    chunk = max(d for d in range(1, min(size, SUM_CHUNK) + 1) if size % d == 0)
    ops = tuple(xs[i].reshape(n, size // chunk, chunk) for i in idx)
    partial = jax.lax.reduce(ops, tuple(jnp.zeros((), x.dtype) for x in ops),
                             lambda a, b: tuple(u + v for u, v in zip(a, b)), (2,))  # [n, C]
    for dtype in (jnp.int32, jnp.float32):  # the second stage: one reduction per dtype
      js = [j for j, i in enumerate(idx) if xs[i].dtype == dtype]
      if js:
        sums = jnp.sum(jnp.stack([partial[j] for j in js]), axis=2)  # [k, n]
        for row, j in enumerate(js):
          out[idx[j]] = sums[row]
  return out


# Group's arrays (each [n, *shape]; float32 unless noted), read as attributes (group.g, ...):
ARRAY_FIELDS = (
    "g",          # g_t
    "p",          # theta_t (before this step's update)
    "u",          # u_t (params_{t+1} = params_t + u_t)
    "m",          # first moment m_{t-1}
    "v",          # second moment v_{t-1} (reconstructed for Adafactor)
    "age",        # int32 t - last_active_t (t + 1: never active)
    "seen",       # bool: active at some step < t (v_{t-1} holds its gradient)
    "count",      # int32 active steps incl. t
    "ema",        # raw EMA of the active indicator
    "s",          # raw EMA of g^2
    "prev_g",     # g_{t-1} as stored (prev_grad_dtype)
    "prev_sign",  # int8 sign(u_{t-1})
)
# Members of at least this many entries are reduced one by one (Context.run_pending), never
# stacked: stacking copies every array of the group (~90 bytes per entry at all families on).
UNSTACKED_MIN_SIZE = 2 ** 18


@dataclasses.dataclass
class Group:
  """Tensors of one role (n members of one shape). ``group.<field>`` for a field of
  :data:`ARRAY_FIELDS` is the members' arrays stacked along a new axis 0, [n, *shape] (None if
  absent), made on first access from ``parts``; :meth:`member` and :func:`strided` make views
  that stack nothing of the full-size arrays."""
  paths: list[str]
  kind: str
  layers: list[Optional[int]]
  shape: tuple                     # member shape
  size: int                        # member size
  start: int                       # index of the first member in the context's tensor order
  parts: dict = dataclasses.field(default_factory=dict)  # field -> [n arrays of `shape`]

  def __post_init__(self):
    unknown = set(self.parts) - set(ARRAY_FIELDS)
    if unknown:
      raise TypeError(f"Group: unknown array fields {sorted(unknown)}; valid: {ARRAY_FIELDS}")
    self._stacked = {}

  def __getattr__(self, name):  # only called for names that are not regular attributes
    if name not in ARRAY_FIELDS:
      raise AttributeError(name)
    xs = self.__dict__["parts"].get(name)
    if xs is None:
      return None
    cache = self.__dict__["_stacked"]
    if name not in cache:
      cache[name] = xs[0][None] if len(xs) == 1 else jnp.stack(xs)
    return cache[name]

  @property
  def n(self):
    return len(self.paths)

  def member(self, i: int) -> "Group":
    """The singleton group of member i."""
    return Group(paths=[self.paths[i]], kind=self.kind, layers=[self.layers[i]],
                 shape=self.shape, size=self.size, start=self.start + i,
                 parts={q: [xs[i]] for q, xs in self.parts.items()})


@dataclasses.dataclass
class Rows:
  """Row statistics of one (V, D) token embedding (rows = axis 0)."""
  path: str
  group: Group                        # its (singleton) group; arrays [1, V, D]
  count: Optional[jax.Array] = None   # int32 [V] steps in which the row was active
  ema: Optional[jax.Array] = None     # float32 [V] raw EMA of the row-active indicator


@dataclasses.dataclass
class Context:
  """Inputs of one full step (static structure, traced arrays) and the metrics written so far."""
  cfg: Any
  groups: list[Group]
  rows: list[Rows]
  step: jax.Array          # int32 t
  n: jax.Array             # int32 number of update() calls including this one
  prev_valid: jax.Array    # bool: the stored previous gradient/sign is from step t-1
  token_bucket: Optional[jax.Array]
  energy_short: Optional[jax.Array] = None   # raw, per tensor in context order
  energy_long: Optional[jax.Array] = None
  init_grad_sq: Optional[jax.Array] = None   # |g_0(b)|^2 per tensor in context order (NaN: unseen)
  names: list = dataclasses.field(default_factory=list)
  values: list = dataclasses.field(default_factory=list)
  hists: dict = dataclasses.field(default_factory=dict)
  quantile_requests: list = dataclasses.field(default_factory=list)
  pending: list = dataclasses.field(default_factory=list)   # (fn, then) of per_tensor

  @property
  def paths(self) -> list[str]:
    return [p for g in self.groups for p in g.paths]

  @property
  def kinds(self) -> list[str]:
    return [g.kind for g in self.groups for _ in g.paths]

  @property
  def layers(self) -> list[Optional[int]]:
    return [l for g in self.groups for l in g.layers]

  def bias_correction(self, decay: float) -> jax.Array:
    return 1.0 - jnp.power(jnp.float32(decay), self.n.astype(jnp.float32))

  # ---- output ----
  def add(self, names: list[str], vec):
    vec = jnp.asarray(vec, jnp.float32).reshape(-1)
    assert vec.shape[0] == len(names), (names, vec.shape)
    self.names.extend(names)
    self.values.append(vec)

  def add_scalar(self, name: str, x):
    self.add([name], x)

  def result(self) -> Metrics:
    self.run_pending()
    if self.quantile_requests:
      xs = [x for _, x, _ in self.quantile_requests]
      mat, count = sorted_samples(xs)  # one sort serves every quantile and histogram
      qs = tuple(self.cfg.quantiles)
      if qs:
        self.add([n for ns, _, _ in self.quantile_requests for n in ns],
                 interpolate(mat, count, qs).reshape(-1))
      for i, (_, x, hist) in enumerate(self.quantile_requests):
        if hist is not None:
          k = min(int(self.cfg.histogram_size), x.shape[0])
          if 2 * k > MAX_DENOMINATOR:
            raise ValueError(f"config.diagnostics.histogram_size={self.cfg.histogram_size} is "
                             f"too large: set it to at most {MAX_DENOMINATOR // 2}")
          self.hists[hist] = interpolate(mat[i:i + 1], count[i:i + 1],
                                         [(2 * j + 1, 2 * k) for j in range(k)])[0]
      self.quantile_requests = []
    values = (jnp.concatenate(self.values) if self.values else jnp.zeros((0,), jnp.float32))
    return Metrics(self.names, values, self.hists)

  # ---- per-tensor vectors ----
  def per_tensor(self, fn: Callable[[Group], Any], then: Callable):
    """Deferred: ``then(parts, present)`` with fn's per-tensor values, when the result is made.

    fn(group) -> a tuple of [n] arrays or :func:`red` sums, or None (absent); parts = tuple of
    [T] float32 vectors (context order, 0 where absent), present = bool [T]. All requests are
    evaluated together (:meth:`run_pending`): one variadic reduction per group for all sums.
    """
    self.pending.append((fn, then))

  def run_pending(self):
    """Evaluates the pending per_tensor requests: per group (or per member of a group whose
    members have >= UNSTACKED_MIN_SIZE entries), every request's sums in one member_sums call."""
    pending, self.pending = self.pending, []
    outs = [[] for _ in pending]  # [request][group]: per-member tuples, or None
    for g in self.groups:
      split = g.n > 1 and g.size >= UNSTACKED_MIN_SIZE
      views = [g.member(i) for i in range(g.n)] if split else [g]
      res = [[fn(v) for v in views] for fn, _ in pending]  # [request][view]
      for i in range(len(views)):  # one member_sums per view: every request's sums of it
        terms = [t for r in res if r[i] is not None for t in r[i] if isinstance(t, Sum)]
        for t, v in zip(terms, member_sums([t.x for t in terms])):
          t.value = v
      for out, r in zip(outs, res):
        if r[0] is None:
          out.append(None)
        else:
          value = lambda x, n: (x.value if isinstance(x, Sum) else jnp.asarray(x)).reshape(n)
          out.append(tuple(jnp.concatenate([value(o[j], v.n).astype(jnp.float32)
                                            for o, v in zip(r, views)])
                           for j in range(len(r[0]))))
    for (_, then), rs in zip(pending, outs):
      then(*self._vectors(rs))

  def _vectors(self, rs: list):
    """(tuple of [T] float32, present bool [T]) from one request's per-group results."""
    present, k = [], None
    for g, r in zip(self.groups, rs):
      present += [r is not None] * g.n
      if r is not None:
        k = len(r)
    if k is None:
      return None, np.zeros(len(present), bool)
    vecs = []
    for j in range(k):
      vecs.append(jnp.concatenate([
          jnp.asarray(r[j], jnp.float32).reshape(g.n) if r is not None
          else jnp.zeros((g.n,), jnp.float32) for g, r in zip(self.groups, rs)]))
    return tuple(vecs), np.asarray(present)

  def group_table(self, present: np.ndarray):
    """(suffixes, membership matrix [num_groups, T]) over present tensors."""
    paths, kinds, layers = self.paths, self.kinds, self.layers
    idx = np.nonzero(present)[0]
    rows = [("", idx)]
    if self.cfg.per_kind:
      for k in sorted({kinds[i] for i in idx}):
        rows.append((f"/kind={k}", [i for i in idx if kinds[i] == k]))
    if self.cfg.per_layer:
      for l in sorted({layers[i] for i in idx if layers[i] is not None}):
        rows.append((f"/layer={l:02d}", [i for i in idx if layers[i] == l]))
    if self.cfg.per_param:
      rows += [(f"/param={paths[i]}", [i]) for i in idx]
    mat = np.zeros((len(rows), len(paths)), np.float32)
    for r, (_, members) in enumerate(rows):
      mat[r, members] = 1.0
    return [s for s, _ in rows], mat

  def emit(self, name: str, fn: Callable[[Group], Any], combine: Callable):
    """metrics[name + suffix] = combine(*group sums of fn's per-tensor partial sums)."""
    def then(parts, present):
      if parts is None:
        return
      suffixes, mat = self.group_table(present)
      mat = jnp.asarray(mat)
      sums = [jnp.dot(mat, jnp.where(jnp.asarray(present), p, 0.0),
                      precision=jax.lax.Precision.HIGHEST) for p in parts]
      self.add([name + s for s in suffixes], combine(*sums))
    self.per_tensor(fn, then)

  # ---- quantiles ----
  def sample(self, g: Group, total: int) -> Group:
    """g with every array subsampled on the strided grid of its members (see module doc)."""
    budget = max(1, math.ceil(g.size * int(self.cfg.quantile_sample_size) / max(total, 1)))
    return strided(g, grid_stride(g.shape, budget))

  def emit_quantiles(self, name: str, fn: Callable[[Group], Any], hist: bool = False):
    """Quantiles (global, per kind) of fn(group) ([n, *shape] or None) over the groups.

    fn must be elementwise (entry i of its result depends on entry i of the group's arrays
    only): it is evaluated on the subsampled arrays, so no full-size intermediate is made.
    """
    sel = [g for g in self.groups if fn(strided(g, max(g.shape, default=1))) is not None]
    if not sel:
      return
    total = sum(g.n * g.size for g in sel)
    samples = [(g.kind, fn(self.sample(g, total)).reshape(-1).astype(jnp.float32)) for g in sel]
    sets = [("", [s for _, s in samples])]
    if self.cfg.per_kind:
      for k in sorted({k for k, _ in samples}):
        sets.append((f"/kind={k}", [s for kk, s in samples if kk == k]))
    for suffix, xs in sets:
      self.quantiles(name, jnp.concatenate(xs), suffix, hist=hist and suffix == "")

  def quantiles(self, name: str, x, suffix: str = "", hist: bool = False):
    """Requests nanquantiles (and, with hist, the ``name + '_hist'`` sample) of the 1-d x.

    NaN entries of x are excluded. All requests are served by one batched sort in result().
    """
    if tuple(self.cfg.quantiles) or hist:
      self.quantile_requests.append(([qname(name, q) + suffix for q in self.cfg.quantiles],
                                     x.reshape(-1).astype(jnp.float32),
                                     name + "_hist" if hist else None))

  # ---- token-frequency buckets ----
  def emit_buckets(self, name: str, values, weights=None):
    """Per token-frequency bucket weighted mean of a per-row value: name + '/freq_bucket=BB'."""
    values = values.astype(jnp.float32)
    w = jnp.ones_like(values) if weights is None else weights.astype(jnp.float32)
    self.emit_bucket_ratio(name, jnp.where(w > 0, values * w, 0.0), w)

  def emit_bucket_ratio(self, name: str, num, den):
    """name + '/freq_bucket=BB' = sum_{rows in BB} num / sum_{rows in BB} den (NaN if 0)."""
    if self.token_bucket is None or self.token_bucket.shape[0] != num.shape[0]:
      return
    nb = int(self.cfg.num_freq_buckets)
    seg = lambda x: jax.ops.segment_sum(x.astype(jnp.float32), self.token_bucket, num_segments=nb)
    self.add([f"{name}/freq_bucket={b:02d}" for b in range(nb)], safe_div(seg(num), seg(den)))


def strided(g: Group, s: int) -> Group:
  """g with each member's arrays on the grid x[::s, ::s, ...] (s = 1: g itself)."""
  if s == 1:
    return g
  sl = tuple(slice(None, None, s) for _ in g.shape)
  shape = tuple(math.ceil(d / s) for d in g.shape)
  return dataclasses.replace(g, shape=shape, size=int(np.prod(shape, dtype=np.int64)),
                             parts={q: [x[sl] for x in xs] for q, xs in g.parts.items()})


def grid_stride(shape: tuple, budget: int) -> int:
  """Smallest s >= 1 with prod(ceil(n_i / s)) <= budget."""
  size = lambda s: int(np.prod([math.ceil(n / s) for n in shape], dtype=np.int64))
  lo, hi = 1, max([1] + list(shape))
  while lo < hi:  # size(s) is non-increasing in s and size(max(shape)) == 1
    mid = (lo + hi) // 2
    if size(mid) <= budget:
      hi = mid
    else:
      lo = mid + 1
  return lo


def sorted_samples(xs: list):
  """(mat [R, L] each 1-d x padded with NaN and sorted, NaNs last; count [R] int32 non-NaN)."""
  length = max(x.shape[0] for x in xs)
  mat = jnp.stack([jnp.pad(x, (0, length - x.shape[0]), constant_values=jnp.nan) for x in xs])
  return jnp.sort(mat, axis=1), jnp.sum(~jnp.isnan(mat), axis=1, dtype=jnp.int32)


MAX_DENOMINATOR = 46340  # b^2 < 2^31: the int32 position arithmetic below cannot overflow


def as_ratio(q) -> tuple[int, int]:
  """q (a float in [0, 1], or an (a, b) pair) as integers a/b with b <= MAX_DENOMINATOR."""
  if isinstance(q, tuple):
    return q
  r = fractions.Fraction(q).limit_denominator(MAX_DENOMINATOR)
  if not 0 <= q <= 1 or abs(float(r) - q) > 1e-12:
    raise ValueError(f"config.diagnostics.quantiles: {q!r} must lie in [0, 1] and be a ratio a/b "
                     f"with b <= {MAX_DENOMINATOR} (e.g. 0.9, 0.999); set it to such a value")
  return r.numerator, r.denominator


def interpolate(mat, count, qs):
  """[R, Q] linear-interpolation quantiles (np.quantile's default) of the sorted rows of mat.

  For level q = a/b and m = count - 1 the position q m is floor + frac with
  floor = (m // b) a + ((m % b) a) // b and frac = ((m % b) a % b) / b, exact in int32
  (m % b < b <= MAX_DENOMINATOR). NaN where count == 0.
  """
  a, b = (jnp.asarray(v, jnp.int32)[None, :] for v in zip(*(as_ratio(q) for q in qs)))
  m = jnp.maximum(count - 1, 0)[:, None]                               # [R, 1]
  lo = (m // b) * a + ((m % b) * a) // b                               # [R, Q]
  frac = (((m % b) * a) % b).astype(jnp.float32) / b.astype(jnp.float32)
  vlo = jnp.take_along_axis(mat, lo, axis=1)
  vhi = jnp.take_along_axis(mat, jnp.minimum(lo + 1, m), axis=1)
  out = vlo + (vhi - vlo) * frac
  return jnp.where(count[:, None] > 0, out, NAN)


def safe_div(a, b):
  return jnp.where(b > 0, a / jnp.where(b > 0, b, 1.0), NAN)


def cosine(ab, aa, bb):
  return safe_div(ab, jnp.sqrt(aa) * jnp.sqrt(bb))


def sqrt_ratio(a, b):
  return jnp.sqrt(safe_div(a, b))


def qname(name: str, q: float) -> str:
  return f"{name}_q{100 * q:g}"
