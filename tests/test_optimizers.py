"""Each optimizer chain against optax's own alias and a NumPy reference (table-driven)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxopt_study import presets
from jaxopt_study import optimizers

LR = 0.01


def _config(name, **overrides):
  config = presets.get_config("tiny", name)
  config.schedule.name, config.schedule.warmup_steps = "constant", 0
  config.optimizer.learning_rate = LR
  config.optimizer.clip_norm = 0.0
  config.optimizer.weight_decay = 0.0
  for k, v in overrides.items():
    config.optimizer[k] = v
  return config


def _params():
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
  return {
      "wte": {"embedding": jax.random.normal(k1, (130, 8))},
      "block_0": {"mlp": {"fc": {"kernel": jax.random.normal(k2, (8, 160)), "bias": jnp.ones(160)}}},
      "lm_head": {"kernel": jax.random.normal(k3, (8, 130))},
  }


def _loss(p):  # a toy problem with a non-trivial, changing gradient
  return sum(jnp.sum(jnp.sin(x) * x**2) for x in jax.tree.leaves(p))


def _run(tx, params, steps=5):
  state = tx.init(params)
  for _ in range(steps):
    g = jax.grad(_loss)(params)
    u, state = tx.update(g, state, params)
    params = optax.apply_updates(params, u)
  return params


# Constant lr: optax's schedule-less alias is the reference.
REFERENCES = {
    "sgd_momentum": lambda o: optax.sgd(LR, momentum=o.momentum, nesterov=o.nesterov),
    "adamw": lambda o: optax.adamw(LR, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=0.0),
    "adafactor": lambda o: optax.adafactor(
        LR, decay_rate=o.decay_rate, clipping_threshold=o.clipping_threshold,
        multiply_by_parameter_scale=o.multiply_by_parameter_scale,
    ),
    "lion": lambda o: optax.lion(LR, b1=o.b1, b2=o.b2, weight_decay=0.0),
    "signsgd": lambda o: optax.sign_sgd(LR),
}


@pytest.mark.parametrize("name", sorted(optimizers.OPTIMIZERS))
def test_chain_equals_optax_reference(name):
  config = _config(name)
  params = _params()
  tx, _ = optimizers.build(config, params)
  ours, ref = _run(tx, params), _run(REFERENCES[name](config.optimizer), params)
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_signum_equals_optax_signum():
  config = _config("signsgd", momentum=0.9)
  params = _params()
  tx, _ = optimizers.build(config, params)
  ours, ref = _run(tx, params), _run(optax.signum(LR, 0.9), params)
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_adamw_first_steps_match_numpy_with_masked_decay():
  """Hand-written AdamW (Loshchilov & Hutter) with decay on kernels only, clipping to 1."""
  config = _config("adamw", weight_decay=0.1, clip_norm=1.0)
  params = _params()
  tx, _ = optimizers.build(config, params)
  ours = _run(tx, params, steps=3)

  o = config.optimizer
  p = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
  m = jax.tree.map(np.zeros_like, p)
  v = jax.tree.map(np.zeros_like, p)
  decay = {"wte": {"embedding": 0.0}, "block_0": {"mlp": {"fc": {"kernel": 1.0, "bias": 0.0}}},
           "lm_head": {"kernel": 1.0}}
  for t in range(1, 4):
    g = jax.tree.map(lambda x: np.asarray(x, np.float64), jax.grad(_loss)(jax.tree.map(jnp.asarray, p)))
    norm = np.sqrt(sum(np.sum(x**2) for x in jax.tree.leaves(g)))
    g = jax.tree.map(lambda x: x * min(1.0, 1.0 / norm), g)
    m = jax.tree.map(lambda m, g: o.b1 * m + (1 - o.b1) * g, m, g)
    v = jax.tree.map(lambda v, g: o.b2 * v + (1 - o.b2) * g**2, v, g)
    p = jax.tree.map(
        lambda p, m, v, d: p - LR * (m / (1 - o.b1**t) / (np.sqrt(v / (1 - o.b2**t)) + o.eps)
                                     + o.weight_decay * d * p),
        p, m, v, decay,
    )
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(p)):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-5)


def test_lion_step_matches_numpy():
  config = _config("lion", weight_decay=0.5)
  params = _params()
  tx, _ = optimizers.build(config, params)
  ours = _run(tx, params, steps=1)
  g = jax.grad(_loss)(params)
  o = config.optimizer
  # m_0 = 0: the first update is sign((1 - b1) g) = sign(g).
  for path_p, a in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(ours)):
    path, p0 = path_p
    gp = np.asarray(jax.tree_util.tree_leaves_with_path(g)[[q for q, _ in jax.tree_util.tree_leaves_with_path(params)].index(path)][1])
    wd = o.weight_decay if path[-1].key == "kernel" else 0.0
    np.testing.assert_allclose(a, p0 - LR * (np.sign(gp) + wd * p0), rtol=1e-6, atol=1e-7)


def test_weight_decay_mask():
  mask = optimizers.weight_decay_mask(_params(), decay_embeddings=False)
  assert mask == {"wte": {"embedding": False}, "block_0": {"mlp": {"fc": {"kernel": True, "bias": False}}},
                  "lm_head": {"kernel": True}}
  assert optimizers.weight_decay_mask(_params(), decay_embeddings=True)["wte"]["embedding"]


def test_schedule_warmup_cosine():
  config = _config("adamw")
  config.schedule.name, config.schedule.warmup_steps, config.num_steps = "cosine", 10, 110
  tx, learning_rate = optimizers.build(config, _params())
  state = tx.init(_params())
  rates = [learning_rate(state, t) for t in (0, 5, 10, 60, 110)]
  # Linear warmup to the peak, then half-way down a cosine to min_lr_ratio at num_steps.
  end = LR * config.schedule.min_lr_ratio
  np.testing.assert_allclose(rates, [0, LR / 2, LR, (LR + end) / 2, end], rtol=1e-5)


def test_unknown_optimizer_lists_valid_names():
  config = _config("adamw")
  config.optimizer.name = "adam_typo"
  with pytest.raises(ValueError, match=r"config\.optimizer\.name='adam_typo'.*valid") as e:
    optimizers.validate(config)
  assert all(name in str(e.value) for name in optimizers.NAMES)
  with pytest.raises(ValueError, match="adam_typo"):
    optimizers.default_config("adam_typo")


@pytest.mark.parametrize("name", optimizers.NAMES)
def test_default_config_is_valid_and_builds(name):
  config = _config(name)
  config.optimizer = optimizers.default_config(name)
  optimizers.validate(config)
  tx, _ = optimizers.build(config, _params())
  assert np.all(np.isfinite(jax.tree.leaves(_run(tx, _params(), steps=2))[0]))


@pytest.mark.parametrize("name", sorted(optimizers.OPTIMIZERS))
def test_learning_rates_of_a_sweep_share_one_compiled_step(name):
  """The peak rate lives in the optimizer state, not in the program: one compile per sweep."""
  params = _params()
  grads = jax.grad(_loss)(params)

  def lowered(lr):
    config = _config(name)
    config.optimizer.learning_rate = lr
    tx, learning_rate = optimizers.build(config, params)
    state = tx.init(params)
    step = jax.jit(lambda p, s, g: (tx.update(g, s, p), learning_rate(s, 3)))
    (_, _), rate = step(params, state, grads)
    assert np.isclose(rate, lr)
    return step.lower(params, state, grads).as_text()

  assert lowered(LR) == lowered(3 * LR)
