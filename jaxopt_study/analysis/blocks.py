"""The model as ``embed -> block_0 -> ... -> block_{L-1} -> head``, and one forward pass with
per-block interventions that every layer score is built from.

Notation used by all analysis modules: ``h_0 = embed(tokens)`` and ``h_{i+1} = f_i(h_i)``, the
residual stream after block ``i`` (shape [B, T, D]); block ``i``'s *update* is
``delta_i = h_{i+1} - h_i``; logits are ``head(h_L)``. The interventions of ``forward``:

* ``order``  [L] int: position ``k`` applies the weights of block ``order[k]`` (a permutation
  swaps blocks; identity ``arange(L)``);
* ``skip``   [L] bool: position ``k`` is the identity, ``h_{k+1} = h_k``;
* ``affine`` (A [L, D, D], b [L, D], use [L] bool): position ``k`` is ``h_{k+1} = h_k A_k + b_k``
  applied token-wise where ``use[k]``.

All three are traced arrays, so one compiled ``forward`` serves every variant (``lax.map`` over
variants in the score modules). The blocks' parameters are stacked along a new leading axis so a
traced ``order`` can index them.

``ModelParts`` is what the scores need from a model. ``gpt_parts`` builds it for
``models.gpt.GPT`` by applying its own submodules to their parameter subtrees (``gpt.Block`` for
a block, dense or mixture-of-experts: one kind in every block); the embedding and head repeat
``GPT.__call__``'s few lines (``tests/test_analysis.py`` checks that the composition equals
``GPT.apply``). Analysis computes in the parameters' dtype
(float32; float64 in a test), without dropout, whatever the run's compute dtype.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from jaxopt_study.models import gpt

Params = Any


class ModelParts(NamedTuple):
  """A residual model cut into pieces (all pure functions; hashable, so usable as a jit static).

  embed(params, tokens [B, T]) -> h_0 [B, T, D]
  block(block_params, h [B, T, D]) -> h' [B, T, D]   (one block, whole sequence, causal)
  head(params, h_L [B, T, D]) -> logits [B, T, V]
  block_names: the blocks' keys in ``params``, in order.
  """

  embed: Callable[[Params, jax.Array], jax.Array]
  block: Callable[[Params, jax.Array], jax.Array]
  head: Callable[[Params, jax.Array], jax.Array]
  block_names: tuple[str, ...]

  @property
  def num_layers(self) -> int:
    return len(self.block_names)


@functools.lru_cache(maxsize=None)  # one ModelParts per config: jit caches keyed on it hit.
def gpt_parts(cfg: gpt.GPTConfig) -> ModelParts:
  """ModelParts of ``gpt.GPT(cfg)`` computing in the parameters' dtype (float32), no dropout."""
  cfg = dataclasses.replace(
      cfg, dtype=cfg.param_dtype, dropout_rate=0.0, remat="none", attention_impl="xla"
  )
  kinds = {cfg.is_moe_block(i) for i in range(cfg.num_layers)}
  if len(kinds) > 1:  # stacking (and swapping) blocks needs one parameter structure
    raise ValueError(
        f"layer analysis needs blocks of one kind: config.model.moe_every={cfg.moe_every} mixes "
        "dense and mixture-of-experts blocks; analyse a model with moe_every=1 or no experts.")
  block_module = gpt.Block(cfg, moe=kinds.pop())
  embed_mod = lambda n: nn.Embed(n, cfg.d_model, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
  ln_f = nn.LayerNorm(epsilon=1e-5, dtype=cfg.dtype, param_dtype=cfg.param_dtype)  # as gpt's

  def embed(params, tokens):
    t = tokens.shape[1]
    wte = embed_mod(cfg.vocab_size).apply({"params": params["wte"]}, tokens)
    wpe = embed_mod(cfg.max_len).apply({"params": params["wpe"]}, jnp.arange(t)[None, :])
    return wte + wpe  # [B, T, D]

  def block(block_params, h):
    return block_module.apply({"params": block_params}, h, True)

  def head(params, h):
    if cfg.ln_position == "pre":
      h = ln_f.apply({"params": params["ln_f"]}, h)
    if cfg.tie_embeddings:
      return h @ params["wte"]["embedding"].T  # [B, T, V]
    return h @ params["lm_head"]["kernel"]  # [B, T, V]

  return ModelParts(embed, block, head, tuple(f"block_{i}" for i in range(cfg.num_layers)))


def stack_blocks(parts: ModelParts, params: Params) -> Params:
  """The blocks' parameter trees stacked on a new leading axis [L, ...]."""
  return jax.tree.map(lambda *xs: jnp.stack(xs), *[params[n] for n in parts.block_names])


class Affine(NamedTuple):
  """Token-wise affine replacements: position k maps h -> h @ A[k] + b[k] where use[k]."""

  A: jax.Array  # [L, D, D]
  b: jax.Array  # [L, D]
  use: jax.Array  # [L] bool


class Forward(NamedTuple):
  hs: jax.Array  # [L + 1, B, T, D]: h_0 (embedding) .. h_L (after the last block)
  logits: jax.Array  # [B, T, V]


def forward(parts: ModelParts, params: Params, tokens, *, order=None, skip=None,
            affine: Affine | None = None) -> Forward:
  """Residual streams and logits of ``tokens`` [B, T] under the interventions (module doc)."""
  stacked = stack_blocks(parts, params)
  num_layers = parts.num_layers
  order = jnp.arange(num_layers) if order is None else order
  h = parts.embed(params, tokens)
  hs = [h]
  for k in range(num_layers):
    block_params = jax.tree.map(lambda s: s[order[k]], stacked)
    out = parts.block(block_params, h)
    if affine is not None:
      out = jnp.where(affine.use[k], h @ affine.A[k] + affine.b[k], out)
    if skip is not None:
      out = jnp.where(skip[k], h, out)
    h = out
    hs.append(h)
  return Forward(jnp.stack(hs), parts.head(params, h))


def mean_loss(logits, tokens_next):
  """Mean next-token cross-entropy (nats): logits [B, T, V], targets [B, T] -> []."""
  return optax.softmax_cross_entropy_with_integer_labels(logits, tokens_next).mean()


def split_batch(batch):
  """A window batch int [B, T + 1] -> (inputs [B, T], targets [B, T]), as train.py does."""
  return batch[:, :-1], batch[:, 1:]


def relative_change(new, old, axes=None, eps=1e-12):
  """||new - old||_F / ||old||_F over ``axes`` (all by default); NaN where ||old|| <= eps."""
  num = jnp.sqrt(jnp.sum(jnp.square(new - old), axis=axes))
  den = jnp.sqrt(jnp.sum(jnp.square(old), axis=axes))
  return jnp.where(den > eps, num / jnp.maximum(den, eps), jnp.nan)
