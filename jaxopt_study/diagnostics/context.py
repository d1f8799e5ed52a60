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


def red(x):
  """Per-member sum over all but the leading (stacking) axis."""
  return jnp.sum(x, axis=tuple(range(1, x.ndim)))


@dataclasses.dataclass
class Group:
  """Tensors of one role, stacked along axis 0 (n members). Arrays are float32 unless noted."""
  paths: list[str]
  kind: str
  layers: list[Optional[int]]
  shape: tuple                     # member shape
  size: int                        # member size
  start: int                       # index of the first member in the context's tensor order
  grid: int = 1                    # stride of the per-entry counters' grid (core.entry_strides)
  g: Any = None                    # g_t
  p: Any = None                    # theta_t (before this step's update)
  u: Any = None                    # u_t (params_{t+1} = params_t + u_t)
  m: Any = None                    # first moment m_{t-1}
  v: Any = None                    # second moment v_{t-1} (reconstructed for Adafactor)
  # Per-entry counters, on the grid x[:, ::grid, ::grid, ...] (all entries when grid == 1):
  age: Any = None                  # int32 t - last_active_t (t + 1: never active)
  seen: Any = None                 # bool: active at some step < t (v_{t-1} holds its gradient)
  count: Any = None                # int32 active steps incl. t
  ema: Any = None                  # raw EMA of the active indicator
  s: Any = None                    # raw EMA of g^2
  prev_g: Any = None
  prev_sign: Any = None            # int8

  @property
  def n(self):
    return len(self.paths)

  def on_grid(self, x):
    """A full-shape stacked array [n, *shape] on the counters' grid (like ``age``, ``s``)."""
    return None if x is None else on_grid(x, self.grid, lead=1)

  def grid_size(self):
    """[n] float32: the number of entries on the counters' grid of each member."""
    return jnp.full((self.n,), math.prod(grid_shape(self.shape, self.grid)), jnp.float32)


@dataclasses.dataclass
class Rows:
  """Row statistics of one (V, D) token embedding (rows = axis 0)."""
  path: str
  group: Group                        # its (singleton) group; arrays [1, V, D]
  count: Optional[jax.Array] = None   # int32 [V] steps in which the row was active
  ema: Optional[jax.Array] = None     # float32 [V] raw EMA of the row-active indicator
  last_active: Optional[jax.Array] = None  # int32 [V] last step the row was active (-1: never)
  seen: Optional[jax.Array] = None    # bool [V] the row was active at some step < t
  s: Optional[jax.Array] = None       # float32 [V] raw EMA of the row mean of g^2


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
  experts: dict = dataclasses.field(default_factory=dict)  # DiagState.experts after this step
  experts_seen: dict = dataclasses.field(default_factory=dict)  # {layer: bool [E]} active < t
  names: list = dataclasses.field(default_factory=list)
  values: list = dataclasses.field(default_factory=list)
  hists: dict = dataclasses.field(default_factory=dict)
  quantile_requests: list = dataclasses.field(default_factory=list)

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
  def per_tensor(self, fn: Callable[[Group], Any]):
    """fn(group) -> tuple of [n] arrays, or None (absent). Returns (tuple of [T], present)."""
    outs, present, k = [], [], None
    for g in self.groups:
      r = fn(g)
      present += [r is not None] * g.n
      outs.append(r)
      if r is not None:
        k = len(r)
    if k is None:
      return None, np.zeros(len(present), bool)
    vecs = []
    for j in range(k):
      vecs.append(jnp.concatenate([
          jnp.asarray(r[j], jnp.float32).reshape(g.n) if r is not None
          else jnp.zeros((g.n,), jnp.float32) for g, r in zip(self.groups, outs)]))
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
    parts, present = self.per_tensor(fn)
    if parts is None:
      return
    suffixes, mat = self.group_table(present)
    mat = jnp.asarray(mat)
    sums = [jnp.dot(mat, jnp.where(jnp.asarray(present), p, 0.0),
                    precision=jax.lax.Precision.HIGHEST) for p in parts]
    self.add([name + s for s in suffixes], combine(*sums))

  # ---- quantiles ----
  def sample(self, x, total: int):
    """Strided-grid subsample of each member of x [n, *shape] -> [n, k] float32."""
    shape = tuple(x.shape[1:])
    budget = max(1, math.ceil(math.prod(shape) * int(self.cfg.quantile_sample_size)
                              / max(total, 1)))
    s = grid_stride(shape, budget)
    sl = (slice(None),) + tuple(slice(None, None, s) for _ in shape)
    return x[sl].reshape(x.shape[0], -1).astype(jnp.float32)

  def emit_quantiles(self, name: str, fn: Callable[[Group], Any], hist: bool = False):
    """Quantiles (global, per kind) of fn(group) ([n, *shape] or None) over the groups."""
    sel = [(g, fn(g)) for g in self.groups]
    sel = [(g, x) for g, x in sel if x is not None]
    if not sel:
      return
    total = sum(math.prod(x.shape) for _, x in sel)
    samples = [(g.kind, self.sample(x, total).reshape(-1)) for g, x in sel]
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


def on_grid(x, stride: int, lead: int = 0):
  """``x[..., ::stride, ::stride]``: every axis after the first ``lead`` (stacking) ones."""
  if stride == 1:
    return x
  return x[(slice(None),) * lead + (slice(None, None, stride),) * (x.ndim - lead)]


def grid_shape(shape: tuple, stride: int) -> tuple:
  """The shape of ``on_grid`` of an array of ``shape``."""
  return tuple(-(-n // stride) for n in shape)


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
