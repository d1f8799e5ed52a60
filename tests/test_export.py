"""Hugging Face GPT-2 export: an independent NumPy GPT-2 and (where installed) transformers.

``hf_gpt2_logits`` implements GPT-2 as HF's ``GPT2LMHeadModel`` documents it, from the exported
files alone (names, Conv1D [in, out] layouts, config fields), not from our model code; the
exported model must reproduce ``GPT.apply``'s logits.
"""

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
from safetensors.numpy import load_file

from jaxopt_study import checkpointing
from jaxopt_study import export_hf
from jaxopt_study import presets
from jaxopt_study.models import gpt

ROOT = pathlib.Path(__file__).resolve().parents[1]
V_DATA, V_PADDED, T, B = 37, 64, 8, 2
CFG = gpt.GPTConfig(vocab_size=V_PADDED, max_len=T, num_layers=2, d_model=16, num_heads=4,
                    num_kv_heads=4, mlp_dim=64, init_std=0.2)


def _params(cfg, seed=0):
  """Initial parameters with every leaf perturbed: biases and LayerNorms non-trivial too."""
  p = nn.meta.unbox(gpt.GPT(cfg).init(jax.random.PRNGKey(seed), jnp.zeros((1, T), jnp.int32)))
  leaves, tree = jax.tree.flatten(p["params"])
  keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(leaves))
  return jax.tree.unflatten(
      tree, [x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
  )


def _tokens():
  return np.asarray(jax.random.randint(jax.random.PRNGKey(3), (B, T), 0, V_DATA))


# --------------------------------------------------------------- GPT-2 by hand, from the export


def _layer_norm(x, w, b, eps):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * w + b


def _gelu_new(x):
  return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))


def hf_gpt2_logits(export_dir, tokens):
  """GPT2LMHeadModel's forward in float64 NumPy from config.json + model.safetensors."""
  conf = json.load(open(os.path.join(export_dir, "config.json")))
  tensors = load_file(os.path.join(export_dir, "model.safetensors"))
  w = {k: v.astype(np.float64) for k, v in tensors.items()}
  assert conf["activation_function"] == "gelu_new" and conf["model_type"] == "gpt2"
  n_head, eps, (b, t) = conf["n_head"], conf["layer_norm_epsilon"], tokens.shape
  x = w["transformer.wte.weight"][tokens] + w["transformer.wpe.weight"][:t]
  causal = np.tril(np.ones((t, t), bool))
  for i in range(conf["n_layer"]):
    pre = f"transformer.h.{i}."
    a = _layer_norm(x, w[pre + "ln_1.weight"], w[pre + "ln_1.bias"], eps)
    qkv = a @ w[pre + "attn.c_attn.weight"] + w[pre + "attn.c_attn.bias"]  # Conv1D: x W + b
    q, k, v = np.split(qkv, 3, axis=-1)
    heads = lambda z: z.reshape(b, t, n_head, -1).transpose(0, 2, 1, 3)  # [B, H, T, K]
    q, k, v = heads(q), heads(k), heads(v)
    scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(q.shape[-1])
    scores = np.where(causal, scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    y = (probs @ v).transpose(0, 2, 1, 3).reshape(b, t, -1)
    x = x + y @ w[pre + "attn.c_proj.weight"] + w[pre + "attn.c_proj.bias"]
    m = _layer_norm(x, w[pre + "ln_2.weight"], w[pre + "ln_2.bias"], eps)
    m = _gelu_new(m @ w[pre + "mlp.c_fc.weight"] + w[pre + "mlp.c_fc.bias"])
    x = x + m @ w[pre + "mlp.c_proj.weight"] + w[pre + "mlp.c_proj.bias"]
  x = _layer_norm(x, w["transformer.ln_f.weight"], w["transformer.ln_f.bias"], eps)
  head = w["transformer.wte.weight"] if conf["tie_word_embeddings"] else w["lm_head.weight"]
  assert ("lm_head.weight" in w) != conf["tie_word_embeddings"]
  assert head.shape[0] == conf["vocab_size"]
  return x @ head.T  # [B, T, V]


CASES = {
    "untied": (dict(tie_embeddings=False), None),
    "tied": (dict(tie_embeddings=True), None),
    "untied_cropped": (dict(tie_embeddings=False), V_DATA),
    "tied_cropped": (dict(tie_embeddings=True), V_DATA),
    "no_bias": (dict(tie_embeddings=True, use_bias=False), None),  # exported with zero biases
}


@pytest.fixture(scope="module", params=sorted(CASES))
def exported(request, tmp_path_factory):
  overrides, vocab = CASES[request.param]
  cfg = dataclasses.replace(CFG, **overrides)
  params = _params(cfg)
  out = export_hf.export(params, cfg, str(tmp_path_factory.mktemp(request.param)), vocab_size=vocab)
  ours = np.asarray(gpt.GPT(cfg).apply({"params": params}, _tokens()))
  return out, ours[..., : vocab or V_PADDED]


def test_use_bias_false_leaves_no_bias_parameter():
  params = _params(dataclasses.replace(CFG, use_bias=False))
  paths = ["/".join(str(k.key) for k in kp) for kp, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  assert paths and not [p for p in paths if p.endswith("bias")]


def test_numpy_gpt2_reproduces_our_logits(exported):
  out, ours = exported
  np.testing.assert_allclose(hf_gpt2_logits(out, _tokens()), ours, atol=1e-4, rtol=1e-4)


def test_transformers_reproduces_our_logits(exported):
  """Runs only where torch and transformers are installed, not in CI (too large to install
  there); passed with torch 2.13.0 (CPU) and transformers 5.24.0 on 2026-11-25."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  out, ours = exported
  model = transformers.GPT2LMHeadModel.from_pretrained(out, attn_implementation="eager").eval()
  with torch.no_grad():
    logits = model(torch.tensor(_tokens(), dtype=torch.long)).logits.numpy()
  np.testing.assert_allclose(logits, ours, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("field,overrides", [
    ("config.model.ln_position", dict(ln_position="post")),
    ("config.model.num_kv_heads", dict(num_kv_heads=2)),
])
def test_unrepresentable_models_are_refused_naming_the_field(field, overrides):
  cfg = dataclasses.replace(CFG, **overrides)
  with pytest.raises(ValueError, match=field):
    export_hf.gpt2_state_dict(_params(cfg), cfg)


def test_export_script_on_a_run_directory(tmp_path):
  """scripts/export_hf.py: config.json + an orbax checkpoint in a workdir -> HF directory."""
  config = presets.get_config("tiny", "adamw")
  config.model.num_layers, config.model.d_model, config.model.num_heads = 2, 16, 4
  config.model.max_len = config.seq_len = T
  config.data.vocab_size = V_DATA
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
  cfg = gpt.from_config(config.model, vocab_size=V_PADDED)
  params = _params(cfg)
  mngr = checkpointing.manager(str(workdir / "checkpoints"), keep=1, async_save=False)
  checkpointing.save(mngr, 7, {"step": jnp.int32(7), "params": params})
  mngr.wait_until_finished()
  mngr.close()

  sys.path.insert(0, str(ROOT / "scripts"))
  try:
    import export_hf as export_script  # pylint: disable=g-import-not-at-top
  finally:
    sys.path.pop(0)
  export_script.main([f"--workdir={workdir}", "--crop_vocab"])
  ours = np.asarray(gpt.GPT(cfg).apply({"params": params}, _tokens()))[..., :V_DATA]
  np.testing.assert_allclose(hf_gpt2_logits(str(workdir / "hf"), _tokens()), ours, atol=1e-4,
                             rtol=1e-4)

  post = tmp_path / "post"
  post.mkdir()
  config.model.ln_position = "post"
  (post / "config.json").write_text(config.to_json_best_effort(indent=2))
  with pytest.raises(ValueError, match="config.model.ln_position"):
    export_script.main([f"--workdir={post}"])
