"""Tests of jaxopt_study.diagnostics against an independent NumPy reference.

The reference (class Ref) recomputes every metric from concatenated float64 NumPy arrays with
hand-written kind / layer tables (no regex, no stacking, no partial sums), and the tests require
the produced metric-name set to equal the reference's, so every metric is checked.
"""

import functools
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxopt_study import presets
from jaxopt_study import diagnostics as D
from jaxopt_study.diagnostics import context
from jaxopt_study import optimizers

SHAPES = {
    "wte/embedding": (300, 8),
    "wpe/embedding": (16, 8),
    "block_0/attn/query/kernel": (8, 2, 4),
    "block_0/ln_attn/scale": (8,),
    "block_0/mlp/fc/kernel": (256, 160),   # factored by Adafactor (second-largest dim >= 128)
    "block_1/attn/query/kernel": (8, 2, 4),  # same role/shape as block_0's: stacked together
    "block_1/mlp/fc/kernel": (8, 16),      # unfactored
    "ln_f/scale": (8,),
    "lm_head/kernel": (8, 300),
}
KIND = {"wte/embedding": "token_embedding", "wpe/embedding": "position_embedding",
        "block_0/attn/query/kernel": "attention", "block_0/ln_attn/scale": "norm",
        "block_0/mlp/fc/kernel": "mlp", "block_1/attn/query/kernel": "attention",
        "block_1/mlp/fc/kernel": "mlp", "ln_f/scale": "norm", "lm_head/kernel": "head"}
LAYER = {p: (int(p.split("/")[0][6:]) if p.startswith("block_") else None) for p in SHAPES}
PATHS = sorted(SHAPES)
V = 300


def to_tree(d):
  out = {}
  for path, x in d.items():
    node = out
    *head, last = path.split("/")
    for k in head:
      node = node.setdefault(k, {})
    node[last] = x
  return out


def from_tree(t):
  return {"/".join(str(getattr(k, "key", k)) for k in kp): np.asarray(x, np.float64)
          for kp, x in jax.tree_util.tree_flatten_with_path(t)[0]}


def make_cfg(**kw):
  cfg = D.default_config()
  cfg.quantile_sample_size = 10 ** 7   # exact quantiles on these small trees
  cfg.histogram_size = 20_000         # the largest allowed
  cfg.window = 3
  cfg.horizon = 2
  cfg.num_freq_buckets = 10
  cfg.bucket_scheme = "equal_count"
  for k, v in kw.items():
    cfg[k] = v
  return cfg


TOKEN_FREQ = 1.0 / (1.0 + np.arange(V))  # decreasing in id: equal_count -> bucket = id // 30


# ----------------------------------------------------------------------------------------------
# Independent NumPy reference
# ----------------------------------------------------------------------------------------------
def grid_strides(sample_size):
  """{path: s}: per-entry counters on x[::s, ::s, ...], the smallest s with at most
  ceil(N_b * sample_size / N_total) such entries (every entry when sample_size is 0)."""
  total = sum(math.prod(SHAPES[p]) for p in PATHS)
  out = {}
  for p in PATHS:
    budget = math.ceil(math.prod(SHAPES[p]) * sample_size / total)
    s = 1
    while sample_size and math.prod(-(-n // s) for n in SHAPES[p]) > budget:
      s += 1
    out[p] = s
  return out


class Ref:

  def __init__(self, cfg, bucket=None):
    self.cfg = cfg
    self.grid = grid_strides(cfg.entry_sample_size)
    self.bucket = bucket
    self.n = 0
    self.last = {p: np.full(SHAPES[p], -1) for p in PATHS}
    self.cnt = {p: np.zeros(SHAPES[p]) for p in PATHS}
    self.ema = {p: np.zeros(SHAPES[p]) for p in PATHS}
    self.s = {p: np.zeros(SHAPES[p]) for p in PATHS}
    self.es = {p: 0.0 for p in PATHS}
    self.el = {p: 0.0 for p in PATHS}
    self.rcnt = np.zeros(V)
    self.rema = np.zeros(V)
    self.prev_g = self.prev_sign = None
    self.prev_step = None
    self.grad_norms_at_step0 = None

  def step(self, t, P, G, U, M=None, Vm=None, mode="full"):
    c = self.cfg
    self.n += 1
    act = {p: np.abs(G[p]) > c.active_threshold for p in PATHS}
    # Entries with a gradient at some earlier step (the optimizer's v_{t-1} holds one).
    self.had_grad = {p: self.last[p] >= 0 for p in PATHS}
    for p in PATHS:
      self.last[p] = np.where(act[p], t, self.last[p])
      self.cnt[p] = self.cnt[p] + act[p]
      self.ema[p] = c.update_ema_decay * self.ema[p] + (1 - c.update_ema_decay) * act[p]
      self.s[p] = c.sq_ema_decay * self.s[p] + (1 - c.sq_ema_decay) * G[p] ** 2
      e = float(np.sum(G[p] ** 2))
      self.es[p] = c.energy_short_decay * self.es[p] + (1 - c.energy_short_decay) * e
      self.el[p] = c.energy_long_decay * self.el[p] + (1 - c.energy_long_decay) * e
    ra = act["wte/embedding"].any(axis=1)
    self.rcnt = self.rcnt + ra
    self.rema = c.update_ema_decay * self.rema + (1 - c.update_ema_decay) * ra
    out = self.metrics(t, P, G, U, M or {}, Vm or {}) if mode == "full" else {}
    if mode in ("prev", "full"):
      self.prev_g = {p: G[p].copy() for p in PATHS}
      self.prev_sign = {p: np.sign(U[p]) for p in PATHS}
      self.prev_step = t
    return out

  def metrics(self, t, P, G, U, M, Vm):
    c, n, out = self.cfg, self.n, {}
    qs = tuple(c.quantiles)
    cat = lambda d, ms: np.concatenate([np.asarray(d[p], np.float64).ravel() for p in ms])

    def groups(ms):
      res = [("", ms)]
      res += [(f"/kind={k}", [p for p in ms if KIND[p] == k]) for k in sorted({KIND[p] for p in ms})]
      ls = sorted({LAYER[p] for p in ms if LAYER[p] is not None})
      res += [(f"/layer={l:02d}", [p for p in ms if LAYER[p] == l]) for l in ls]
      res += [(f"/param={p}", [p]) for p in ms]
      return res

    def add(name, fn, ms=PATHS):
      for sfx, members in groups(list(ms)):
        out[name + sfx] = fn(members)

    def quant(name, d, ms=PATHS, hist=False):
      sets = [("", list(ms))] + [(f"/kind={k}", [p for p in ms if KIND[p] == k])
                                 for k in sorted({KIND[p] for p in ms})]
      for sfx, members in sets:
        x = cat(d, members)
        vals = (np.nanquantile(x, qs) if np.any(~np.isnan(x)) else np.full(len(qs), np.nan))
        for q, v in zip(qs, vals):
          out[f"{name}_q{100 * q:g}{sfx}"] = v
      if hist:
        x = cat(d, ms)  # histogram: K evenly spaced quantiles of the non-NaN entries
        k = min(c.histogram_size, x.size)
        out[name + "_hist"] = (np.nanquantile(x, (np.arange(k) + 0.5) / k)
                               if np.any(~np.isnan(x)) else np.full(k, np.nan))

    def rowquant(name, x):
      for q, v in zip(qs, np.quantile(x, qs)):
        out[f"{name}_q{100 * q:g}"] = v

    def buckets(name, x, w=None):
      if self.bucket is None:
        return
      w = np.ones(V) if w is None else w.astype(np.float64)
      for b in range(c.num_freq_buckets):
        sel = (self.bucket == b) & (w > 0)
        out[f"{name}/freq_bucket={b:02d}"] = np.mean(x[sel]) if sel.any() else np.nan

    frac = lambda d: (lambda ms: np.mean(cat(d, ms)))
    # Per-entry counter statistics read the entries on each tensor's grid only.
    on_grid = lambda d: {p: x[(slice(None, None, self.grid[p]),) * x.ndim] for p, x in d.items()}
    age = {p: t - self.last[p] for p in PATHS}
    valid = self.prev_step == t - 1
    nanif = lambda f: (lambda ms: f(ms) if valid else np.nan)
    cos = lambda a, b: sdiv(np.dot(a, b), np.sqrt(np.dot(a, a) * np.dot(b, b)))

    # sparsity
    add("sparsity/zero_frac", frac({p: G[p] == 0 for p in PATHS}))
    add("sparsity/small_frac", frac({p: np.abs(G[p]) <= c.rel_threshold * np.sqrt(
        np.mean(G[p] ** 2)) for p in PATHS}))
    freq = on_grid({p: self.cnt[p] / n for p in PATHS})
    ema = on_grid({p: self.ema[p] / (1 - c.update_ema_decay ** n) for p in PATHS})
    add("sparsity/update_freq_mean", frac(freq))
    quant("sparsity/update_freq", freq, hist=True)
    add("sparsity/update_freq_ema_mean", frac(ema))
    quant("sparsity/update_freq_ema", ema)
    first_in_window = max(0, t - c.window + 1)
    add("sparsity/active_frac_window",
        frac(on_grid({p: self.last[p] >= first_in_window for p in PATHS})))
    gw = G["wte/embedding"]
    row_age = age["wte/embedding"].min(axis=1).astype(np.float64)
    rows = {"zero_frac": np.all(gw == 0, axis=1).astype(float),
            "active_frac_window": (self.last["wte/embedding"].max(axis=1)
                                   >= first_in_window).astype(float)}
    for k, x in rows.items():
      out[f"sparsity/emb_row_{k}"] = x.mean()
      buckets(f"sparsity/emb_row_{k}", x)
    for k, x in {"update_freq": self.rcnt / n,
                 "update_freq_ema": self.rema / (1 - c.update_ema_decay ** n)}.items():
      out[f"sparsity/emb_row_{k}_mean"] = x.mean()
      rowquant(f"sparsity/emb_row_{k}", x)
      buckets(f"sparsity/emb_row_{k}_mean", x)

    # drift
    add("drift/cos_grad_prev", nanif(lambda ms: cos(cat(G, ms), cat(self.prev_g, ms))))
    add("drift/grad_rel_change", nanif(lambda ms: sdiv(np.linalg.norm(
        cat(G, ms) - cat(self.prev_g, ms)), np.linalg.norm(cat(self.prev_g, ms)))))

    def flipfrac(a, b):
      prod = np.sign(a) * np.sign(b)
      return sdiv(np.sum(prod < 0), np.sum(prod != 0))
    add("drift/grad_sign_flip_frac",
        nanif(lambda ms: flipfrac(cat(G, ms), cat(self.prev_g, ms))))
    if M:
      add("drift/cos_grad_mu", lambda ms: cos(cat(G, ms), cat(M, ms)), sorted(M))
    bs, bl = 1 - c.energy_short_decay ** n, 1 - c.energy_long_decay ** n
    add("drift/energy_ratio",
        lambda ms: sdiv(sum(self.es[p] / bs for p in ms), sum(self.el[p] / bl for p in ms)))

    # aging
    h = c.horizon
    add("aging/age_mean", frac(on_grid(age)))
    quant("aging/age", on_grid(age), hist=True)
    add("aging/frac_older_than_H", frac(on_grid({p: age[p] >= h for p in PATHS})))
    sh = {p: self.s[p] / (1 - c.sq_ema_decay ** n) for p in PATHS}
    if Vm:
      vp = sorted(Vm)
      ls = {}
      for p in vp:
        with np.errstate(divide="ignore", invalid="ignore"):
          ls[p] = np.where(self.had_grad[p] & (Vm[p] > 0) & (sh[p] > 0),
                           np.log(Vm[p]) - np.log(sh[p]), np.nan)
      ls = on_grid(ls)
      add("aging/log_staleness_mean", lambda ms: sdiv(np.nansum(cat(ls, ms)),
                                                       np.sum(~np.isnan(cat(ls, ms)))), vp)
      quant("aging/log_staleness", ls, vp, hist=True)
    out["aging/emb_row_age_mean"] = row_age.mean()
    out["aging/emb_row_frac_older_than_H"] = np.mean(row_age >= h)
    rowquant("aging/emb_row_age", row_age)
    buckets("aging/emb_row_age_mean", row_age)
    buckets("aging/emb_row_frac_older_than_H", (row_age >= h).astype(float))
    if "wte/embedding" in Vm:
      vm = Vm["wte/embedding"].mean(axis=1)
      sm = sh["wte/embedding"].mean(axis=1)
      ok = self.had_grad["wte/embedding"].any(axis=1) & (vm > 0) & (sm > 0)
      x = np.where(ok, np.log(np.where(ok, vm, 1)) - np.log(np.where(ok, sm, 1)), 0.0)
      out["aging/emb_row_log_staleness_mean"] = x[ok].mean() if ok.any() else np.nan
      buckets("aging/emb_row_log_staleness_mean", x, ok)

    # norms
    nrm = lambda d: (lambda ms: np.linalg.norm(cat(d, ms)))
    add("norms/param", nrm(P))
    add("norms/grad", nrm(G))
    add("norms/update", nrm(U))
    add("norms/update_param_ratio",
        lambda ms: sdiv(np.linalg.norm(cat(U, ms)), np.linalg.norm(cat(P, ms))))

    # heterogeneity
    gn = {p: np.linalg.norm(G[p]) for p in PATHS}
    un = {p: np.linalg.norm(U[p]) for p in PATHS}
    st = {p: (un[p] / gn[p] if gn[p] > 0 else np.nan) for p in PATHS}
    if t == 0:
      self.grad_norms_at_step0 = gn
    g0 = self.grad_norms_at_step0 or {p: np.nan for p in PATHS}
    for sfx, ms in [("", PATHS)] + [(f"/kind={k}", [p for p in PATHS if KIND[p] == k])
                                    for k in sorted(set(KIND.values()))]:
      for name, d in (("grad_norm", gn), ("update_norm", un), ("step_size", st),
                      ("grad_norm_at_init", g0)):
        x = np.array([d[p] for p in ms])
        x = x[np.isfinite(x) & (x > 0)]
        base, at = name.partition("_at_init")[:2]
        out[f"heterogeneity/{base}_cv{at}{sfx}"] = x.std() / x.mean() if x.size else np.nan
        out[f"heterogeneity/{base}_max_min{at}{sfx}"] = x.max() / x.min() if x.size else np.nan

    # sign
    add("sign/update_flip_frac", nanif(lambda ms: flipfrac(cat(U, ms), cat(self.prev_sign, ms))))

    def agree(ms):
      g, u = cat(G, ms), cat(U, ms)
      nz = g != 0
      return sdiv(np.sum(nz & (np.sign(u) == -np.sign(g))), np.sum(nz))
    add("sign/descent_agree_frac", agree)
    add("sign/update_sign_likeness", lambda ms: sdiv(
        np.sum(np.abs(cat(U, ms))), np.sqrt(cat(U, ms).size * np.sum(cat(U, ms) ** 2))))

    # idle: entries with g == 0 (active_threshold 0)
    idle = {p: G[p] == 0 for p in PATHS}
    add("idle/update_sq_share", lambda ms: sdiv(np.sum(cat(U, ms) ** 2 * cat(idle, ms)),
                                                np.sum(cat(U, ms) ** 2)))
    add("idle/update_abs_mean_idle", lambda ms: sdiv(np.sum(np.abs(cat(U, ms)) * cat(idle, ms)),
                                                     np.sum(cat(idle, ms))))
    add("idle/update_abs_mean_active", lambda ms: sdiv(
        np.sum(np.abs(cat(U, ms)) * (1 - cat(idle, ms))), np.sum(1 - cat(idle, ms))))
    if self.bucket is not None:
      uw, iw = U["wte/embedding"], idle["wte/embedding"]
      for b in range(c.num_freq_buckets):
        rows = self.bucket == b
        u, i = uw[rows], iw[rows]
        out[f"idle/emb_update_sq_share/freq_bucket={b:02d}"] = sdiv(np.sum(u[i] ** 2),
                                                                    np.sum(u ** 2))
        out[f"idle/emb_update_abs_mean_idle/freq_bucket={b:02d}"] = (
            np.abs(u[i]).mean() if i.any() else np.nan)
        out[f"idle/emb_update_abs_mean_active/freq_bucket={b:02d}"] = (
            np.abs(u[~i]).mean() if (~i).any() else np.nan)
    return out


close = functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-6)


def sdiv(a, b):
  return float(a) / float(b) if b > 0 else np.nan


def assert_metrics_match(got, ref, rtol=2e-4, atol=2e-5):
  got = got.to_numpy() if hasattr(got, "to_numpy") else {k: np.asarray(v) for k, v in got.items()}
  assert set(got) == set(ref), (sorted(set(got) - set(ref)), sorted(set(ref) - set(got)))
  for k, r in ref.items():
    g = got[k]
    if k.endswith("_hist"):
      assert g.ndim == 1, k
      np.testing.assert_allclose(g, r, rtol=rtol, atol=atol, equal_nan=True, err_msg=k)
    else:
      assert g.shape == (), k
      np.testing.assert_allclose(g, r, rtol=rtol, atol=atol, equal_nan=True, err_msg=k)


def rand(seed):
  rng = np.random.default_rng(seed)
  return {p: rng.normal(size=SHAPES[p]).astype(np.float32) for p in PATHS}


def j(d):
  return to_tree({p: jnp.asarray(x, jnp.float32) for p, x in d.items()})


def update(*args, mode, cfg):
  return D.update(*args, cfg=cfg, mode=mode)


# ----------------------------------------------------------------------------------------------
# Paths, config, modes, memory
# ----------------------------------------------------------------------------------------------
def test_kind_and_layer_rules():
  for p in PATHS:
    assert D.paths.kind_of(p) == KIND[p]
    assert D.paths.layer_of(p) == LAYER[p]
  gpt = {"wpe/embedding": "position_embedding", "block_11/ln_mlp/bias": "norm",
         "block_3/attn/out/bias": "attention", "block_2/mlp/proj/kernel": "mlp",
         "block_2/router/kernel": "other"}
  for p, k in gpt.items():
    assert D.paths.kind_of(p) == k
  assert D.paths.layer_of("block_11/ln_mlp/bias") == 11
  rules = [(r"(^|/)router(/|$)", "router")] + D.paths.KIND_RULES
  assert D.paths.kind_of("block_2/router/kernel", rules) == "router"


def test_family_switches_come_from_the_registry():
  """Each FAMILIES entry is a config switch that removes exactly its own metrics."""
  params = j({p: x for p, x in rand(0).items() if p in ("wte/embedding", "lm_head/kernel")})
  grads = jax.tree.map(lambda x: x + 1.0, params)
  prefixes = lambda cfg: {k.split("/")[0] for k in D.update(
      params, grads, grads, None, D.init(params, cfg, TOKEN_FREQ), 0, cfg, mode="full")[0]}
  present = set(D.FAMILIES) - {"experts"}  # this tree has no MoE expert weights
  assert prefixes(make_cfg()) == present
  for name in D.FAMILIES:
    assert prefixes(make_cfg(**{name: False})) == present - {name}, name


def test_modes():
  cfg = D.default_config()
  modes = lambda: [D.mode_for_step(s, cfg) for s in range(21)]
  assert modes() == (["full"] + ["counters"] * 8 + ["prev"]) * 2 + ["full"]
  cfg.drift = cfg.sign = False  # nothing reads g_{t-1}: no 'prev' step
  assert modes() == (["full"] + ["counters"] * 9) * 2 + ["full"]
  cfg.every = 1
  assert set(modes()) == {"full"}
  cfg.enabled = False
  assert set(modes()) == {"off"}
  params = j(rand(0))
  with pytest.raises(ValueError, match="mode"):
    D.update(params, params, params, None, D.init(params, cfg), 0, cfg, mode=True)


def test_state_bytes_and_families_off():
  params = j(rand(0))
  cfg = D.default_config()
  nparams = sum(int(np.prod(s)) for s in SHAPES.values())
  bpp = D.state_bytes_per_param(cfg)
  assert bpp["total"] == 21.0
  st = D.init(params, cfg, TOKEN_FREQ)
  # counters, energy EMAs, grad norms at init, rows, buckets
  small = 4 * 2 + 4 * len(PATHS) * 3 + V * 16 + V * 4
  assert D.state_nbytes(st) == bpp["total"] * nparams + small
  # No second moment (SGD): sq_ema not allocated.
  st = D.init(params, cfg, opt_state=optax.sgd(0.1, momentum=0.9).init(params))
  assert st.sq_ema is None
  assert D.state_bytes_per_param(cfg, has_second_moment=False)["total"] == 17.0
  # Families off: leaves not allocated, metrics absent.
  off = make_cfg(drift=False, sign=False, aging=False, sparsity=False)
  st = D.init(params, off, TOKEN_FREQ)
  assert all(getattr(st, f) is None for f in (
      "last_active", "update_count", "update_ema", "sq_ema", "prev_grad", "prev_sign",
      "energy_short", "rows"))
  assert D.state_bytes_per_param(off)["total"] == 0.0
  g = j(rand(1))
  m, _ = D.update(params, g, g, None, st, 0, off, mode="full")
  assert {k.split("/")[0] for k in m} == {"norms", "heterogeneity", "idle"}
  # Per-entry counters on a grid of ~4000 entries: one small vector per counter, not a tree.
  sampled = make_cfg(entry_sample_size=4000)
  assert D.state_bytes_per_param(sampled)["total"] == 5.0  # prev_grad and prev_sign only
  st = D.init(params, sampled, TOKEN_FREQ)
  for leaf in (st.last_active, st.update_count, st.update_ema, st.sq_ema):
    assert leaf.ndim == 1 and 1000 <= leaf.shape[0] <= 4000 + len(PATHS)
  m_all = D.update(params, g, g, None, D.init(params, make_cfg(), TOKEN_FREQ), 0, make_cfg(),
                   mode="full")[0].to_numpy()
  m_grid = D.update(params, g, g, None, st, 0, sampled, mode="full")[0].to_numpy()
  assert set(m_grid) == set(m_all)
  for k in ("sparsity/emb_row_zero_frac", "aging/emb_row_age_mean", "norms/grad"):
    assert m_grid[k] == m_all[k]
  disabled = D.default_config()
  disabled.enabled = False
  st = D.init(params, disabled)
  assert D.update(params, g, g, None, st, 0, disabled, mode="full") == ({}, st)


# ----------------------------------------------------------------------------------------------
# Hand-built gradient sequence with known zero rows, ages and drift
# ----------------------------------------------------------------------------------------------
def hand_grads(t, base):
  g = {p: base[p] * (1.0 + t) for p in PATHS}
  w = np.zeros((V, 8), np.float32)
  w[:10] = base["wte/embedding"][:10]            # rows 0-9 active every step
  if t <= 1:
    w[10:20] = base["wte/embedding"][10:20]      # rows 10-19 active at steps 0, 1 only
  g["wte/embedding"] = w
  g["block_0/ln_attn/scale"] = np.zeros(8, np.float32)  # dead tensor
  if t == 4:
    g["block_1/mlp/fc/kernel"] = -g["block_1/mlp/fc/kernel"]  # sign flip at step 4
  return g


def test_hand_built_sequence_known_answers():
  cfg = make_cfg(every=2)
  base, params = rand(0), rand(1)
  st = D.init(j(params), cfg, TOKEN_FREQ)
  bucket = np.asarray(st.token_bucket)
  np.testing.assert_array_equal(bucket, np.arange(V) // 30)
  ref = Ref(cfg, bucket)
  for t in range(6):
    mode = D.mode_for_step(t, cfg)
    assert mode == ("full" if t % 2 == 0 else "prev")
    g = hand_grads(t, base)
    u = {p: -0.1 * x for p, x in g.items()}
    m, st = D.update(j(params), j(g), j(u), None, st, t, cfg, mode=mode)
    r = ref.step(t, {p: params[p].astype(np.float64) for p in PATHS},
                 {p: g[p].astype(np.float64) for p in PATHS},
                 {p: u[p].astype(np.float64) for p in PATHS}, mode=mode)
    if mode != "full":
      assert m == {}
      continue
    assert_metrics_match(m, r)
    m = m.to_numpy()
    if t == 0:
      assert np.isnan(m["drift/cos_grad_prev"]) and np.isnan(m["sign/update_flip_frac"])
    if t == 2:  # g_2 = 3 base, g_1 = 2 base on lm_head
      close(m["drift/cos_grad_prev/param=lm_head/kernel"], 1.0)
      close(m["drift/grad_rel_change/param=lm_head/kernel"], 0.5)
      assert m["sign/update_flip_frac/param=lm_head/kernel"] == 0.0
    if t == 4:
      close(m["drift/cos_grad_prev/param=block_1/mlp/fc/kernel"], -1.0)
      assert m["sign/update_flip_frac/param=block_1/mlp/fc/kernel"] == 1.0
      assert m["sign/descent_agree_frac"] == 1.0
      # rows 0-9 age 0, rows 10-19 age 3 (last step 1), rows 20-299 never active (age 5).
      close(m["aging/emb_row_age_mean"], (10 * 3 + 280 * 5) / 300)
      close(m["sparsity/emb_row_zero_frac"], 290 / 300)
      close(m["sparsity/emb_row_active_frac_window"], 10 / 300)  # W=3
      close(m["aging/emb_row_frac_older_than_H"], 290 / 300)
      close(m["sparsity/emb_row_update_freq_mean"], (10 + 10 * 2 / 5) / 300)
      close(m["sparsity/emb_row_zero_frac/freq_bucket=00"], 20 / 30)
      close(m["sparsity/emb_row_zero_frac/freq_bucket=05"], 1.0)
      close(m["aging/emb_row_age_mean/freq_bucket=00"], (30 + 50) / 30)
      assert m["sparsity/zero_frac/param=block_0/ln_attn/scale"] == 1.0
      assert m["aging/age_mean/param=block_0/ln_attn/scale"] == 5.0
      assert m["aging/frac_older_than_H/param=lm_head/kernel"] == 0.0
      # The dead tensor is excluded from heterogeneity (its gradient norm is 0).
      gn = [np.linalg.norm(g[p]) for p in PATHS if p != "block_0/ln_attn/scale"]
      close(m["heterogeneity/grad_norm_max_min"], max(gn) / min(gn))
      close(m["heterogeneity/step_size_cv"], 0.0, atol=1e-5)  # SGD: 0.1
      for k, v in m.items():
        assert v.ndim in (0, 1), k


# ----------------------------------------------------------------------------------------------
# Issue 9 defects, each on a hand-built case with a known answer
# ----------------------------------------------------------------------------------------------
def study_tx(name, params, **optimizer_overrides):
  """The study's optimizer ``name`` (optimizers.build), constant lr 0.1, no clipping/decay."""
  c = presets.get_config("tiny", name)
  c.schedule.name, c.schedule.warmup_steps = "constant", 0
  c.optimizer.learning_rate, c.optimizer.clip_norm, c.optimizer.weight_decay = 0.1, 0.0, 0.0
  for k, v in optimizer_overrides.items():
    c.optimizer[k] = v
  return optimizers.build(c, params)[0], c.optimizer


def run_steps(params, grads, cfg, tx=None, token_freq=None):
  """Runs update() in mode 'full' on each gradient in turn; returns each step's metrics (numpy)."""
  params = j(params)
  opt_state = tx.init(params) if tx is not None else None
  st = D.init(params, cfg, token_freq, opt_state=opt_state)
  out = []
  for t, g in enumerate(grads):
    g = j(g)
    u, new_opt_state = tx.update(g, opt_state, params) if tx is not None else (g, None)
    m, st = D.update(params, g, u, opt_state, st, t, cfg, mode="full")
    out.append(m.to_numpy())
    if tx is not None:
      params, opt_state = optax.apply_updates(params, u), new_opt_state
  return out


def test_window_excludes_never_active_entries():
  # 4-entry tensor and a 4-row embedding; only entry / row 0 ever receives a gradient.
  cfg = make_cfg(every=1, window=100)
  params = {"w": np.zeros(4, np.float32), "wte/embedding": np.zeros((4, 2), np.float32)}
  grads = [{"w": np.array([1.0, 0, 0, 0], np.float32),
            "wte/embedding": np.array([[1.0, 1.0], [0, 0], [0, 0], [0, 0]], np.float32)}] * 3
  m = run_steps(params, grads, cfg)[-1]
  assert m["sparsity/active_frac_window/param=w"] == 0.25
  assert m["sparsity/active_frac_window"] == 3 / 12
  assert m["sparsity/emb_row_active_frac_window"] == 0.25


def test_quantiles_interpolate_like_numpy():
  # 404,480 indicators, 364,032 zeros: position 0.9 * 404,479 = 364,031.1 lies between the
  # last 0 and the first 1, so q90 = 0.1 exactly (float32 positions gave 0.09375).
  n, zeros = 404_480, 364_032
  g = np.zeros(n, np.float32)
  g[zeros:] = 1.0
  m = run_steps({"w": np.zeros(n, np.float32)}, [{"w": g}], make_cfg(every=1))[-1]
  active = (g != 0).astype(np.float64)
  assert np.quantile(active, 0.9) == pytest.approx(0.1)
  for q in (0.1, 0.5, 0.9):
    np.testing.assert_allclose(m[f"sparsity/update_freq_q{100 * q:g}"], np.quantile(active, q),
                               rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", ["adamw", "adafactor"])
def test_staleness_excludes_never_updated_entries(name):
  """Row 2 gets its first gradient at step 1: no optimizer's v_0 holds a gradient of it.

  Adam's nu there is exactly 0; Adafactor's is its 1e-30 floor. Both must exclude it (and rows
  never active), so both average over rows 0 and 1 only: v_0 = (1 - b2) g_0^2 for Adam,
  g_0^2 + 1e-30 for Adafactor (its decay at the first step is 1 - 1^-0.8 = 0), and
  s_hat_1 = (0.9 * 0.1 g_0^2 + 0.1 g_1^2) / (1 - 0.9^2) with g_0 = 1, g_1 = 2.
  """
  params = {"wte/embedding": np.zeros((4, 2), np.float32)}
  g0 = np.array([[1, 1], [1, 1], [0, 0], [0, 0]], np.float32)
  g1 = np.array([[2, 2], [2, 2], [2, 2], [0, 0]], np.float32)
  tx, o = study_tx(name, j(params))
  cfg = make_cfg(every=1, sq_ema_decay=0.9)
  m = run_steps(params, [{"wte/embedding": g0}, {"wte/embedding": g1}], cfg, tx)[-1]
  v0 = (1 - o.b2) if name == "adamw" else 1.0
  s_hat = (0.9 * 0.1 * 1.0 + 0.1 * 4.0) / (1 - 0.81)
  expect = np.log(v0) - np.log(s_hat)
  np.testing.assert_allclose(m["aging/log_staleness_mean"], expect, rtol=1e-5)
  np.testing.assert_allclose(m["aging/emb_row_log_staleness_mean"], expect, rtol=1e-5)
  for q in (0.1, 0.5, 0.9):
    np.testing.assert_allclose(m[f"aging/log_staleness_q{100 * q:g}"], expect, rtol=1e-5)
  # The histogram sample holds the included entries only: no NaN.
  np.testing.assert_allclose(m["aging/log_staleness_hist"], expect, rtol=1e-5)


def test_idle_staleness_growth_rate():
  """An Adam entry idle after step 0: log(nu_{t-1} / s_hat_t) grows by log(b2 / d) only late.

  nu_{t-1} = b2^(t-1) (1 - b2) g_0^2 and s_hat_t = d^t (1 - d) g_0^2 / (1 - d^(t+1)), so from
  step t to t + 1 the growth is log(b2 / d) + log((1 - d^(t+2)) / (1 - d^(t+1))).
  """
  tx, o = study_tx("adamw", j({"w": np.zeros(1, np.float32)}))
  d = 0.9
  grads = [{"w": np.array([1.0 if t == 0 else 0.0], np.float32)} for t in range(40)]
  cfg = make_cfg(every=1, sq_ema_decay=d)
  stale = [float(m["aging/log_staleness_mean"])
           for m in run_steps({"w": np.zeros(1, np.float32)}, grads, cfg, tx)]
  growth = lambda t: np.log(o.b2 / d) + np.log((1 - d ** (t + 2)) / (1 - d ** (t + 1)))
  np.testing.assert_allclose(stale[7] - stale[6], growth(6), rtol=1e-3)   # 0.142
  np.testing.assert_allclose(stale[39] - stale[38], growth(38), rtol=2e-2)
  assert abs(growth(38) - np.log(o.b2 / d)) < 0.005                      # 0.054


# ----------------------------------------------------------------------------------------------
# New metrics: hand cases for every optimizer of the study (optimizers.build), lr = 0.1
# ----------------------------------------------------------------------------------------------
def _adam_step1(o, g0, g1):
  """|u_1| of Adam (optax.scale_by_adam, bias-corrected) by hand, for scalars g0, g1."""
  m = o.b1 * (1 - o.b1) * g0 + (1 - o.b1) * g1
  v = o.b2 * (1 - o.b2) * g0 ** 2 + (1 - o.b2) * g1 ** 2
  return 0.1 * abs(m / (1 - o.b1 ** 2)) / (np.sqrt(v / (1 - o.b2 ** 2)) + o.eps)


# name, optimizer overrides, |u_1| of (an entry with g_0 = 1, g_1 = 0), (one with g_0 = g_1 = 1).
IDLE_CASES = [
    ("sgd_momentum", {"momentum": 0.9, "nesterov": False}, lambda o: (0.1 * 0.9, 0.1 * 1.9)),
    ("sgd_momentum", {"momentum": 0.9, "nesterov": True},  # u = g + b (g + b m)
     lambda o: (0.1 * 0.9 * 0.9, 0.1 * (1 + 0.9 * 1.9))),
    ("sgd_momentum", {"momentum": 0.0, "nesterov": False}, lambda o: (0.0, 0.1)),
    ("adamw", {}, lambda o: (_adam_step1(o, 1.0, 0.0), _adam_step1(o, 1.0, 1.0))),
    ("lion", {}, lambda o: (0.1, 0.1)),   # sign(b1 (1 - b2) g_0 + (1 - b1) g_1) = 1: full lr
    ("signsgd", {"momentum": 0.0}, lambda o: (0.0, 0.1)),
    ("signsgd", {"momentum": 0.9}, lambda o: (0.1, 0.1)),   # signum: sign of the trace
    # No momentum: u = 0 where g = 0. Active: g / sqrt(v) = 1, times the parameter scale
    # max(rms(theta) = 0, 1e-3) and lr; the block RMS of u (0.5) is below the clipping 1.
    ("adafactor", {"momentum": 0.0}, lambda o: (0.0, 0.1 * 1e-3)),
]


@pytest.mark.parametrize("name,overrides,expect", IDLE_CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(IDLE_CASES)])
def test_idle_entries_movement(name, overrides, expect):
  """4-token embedding (2 buckets: rows 0-1, rows 2-3), theta_0 = 0.

  g_0 = 1 on rows 0 and 1; g_1 = 1 on row 0 only. At step 1 row 1 is idle after one gradient
  (it moves only through a momentum), rows 2-3 never had one (no optimizer moves them: every
  moment is 0 there), row 0 is active.
  """
  params = {"wte/embedding": np.zeros((4, 2), np.float32)}
  g0 = np.array([[1, 1], [1, 1], [0, 0], [0, 0]], np.float32)
  g1 = np.array([[1, 1], [0, 0], [0, 0], [0, 0]], np.float32)
  tx, o = study_tx(name, j(params), **overrides)
  cfg = make_cfg(every=1, num_freq_buckets=2)
  m = run_steps(params, [{"wte/embedding": g0}, {"wte/embedding": g1}], cfg, tx,
                token_freq=np.array([4.0, 3.0, 2.0, 1.0]))[-1]
  idle_u, active_u = expect(o)
  check = lambda k, v: np.testing.assert_allclose(m[k], v, rtol=1e-5, atol=1e-9, err_msg=k)
  # 6 idle entries (2 moving by idle_u, 4 by 0), 2 active entries moving by active_u.
  share = sdiv(2 * idle_u ** 2, 2 * idle_u ** 2 + 2 * active_u ** 2)
  check("idle/update_sq_share", share)
  check("idle/update_sq_share/kind=token_embedding", share)
  check("idle/update_abs_mean_idle", 2 * idle_u / 6)
  check("idle/update_abs_mean_active", active_u)
  check("idle/emb_update_sq_share/freq_bucket=00", share)
  check("idle/emb_update_abs_mean_idle/freq_bucket=00", idle_u)
  check("idle/emb_update_abs_mean_active/freq_bucket=00", active_u)
  assert np.isnan(m["idle/emb_update_sq_share/freq_bucket=01"])  # no update in bucket 01
  check("idle/emb_update_abs_mean_idle/freq_bucket=01", 0.0)
  assert np.isnan(m["idle/emb_update_abs_mean_active/freq_bucket=01"])  # no active entry


# name, overrides, sign(u_1) = -sign(g_1) on the entries whose gradient turned (g_0 = 1,
# g_1 = -0.5)? (every other entry has g_0 = g_1 = 1 and agrees), and sign-likeness at step 1.
SIGN_CASES = [
    ("sgd_momentum", {"momentum": 0.9, "nesterov": False},
     lambda o: (-0.5 + 0.9 < 0, None)),                # m = g_1 + b g_0 = 0.4: still descends g_0
    ("sgd_momentum", {"momentum": 0.9, "nesterov": True},
     lambda o: (-0.5 + 0.9 * 0.4 < 0, None)),          # g_1 + b m = -0.14
    ("sgd_momentum", {"momentum": 0.0, "nesterov": False}, lambda o: (True, None)),
    ("adamw", {}, lambda o: (o.b1 * (1 - o.b1) - 0.5 * (1 - o.b1) < 0, None)),
    ("lion", {}, lambda o: (o.b1 * (1 - o.b2) - 0.5 * (1 - o.b1) < 0, 1.0)),
    ("signsgd", {"momentum": 0.0}, lambda o: (True, 1.0)),
    ("adafactor", {"momentum": 0.0}, lambda o: (True, None)),
]


@pytest.mark.parametrize("name,overrides,expect", SIGN_CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(SIGN_CASES)])
def test_sign_descent_agreement(name, overrides, expect):
  """Two layers; in layer 0 the first 2 of 8 entries turn their gradient at step 1."""
  params = {"block_0/mlp/kernel": np.zeros((4, 2), np.float32),
            "block_1/mlp/kernel": np.zeros((4, 2), np.float32)}
  g0 = {p: np.ones((4, 2), np.float32) for p in params}
  g1 = {p: np.ones((4, 2), np.float32) for p in params}
  g1["block_0/mlp/kernel"][0] = -0.5
  tx, o = study_tx(name, j(params), **overrides)
  m = run_steps(params, [g0, g1], make_cfg(every=1), tx)[-1]
  turned_agree, likeness = expect(o)
  layer0 = (6 + 2 * turned_agree) / 8
  np.testing.assert_allclose(m["sign/descent_agree_frac/layer=00"], layer0)
  np.testing.assert_allclose(m["sign/descent_agree_frac/layer=01"], 1.0)
  np.testing.assert_allclose(m["sign/descent_agree_frac"], (layer0 + 1) / 2)
  if likeness is not None:  # a pure sign step
    np.testing.assert_allclose(m["sign/update_sign_likeness/layer=00"], likeness, rtol=1e-6)


def test_heterogeneity_at_init():
  """The grad-norm spread of g_0 is kept and reported at every later full step."""
  params = {"a/kernel": np.zeros(4, np.float32), "b/kernel": np.zeros(4, np.float32),
            "c/kernel": np.zeros(4, np.float32)}
  norms0, norms1 = np.array([1.0, 2.0, 4.0]), np.array([3.0, 3.0, 3.0])
  grads = [{p: np.full(4, n / 2, np.float32) for p, n in zip(sorted(params), norms)}
           for norms in (norms0, norms1, norms1)]  # |g_b| = n (4 entries of n / 2)
  cfg = make_cfg(every=1)
  cv0 = np.sqrt(np.mean((norms0 - 7 / 3) ** 2)) / (7 / 3)  # population std / mean
  first, *_, m = run_steps(params, grads, cfg)
  np.testing.assert_allclose(first["heterogeneity/grad_norm_cv"], cv0, rtol=1e-5)
  np.testing.assert_allclose(first["heterogeneity/grad_norm_cv_at_init"], cv0, rtol=1e-5)
  np.testing.assert_allclose(m["heterogeneity/grad_norm_cv"], 0.0, atol=1e-6)
  np.testing.assert_allclose(m["heterogeneity/grad_norm_cv_at_init"], cv0, rtol=1e-5)
  np.testing.assert_allclose(m["heterogeneity/grad_norm_max_min_at_init"], 4.0, rtol=1e-6)
  np.testing.assert_allclose(m["heterogeneity/grad_norm_max_min_at_init/kind=other"], 4.0,
                             rtol=1e-6)


# ----------------------------------------------------------------------------------------------
# Real optax states of the five optimizers
# ----------------------------------------------------------------------------------------------
OPTIMIZERS = {
    "sgd_nesterov": lambda: optax.sgd(0.05, momentum=0.9, nesterov=True),
    "adamw": lambda: optax.adamw(1e-2, b1=0.9, b2=0.95, weight_decay=0.1),
    "adafactor": lambda: optax.adafactor(1e-2),
    "lion": lambda: optax.lion(1e-3),
    "signsgd": lambda: optax.chain(optax.scale_by_sign(), optax.scale(-1e-2)),
}


def ref_moments(name, state):
  """Moments read by hand from each optimizer's known state layout (not by field search)."""
  s0 = state[0]
  if name == "sgd_nesterov":
    return from_tree(s0.trace), {}
  if name in ("adamw",):
    return from_tree(s0.mu), from_tree(s0.nu)
  if name == "lion":
    return from_tree(s0.mu), {}
  if name == "adafactor":
    vr, vc, v = from_tree(s0.v_row), from_tree(s0.v_col), from_tree(s0.v)
    out = {}
    for p in PATHS:
      if p == "block_0/mlp/fc/kernel":  # (256, 160): v_row (160,) mean over rows, v_col (256,)
        assert vr[p].shape == (160,) and vc[p].shape == (256,) and v[p].shape == (1,)
        out[p] = (np.outer(vc[p], vr[p]) / vr[p].mean() if vr[p].mean() > 0
                  else np.zeros(SHAPES[p]))  # before the first update
      else:
        assert v[p].shape == SHAPES[p] and vr[p].shape == (1,)
        out[p] = v[p]
    return {}, out
  return {}, {}


def sparse_grads(t, rng):
  g = {p: rng.normal(size=SHAPES[p]).astype(np.float32) for p in PATHS}
  g["wte/embedding"][150:] = 0.0
  if t > 0:
    g["wte/embedding"][100:150] = 0.0
  g["block_0/mlp/fc/kernel"][:, :5] = 0.0
  return g


@pytest.mark.parametrize("name,sample", [(n, 0) for n in sorted(OPTIMIZERS)]
                         + [("adamw", 4000), ("adafactor", 4000)])
def test_real_optimizer_states(name, sample):
  """Every metric against the NumPy reference; with ``entry_sample_size`` the per-entry counter
  statistics over each tensor's grid, every other metric (rows included) over all entries."""
  cfg = make_cfg(every=1, entry_sample_size=sample)
  tx = OPTIMIZERS[name]()
  params = rand(3)
  rng = np.random.default_rng(4)
  opt_state = tx.init(j(params))
  st = D.init(j(params), cfg, TOKEN_FREQ, opt_state=opt_state)
  ref = Ref(cfg, np.asarray(st.token_bucket))
  for t in range(3):
    g = sparse_grads(t, rng)
    updates, new_opt_state = tx.update(j(g), opt_state, j(params))
    m, st = D.update(j(params), j(g), updates, opt_state, st, t, cfg, mode="full")
    M, Vm = ref_moments(name, opt_state)
    r = ref.step(t, {p: params[p].astype(np.float64) for p in PATHS},
                 {p: g[p].astype(np.float64) for p in PATHS}, from_tree(updates), M, Vm,
                 mode="full")
    assert_metrics_match(m, r, rtol=5e-4, atol=5e-5)
    params = {p: np.asarray(x, np.float32) for p, x in from_tree(
        optax.apply_updates(j(params), updates)).items()}
    opt_state = new_opt_state
  fam = D.available_families(opt_state, j(params))
  expect_first = {"sgd_nesterov": "TraceState.trace", "adamw": "ScaleByAdamState.mu",
                  "lion": "ScaleByLionState.mu"}.get(name)
  expect_second = {"adamw": "ScaleByAdamState.nu",
                   "adafactor": "FactoredState.v_row/v_col/v"}.get(name)
  assert fam["first_moment"] == expect_first
  assert fam["second_moment"] == expect_second
  assert ("drift/cos_grad_mu" in m) == (expect_first is not None)
  assert ("aging/log_staleness_q50" in m) == (expect_second is not None)
  if name == "adafactor":
    assert fam["factored"] == ("block_0/mlp/fc/kernel",)
  assert D.available_families(opt_state)["second_moment"] == (
      None if expect_second is None else ("factored" if name == "adafactor" else expect_second))


def test_optax_facts():
  """Facts the module relies on, checked against the installed optax."""
  params = j(rand(0))
  # Adafactor: factored iff second-largest dim >= 128; v_row = mean over the LARGEST axis.
  tx = optax.scale_by_factored_rms()
  s = tx.init(params)
  assert s.v_row["block_0"]["mlp"]["fc"]["kernel"].shape == (160,)
  assert s.v_col["block_0"]["mlp"]["fc"]["kernel"].shape == (256,)
  assert s.v["wte"]["embedding"].shape == (300, 8)    # 8 < 128: unfactored
  g = {p: np.asarray(x) for p, x in rand(5).items()}
  g["wte/embedding"][5:] = 0.0
  u, s = tx.update(j(g), s, params)
  vhat = D.find_moments(s, params).second
  for p in PATHS:  # the update is exactly g / sqrt(v_hat): the reconstruction is the real one
    np.testing.assert_allclose(from_tree(u)[p], g[p] / np.sqrt(np.asarray(vhat[p])),
                               rtol=2e-5, atol=1e-6)
  assert np.all(np.asarray(s.v["wte"]["embedding"]) > 0)  # eps = 1e-30 added to g^2
  # Adam: an inactive entry's nu decays by exactly b2.
  tx = optax.scale_by_adam(b2=0.95)
  s = tx.init(params)
  _, s = tx.update(j(g), s, params)
  nu1 = np.asarray(s.nu["wte"]["embedding"])
  g2 = dict(g)
  g2["wte/embedding"] = np.zeros_like(g["wte/embedding"])
  _, s = tx.update(j(g2), s, params)
  np.testing.assert_array_equal(np.asarray(s.nu["wte"]["embedding"]),
                                np.float32(0.95) * nu1)
  # tree_get raises on duplicate names; tree_get_all_with_path does not.
  chain_state = optax.chain(optax.scale_by_adam(), optax.scale_by_adam()).init(params)
  with pytest.raises(KeyError):
    optax.tree_utils.tree_get(chain_state, "count")
  assert len(optax.tree_utils.tree_get_all_with_path(chain_state, "count")) == 2


def test_moments_through_wrappers():
  params = j(rand(0))
  tx = optax.MultiSteps(optax.adamw(1e-3), every_k_schedule=2)
  mom = D.find_moments(tx.init(params), params)
  assert mom.first_field == "ScaleByAdamState.mu" and set(mom.first) == set(PATHS)
  masked = optax.masked(optax.scale_by_adam(), to_tree({p: p.startswith("block") for p in PATHS}))
  mom = D.find_moments(masked.init(params), params)
  assert set(mom.second) == {p for p in PATHS if p.startswith("block")}


# ----------------------------------------------------------------------------------------------
# jit, sharding-relevant structure, checkpointing
# ----------------------------------------------------------------------------------------------
def test_jit_matches_eager_and_state_structure():
  cfg = make_cfg(every=2)
  tx = optax.adamw(1e-2, b1=0.9, b2=0.95)
  params = j(rand(0))
  opt_state = tx.init(params)
  st0 = D.init(params, cfg, TOKEN_FREQ, opt_state=opt_state)
  fns = {mode: jax.jit(functools.partial(D.update, cfg=cfg, mode=mode))
         for mode in ("counters", "prev", "full")}
  st_j, st_e = st0, st0
  rng = np.random.default_rng(0)
  for t in range(4):
    g = j(sparse_grads(t, rng))
    u, new_os = tx.update(g, opt_state, params)
    mode = D.mode_for_step(t, cfg)
    m_j, st_j = fns[mode](params, g, u, opt_state, st_j, jnp.int32(t))
    m_e, st_e = D.update(params, g, u, opt_state, st_e, t, cfg, mode=mode)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), st_j, st_e)
    if mode != "full":
      assert m_j == {} and m_e == {}
    else:
      a, b = m_j.to_numpy(), m_e.to_numpy()
      assert set(a) == set(b)
      for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-4, atol=1e-5, equal_nan=True, err_msg=k)
    opt_state = new_os
  # A 'counters' step: no metric leaves the device.
  m, _ = D.update(params, g, u, opt_state, st_j, 5, cfg, mode="counters")
  assert m == {}
  # Leaves that mirror a parameter: its path as suffix and its shape; others small.
  pshape = {p: s for p, s in SHAPES.items()}
  for kp, leaf in jax.tree_util.tree_flatten_with_path(st_j)[0]:
    path = "/".join(D.paths.key_name(k) for k in kp)
    mirrors = [p for p in pshape if path.endswith("/" + p)]
    if mirrors:
      assert leaf.shape == pshape[mirrors[0]], path
    else:
      assert leaf.size <= V, path
  for field in ("last_active", "update_count", "update_ema", "sq_ema", "prev_grad", "prev_sign"):
    assert jax.tree.structure(getattr(st_j, field)) == jax.tree.structure(params), field
  # Under a (1-device) mesh: shard params, grads and the mirroring leaves alike; the jitted
  # step returns mirroring leaves with the parameter's sharding and shape.
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("fsdp",))
  shard = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp"))
  put = lambda tree: jax.device_put(tree, shard)
  st_in = st_j._replace(**{f: put(getattr(st_j, f)) for f in (
      "last_active", "update_count", "update_ema", "sq_ema", "prev_grad", "prev_sign")})
  for mode in ("counters", "prev"):
    _, st_s = fns[mode](put(params), put(g), put(u), opt_state, st_in, jnp.int32(8))
    for f in ("last_active", "update_count", "update_ema", "sq_ema", "prev_grad", "prev_sign"):
      jax.tree.map(lambda x, p: (x.shape == p.shape and x.sharding.is_equivalent_to(
          shard, x.ndim)) or pytest.fail(f), getattr(st_s, f), params)


def test_orbax_roundtrip(tmp_path):
  ocp = pytest.importorskip("orbax.checkpoint")
  cfg = make_cfg(sign=False)  # some leaves None
  params = j(rand(0))
  st = D.init(params, cfg, TOKEN_FREQ)
  g = j(rand(1))
  _, st = D.update(params, g, g, None, st, 0, cfg, mode="prev")
  ckpt = ocp.StandardCheckpointer()
  ckpt.save(tmp_path / "diag", st)
  ckpt.wait_until_finished()
  restored = ckpt.restore(tmp_path / "diag", jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), st))
  assert jax.tree.structure(restored) == jax.tree.structure(st)
  jax.tree.map(np.testing.assert_array_equal, restored, st)


# ----------------------------------------------------------------------------------------------
# Token-frequency buckets and loss by frequency
# ----------------------------------------------------------------------------------------------
def test_bucket_table_and_loss_by_frequency():
  p = np.array([50, 30, 10, 5, 3, 1, 1, 0], np.float64)
  # equal_mass, 4 buckets: mass before each token (sorted): 0, .5, .8, .9, .95, .98, .99, 1.0
  np.testing.assert_array_equal(D.bucket_table(p, 4, "equal_mass"), [0, 2, 3, 3, 3, 3, 3, 3])
  np.testing.assert_array_equal(D.bucket_table(p, 4, "equal_count"), [0, 0, 1, 1, 2, 2, 3, 3])
  lb = D.bucket_table(p, 2, "log")  # log edges between 1 and 50: split at sqrt(50) ~ 7.07
  np.testing.assert_array_equal(lb, [0, 0, 0, 1, 1, 1, 1, 1])
  assert D.bucket_table(p, 4, vocab_size=10).shape == (10,)
  rng = np.random.default_rng(0)
  loss = rng.random((3, 7)).astype(np.float32)
  tgt = rng.integers(0, 8, (3, 7))
  mask = (rng.random((3, 7)) > 0.3).astype(np.float32)
  table = D.bucket_table(p, 4, "equal_count")
  sums, counts = D.loss_by_frequency(loss, tgt, table, mask)
  b = table[tgt]
  for k in range(4):
    np.testing.assert_allclose(sums[k], np.sum(loss * mask * (b == k)), rtol=1e-6)
    np.testing.assert_allclose(counts[k], np.sum(mask * (b == k)))
  # From a diag_state, under jit.
  params = j(rand(0))
  st = D.init(params, make_cfg(), TOKEN_FREQ)
  f = jax.jit(lambda l, t, s: D.loss_by_frequency(l, t, s, num_buckets=10))
  tg = rng.integers(0, V, (3, 7))
  sums, counts = f(loss, tg, st)
  np.testing.assert_allclose(counts, np.bincount(tg.ravel() // 30, minlength=10))
  with pytest.raises(ValueError):
    D.loss_by_frequency(loss, tgt, D.init(params, make_cfg()))


def test_subsampled_quantiles_and_histogram_bounds():
  cfg = make_cfg(quantile_sample_size=1000, histogram_size=64, every=1)
  params = j(rand(0))
  st = D.init(params, cfg)
  g = rand(1)
  m, _ = D.update(params, j(g), j(g), None, st, 0, cfg, mode="full")
  m = m.to_numpy()
  for k, v in m.items():
    assert v.ndim == 0 or (v.ndim == 1 and 0 < v.shape[0] <= 64), k
  # The grid stride: smallest s with prod(ceil(n/s)) <= budget.
  for shape, budget in [((256, 160), 1000), ((300, 8), 7), ((8,), 100), ((5, 7, 3), 10)]:
    s = context.grid_stride(shape, budget)
    size = lambda s: np.prod([math.ceil(n / s) for n in shape])
    assert size(s) <= budget and (s == 1 or size(s - 1) > budget)


# ----------------------------------------------------------------------------------------------
# Golden values: every metric and state leaf unchanged by performance work
# ----------------------------------------------------------------------------------------------
GOLDEN = pathlib.Path(__file__).parent / "golden" / "diagnostics_metrics.npz"


def golden_run() -> dict[str, np.ndarray]:
  """Every metric of the full steps and every diag_state leaf (sum, sum of squares, min, max)
  after 4 steps (modes full, counters, prev, full: every = 3) for each study optimizer, jitted
  as in the train step, on SHAPES with sparse gradients; keys '<optimizer>/t<step>/<metric>'
  and '<optimizer>/state/<leaf>'."""
  cfg = make_cfg(every=3, quantile_sample_size=2048, histogram_size=64)
  step_fn = {m: jax.jit(functools.partial(D.update, cfg=cfg, mode=m)) for m in D.MODES}
  out = {}
  for name in optimizers.NAMES:
    params = j(rand(7))
    tx, _ = study_tx(name, params)
    opt_state = tx.init(params)
    st = D.init(params, cfg, TOKEN_FREQ, opt_state=opt_state)
    rng = np.random.default_rng(8)
    for t in range(4):
      g = j(sparse_grads(t, rng))
      u, new_opt_state = tx.update(g, opt_state, params)
      m, st = step_fn[D.mode_for_step(t, cfg)](params, g, u, opt_state, st, t)
      if m:
        out.update({f"{name}/t{t}/{k}": v for k, v in m.to_numpy().items()})
      params, opt_state = optax.apply_updates(params, u), new_opt_state
    for kp, x in jax.tree_util.tree_flatten_with_path(st)[0]:
      x = np.asarray(x, np.float64)
      out[f"{name}/state/{jax.tree_util.keystr(kp)}"] = np.array(
          [x.sum(), np.square(x).sum(), x.min(), x.max()])
  return out


def test_metrics_and_state_match_golden_values():
  """The values of commit e26f058, recorded by ``python -m tests.test_diagnostics``: a change
  that reorganises the computation (fusion, sharding) keeps the names and the values up to
  float32 summation order. State leaves added since are new names: the embedding rows' own
  last active step and g^2 EMA (which made row ages and staleness independent of the per-entry
  counters, so that those can be sampled: ``entry_sample_size``)."""
  with np.load(GOLDEN) as f:
    want = dict(zip(f["names"], np.split(f["values"], np.cumsum(f["sizes"])[:-1])))
  got = {k: np.asarray(v, np.float64).reshape(-1) for k, v in golden_run().items()}
  added = {k for k in set(got) - set(want)
           if ".rows[" in k and k.endswith(("['last_active']", "['sq_ema']"))}
  assert set(got) - added == set(want), (sorted(set(got) - added - set(want))[:5],
                                         sorted(set(want) - set(got))[:5])
  for k, w in want.items():
    np.testing.assert_allclose(got[k], w, rtol=1e-5, atol=1e-6, equal_nan=True, err_msg=k)


if __name__ == "__main__":
  GOLDEN.parent.mkdir(exist_ok=True)
  run = {k: np.asarray(v, np.float64).reshape(-1) for k, v in golden_run().items()}
  np.savez_compressed(GOLDEN, names=np.array(list(run)), values=np.concatenate(list(run.values())),
                      sizes=np.array([v.size for v in run.values()]))
