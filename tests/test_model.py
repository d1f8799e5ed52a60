"""The GPT: shapes, causality, LayerNorm placement, tied/untied embeddings, GQA, config errors."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxopt_study import presets
from jaxopt_study.models import gpt

V, T = 96, 12


def _model_config(**overrides):
  m = presets.get_config("tiny").model
  m.num_layers, m.d_model, m.num_heads, m.max_len = 2, 32, 4, 16
  for k, v in overrides.items():
    m[k] = v
  return m


def _model(**overrides):
  return gpt.GPT(gpt.from_config(_model_config(**overrides), V))


def _init(model):
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, T), 0, V)
  params = nn.meta.unbox(model.init(jax.random.PRNGKey(0), tokens)["params"])
  return params, tokens


@pytest.mark.parametrize("ln_position", ["pre", "post"])
def test_causal(ln_position):
  """Changing token t changes no logit before t."""
  model = _model(ln_position=ln_position)
  params, tokens = _init(model)
  logits = model.apply({"params": params}, tokens)
  assert logits.shape == (2, T, V) and logits.dtype == jnp.float32
  changed = tokens.at[:, 7].set((tokens[:, 7] + 1) % V)
  logits2 = model.apply({"params": params}, changed)
  np.testing.assert_allclose(logits[:, :7], logits2[:, :7], atol=1e-6)
  assert not np.allclose(logits[:, 7:], logits2[:, 7:])


def test_parameter_tree_and_ln_placement():
  pre, _ = _init(_model())
  post, _ = _init(_model(ln_position="post"))
  assert {"wte", "wpe", "block_0", "block_1", "ln_f", "lm_head"} == set(pre)
  assert "ln_f" not in post  # post-LN ends with the last block's LayerNorm
  assert pre["block_0"]["attn"]["query"]["kernel"].shape == (32, 4, 8)


def test_untied_embedding_gradient_is_zero_on_absent_tokens_tied_is_dense():
  for tie, expect_sparse in [(False, True), (True, False)]:
    model = _model(tie_embeddings=tie)
    params, tokens = _init(model)
    tokens = jnp.arange(2 * T).reshape(2, T) % 10  # ids 0..9 occur (as inputs), no others

    def loss(p):
      logits = model.apply({"params": p}, tokens[:, :-1])
      return -jnp.mean(jax.nn.log_softmax(logits)[..., 0])

    g = jax.grad(loss)(params)["wte"]["embedding"]
    zero_rows = np.all(np.asarray(g) == 0, axis=1)
    assert zero_rows[10:].all() == expect_sparse
    assert not zero_rows[:10].any()
    assert ("lm_head" in params) != tie


def test_grouped_query_attention_matches_repeated_kv_heads():
  model = _model(num_kv_heads=2)
  params, tokens = _init(model)
  assert params["block_0"]["attn"]["key"]["kernel"].shape == (32, 2, 8)
  # Multi-head attention with each K/V head repeated for its group is the same function.
  mha = _model(num_kv_heads=4)
  p = jax.tree.map(lambda x: x, params)
  for i in range(2):
    for name in ("key", "value"):
      leaf = p[f"block_{i}"]["attn"][name]
      leaf["kernel"] = jnp.repeat(leaf["kernel"], 2, axis=1)
      leaf["bias"] = jnp.repeat(leaf["bias"], 2, axis=0)
  np.testing.assert_allclose(
      model.apply({"params": params}, tokens), mha.apply({"params": p}, tokens), atol=1e-5
  )


@pytest.mark.parametrize("tie", [False, True])
def test_bfloat16_compute_keeps_float32_params_and_matches_float32(tie):
  """bf16 compute: float32 params, bf16 logits (the loss upcasts), values near the f32 model's."""
  model = _model(dtype="bfloat16", tie_embeddings=tie)
  params, tokens = _init(model)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
  logits = model.apply({"params": params}, tokens)
  assert logits.dtype == jnp.bfloat16
  want = _model(tie_embeddings=tie).apply({"params": params}, tokens)
  assert want.dtype == jnp.float32
  np.testing.assert_allclose(logits.astype(jnp.float32), want, atol=0.02 * float(jnp.abs(want).max()))


def test_embedding_gradients_accumulate_in_float32_under_bfloat16_compute():
  """The lookup's transpose (a scatter-add over the batch's tokens) must not add in bfloat16.

  A bf16 scatter-add rounds every partial sum to 8 mantissa bits and ran as one slow kernel
  taking a third of an H100 step (BENCHMARKS.md); looking up in float32 and casting the rows
  makes it a float32 scatter. Checked on the gradient's HLO, where every scatter is listed.
  """
  model = _model(dtype="bfloat16")
  params, tokens = _init(model)
  grad = jax.jit(jax.grad(lambda p: model.apply({"params": p}, tokens).astype(jnp.float32).sum()))
  hlo = grad.lower(params).compiler_ir("hlo").as_hlo_text()
  scatters = [l for l in hlo.splitlines() if " scatter(" in l]
  assert scatters, "expected the token lookup's gradient to be a scatter-add"
  assert all(" f32[" in l.split("scatter(")[0] for l in scatters), scatters


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("num_heads", 5, r"config\.model\.d_model=32 is not divisible by config\.model\.num_heads=5"),
        ("num_kv_heads", 3, r"config\.model\.num_kv_heads=3"),
        ("ln_position", "middle", r"config\.model\.ln_position"),
        ("dtype", "float8", r"config\.model\.dtype"),
        ("attention_impl", "flash", r"config\.model\.attention_impl='flash'; valid: \['auto', 'cudnn', 'xla'\]"),
    ],
)
def test_bad_model_config(field, value, match):
  with pytest.raises(ValueError, match=match):
    _model(**{field: value})


@pytest.mark.parametrize("impl", ["auto", "xla", "cudnn", None])
def test_attention_impl_is_a_string_field(impl):
  """'auto' (jax chooses), 'xla', 'cudnn'; None (older configs) means 'auto'."""
  assert _model(attention_impl=impl).cfg.attention_impl == (impl or "auto")
