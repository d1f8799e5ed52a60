"""Trace-time context and the aggregation of per-tensor partial sums into named metrics.

Every additive metric is a function ``combine(S_1, ..., S_k)`` of sums of per-tensor partial
sums ``S_j = sum_{tensors b in group} s_j(b)``. Groups: all tensors (``family/metric``), one kind
(``/kind=<kind>``), one layer (``/layer=<NN>``), one tensor (``/param=<path>``). E.g. a fraction is
``(count, size)`` -> count/size, a norm is ``(sum x^2,)`` -> sqrt, a cosine is
``(<a,b>, |a|^2, |b|^2)`` -> <a,b>/sqrt(|a|^2 |b|^2) (the cosine of the concatenated vectors).

Quantiles are taken (``jnp.nanquantile``, linear interpolation) over a strided subsample:
``x.reshape(-1)[::stride]`` with one ``stride = ceil(total size / quantile_sample_size)`` for all
tensors of a metric, so every tensor contributes in proportion to its size. Histogram samples
are the global subsample strided again to <= ``histogram_size`` entries.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

NAN = float("nan")


@dataclasses.dataclass
class Tensor:
  path: str
  kind: str
  layer: Optional[int]
  shape: tuple
  size: int
  g: jax.Array                     # float32 gradient g_t
  p: jax.Array                     # float32 parameter theta_t (before this step's update)
  u: jax.Array                     # float32 update u_t (params_{t+1} = params_t + u_t)
  active: jax.Array                # bool |g_t| > active_threshold
  m: Optional[jax.Array] = None    # first moment m_{t-1} (state passed to tx.update with g_t)
  v: Optional[jax.Array] = None    # second moment v_{t-1} (reconstructed for Adafactor)
  age: Optional[jax.Array] = None  # int32 t - last_active_t (0 if active at t)
  count: Optional[jax.Array] = None  # int32 number of active steps incl. t
  ema: Optional[jax.Array] = None  # float32 raw EMA of the active indicator incl. t
  s: Optional[jax.Array] = None    # float32 raw EMA of g^2 incl. t
  prev_g: Optional[jax.Array] = None
  prev_sign: Optional[jax.Array] = None


@dataclasses.dataclass
class Rows:
  """Row statistics of one (V, D) token embedding (rows = axis 0)."""
  path: str
  tensor: Tensor
  count: Optional[jax.Array] = None   # int32 [V] steps in which the row was active
  ema: Optional[jax.Array] = None     # float32 [V] raw EMA of the row-active indicator


@dataclasses.dataclass
class Ctx:
  cfg: Any
  tensors: list[Tensor]
  rows: list[Rows]
  step: jax.Array          # int32 t
  n: jax.Array             # int32 number of update() calls including this one
  prev_valid: jax.Array    # bool: the stored previous gradient/sign is from step t-1
  token_bucket: Optional[jax.Array]
  energy_short: Optional[jax.Array] = None   # raw, per tensor (after this step)
  energy_long: Optional[jax.Array] = None
  metrics: dict = dataclasses.field(default_factory=dict)

  def stride(self, total: int) -> int:
    return max(1, math.ceil(total / int(self.cfg.quantile_sample_size)))

  def bias_correction(self, decay: float) -> jax.Array:
    return 1.0 - jnp.power(jnp.float32(decay), self.n.astype(jnp.float32))


def safe_div(a, b):
  return jnp.where(b > 0, a / jnp.where(b > 0, b, 1.0), NAN)


def ratio(a, b):
  return safe_div(a, b)


def cosine(ab, aa, bb):
  return safe_div(ab, jnp.sqrt(aa) * jnp.sqrt(bb))


def sqrt_ratio(a, b):
  return jnp.sqrt(safe_div(a, b))


def groups(ctx: Ctx, paths: list[str]) -> list[tuple[str, list[str]]]:
  """(name suffix, member paths) for the global, kind, layer and param groups."""
  info = {t.path: t for t in ctx.tensors}
  out = [("", list(paths))]
  if ctx.cfg.per_kind:
    kinds = sorted({info[p].kind for p in paths})
    out += [(f"/kind={k}", [p for p in paths if info[p].kind == k]) for k in kinds]
  if ctx.cfg.per_layer:
    layers = sorted({info[p].layer for p in paths if info[p].layer is not None})
    out += [(f"/layer={l:02d}", [p for p in paths if info[p].layer == l]) for l in layers]
  if ctx.cfg.per_param:
    out += [(f"/param={p}", [p]) for p in paths]
  return out


def emit(ctx: Ctx, name: str, parts: dict[str, tuple], combine: Callable,
         per_group: bool = True):
  """metrics[name + suffix] = combine(*sum over group of parts) for every group."""
  if not parts:
    return
  paths = list(parts)
  for suffix, members in (groups(ctx, paths) if per_group else [("", paths)]):
    k = len(parts[members[0]])
    sums = [sum(jnp.asarray(parts[p][j], jnp.float32) for p in members) for j in range(k)]
    ctx.metrics[name + suffix] = jnp.asarray(combine(*sums), jnp.float32)


def qname(name: str, q: float) -> str:
  return f"{name}_q{100 * q:g}"


def sample(x: jax.Array, stride: int) -> jax.Array:
  return x.reshape(-1)[::stride].astype(jnp.float32)


def emit_quantiles(ctx: Ctx, name: str, samples: dict[str, jax.Array],
                   hist: bool = False, per_kind: bool = True):
  """Quantiles (global and per kind) of concatenated subsamples; optional histogram sample."""
  if not samples:
    return
  qs = jnp.asarray(ctx.cfg.quantiles, jnp.float32)
  info = {t.path: t for t in ctx.tensors}
  groups_ = [("", list(samples))]
  if per_kind and ctx.cfg.per_kind:
    kinds = sorted({info[p].kind if p in info else "other" for p in samples})
    groups_ += [(f"/kind={k}", [p for p in samples if (info[p].kind if p in info else "other") == k])
                for k in kinds]
  for suffix, members in groups_:
    x = jnp.concatenate([samples[p] for p in members])
    vals = jnp.nanquantile(x, qs)
    for i, q in enumerate(ctx.cfg.quantiles):
      ctx.metrics[qname(name, q) + suffix] = vals[i]
    if hist and suffix == "":
      ctx.metrics[name + "_hist"] = hist_sample(x, int(ctx.cfg.histogram_size))


def hist_sample(x: jax.Array, size: int) -> jax.Array:
  return x[::max(1, math.ceil(x.shape[0] / size))]


def emit_buckets(ctx: Ctx, name: str, values: jax.Array, weights: Optional[jax.Array] = None):
  """Per token-frequency bucket mean of a per-row value: name + '/freq_bucket=BB'."""
  if ctx.token_bucket is None:
    return
  nb = int(ctx.cfg.num_freq_buckets)
  values = values.astype(jnp.float32)
  w = jnp.ones_like(values) if weights is None else weights.astype(jnp.float32)
  values = jnp.where(w > 0, values, 0.0)
  num = jax.ops.segment_sum(values * w, ctx.token_bucket, num_segments=nb)
  den = jax.ops.segment_sum(w, ctx.token_bucket, num_segments=nb)
  mean = safe_div(num, den)
  for b in range(nb):
    ctx.metrics[f"{name}/freq_bucket={b:02d}"] = mean[b]
