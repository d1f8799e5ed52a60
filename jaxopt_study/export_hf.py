"""Export a trained GPT to the Hugging Face GPT-2 format (``config.json`` + ``model.safetensors``).

The directory loads with ``transformers.GPT2LMHeadModel.from_pretrained(dir)`` (and so with tools
built on it, such as lm-evaluation-harness, given a tokenizer: the run's SentencePiece model or
the synthetic ids are not a GPT-2 tokenizer and are not exported).

GPT-2 can represent our model when it is pre-LN (``config.model.ln_position='pre'``), uses
multi-head attention (``config.model.num_kv_heads`` 0 or equal to ``num_heads``) and learned
positions (always here); ``check_exportable`` names the field otherwise. HF's ``Conv1D`` computes
``y = x @ W + b`` with ``W`` stored [in, out] (the transpose of ``nn.Linear``), so our kernels keep
their layout, flattened. With D = d_model, H heads of K = D / H, F = mlp width, V vocabulary:

  ours (flax params)                          HF GPT2LMHeadModel state dict
  wte/embedding              [V, D]           transformer.wte.weight             [V, D]
  wpe/embedding              [T, D]           transformer.wpe.weight             [T, D]
  block_i/ln_attn/{scale,bias}                transformer.h.i.ln_1.{weight,bias}
  block_i/attn/{query,key,value}/kernel       transformer.h.i.attn.c_attn.weight [D, 3D]
      each [D, H, K] -> [D, H*K], concatenated q | k | v on the output axis (HF splits the
      output in three and each third into heads as h * K + k: C order of [H, K])
  block_i/attn/{query,key,value}/bias [H, K]  transformer.h.i.attn.c_attn.bias   [3D]
  block_i/attn/out/kernel    [H, K, D]        transformer.h.i.attn.c_proj.weight [D, D] (H*K, D)
  block_i/attn/out/bias      [D]              transformer.h.i.attn.c_proj.bias
  block_i/ln_mlp/{scale,bias}                 transformer.h.i.ln_2.{weight,bias}
  block_i/mlp/fc/{kernel [D, F], bias}        transformer.h.i.mlp.c_fc.{weight [D, F], bias}
  block_i/mlp/proj/{kernel [F, D], bias}      transformer.h.i.mlp.c_proj.{weight [F, D], bias}
  ln_f/{scale,bias}                           transformer.ln_f.{weight,bias}
  lm_head/kernel             [D, V]           lm_head.weight [V, D] (nn.Linear: transposed);
                                              absent when tied (tie_word_embeddings true)

The rest of the architecture matches GPT-2's: LayerNorm eps 1e-5, tanh-approximated GELU
(``gelu_new``), attention scaled by 1/sqrt(K), causal. Vocabulary padding: by default every
padded row is exported and ``vocab_size`` is the padded size, so the logits are ours exactly;
``vocab_size=n`` keeps only the first n rows (the tokenizer's size), which renormalises the
softmax over real tokens only (the padded ids are never targets, so their probability is tiny
but not zero).
"""

from __future__ import annotations

import json
import os

import numpy as np
import safetensors.numpy

from jaxopt_study.models import gpt

CONFIG, WEIGHTS = "config.json", "model.safetensors"


def check_exportable(cfg: gpt.GPTConfig) -> None:
  """Raises ValueError naming the config field when GPT-2 cannot represent the model."""
  if cfg.ln_position != "pre":
    raise ValueError(
        f"config.model.ln_position={cfg.ln_position!r}: GPT-2 is pre-LN (LayerNorm before each "
        "sub-block, a final ln_f); only runs with config.model.ln_position='pre' can be exported."
    )
  if cfg.num_kv_heads != cfg.num_heads:
    raise ValueError(
        f"config.model.num_kv_heads={cfg.num_kv_heads} with num_heads={cfg.num_heads}: GPT-2 has "
        "multi-head attention only; export runs with config.model.num_kv_heads=0 (or = num_heads)."
    )


def gpt2_config(cfg: gpt.GPTConfig, *, vocab_size: int | None = None) -> dict:
  """HF ``GPT2Config`` fields of ``cfg`` (vocab_size: exported rows, default all padded rows)."""
  return {
      "architectures": ["GPT2LMHeadModel"],
      "model_type": "gpt2",
      "vocab_size": int(vocab_size or cfg.vocab_size),
      "n_positions": cfg.max_len,
      "n_embd": cfg.d_model,
      "n_layer": cfg.num_layers,
      "n_head": cfg.num_heads,
      "n_inner": cfg.mlp_dim,
      "activation_function": "gelu_new",  # 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
      "layer_norm_epsilon": 1e-5,
      "resid_pdrop": cfg.dropout_rate,
      "embd_pdrop": cfg.dropout_rate,
      "attn_pdrop": 0.0,  # our attention has no dropout on its probabilities
      "initializer_range": cfg.init_std,
      "scale_attn_weights": True,
      "scale_attn_by_inverse_layer_idx": False,
      "reorder_and_upcast_attn": False,
      "tie_word_embeddings": cfg.tie_embeddings,
      "bos_token_id": None,  # the run's tokenizer is not GPT-2's; set these with the tokenizer
      "eos_token_id": None,
      "torch_dtype": "float32",
  }


def gpt2_state_dict(p, cfg: gpt.GPTConfig, *,
                    vocab_size: int | None = None) -> dict[str, np.ndarray]:
  """HF GPT-2 tensors (float32 NumPy, C-contiguous) of our params ``p`` (mapping in module doc)."""
  check_exportable(cfg)
  v = int(vocab_size or cfg.vocab_size)
  if not 0 < v <= cfg.vocab_size:
    raise ValueError(f"vocab_size={v} must be in [1, {cfg.vocab_size}] (the checkpoint's rows).")
  f32 = lambda x: np.ascontiguousarray(np.asarray(x, np.float32))
  d = cfg.d_model
  # use_bias=False: HF GPT-2 always has biases; zeros compute the same function.
  bias = lambda m, n: f32(m["bias"]) if "bias" in m else np.zeros(n, np.float32)
  out = {
      "transformer.wte.weight": f32(p["wte"]["embedding"])[:v],
      "transformer.wpe.weight": f32(p["wpe"]["embedding"]),
      "transformer.ln_f.weight": f32(p["ln_f"]["scale"]),
      "transformer.ln_f.bias": bias(p["ln_f"], d),
  }
  for i in range(cfg.num_layers):
    b, h = p[f"block_{i}"], f"transformer.h.{i}."
    attn, mlp = b["attn"], b["mlp"]
    qkv = ("query", "key", "value")
    out.update({
        h + "ln_1.weight": f32(b["ln_attn"]["scale"]),
        h + "ln_1.bias": bias(b["ln_attn"], d),
        h + "attn.c_attn.weight": np.concatenate(
            [f32(attn[n]["kernel"]).reshape(d, -1) for n in qkv], axis=1),  # [D, 3D]
        h + "attn.c_attn.bias": np.concatenate(
            [bias(attn[n], attn[n]["kernel"].shape[1:]).reshape(-1) for n in qkv]),
        h + "attn.c_proj.weight": f32(attn["out"]["kernel"]).reshape(-1, d),  # [H*K, D]
        h + "attn.c_proj.bias": bias(attn["out"], d),
        h + "ln_2.weight": f32(b["ln_mlp"]["scale"]),
        h + "ln_2.bias": bias(b["ln_mlp"], d),
        h + "mlp.c_fc.weight": f32(mlp["fc"]["kernel"]),
        h + "mlp.c_fc.bias": bias(mlp["fc"], mlp["fc"]["kernel"].shape[1]),
        h + "mlp.c_proj.weight": f32(mlp["proj"]["kernel"]),
        h + "mlp.c_proj.bias": bias(mlp["proj"], d),
    })
  if not cfg.tie_embeddings:
    out["lm_head.weight"] = f32(p["lm_head"]["kernel"]).T[:v]  # [V, D]
  return {k: np.ascontiguousarray(x) for k, x in out.items()}


def export(params, cfg: gpt.GPTConfig, out_dir: str, *, vocab_size: int | None = None) -> str:
  """Writes ``out_dir/config.json`` and ``out_dir/model.safetensors``; returns ``out_dir``."""
  tensors = gpt2_state_dict(params, cfg, vocab_size=vocab_size)
  os.makedirs(out_dir, exist_ok=True)
  safetensors.numpy.save_file(tensors, os.path.join(out_dir, WEIGHTS), metadata={"format": "pt"})
  with open(os.path.join(out_dir, CONFIG), "w") as f:
    json.dump(gpt2_config(cfg, vocab_size=vocab_size), f, indent=2)
  return out_dir
