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
* Parameters are float32; ``dtype`` is the compute dtype (bfloat16 on accelerators). The logits
  come out in ``dtype`` too: the loss upcasts them inside its own fused kernels
  (``train.cross_entropy``), so no float32 [B, T, V] copy is ever written.
* Embeddings are looked up in the parameters' dtype and the rows cast to ``dtype`` afterwards, so
  the lookup's gradient is a float32 scatter-add into the [V, D] table (hardware atomics on GPU).
  Casting the table first (flax ``nn.Embed(dtype=bfloat16)``) makes it a bfloat16 scatter-add,
  which took a third of an H100 step (BENCHMARKS.md) and rounds every partial sum to 8 bits of
  mantissa. The forward values are the same either way.
* Attention goes through ``jax.nn.dot_product_attention``: ``attention_impl`` 'auto' lets jax
  choose, 'xla' or 'cudnn' (flash attention on GPU) force one.
* Inside the blocks and the head, activations are token rows [N = B * T, D]: every projection is
  a 2-D matrix product and every LayerNorm works on 2-D arrays. With [B, T, D] activations, XLA
  stored the residual stream batch-minor around the LayerNorms at B=32 on an H100 and spent
  ~13 ms of a 75 ms step in transposes; on rows the step took 68 ms (BENCHMARKS.md).

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
  use_bias: bool = True  # projection and LayerNorm biases (GPT-2); MoE experts keep theirs
  tie_embeddings: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_impl: str = "auto"  # A key of ATTENTION_IMPLS.
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

  ``spec`` is an einsum such as 'nd,dhk->nhk'; the kernel's shape is ``shape`` and its logical
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
    if self.use_bias and cfg.use_bias:
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
      use_bias=cfg.use_bias,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)),
      name=name,
  )


class CausalSelfAttention(nn.Module):
  cfg: GPTConfig

  @nn.compact
  def __call__(self, x, *, batch: int, deterministic: bool):
    """x: [N, D] token rows (N = batch * T) -> [N, D]."""
    cfg = self.cfg
    d, h, g, k = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    rows = lambda y: y.reshape(batch, -1, *y.shape[1:])  # [N, ...] -> [B, T, ...]
    # GPT-2's residual-projection init: std / sqrt(2 * num_layers).
    out_std = cfg.init_std / (2 * cfg.num_layers) ** 0.5
    proj = functools.partial(Projection, cfg=cfg, std=cfg.init_std, bias_ndim=2)
    q = rows(proj("nd,dhk->nhk", (d, h, k), ("embed", "heads", "kv"), name="query")(x))
    kk = rows(proj("nd,dgk->ngk", (d, g, k), ("embed", "kv_heads", "kv"), name="key")(x))
    v = rows(proj("nd,dgk->ngk", (d, g, k), ("embed", "kv_heads", "kv"), name="value")(x))
    # q: [B, T, H, K]; kk, v: [B, T, G, K]
    # jax.nn.dot_product_attention handles grouped K/V heads (H % G == 0) itself.
    y = jax.nn.dot_product_attention(
        q, kk, v, is_causal=True, implementation=ATTENTION_IMPLS[cfg.attention_impl]
    ).reshape(x.shape[0], h, k)  # [N, H, K]
    y = Projection(
        "nhk,hkd->nd", (h, k, d), ("heads", "kv", "embed"), 1, cfg, out_std, name="out"
    )(y)  # [N, D]
    return nn.Dropout(cfg.dropout_rate)(y, deterministic=deterministic)


class MLP(nn.Module):
  cfg: GPTConfig

  @nn.compact
  def __call__(self, x, *, deterministic: bool):
    cfg = self.cfg
    d, f = cfg.d_model, cfg.mlp_dim
    out_std = cfg.init_std / (2 * cfg.num_layers) ** 0.5
    x = Projection("nd,df->nf", (d, f), ("embed", "mlp"), 1, cfg, cfg.init_std, name="fc")(x)
    x = nn.gelu(x, approximate=True)  # [N, F]
    x = Projection("nf,fd->nd", (f, d), ("mlp", "embed"), 1, cfg, out_std, name="proj")(x)
    return nn.Dropout(cfg.dropout_rate)(x, deterministic=deterministic)


class Block(nn.Module):
  """One transformer block; pre-LN: x + f(LN(x)); post-LN: LN(x + f(x)).

  [B, T, D] -> [B, T, D]; inside, token rows [N = B * T, D] (see the module docstring).
  ``moe``: the MLP is a mixture of experts (models/moe.py; it routes within each sequence, so
  it sees [B, T, D]) instead of the dense one.
  """

  cfg: GPTConfig
  moe: bool = False

  @nn.compact
  def __call__(self, x, deterministic: bool):
    cfg = self.cfg
    b, t, d = x.shape
    attn = functools.partial(CausalSelfAttention(cfg, name="attn"), batch=b,
                             deterministic=deterministic)
    if self.moe:
      moe_mlp = moe_lib.MoEMLP(cfg, name="mlp")
      mlp = lambda h: moe_mlp(h.reshape(b, t, d), deterministic=deterministic).reshape(b * t, d)
    else:
      mlp = functools.partial(MLP(cfg, name="mlp"), deterministic=deterministic)
    ln_attn, ln_mlp = _layer_norm("ln_attn", cfg), _layer_norm("ln_mlp", cfg)
    x = x.reshape(b * t, d)  # [N, D]
    if cfg.ln_position == "pre":
      x = x + attn(ln_attn(x))
      x = x + mlp(ln_mlp(x))
    else:
      x = ln_attn(x + attn(x))
      x = ln_mlp(x + mlp(x))
    return nn.with_logical_constraint(x.reshape(b, t, d), (BATCH, LENGTH, EMBED))


_REMAT_POLICIES = {
    "full": None,  # recompute everything in the backward pass
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class GPT(nn.Module):
  """tokens [B, T] int -> logits [B, T, V] in the compute dtype (``cfg.dtype``)."""

  cfg: GPTConfig

  @nn.compact
  def __call__(self, tokens, *, deterministic: bool = True):
    cfg = self.cfg
    b, t = tokens.shape
    if t > cfg.max_len:
      raise ValueError(f"sequence length {t} > config.model.max_len={cfg.max_len}")
    # dtype=param_dtype: the lookup happens in float32 and the rows are cast afterwards (see the
    # module docstring); the head casts the whole table instead.
    embed = functools.partial(nn.Embed, features=cfg.d_model, dtype=cfg.param_dtype,
                              param_dtype=cfg.param_dtype)
    wte = embed(cfg.vocab_size, name="wte", embedding_init=nn.with_logical_partitioning(
        _INIT(cfg.init_std), ("vocab", "embed")))
    wpe = embed(cfg.max_len, name="wpe", embedding_init=nn.with_logical_partitioning(
        _INIT(0.01), ("length", "embed")))
    # Positions 0..t-1 are a slice of the table: its gradient is a pad, not a scatter. Each term
    # is cast before the sum, so the forward values are exactly flax's nn.Embed(dtype=dtype).
    x = wte(tokens).astype(cfg.dtype) + wpe.embedding[None, :t].astype(cfg.dtype)  # [B, T, D]
    x = nn.Dropout(cfg.dropout_rate)(x, deterministic=deterministic)
    x = nn.with_logical_constraint(x, (BATCH, LENGTH, EMBED))

    block = Block
    if cfg.remat != "none":
      block = nn.remat(Block, policy=_REMAT_POLICIES[cfg.remat], static_argnums=(2,))
    for i in range(cfg.num_layers):
      x = block(cfg, moe=cfg.is_moe_block(i), name=f"block_{i}")(x, deterministic)

    x = x.reshape(b * t, cfg.d_model)  # [N, D]
    if cfg.ln_position == "pre":
      x = _layer_norm("ln_f", cfg)(x)
    if cfg.tie_embeddings:
      table = wte.embedding.astype(cfg.dtype)  # [V, D]
      logits = jnp.einsum("nd,vd->nv", x.astype(cfg.dtype), table)  # [N, V]
    else:
      logits = Projection(
          "nd,dv->nv", (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), 0, cfg,
          cfg.init_std, use_bias=False, name="lm_head",
      )(x)  # [N, V]
    return logits.reshape(b, t, cfg.vocab_size)


_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
LN_POSITIONS = ("pre", "post")
# config.model.attention_impl -> jax.nn.dot_product_attention's ``implementation``.
ATTENTION_IMPLS = {"auto": None, "xla": "xla", "cudnn": "cudnn"}


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
  # None: configs written before the field was a string (their meaning was 'auto').
  attention_impl = "auto" if m.attention_impl is None else m.attention_impl
  if attention_impl not in ATTENTION_IMPLS:
    raise ValueError(
        f"config.model.attention_impl={m.attention_impl!r}; valid: {sorted(ATTENTION_IMPLS)}"
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
      use_bias=bool(m.get("use_bias", True)),  # configs saved before the field: GPT-2's biases
      tie_embeddings=m.tie_embeddings,
      dtype=_DTYPES[m.dtype],
      attention_impl=attention_impl,
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
