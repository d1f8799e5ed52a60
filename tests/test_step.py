"""train.py's step functions: the cross-entropy and its gradient, and the divergence guard."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxopt_study import presets
from jaxopt_study import train
from jaxopt_study.models import gpt

V = 50


def _log_softmax64(z):
  z = np.asarray(z, np.float64)
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_cross_entropy_and_gradient_match_numpy(dtype):
  """loss = -log softmax(z)[y]; d mean(loss) / dz = (softmax(z) - onehot(y)) / N (float64 NumPy)."""
  k1, k2 = jax.random.split(jax.random.PRNGKey(0))
  logits = (4 * jax.random.normal(k1, (3, 7, V))).astype(dtype)
  targets = jax.random.randint(k2, (3, 7), 0, V)
  z, y = np.asarray(logits.astype(jnp.float32), np.float64), np.asarray(targets)
  logp = _log_softmax64(z)
  want = -np.take_along_axis(logp, y[..., None], -1)[..., 0]

  loss = train.cross_entropy(logits, targets)
  assert loss.dtype == jnp.float32 and loss.shape == (3, 7)
  np.testing.assert_allclose(loss, want, rtol=1e-6, atol=1e-6)

  grad = jax.grad(lambda l: train.cross_entropy(l, targets).mean())(logits)
  assert grad.dtype == dtype  # the cotangent stays in the logits' dtype
  want_grad = (np.exp(logp) - np.eye(V)[y]) / y.size
  rtol = 1e-5 if dtype == jnp.float32 else 2**-8  # bf16: the output's rounding (8-bit mantissa)
  np.testing.assert_allclose(np.asarray(grad, np.float64), want_grad, rtol=rtol, atol=1e-12)


def test_cross_entropy_of_large_logits_is_finite():
  """The max-shift keeps exp from overflowing: logits of 1e4 give the exact loss (0 and 1e4)."""
  logits = jnp.array([[[1e4, 0.0, 0.0], [0.0, 1e4, 0.0]]])
  loss = train.cross_entropy(logits, jnp.array([[0, 0]]))
  np.testing.assert_allclose(loss, [[0.0, 1e4]], rtol=1e-6)


# ------------------------------------------------------------------ the divergence guard


def _state_and_step(learning_rate: float):
  """A 1-layer GPT, its TrainState under SGD at ``learning_rate``, and its jitted train step."""
  m = presets.get_config("tiny").model
  m.num_layers, m.d_model, m.num_heads, m.max_len = 1, 16, 2, 8
  model = gpt.GPT(gpt.from_config(m, V))
  tokens = jnp.zeros((1, 8), jnp.int32)
  params = nn.meta.unbox(model.init(jax.random.PRNGKey(0), tokens)["params"])
  tx = optax.inject_hyperparams(optax.sgd)(learning_rate=learning_rate)
  opt_state = tx.init(params)
  state = train.TrainState(
      step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state, diag_state=None,
      rng=jax.random.PRNGKey(1), diverged_at=jnp.full((), -1, jnp.int32),
  )
  step = jax.jit(lambda s, b: train.train_step(
      s, b, model=model, tx=tx, learning_rate=lambda o, t: o.hyperparams["learning_rate"],
      diag_config=None, diag_mode=None, nan_step=-1))
  return state, step


def _finite(tree):
  return all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize(
    "learning_rate,diverges,kept_old",
    [
        (1e-2, False, False),  # control: an ordinary step is kept
        (1e39, True, True),  # overflows float32 to inf: the learning rate itself is not finite
        (float("nan"), True, True),
        # Finite learning rate and gradient, but the update's norm (and the new parameters')
        # overflows: the step is marked diverged and its (finite-entry) state kept; every later
        # step is dropped.
        (1e30, True, False),
    ],
)
def test_non_finite_steps_count_as_divergence(learning_rate, diverges, kept_old):
  state, step = _state_and_step(learning_rate)
  before = jax.tree.map(np.asarray, (state.params, state.opt_state))
  batch = jax.random.randint(jax.random.PRNGKey(2), (4, 9), 0, V)
  state, _ = step(state, batch)
  after_first = jax.tree.map(np.asarray, (state.params, state.opt_state))
  for _ in range(2):
    state, metrics = step(state, batch)
  # The last step ran on the kept state: from the old parameters, its loss is finite.
  assert bool(jnp.isfinite(metrics["train/loss"])) == (kept_old or not diverges)
  assert int(state.step) == 3
  assert int(state.diverged_at) == (0 if diverges else -1)
  assert _finite(state.params)  # a diverged run keeps a state of finite entries
  # (The optimizer state holds the learning rate itself, inf or NaN here: compared with NaNs.)
  same = lambda x, y: all(jax.tree.leaves(jax.tree.map(
      lambda a, b: np.array_equal(a, np.asarray(b), equal_nan=True), x, y)))
  now = (state.params, state.opt_state)
  assert same(before, now) == kept_old
  assert same(after_first, now) == diverges  # nothing after the first bad step is applied
