"""Mixture of experts: routing, capacity, the load-balancing loss, sparse expert gradients, the
sharding rule, the config checks, the train step's hook and the per-expert diagnostics family."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxopt_study import diagnostics as D
from jaxopt_study import presets
from jaxopt_study import sharding
from jaxopt_study.models import gpt
from jaxopt_study.models import moe

D_MODEL, F = 4, 8


def _cfg(**kw):
  base = dict(vocab_size=16, max_len=8, num_layers=1, d_model=D_MODEL, num_heads=1,
              num_kv_heads=1, mlp_dim=F, num_experts=3, moe_top_k=1, moe_capacity_factor=3.0)
  base.update(kw)
  return gpt.GPTConfig(**base)


def _softmax(x):
  z = np.exp(x - x.max(-1, keepdims=True))
  return z / z.sum(-1, keepdims=True)


def _init(cfg, x):
  return nn.meta.unbox(moe.MoEMLP(cfg).init(jax.random.PRNGKey(0), x, deterministic=True))[
      "params"]


def _run(cfg, params, x):
  y, st = moe.MoEMLP(cfg).apply({"params": params}, x, deterministic=True,
                                mutable=[moe.COLLECTION])
  return np.asarray(y), jax.tree.map(np.asarray, st[moe.COLLECTION])


def test_one_expert_with_room_for_every_token_is_the_dense_mlp():
  cfg = _cfg(num_experts=1, moe_capacity_factor=1.0)
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 6, D_MODEL))
  p = _init(cfg, x)
  ex = p["experts"]
  dense = {"fc": {"kernel": ex["fc"]["kernel"][0], "bias": ex["fc"]["bias"][0]},
           "proj": {"kernel": ex["proj"]["kernel"][0], "bias": ex["proj"]["bias"][0]}}
  dense = jax.tree.map(lambda a: a + 0.1 * jax.random.normal(jax.random.PRNGKey(2), a.shape),
                       dense)  # non-zero biases too
  p["experts"] = jax.tree.map(lambda a: a[None], dense)
  y, st = _run(cfg, p, x)
  rows = x.reshape(-1, D_MODEL)  # the dense MLP works on token rows [B * T, D]
  want = gpt.MLP(cfg).apply({"params": dense}, rows, deterministic=True).reshape(x.shape)
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-6)
  assert st["dropped_frac"][0] == 0 and st["load"][0].tolist() == [1.0]


def _marker_params(cfg, router):
  """Expert e outputs the constant c_e = (e + 1) * ones (zero kernels, proj bias c_e)."""
  e = cfg.num_experts
  return {"router": {"kernel": jnp.asarray(router, jnp.float32)},
          "experts": {"fc": {"kernel": jnp.zeros((e, D_MODEL, F)), "bias": jnp.zeros((e, F))},
                      "proj": {"kernel": jnp.zeros((e, F, D_MODEL)),
                               "bias": jnp.arange(1.0, e + 1)[:, None] * jnp.ones((e, D_MODEL))}}}


@pytest.mark.parametrize("top_k", [1, 2])
def test_tokens_go_to_their_top_k_experts_with_their_gates(top_k):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 5, D_MODEL)).astype(np.float32)
  router = rng.normal(size=(D_MODEL, 3)).astype(np.float32)
  cfg = _cfg(moe_top_k=top_k)  # capacity factor 3 = E: room for every token
  y, _ = _run(cfg, _marker_params(cfg, router), x)
  p = _softmax(x @ router)
  order = np.argsort(-p, axis=-1)
  want = np.zeros_like(y)
  for b in range(2):
    for t in range(5):
      chosen = order[b, t, :top_k]
      gates = p[b, t, chosen] / (p[b, t, chosen].sum() if top_k == 2 else 1.0)
      want[b, t] = sum(g * (e + 1) for g, e in zip(gates, chosen))
  np.testing.assert_allclose(y, want, rtol=1e-5)


def test_capacity_drops_by_choice_rank_then_position_and_dropped_tokens_get_zero():
  # Hand case, E=3, k=2, S=4, C=ceil(0.75 * 2 * 4 / 3)=2. Choices (first, second):
  # t0 (e0, e1), t1 (e0, e2), t2 (e1, e0), t3 (e0, e1).
  # e0's slots: first choices t0, t1 -> slots 0, 1; t3's first choice -> 2 (dropped);
  # t2's second choice -> 3 (dropped). e1: t2 (first) slot 0, t0 (second) slot 1, t3 dropped.
  logits = np.array([[[3, 2, 0], [3, 0, 2], [2, 3, 0], [3, 2, 0]]], np.float32)
  assert moe.capacity(4, 3, 2, 0.75) == 2
  r = moe.route(jnp.asarray(logits), 2, 2)
  kept = np.asarray(r.dispatch.sum(-1))[0]  # [S, E]
  np.testing.assert_array_equal(kept, [[1, 1, 0], [1, 0, 1], [0, 1, 0], [0, 0, 0]])
  slots = np.asarray(r.dispatch)[0].argmax(-1)  # [S, E]
  assert slots[1, 0] == 1 and slots[0, 1] == 1 and slots[2, 1] == 0 and slots[1, 2] == 0
  np.testing.assert_allclose(float(r.dropped_frac), 3 / 8)
  p = _softmax(logits[0])
  np.testing.assert_allclose(np.asarray(r.combine.sum(-1))[0, 0, :2],
                             p[0, :2] / p[0, :2].sum(), rtol=1e-6)
  # In the model: the fully dropped token t3 gets exactly 0; the others do not.
  cfg = _cfg(moe_top_k=2, moe_capacity_factor=0.75)
  x = np.eye(D_MODEL, dtype=np.float32)[None]  # token t = e_t: x @ router = router = logits
  y, st = _run(cfg, _marker_params(cfg, logits[0]), x)
  assert np.all(y[0, 3] == 0) and np.all(np.abs(y[0, :3]) > 0)
  np.testing.assert_allclose(st["dropped_frac"][0], 3 / 8)


@pytest.mark.parametrize("top_k", [1, 2])
def test_aux_loss_and_load_match_numpy(top_k):
  logits = np.random.default_rng(top_k).normal(size=(3, 7, 4)).astype(np.float32)
  r = moe.route(jnp.asarray(logits), top_k, 7)
  p = _softmax(logits).reshape(-1, 4)
  first = p.argmax(-1)
  f = np.bincount(first, minlength=4) / len(first)
  np.testing.assert_allclose(float(r.aux_loss), 4 * np.sum(f * p.mean(0)), rtol=1e-5)
  chosen = np.argsort(-p, axis=-1)[:, :top_k].reshape(-1)
  np.testing.assert_allclose(np.asarray(r.load), np.bincount(chosen, minlength=4) / len(chosen),
                             rtol=1e-6)
  assert float(r.dropped_frac) == 0  # C = S
  # Uniform routing: aux = 1 (Switch's normalisation).
  uniform = moe.route(jnp.zeros((1, 8, 4)), top_k, 8)
  np.testing.assert_allclose(float(uniform.aux_loss), 1.0, rtol=1e-6)


@pytest.mark.parametrize("top_k", [1, 2])
def test_an_expert_without_tokens_gets_an_exactly_zero_gradient(top_k):
  cfg = _cfg(moe_top_k=top_k)
  rng = np.random.default_rng(3)
  x = jnp.asarray(np.abs(rng.normal(size=(2, 6, D_MODEL))) + 0.1, jnp.float32)  # positive
  params = _init(cfg, x)
  router = -np.ones((D_MODEL, 3))
  router[:, :2] = 2 * np.eye(D_MODEL, 2)  # logits x_0, x_1 (> 0) and -sum(x) (< 0)
  params["router"]["kernel"] = jnp.asarray(router, jnp.float32)
  target = jnp.asarray(rng.normal(size=(2, 6, D_MODEL)), jnp.float32)

  def loss(p):
    y, st = moe.MoEMLP(cfg).apply({"params": p}, x, deterministic=True, mutable=[moe.COLLECTION])
    return jnp.sum(y * target) + 0.01 * st[moe.COLLECTION]["aux_loss"][0]

  g = jax.grad(loss)(params)
  _, st = _run(cfg, params, x)
  assert st["load"][0][2] == 0 and np.all(st["load"][0][:2] > 0)  # experts 0, 1 get tokens
  for leaf in jax.tree.leaves(g["experts"]):
    assert np.all(np.asarray(leaf[2]) == 0)
    assert np.all(np.abs(np.asarray(leaf[:2])) > 0)
  assert np.all(np.abs(np.asarray(g["router"]["kernel"])) > 0)  # the router is dense


def test_expert_axis_is_split_over_fsdp_and_other_params_unchanged():
  rules = sharding.LOGICAL_RULES
  assert tuple(nn.logical_to_mesh_axes(("expert", "embed", "mlp"), rules)) == ("fsdp", None, None)
  assert tuple(nn.logical_to_mesh_axes(("embed", "expert"), rules)) == (None, "fsdp")
  assert tuple(nn.logical_to_mesh_axes(("embed", "mlp"), rules)) == ("fsdp", None)


def _model_config(**kw):
  m = presets.get_config("tiny").model
  m.num_layers, m.d_model, m.num_heads, m.max_len = 2, 16, 2, 8
  for k, v in kw.items():
    m[k] = v
  return m


@pytest.mark.parametrize("field,value", [("num_experts", -1), ("moe_top_k", 3),
                                         ("moe_top_k", 2), ("moe_capacity_factor", 0.0),
                                         ("moe_aux_loss_coef", -1.0), ("moe_every", 3)])
def test_bad_moe_config_names_the_field(field, value):
  m = _model_config(num_experts=2 if field != "moe_top_k" or value != 2 else 1)
  m[field] = value
  with pytest.raises(ValueError, match=rf"config\.model\.{field}="):
    gpt.from_config(m, 32)


def test_a_config_saved_before_moe_existed_builds_the_dense_model():
  import ml_collections
  old = ml_collections.ConfigDict({k: v for k, v in _model_config().items()
                                   if k != "num_experts" and not k.startswith("moe_")})
  assert gpt.from_config(old, 32) == gpt.from_config(_model_config(), 32)


def test_moe_every_places_experts_and_remat_keeps_the_statistics():
  m = _model_config(num_experts=4, moe_top_k=2, moe_every=2)
  tokens = jax.random.randint(jax.random.PRNGKey(0), (2, 8), 0, 32)
  model = gpt.GPT(gpt.from_config(m, 32))
  params = nn.meta.unbox(model.init(jax.random.PRNGKey(0), tokens)["params"])
  assert "fc" in params["block_0"]["mlp"] and "experts" in params["block_1"]["mlp"]
  assert D.paths.kind_of("block_1/mlp/experts/fc/kernel") == "moe_expert"
  assert D.paths.kind_of("block_1/mlp/router/kernel") == "moe_router"
  logits, stats = moe.apply(model, params, tokens)
  m.remat = "full"
  logits_r, stats_r = moe.apply(gpt.GPT(gpt.from_config(m, 32)), params, tokens)
  np.testing.assert_allclose(logits, logits_r, rtol=1e-5, atol=1e-6)
  got = moe.train_metrics(stats_r, full=True)
  assert set(got) == {"train/moe_aux_loss", "moe/dropped_frac/layer=01", "moe/aux_loss/layer=01",
                      *(f"moe/load/layer=01/expert={e:02d}" for e in range(4))}
  np.testing.assert_allclose(float(got["train/moe_aux_loss"]), float(moe.aux_loss(stats)))
  np.testing.assert_allclose(sum(float(got[f"moe/load/layer=01/expert={e:02d}"])
                                 for e in range(4)), 1.0, rtol=1e-6)
  assert set(moe.train_metrics(stats, full=False)) == {"train/moe_aux_loss"}
  dense = gpt.GPT(gpt.from_config(_model_config(), 32))
  dparams = nn.meta.unbox(dense.init(jax.random.PRNGKey(0), tokens)["params"])
  _, dstats = moe.apply(dense, dparams, tokens)
  assert dstats == {} and moe.aux_loss(dstats) == 0.0 and moe.train_metrics(dstats, full=True) == {}


# ------------------------------------------------------------------------ per-expert diagnostics


def _diag_cfg():
  cfg = D.default_config()
  cfg.every, cfg.window, cfg.horizon = 1, 2, 2
  cfg.drift = cfg.sign = cfg.heterogeneity = cfg.norms = False
  cfg.per_param = False
  return cfg


@pytest.mark.parametrize("nu_floor", [0.0, 1e-30])
def test_expert_family_on_a_hand_built_sequence(nu_floor):
  """2 layers x 3 experts; expert (layer l, e) gets a gradient at step t iff e in ACTIVE[t][l].

  ``nu_floor``: the second moment starts at that floor (Adafactor's epsilon) instead of 0, so
  an expert first routed at the last step has v > 0 without any gradient in it: its staleness
  must still be undefined (active before t is the rule, as for embedding rows)."""
  active = [[{0, 1}, {0}], [{0}, {0}], [{0, 2}, {0}]]
  e = 3
  params = {f"block_{l}": {"mlp": {"experts": {"fc": {"kernel": jnp.ones((e, 2, 3)),
                                                       "bias": jnp.ones((e, 3))}}}}
            for l in range(2)}
  params["block_0"]["mlp"]["router"] = {"kernel": jnp.ones((2, e))}
  cfg = _diag_cfg()
  tx = optax.adam(1e-3, b2=0.5)
  opt_state, st = tx.init(params), D.init(params, cfg)
  adam_state = opt_state[0]
  opt_state = (adam_state._replace(nu=jax.tree.map(lambda x: x + nu_floor, adam_state.nu)),
               *opt_state[1:])
  sq = jax.tree.map(jnp.zeros_like, params)  # independent g^2 EMA (decay sq_ema_decay)
  for t, act in enumerate(active):
    def grad(path, p):
      names = [k.key for k in path]
      if names[2] != "experts":
        return jnp.ones_like(p)
      layer = int(names[0].split("_")[1])
      on = np.zeros(e)
      on[list(act[layer])] = 1.0
      g = (t + 2.0) * on.reshape((e,) + (1,) * (p.ndim - 1)) * np.ones(p.shape)
      if names[-1] == "kernel" and 0 in act[layer]:
        g[0, 0, 0] = 0.0  # one exact zero inside an active expert
      return jnp.asarray(g, jnp.float32)
    g = jax.tree_util.tree_map_with_path(grad, params)
    updates, new_opt = tx.update(g, opt_state, params)
    m, st = D.update(params, g, updates, opt_state, st, t, cfg, mode="full")
    nu = opt_state.nu if hasattr(opt_state, "nu") else opt_state[0].nu  # before the update
    sq = jax.tree.map(lambda s, x: 0.9 * s + 0.1 * x * x, sq, g)
    opt_state = new_opt
  m = m.to_numpy()
  t, n = 2, 3
  name = lambda metric, l, x: f"experts/{metric}/layer={l:02d}/expert={x:02d}"
  size = 2 * 3 + 3
  for l in range(2):
    for x in range(e):
      steps = [s for s in range(n) if x in active[s][l]]
      got = x in active[t][l]
      assert m[name("got_grad", l, x)] == float(got)
      zeros = size - (size - 1 if got and x == 0 else size if got else 0)
      np.testing.assert_allclose(m[name("grad_zero_frac", l, x)], zeros / size)
      last = max(steps) if steps else -1
      assert m[name("age", l, x)] == t - last
      assert m[name("active_window", l, x)] == float(t - last < 2)
      # Per-entry counts: entry [0, 0, 0] of expert 0's kernel was never active.
      counts = len(steps) * np.ones(size)
      if x == 0:
        counts[0] = 0
      np.testing.assert_allclose(m[name("update_freq", l, x)], counts.mean() / n, rtol=1e-6)
      ema = sum(0.01 * 0.99 ** (t - s) for s in steps) * np.ones(size)
      if x == 0:
        ema[0] = 0
      np.testing.assert_allclose(m[name("update_freq_ema", l, x)],
                                 ema.mean() / (1 - 0.99 ** n), rtol=1e-5)
      exp = params[f"block_{l}"]["mlp"]["experts"]["fc"]
      v = sum(float(np.sum(nu[f"block_{l}"]["mlp"]["experts"]["fc"][k][x])) for k in exp)
      s = sum(float(np.sum(sq[f"block_{l}"]["mlp"]["experts"]["fc"][k][x])) for k in exp)
      seen = any(step < t for step in steps)  # v_{t-1} holds one of its gradients
      want = np.log(v / (s / (1 - 0.9 ** n))) if seen and v > 0 and s > 0 else np.nan
      np.testing.assert_allclose(m[name("log_staleness", l, x)], want, rtol=1e-5)
  np.testing.assert_allclose(m["experts/got_grad_frac"], 3 / 6)
  assert m["experts/frac_older_than_H"] == np.mean(
      [t - max([s for s in range(n) if x in active[s][l]], default=-1) >= 2
       for l in range(2) for x in range(e)])
  assert not any(k.startswith("experts/") and "router" in k for k in m)


def test_expert_family_is_absent_for_a_dense_model():
  params = {"block_0": {"mlp": {"fc": {"kernel": jnp.ones((2, 3))}}}}
  cfg = _diag_cfg()
  m, _ = D.update(params, params, params, None, D.init(params, cfg), 0, cfg, mode="full")
  assert "experts" in D.FAMILIES and not any(k.startswith("experts/") for k in m)


def test_train_step_adds_the_aux_loss_and_logs_load_and_expert_metrics():
  import functools
  from jaxopt_study import optimizers
  from jaxopt_study import train
  config = presets.get_config("tiny", "adamw")
  m = config.model
  m.num_layers, m.d_model, m.num_heads, m.max_len = 2, 16, 2, 8
  m.num_experts, m.moe_top_k = 4, 2
  config.seq_len, config.diagnostics.every = 8, 1
  dc = config.diagnostics  # only what this test reads: a fast compile
  for family in D.FAMILIES:
    dc[family] = family == "experts"
  model = gpt.GPT(gpt.from_config(m, 32))
  batch = jax.random.randint(jax.random.PRNGKey(0), (2, 9), 0, 32)
  params = nn.meta.unbox(model.init(jax.random.PRNGKey(0), batch[:, :-1])["params"])
  tx, lr = optimizers.build(config, params)
  opt_state = tx.init(params)
  state = train.TrainState(step=jnp.int32(0), params=params, opt_state=opt_state,
                           diag_state=D.init(params, config.diagnostics, opt_state=opt_state),
                           rng=jax.random.PRNGKey(1), diverged_at=jnp.int32(-1))
  step = jax.jit(functools.partial(train.train_step, model=model, tx=tx, learning_rate=lr,
                                   diag_config=config.diagnostics, diag_mode="full", nan_step=-1))
  _, metrics = step(state, batch)
  logits, stats = moe.apply(model, params, batch[:, :-1])
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()
  np.testing.assert_allclose(metrics["train/loss"], ce, rtol=1e-5)  # the LM loss, without aux
  np.testing.assert_allclose(metrics["train/moe_aux_loss"], moe.aux_loss(stats), rtol=1e-5)

  def objective(p, coef):
    lg, st = moe.apply(model, p, batch[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(lg, batch[:, 1:]).mean() + \
        coef * moe.aux_loss(st)
  norm = lambda coef: float(optax.tree.norm(jax.grad(objective)(params, coef)))
  np.testing.assert_allclose(metrics["train/grad_norm"], norm(0.01), rtol=1e-5)  # with the aux
  assert abs(norm(0.01) - norm(0.0)) > 1e-4 * norm(0.0)  # ... which the test can tell apart
  for layer in range(2):
    load = [float(metrics[f"moe/load/layer={layer:02d}/expert={e:02d}"]) for e in range(4)]
    np.testing.assert_allclose(sum(load), 1.0, rtol=1e-6)
  diag = metrics["diagnostics"].to_numpy()
  assert {f"experts/got_grad/layer={l:02d}/expert={e:02d}" for l in range(2) for e in range(4)} \
      <= set(diag)


_MESH_SCRIPT = r"""
import jax, jax.numpy as jnp, numpy as np, flax.linen as nn
from jax.sharding import NamedSharding, PartitionSpec as P
from jaxopt_study import presets, sharding
from jaxopt_study.models import gpt, moe
m = presets.get_config("tiny").model
m.num_layers, m.d_model, m.num_heads, m.max_len, m.num_experts, m.moe_top_k = 2, 16, 2, 8, 4, 2
model = gpt.GPT(gpt.from_config(m, 32))
batch = jax.random.randint(jax.random.PRNGKey(0), (8, 9), 0, 32)
boxed = model.init(jax.random.PRNGKey(0), batch[:, :-1])["params"]
params = nn.meta.unbox(boxed)
def loss(p, b):
  logits, st = moe.apply(model, p, b[:, :-1])
  ce = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), b[:, 1:, None], -1))
  return ce + 0.01 * moe.aux_loss(st)
ref = jax.jit(jax.value_and_grad(loss))(params, batch)
import ml_collections
mesh = sharding.make_mesh(ml_collections.ConfigDict({"data": 2, "fsdp": 2}))
shard = sharding.param_shardings(boxed, mesh)
assert shard["block_0"]["mlp"]["experts"]["fc"]["kernel"].spec == P("fsdp", None, None)
with sharding.activate(mesh):
  got = jax.jit(jax.value_and_grad(loss), in_shardings=(shard, sharding.batch_sharding(mesh)))(
      jax.device_put(params, shard), batch)
np.testing.assert_allclose(got[0], ref[0], rtol=1e-5)
for a, b in zip(jax.tree.leaves(got[1]), jax.tree.leaves(ref[1])):
  np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)
print("OK")
"""


def test_experts_split_over_a_2x2_mesh_give_the_1_device_loss_and_gradients():
  import os
  import pathlib
  import subprocess
  import sys
  root = pathlib.Path(__file__).resolve().parents[1]
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
             PYTHONPATH=str(root))
  out = subprocess.run([sys.executable, "-c", _MESH_SCRIPT], env=env, cwd=root,
                       capture_output=True, text=True, timeout=600)
  assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]
