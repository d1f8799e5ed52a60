"""A decoder-only GPT in Flax (linen), written for optimizer studies.

What matters for the study, and why each option exists:

* ``ln_position``: 'pre' (GPT-2, default) or 'post' (original Transformer). LayerNorm placement
  drives how unevenly gradient norms spread over blocks (gradient heterogeneity, arXiv
  2502.00213), which is the regime where SGD falls behind Adam.
* ``tie_embeddings``: with tied weights the softmax touches every embedding row every step, so
  embedding-gradient sparsity is invisible. Untied (default here) keeps the input embedding's
  gradient exactly zero on rows of tokens absent from the batch.
* ``num_kv_heads``: grouped-query attention (num_kv_heads < num_heads), multi-query at 1.
* ``num_experts``: a mixture-of-experts MLP (models/moe.py) in every ``moe_every``-th block;
  each expert is an explicit source of sparse gradients.
* Parameters are float32; ``dtype`` is the compute dtype (bfloat16 on accelerators).
* Attention goes through ``jax.nn.dot_product_attention`` so cuDNN flash attention is used on
  GPU (``attention_impl='cudnn'``) and XLA's elsewhere.

Every parameter carries logical axis names ('vocab', 'embed', 'heads', 'kv', 'mlp', ...);
``sharding.py`` maps them onto the device mesh. The parameter tree is listed in docs/DESIGN.md.
Blocks are unrolled (block_0, block_1, ...) so that per-layer diagnostics need no slicing.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxopt_study.models import moe as moe_lib

Dtype = Any

# Logical axis names used on activations; sharding.py maps them to mesh axes.
BATCH, LENGTH, EMBED = "activation_batch", "activation_length", "activation_embed"


@dataclasses.dataclass(frozen=True)
class GPTConfig:
  """Static model hyper-parameters (built from ``config.model`` by ``from_config``)."""

  vocab_size: int
  max_len: int
  num_layers: int
  d_model: int
  num_heads: int
  num_kv_heads: int
  mlp_dim: int
  dropout_rate: float = 0.0
  ln_position: str = "pre"
  tie_embeddings: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_impl: str | None = None  # None: XLA picks; 'cudnn': flash attention on GPU.
  remat: str = "none"  # 'none' | 'full' | 'dots' (save matmul outputs only)
  init_std: float = 0.02
  # Mixture of experts (models/moe.py); num_experts = 0: dense MLP in every block.
  num_experts: int = 0
  moe_top_k: int = 1
  moe_capacity_factor: float = 1.25
  moe_every: int = 1  # block i has the MoE MLP iff i % moe_every == moe_every - 1
  moe_aux_loss_coef: float = 0.01  # read by train.train_step, not by the model

  @property
  def head_dim(self) -> int:
    return self.d_model // self.num_heads

  def is_moe_block(self, i: int) -> bool:
    return self.num_experts > 0 and i % self.moe_every == self.moe_every - 1


_INIT = nn.initializers.normal


class Projection(nn.Module):
  """y = einsum(x, kernel) + bias with logically-partitioned float32 params, ``dtype`` compute.

  ``spec`` is an einsum such as 'btd,dhk->bthk'; the kernel's shape is ``shape`` and its logical
  axis names ``axes``; the bias covers the output's trailing (non batch/length) axes.
  """

  spec: str
  shape: tuple[int, ...]
  axes: tuple[str, ...]
  bias_ndim: int
  cfg: GPTConfig
  std: float
  use_bias: bool = True

  @nn.compact
  def __call__(self, x):
    cfg = self.cfg
    kernel = self.param(
        "kernel", nn.with_logical_partitioning(_INIT(self.std), self.axes), self.shape,
        cfg.param_dtype,
    )
    y = jnp.einsum(self.spec, x.astype(cfg.dtype), kernel.astype(cfg.dtype))
    if self.use_bias:
      bias_shape = self.shape[-self.bias_ndim:]
      bias = self.param(
          "bias", nn.with_logical_partitioning(nn.initializers.zeros, self.axes[-self.bias_ndim:]),
          bias_shape, cfg.param_dtype,
      )
      y = y + bias.astype(cfg.dtype)
    return y


def _layer_norm(name, cfg: GPTConfig):
  return nn.LayerNorm(
      epsilon=1e-5,
      dtype=cfg.dtype,
      param_dtype=cfg.param_dtype,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)),
      name=name,
  )


class CausalSelfAttention(nn.Module):
  cfg: GPTConfig

  @nn.compact
  def __call__(self, x, *, deterministic: bool):
    cfg = self.cfg
    d, h, g, k = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    # GPT-2's residual-projection init: std / sqrt(2 * num_layers).
    out_std = cfg.init_std / (2 * cfg.num_layers) ** 0.5
    proj = functools.partial(Projection, cfg=cfg, std=cfg.init_std, bias_ndim=2)
    q = proj("btd,dhk->bthk", (d, h, k), ("embed", "heads", "kv"), name="query")(x)  # [B,T,H,K]
    kk = proj("btd,dgk->btgk", (d, g, k), ("embed", "kv_heads", "kv"), name="key")(x)  # [B,T,G,K]
    v = proj("btd,dgk->btgk", (d, g, k), ("embed", "kv_heads", "kv"), name="value")(x)  # [B,T,G,K]
    # jax.nn.dot_product_attention handles grouped K/V heads (H % G == 0) itself.
    y = jax.nn.dot_product_attention(
        q, kk, v, is_causal=True, implementation=cfg.attention_impl
    )  # [B, T, H, K]
    y = Projection(
        "bthk,hkd->btd", (h, k, d), ("heads", "kv", "embed"), 1, cfg, out_std, name="out"
    )(y)  # [B, T, D]
    return nn.Dropout(cfg.dropout_rate)(y, deterministic=deterministic)


class MLP(nn.Module):
  cfg: GPTConfig

  @nn.compact
  def __call__(self, x, *, deterministic: bool):
    cfg = self.cfg
    d, f = cfg.d_model, cfg.mlp_dim
    out_std = cfg.init_std / (2 * cfg.num_layers) ** 0.5
    x = Projection("btd,df->btf", (d, f), ("embed", "mlp"), 1, cfg, cfg.init_std, name="fc")(x)
    x = nn.gelu(x, approximate=True)  # [B, T, F]
    x = Projection("btf,fd->btd", (f, d), ("mlp", "embed"), 1, cfg, out_std, name="proj")(x)
    return nn.Dropout(cfg.dropout_rate)(x, deterministic=deterministic)


class Block(nn.Module):
  """One transformer block; pre-LN: x + f(LN(x)); post-LN: LN(x + f(x)).

  ``moe``: the MLP is a mixture of experts (models/moe.py) instead of the dense one.
  """

  cfg: GPTConfig
  moe: bool = False

  @nn.compact
  def __call__(self, x, deterministic: bool):
    cfg = self.cfg
    attn = CausalSelfAttention(cfg, name="attn")
    mlp = moe_lib.MoEMLP(cfg, name="mlp") if self.moe else MLP(cfg, name="mlp")
    ln_attn, ln_mlp = _layer_norm("ln_attn", cfg), _layer_norm("ln_mlp", cfg)
    if cfg.ln_position == "pre":
      x = x + attn(ln_attn(x), deterministic=deterministic)
      x = x + mlp(ln_mlp(x), deterministic=deterministic)
    else:
      x = ln_attn(x + attn(x, deterministic=deterministic))
      x = ln_mlp(x + mlp(x, deterministic=deterministic))
    return nn.with_logical_constraint(x, (BATCH, LENGTH, EMBED))


_REMAT_POLICIES = {
    "full": None,  # recompute everything in the backward pass
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class GPT(nn.Module):
  """tokens [B, T] int -> logits [B, T, V] float32."""

  cfg: GPTConfig

  @nn.compact
  def __call__(self, tokens, *, deterministic: bool = True):
    cfg = self.cfg
    b, t = tokens.shape
    if t > cfg.max_len:
      raise ValueError(f"sequence length {t} > config.model.max_len={cfg.max_len}")
    wte = nn.Embed(
        cfg.vocab_size,
        cfg.d_model,
        dtype=cfg.dtype,
        param_dtype=cfg.param_dtype,
        embedding_init=nn.with_logical_partitioning(_INIT(cfg.init_std), ("vocab", "embed")),
        name="wte",
    )
    wpe = nn.Embed(
        cfg.max_len,
        cfg.d_model,
        dtype=cfg.dtype,
        param_dtype=cfg.param_dtype,
        embedding_init=nn.with_logical_partitioning(_INIT(0.01), ("length", "embed")),
        name="wpe",
    )
    x = wte(tokens) + wpe(jnp.arange(t)[None, :])  # [B, T, D]
    x = nn.Dropout(cfg.dropout_rate)(x, deterministic=deterministic)
    x = nn.with_logical_constraint(x, (BATCH, LENGTH, EMBED))

    block = Block
    if cfg.remat != "none":
      block = nn.remat(Block, policy=_REMAT_POLICIES[cfg.remat], static_argnums=(2,))
    for i in range(cfg.num_layers):
      x = block(cfg, moe=cfg.is_moe_block(i), name=f"block_{i}")(x, deterministic)

    if cfg.ln_position == "pre":
      x = _layer_norm("ln_f", cfg)(x)
    if cfg.tie_embeddings:
      logits = wte.attend(x)  # [B, T, V]
    else:
      logits = Projection(
          "btd,dv->btv", (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), 0, cfg,
          cfg.init_std, use_bias=False, name="lm_head",
      )(x)  # [B, T, V]
    # The softmax cross-entropy is computed in float32 whatever the compute dtype.
    return logits.astype(jnp.float32)


_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
LN_POSITIONS = ("pre", "post")


def from_config(model_config, vocab_size: int) -> GPTConfig:
  """Builds a GPTConfig from ``config.model``; errors name the field to fix."""
  m = model_config
  if m.dtype not in _DTYPES:
    raise ValueError(f"config.model.dtype={m.dtype!r}; valid: {sorted(_DTYPES)}")
  if m.ln_position not in LN_POSITIONS:
    raise ValueError(f"config.model.ln_position={m.ln_position!r}; valid: {LN_POSITIONS}")
  if m.remat not in ("none", *_REMAT_POLICIES):
    raise ValueError(f"config.model.remat={m.remat!r}; valid: {('none', *_REMAT_POLICIES)}")
  if m.d_model % m.num_heads:
    raise ValueError(
        f"config.model.d_model={m.d_model} is not divisible by config.model.num_heads="
        f"{m.num_heads}; choose num_heads dividing d_model."
    )
  num_kv_heads = m.num_kv_heads or m.num_heads
  if m.num_heads % num_kv_heads:
    raise ValueError(
        f"config.model.num_heads={m.num_heads} is not divisible by config.model.num_kv_heads="
        f"{num_kv_heads}; grouped-query attention needs num_heads % num_kv_heads == 0."
    )
  moe = _moe_fields(m)
  if m.attention_impl not in (None, "xla", "cudnn"):
    raise ValueError(
        f"config.model.attention_impl={m.attention_impl!r}; valid: None, 'xla', 'cudnn'"
    )
  return GPTConfig(
      vocab_size=vocab_size,
      max_len=m.max_len,
      num_layers=m.num_layers,
      d_model=m.d_model,
      num_heads=m.num_heads,
      num_kv_heads=num_kv_heads,
      mlp_dim=m.mlp_ratio * m.d_model,
      dropout_rate=m.dropout_rate,
      ln_position=m.ln_position,
      tie_embeddings=m.tie_embeddings,
      dtype=_DTYPES[m.dtype],
      attention_impl=m.attention_impl,
      remat=m.remat,
      **moe,
  )


def _moe_fields(m) -> dict[str, Any]:
  """The checked mixture-of-experts fields of ``config.model`` (models/moe.py); a config saved
  before they existed (an older run's config.json) gets the dense defaults."""
  names = ("num_experts", "moe_top_k", "moe_capacity_factor", "moe_every", "moe_aux_loss_coef")
  moe = {n: m.get(n, GPTConfig.__dataclass_fields__[n].default) for n in names}
  e, k, cf, every, coef = (moe[n] for n in names)
  if not isinstance(e, int) or e < 0:
    raise ValueError(f"config.model.num_experts={e!r} must be an integer >= 0 (0: dense MLP).")
  if not e:
    return moe
  if k not in moe_lib.TOP_K or k > e:
    raise ValueError(f"config.model.moe_top_k={k!r}; valid: {moe_lib.TOP_K}, at most "
                     f"config.model.num_experts={e}.")
  if not cf > 0:
    raise ValueError(f"config.model.moe_capacity_factor={cf!r} must be > 0 "
                     f"({e / k:g} = num_experts / moe_top_k drops no token).")
  if not coef >= 0:
    raise ValueError(f"config.model.moe_aux_loss_coef={coef!r} must be >= 0.")
  if not isinstance(every, int) or not 1 <= every <= m.num_layers:
    raise ValueError(f"config.model.moe_every={every!r} must be an integer in [1, "
                     f"config.model.num_layers={m.num_layers}] (block i is MoE iff "
                     "i % moe_every == moe_every - 1).")
  return moe
