"""Probe metrics against a NumPy forward pass written from the GPT's definition, and hand cases:
uniform attention, identity blocks, thresholds on hand-built weights."""

import flax.linen as nn
import jax
import numpy as np
import pytest

from jaxopt_study import presets
from jaxopt_study import probes
from jaxopt_study.models import gpt

V, T, B, L, H, G = 32, 8, 2, 2, 4, 2


@pytest.fixture(scope="module")
def setup():
  m = presets.get_config("tiny").model
  m.num_layers, m.d_model, m.num_heads, m.num_kv_heads, m.max_len = L, 16, H, G, T
  model = gpt.GPT(gpt.from_config(m, V))
  tokens = jax.random.randint(jax.random.PRNGKey(1), (B, T), 0, V)
  params = nn.meta.unbox(model.init(jax.random.PRNGKey(0), tokens)["params"])
  # Larger weights than GPT-2's init so that attention is far from uniform.
  params = jax.tree.map(lambda x: x * 20 if x.ndim >= 2 else x, params)
  return model, params, np.asarray(tokens)


def _ln(x, p):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + 1e-5) * p["scale"] + p["bias"]


def _gelu(x):
  return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def _numpy_forward(params, tokens):
  """Residual stream [h_-1, h_0, .., h_{L-1}] and attention probabilities [B, H, T, T] per block
  of the pre-LN GPT (models/gpt.py), in float64."""
  p = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
  x = p["wte"]["embedding"][tokens] + p["wpe"]["embedding"][:T][None]
  residual, probs = [x], []
  for l in range(L):
    blk = p[f"block_{l}"]
    a = blk["attn"]
    y = _ln(x, blk["ln_attn"])
    q = np.einsum("btd,dhk->bthk", y, a["query"]["kernel"]) + a["query"]["bias"]
    k = np.einsum("btd,dgk->btgk", y, a["key"]["kernel"]) + a["key"]["bias"]
    v = np.einsum("btd,dgk->btgk", y, a["value"]["kernel"]) + a["value"]["bias"]
    pr = np.zeros((B, H, T, T))
    out = np.zeros(q.shape)
    for h in range(H):
      g = h // (H // G)
      s = np.einsum("btk,bsk->bts", q[:, :, h], k[:, :, g]) / np.sqrt(q.shape[-1])
      s = np.where(np.tril(np.ones((T, T), bool)), s, -np.inf)
      e = np.exp(s - s.max(-1, keepdims=True))
      pr[:, h] = e / e.sum(-1, keepdims=True)
      out[:, :, h] = np.einsum("bts,bsk->btk", pr[:, h], v[:, :, g])
    probs.append(pr)
    x = x + np.einsum("bthk,hkd->btd", out, a["out"]["kernel"]) + a["out"]["bias"]
    mlp = blk["mlp"]
    y = _gelu(_ln(x, blk["ln_mlp"]) @ mlp["fc"]["kernel"] + mlp["fc"]["bias"])
    x = x + y @ mlp["proj"]["kernel"] + mlp["proj"]["bias"]
    residual.append(x)
  return residual, probs


def _attention_reference(pr):
  """NumPy entropy, normalised entropy and top-k masses per head of P [B, H, T, T]."""
  with np.errstate(divide="ignore", invalid="ignore"):
    ent = -np.nansum(np.where(pr > 0, pr * np.log(pr), 0.0), axis=-1)  # [B, H, T]
  srt = -np.sort(-pr, axis=-1)
  return {"entropy": ent.mean((0, 2)),
          "entropy_norm": (ent[:, :, 1:] / np.log(np.arange(2, T + 1))).mean((0, 2)),
          "top1_mass": srt[..., :1].sum(-1).mean((0, 2)),
          "top4_mass": srt[..., :4].sum(-1).mean((0, 2))}


def test_depth_and_attention_match_a_numpy_forward(setup):
  model, params, tokens = setup
  got = probes.measure(model, params, tokens).to_numpy()
  residual, probs = _numpy_forward(params, tokens)
  var = [np.var(h) for h in residual]
  np.testing.assert_allclose(got["depth/var/embed"], var[0], rtol=1e-4)
  for l in range(L):
    np.testing.assert_allclose(got[f"depth/var/layer={l:02d}"], var[l + 1], rtol=1e-4)
    np.testing.assert_allclose(got[f"depth/var_ratio/layer={l:02d}"], var[l + 1] / var[l],
                               rtol=1e-4)
  np.testing.assert_allclose(got["depth/log_var_slope"],
                             np.polyfit(np.arange(L), np.log(var[1:]), 1)[0], rtol=1e-3,
                             atol=1e-5)
  for l in range(L):
    ref = _attention_reference(probs[l])
    assert ref["top1_mass"].min() > 1.5 / T  # far from uniform: the test can tell them apart
    for name, per_head in ref.items():
      for h in range(H):
        np.testing.assert_allclose(got[f"attention/{name}/layer={l:02d}/head={h:02d}"],
                                   per_head[h], rtol=1e-4, atol=1e-5)
      np.testing.assert_allclose(got[f"attention/{name}/layer={l:02d}"], per_head.mean(),
                                 rtol=1e-4, atol=1e-5)


def test_zero_queries_give_uniform_attention_and_identity_blocks_ratio_one(setup):
  model, params, tokens = setup
  p = jax.tree.map(lambda x: x, params)
  for l in range(L):
    q = p[f"block_{l}"]["attn"]["query"]
    q["kernel"], q["bias"] = q["kernel"] * 0, q["bias"] * 0
  for sub in (("attn", "out"), ("mlp", "proj")):  # block 1 writes nothing: the identity
    leaf = p["block_1"][sub[0]][sub[1]]
    leaf["kernel"], leaf["bias"] = leaf["kernel"] * 0, leaf["bias"] * 0
  got = probes.measure(model, p, tokens).to_numpy()
  t = np.arange(T)
  for l in range(L):
    for h in range(H):
      sfx = f"/layer={l:02d}/head={h:02d}"
      np.testing.assert_allclose(got["attention/entropy" + sfx], np.mean(np.log(t + 1)),
                                 rtol=1e-5)
      np.testing.assert_allclose(got["attention/entropy_norm" + sfx], 1.0, rtol=1e-5)
      np.testing.assert_allclose(got["attention/top1_mass" + sfx], np.mean(1 / (t + 1)),
                                 rtol=1e-5)
      np.testing.assert_allclose(got["attention/top4_mass" + sfx],
                                 np.mean(np.minimum(4, t + 1) / (t + 1)), rtol=1e-5)
  assert got["depth/var_ratio/layer=01"] == 1.0
  assert got["depth/var_ratio/layer=00"] != 1.0


def test_weight_sparsity_on_hand_built_tensors():
  # rms(w) = sqrt((4 * 4 + 0 + 0.01^2 + 0.2^2) / 8) ~= 1.4284: thresholds 0.0143 and 0.143.
  w = np.array([[2, -2, 0, 0.01], [2, -2, 0.2, 0.0]], np.float32)
  u = np.array([[1, 1], [1, 0.05]], np.float32)  # rms ~= 0.8664: 0.0087 and 0.087
  params = {"block_0": {"attn": {"query": {"kernel": w, "bias": np.zeros(4, np.float32)}},
                        "mlp": {"fc": {"kernel": u}}},
            "block_1": {"attn": {"query": {"kernel": u}}},
            "wte": {"embedding": w}}
  got = {k: float(v) for k, v in probes.weight_metrics(params, (0.01, 0.1)).items()}
  # w: |x| <= 0.0143: {0, 0.01, 0} -> 3 of 8; <= 0.143: also 3 (0.2 is above). u: 0 and 1 of 4.
  want = {
      "weights/small_frac_0.01/layer=00/kind=attention": 3 / 8,
      "weights/small_frac_0.1/layer=00/kind=attention": 3 / 8,
      "weights/small_frac_0.01/layer=00/kind=mlp": 0.0,
      "weights/small_frac_0.1/layer=00/kind=mlp": 1 / 4,
      "weights/small_frac_0.01/layer=01/kind=attention": 0.0,
      "weights/small_frac_0.1/layer=01/kind=attention": 1 / 4,
      "weights/small_frac_0.01/kind=attention": 3 / 12,
      "weights/small_frac_0.1/kind=attention": 4 / 12,
      "weights/small_frac_0.01/kind=mlp": 0.0,
      "weights/small_frac_0.1/kind=mlp": 1 / 4,
      "weights/small_frac_0.01/kind=token_embedding": 3 / 8,
      "weights/small_frac_0.1/kind=token_embedding": 3 / 8,
      "weights/small_frac_0.01": 6 / 24,  # 8 + 4 + 4 + 8 entries
      "weights/small_frac_0.1": 8 / 24,
  }
  assert got.keys() == want.keys()  # the bias (ndim 1) is left out
  for k, v in want.items():
    np.testing.assert_allclose(got[k], v, rtol=1e-6, err_msg=k)


def test_probe_tokens_are_a_fixed_slice_of_an_eval_batch():
  batch = np.arange(5 * 9).reshape(5, 9)
  np.testing.assert_array_equal(probes.probe_tokens(batch, 2), batch[:2, :-1])
