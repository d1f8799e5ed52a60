"""Layer scores on hand-built cases, against NumPy definitions, and end to end on a tiny run."""

import dataclasses
import json
import os
import pathlib
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxopt_study import presets
from jaxopt_study import train
from jaxopt_study.analysis import blocks as blocks_lib
from jaxopt_study.analysis import causal
from jaxopt_study.analysis import jacobian
from jaxopt_study.analysis import permutation
from jaxopt_study.analysis import usefulness
from jaxopt_study.models import gpt

ROOT = pathlib.Path(__file__).resolve().parents[1]
L, D, V, T, B = 3, 16, 32, 8, 4
CFG = gpt.GPTConfig(vocab_size=V, max_len=T, num_layers=L, d_model=D, num_heads=2, num_kv_heads=2,
                    mlp_dim=32, init_std=0.3)  # large init: blocks far from the identity
PARTS = blocks_lib.gpt_parts(CFG)


def _init(cfg, seed=0):
  boxed = gpt.GPT(cfg).init(jax.random.PRNGKey(seed), jnp.zeros((1, T), jnp.int32))["params"]
  return nn.meta.unbox(boxed)


@pytest.fixture(scope="module")
def params():
  return _init(CFG)


@pytest.fixture(scope="module")
def batch():
  return jax.random.randint(jax.random.PRNGKey(1), (B, T + 1), 0, V)


def _set_block(params, i, fn):
  """params with block_i's residual-branch output projections replaced by fn(leaf)."""
  block = dict(params[f"block_{i}"])
  block["attn"] = {**block["attn"], "out": jax.tree.map(fn, block["attn"]["out"])}
  block["mlp"] = {**block["mlp"], "proj": jax.tree.map(fn, block["mlp"]["proj"])}
  return {**params, f"block_{i}": block}


def _identity_block(params, i):
  """Pre-LN block x + attn(LN x) + mlp(LN x') with both output projections zero: exactly x."""
  return _set_block(params, i, jnp.zeros_like)


def _shift_block(params, i):
  """Zero output kernels, non-zero biases: the block is x -> x + c, exactly affine."""
  p = _set_block(params, i, jnp.zeros_like)
  block = p[f"block_{i}"]
  block["attn"]["out"]["bias"] = jnp.linspace(-1.0, 1.0, D)
  block["mlp"]["proj"]["bias"] = jnp.cos(jnp.arange(D, dtype=jnp.float32))
  return p


@pytest.mark.parametrize("ln_position,tie,experts", [
    ("pre", False, 0), ("pre", True, 0), ("post", False, 0), ("pre", False, 4)])
def test_parts_compose_to_the_model(ln_position, tie, experts, batch):
  cfg = dataclasses.replace(CFG, ln_position=ln_position, tie_embeddings=tie, num_experts=experts)
  p = _init(cfg)
  inputs = batch[:, :-1]
  ours = blocks_lib.forward(blocks_lib.gpt_parts(cfg), p, inputs)
  np.testing.assert_allclose(ours.logits, gpt.GPT(cfg).apply({"params": p}, inputs), atol=2e-5)
  assert ours.hs.shape == (L + 1, B, T, D)


def test_blocks_of_two_kinds_are_refused_by_name():
  with pytest.raises(ValueError, match="moe_every=2"):
    blocks_lib.gpt_parts(dataclasses.replace(CFG, num_experts=4, moe_every=2))


# ------------------------------------------------------------------------ Jacobian


def test_identity_block_has_identity_jacobian(params, batch):
  for make in (_identity_block, _shift_block):
    stats = jacobian.jacobian_stats(PARTS, make(params, 1), batch[:, :-1], jnp.array([0, 3, 2]),
                                    jnp.array([0, 5, 7]))
    np.testing.assert_allclose(stats.identity_deviation[1], 0.0, atol=1e-6)
    np.testing.assert_allclose(stats.offdiag_norm[1], 0.0, atol=1e-6)
    np.testing.assert_allclose(stats.diag_norm[1], np.sqrt(D), rtol=1e-6)
    np.testing.assert_allclose(stats.frobenius[1], np.sqrt(D), rtol=1e-6)
    np.testing.assert_allclose(stats.spectral[1], 1.0, rtol=1e-5)
    assert stats.identity_deviation[0] > 0.05 and stats.identity_deviation[2] > 0.05


def test_token_jacobian_matches_finite_differences_in_float64(batch):
  """Central differences of the block itself (no autodiff) in float64; stats by NumPy.

  jax.nn.dot_product_attention rounds through float32 inside, so the step is 1e-3 (truncation
  error ~1e-6, rounding ~1e-7 / 1e-3), not the 1e-6 a pure float64 function would allow.
  """
  with jax.enable_x64(True):
    cfg = dataclasses.replace(CFG, param_dtype=jnp.float64, dtype=jnp.float64)
    parts = blocks_lib.gpt_parts(cfg)
    p = _init(cfg)
    h = blocks_lib.forward(parts, p, batch[:, :-1]).hs[1]  # input of block 1, float64
    assert h.dtype == jnp.float64
    b, t, eps = 2, 5, 1e-3
    block = jax.jit(parts.block)
    fd = np.zeros((D, D))
    for k in range(D):
      up = block(p["block_1"], h.at[b, t, k].add(eps))[b, t]
      down = block(p["block_1"], h.at[b, t, k].add(-eps))[b, t]
      fd[:, k] = (up - down) / (2 * eps)
    j = np.asarray(jacobian.token_jacobian(parts.block, p["block_1"], h, b, t))
    np.testing.assert_allclose(j, fd, atol=3e-4)
    assert np.abs(fd - np.eye(D)).max() > 0.1  # a block far from the identity
    stats = jacobian.matrix_stats(jnp.asarray(fd))
  np.testing.assert_allclose(stats.identity_deviation, np.linalg.norm(fd - np.eye(D)) / np.sqrt(D))
  np.testing.assert_allclose(stats.diag_norm, np.sqrt(np.sum(np.diag(fd) ** 2)))
  np.testing.assert_allclose(stats.offdiag_norm, np.linalg.norm(fd - np.diag(np.diag(fd))))
  np.testing.assert_allclose(stats.frobenius, np.linalg.norm(fd))
  np.testing.assert_allclose(stats.spectral, np.linalg.svd(fd)[1][0])


# ------------------------------------------------------------------------ a linear toy model

TOY_D = 6


def _toy():
  """h_0 = E[tokens]; block i: h -> h M_i + c_i; logits = h W. Every block exactly affine."""
  rng = np.random.default_rng(0)
  params = {
      "emb": rng.normal(size=(V, TOY_D)).astype(np.float32),
      "out": rng.normal(size=(TOY_D, V)).astype(np.float32),
  }
  for i in range(L):
    params[f"block_{i}"] = {
        "M": (np.eye(TOY_D) + 0.5 * rng.normal(size=(TOY_D, TOY_D))).astype(np.float32),
        "c": rng.normal(size=TOY_D).astype(np.float32),
    }
  parts = blocks_lib.ModelParts(
      embed=lambda p, tok: p["emb"][tok],
      block=lambda p, h: h @ p["M"] + p["c"],
      head=lambda p, h: h @ p["out"],
      block_names=tuple(f"block_{i}" for i in range(L)),
  )
  return parts, params


TOY_PARTS, TOY_PARAMS = _toy()


def _np_forward(params, tokens, order=range(L), skip=None):
  """The toy model by hand: residual streams [L + 1, B, T, D] and logits."""
  h = params["emb"][np.asarray(tokens)].astype(np.float64)
  hs = [h]
  for k, i in enumerate(order):
    if k != skip:
      h = h @ params[f"block_{i}"]["M"] + params[f"block_{i}"]["c"]
    hs.append(h)
  return np.stack(hs), h @ params["out"]


def _np_loss(logits, targets):
  z = logits - logits.max(-1, keepdims=True)
  logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
  return -np.take_along_axis(logp, np.asarray(targets)[..., None], -1).mean()


def test_linear_block_jacobian_is_its_matrix(batch):
  stats = jacobian.jacobian_stats(TOY_PARTS, TOY_PARAMS, batch[:, :-1], jnp.array([1]),
                                  jnp.array([4]))
  for i in range(L):
    j = TOY_PARAMS[f"block_{i}"]["M"].T  # d(h M)_o / d h_k = M[k, o]
    np.testing.assert_allclose(stats.identity_deviation[i],
                               np.linalg.norm(j - np.eye(TOY_D)) / np.sqrt(TOY_D), rtol=1e-5)
    np.testing.assert_allclose(stats.spectral[i], np.linalg.svd(j)[1][0], rtol=1e-5)
    np.testing.assert_allclose(stats.offdiag_norm[i], np.linalg.norm(j - np.diag(np.diag(j))),
                               rtol=1e-5)


# ------------------------------------------------------------------------ usefulness


def test_affine_blocks_are_fully_replaceable(batch):
  res = usefulness.usefulness(TOY_PARTS, TOY_PARAMS, batch, batch)
  np.testing.assert_allclose(res.loss_increase, 0.0, atol=1e-4)
  np.testing.assert_allclose(res.fit_r2, 1.0, atol=1e-4)
  assert res.share_useful == 0.0
  inputs, targets = batch[:, :-1], batch[:, 1:]
  np.testing.assert_allclose(res.base_loss, _np_loss(_np_forward(TOY_PARAMS, inputs)[1], targets),
                             rtol=1e-5)


def test_identity_and_shift_blocks_have_zero_usefulness(params, batch):
  fit = jax.random.randint(jax.random.PRNGKey(7), (2 * B, T + 1), 0, V)
  base = usefulness.usefulness(PARTS, params, batch, fit)
  for make in (_identity_block, _shift_block):
    res = usefulness.usefulness(PARTS, make(params, 1), batch, fit)
    np.testing.assert_allclose(res.loss_increase[1], 0.0, atol=1e-5)
  # The untouched, non-linear blocks are not replaceable for free.
  assert np.max(np.abs(base.loss_increase)) > 1e-3
  np.testing.assert_allclose(base.share_useful, np.mean(np.asarray(base.loss_increase) > 0.1))


# ------------------------------------------------------------------------ causal


def test_skipping_an_identity_block_changes_nothing(params, batch):
  res = causal.causal_scores(PARTS, _identity_block(params, 1), batch)
  np.testing.assert_allclose(res.output_change[1, 2], 0.0, atol=1e-6)
  np.testing.assert_allclose(res.update_change[1, 2], 0.0, atol=1e-6)
  np.testing.assert_allclose(res.loss_increase[1], 0.0, atol=1e-6)
  assert res.output_change[0, 1] > 1e-3 and res.output_change[0, 2] > 1e-3
  assert np.isnan(res.output_change[2, 1]) and np.isnan(res.output_change[1, 1])


def test_causal_scores_match_numpy_definition(batch):
  res = causal.causal_scores(TOY_PARTS, TOY_PARAMS, batch)
  inputs, targets = batch[:, :-1], batch[:, 1:]
  hs, logits = _np_forward(TOY_PARAMS, inputs)
  for i in range(L):
    hs_skip, logits_skip = _np_forward(TOY_PARAMS, inputs, skip=i)
    for j in range(i + 1, L):
      want = np.linalg.norm(hs_skip[j + 1] - hs[j + 1]) / np.linalg.norm(hs[j + 1])
      np.testing.assert_allclose(res.output_change[i, j], want, rtol=1e-4)
      du, du_skip = hs[j + 1] - hs[j], hs_skip[j + 1] - hs_skip[j]
      np.testing.assert_allclose(res.update_change[i, j],
                                 np.linalg.norm(du_skip - du) / np.linalg.norm(du), rtol=1e-4)
    base = _np_loss(logits, targets)
    np.testing.assert_allclose(res.loss_increase[i], (_np_loss(logits_skip, targets) - base) / base,
                               rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------ permutation


def test_swapping_identical_blocks_changes_nothing(params, batch):
  p = {**params, "block_2": params["block_1"]}
  res = permutation.permutation_scores(PARTS, p, batch)
  np.testing.assert_allclose(res.loss_change[1, 2], 0.0, atol=1e-7)
  np.testing.assert_allclose(res.loss_change, np.asarray(res.loss_change).T)
  np.testing.assert_allclose(np.diag(res.loss_change), 0.0)
  assert abs(res.loss_change[0, 1]) > 1e-4


def test_permutation_scores_match_numpy_definition(batch):
  res = permutation.permutation_scores(TOY_PARTS, TOY_PARAMS, batch)
  inputs, targets = batch[:, :-1], batch[:, 1:]
  base = _np_loss(_np_forward(TOY_PARAMS, inputs)[1], targets)
  for i, j in ((0, 1), (0, 2), (1, 2)):
    order = list(range(L))
    order[i], order[j] = j, i
    swapped = _np_loss(_np_forward(TOY_PARAMS, inputs, order=order)[1], targets)
    np.testing.assert_allclose(res.loss_change[i, j], (swapped - base) / base, rtol=1e-4,
                               atol=1e-6)


# ------------------------------------------------------------------------ the script, end to end


def test_analyze_checkpoint_end_to_end(tmp_path):
  config = presets.get_config("tiny", "adamw")
  config.model.num_layers, config.model.d_model, config.model.num_heads = 2, 16, 2
  config.model.max_len = config.seq_len = 8
  config.batch_size, config.num_steps = 4, 4
  config.data.vocab_size, config.data.eval_batches = 64, 2
  config.schedule.warmup_steps = 2
  config.log_every = config.eval_every = config.checkpoint_every = 4
  config.diagnostics.enabled = False
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(config, workdir)

  sys.path.insert(0, str(ROOT / "scripts"))
  try:
    import analyze_checkpoint  # pylint: disable=g-import-not-at-top
  finally:
    sys.path.pop(0)
  analyze_checkpoint.main([f"--workdir={workdir}", "--num_jacobian_tokens=4"])
  out = os.path.join(workdir, "analysis")
  res = json.load(open(os.path.join(out, "analysis.json")))
  assert res["step"] == 4 and res["num_layers"] == 2 and res["fit_on_separate_batch"]
  assert res["batch_shape"] == [4, 8] and res["d_model"] == 16
  assert len(res["jacobian"]["identity_deviation"]) == 2 and res["jacobian"]["num_tokens"] == 4
  assert 0.0 <= res["usefulness"]["share_useful"] <= 1.0
  assert np.array(res["permutation"]["loss_change"]).shape == (2, 2)
  assert res["causal"]["output_change"][0][0] is None and res["causal"]["output_change"][0][1] > 0
  assert 0 < res["base_loss"] < 2 * np.log(64)
  for name in ("jacobian", "usefulness", "causal", "permutation"):
    assert os.path.getsize(os.path.join(out, f"{name}.png")) > 1000
