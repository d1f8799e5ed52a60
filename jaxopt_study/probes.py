r"""Depth and sparsity measurements of the model on a fixed probe batch (forward only, jitted).

``measure(model, params, tokens)`` runs the GPT once (deterministic, float32 compute, no remat)
on a fixed batch of token ids [B, T] and returns a :class:`diagnostics.Metrics` (names -> 0-d
values packed in one vector: one device output; ``.to_numpy()`` on the host). The train loop
calls it at the diagnostics' full-step cadence on the same batch every time, so the series are
comparable over training and across runs of a study.

Layerwise output variance (residual stream). h_{-1} = the embedding output (input of block 0),
h_l = the output of block l (l = 0..L-1; before the final LayerNorm), over all B*T*D entries:

* ``depth/var/embed`` = Var(h_{-1}); ``depth/var/layer=NN`` = Var(h_l) = mean(h^2) - mean(h)^2.
* ``depth/var_ratio/layer=NN`` = Var(h_l) / Var(h_{l-1}) (1 for a block that is the identity).
* ``depth/log_var_slope`` = least-squares slope of ln Var(h_l) against l over l = 0..L-1 (0 for
  L = 1): exp(slope) is the average growth factor per block.

Weight sparsity, for every parameter tensor with ndim >= 2 (kernels, embeddings, experts; biases
and norm scales are excluded), each judged against its own rms = sqrt(mean(w^2)), for each
threshold tau in ``thresholds``:

* ``weights/small_frac_<tau>`` = #{|w| <= tau * rms} / #entries, pooled over all such tensors;
  ``.../kind=<kind>`` over one kind (:data:`diagnostics.paths.KIND_RULES`) and
  ``.../layer=NN/kind=<kind>`` over one block's tensors of that kind.

Attention sparsity, per block l and query head h, from an explicit softmax (not the fused
kernel): q, k are the block's own query/key projections of its input (captured from the
forward), ``P[b, t, s] = softmax_s(q_t . k_s / sqrt(d_head))`` over keys s <= t (causal); with
grouped-query attention head h reads key head h // (H / G). Averaged over the B*T queries:

* ``attention/entropy/layer=NN/head=HH`` = mean_{b,t} -sum_s P log P (log(t+1) when uniform);
  ``attention/entropy/layer=NN`` its mean over heads.
* ``attention/entropy_norm/layer=NN/head=HH`` = mean over queries t >= 1 of
  entropy / log(t + 1) (1: uniform over the visible keys, 0: one key).
* ``attention/top<k>_mass/layer=NN/head=HH`` for k in ``top_k``: mean of the sum of the k largest
  P[b, t, :] (1 for queries with t + 1 <= k keys); ``attention/top<k>_mass/layer=NN`` over heads.

Cost: one forward pass plus [B, H, T, T] float32 attention probabilities per block, so keep the
probe batch small (e.g. 4-8 sequences).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxopt_study.diagnostics import context
from jaxopt_study.diagnostics import paths
from jaxopt_study.models import gpt

THRESHOLDS = (0.01, 0.1)  # weight sparsity: |w| <= tau * rms(w)
TOP_K = (1, 4)  # attention: probability mass of the k largest keys


def measure(model: gpt.GPT, params, tokens, *, thresholds=THRESHOLDS, top_k=TOP_K):
  """Every probe metric (module docstring) of ``params`` on ``tokens`` (int [B, T])."""
  return measure_fn(model, thresholds=thresholds, top_k=top_k)(params, tokens)


def measure_fn(model: gpt.GPT, *, thresholds=THRESHOLDS, top_k=TOP_K):
  """The jitted ``(params, tokens) -> metrics`` of :func:`measure` (one per model config)."""
  return _compiled(model.cfg, tuple(thresholds), tuple(top_k))


@functools.lru_cache(maxsize=None)
def _compiled(cfg: gpt.GPTConfig, thresholds: tuple, top_k: tuple):
  # float32 compute, no remat, XLA attention (cuDNN flash attention needs 16-bit inputs): the
  # measurement does not depend on the speed settings.
  model = gpt.GPT(dataclasses.replace(cfg, dtype=jnp.float32, remat="none", attention_impl="xla"))

  def fn(params, tokens):
    out = {}
    captured = capture(model, params, tokens)
    out.update(depth_metrics(captured["residual"]))
    out.update(weight_metrics(params, thresholds))
    for layer, (q, k) in enumerate(captured["qk"]):
      out.update(attention_metrics(q, k, layer, top_k))
    return context.Metrics(list(out), jnp.stack(list(out.values())), {})

  return jax.jit(fn)


def capture(model: gpt.GPT, params, tokens):
  """Runs the GPT; returns {'residual': [L + 1, B, T, D] (h_{-1}..h_{L-1}), 'qk': [(q, k)] per
  block, q [B, T, H, K], k [B, T, G, K]}, captured with flax's ``capture_intermediates``."""

  def keep(mdl, method):
    return method == "__call__" and (isinstance(mdl, gpt.Block) or mdl.name in ("query", "key"))

  _, state = model.apply({"params": params}, tokens, deterministic=True,
                         capture_intermediates=keep, mutable=["intermediates"])
  inter = state["intermediates"]
  num_layers = model.cfg.num_layers
  b, t = tokens.shape
  # The residual stream entering block 0: token rows plus learned positions (as GPT.__call__).
  embed = (params["wte"]["embedding"][tokens] + params["wpe"]["embedding"][None, :t])
  blocks = [inter[f"block_{i}"] for i in range(num_layers)]
  residual = jnp.stack([embed] + [blk["__call__"][0] for blk in blocks]).astype(jnp.float32)
  # Inside a block the projections see token rows [B * T, ...]: back to [B, T, ...].
  rows = lambda x: x.reshape(b, t, *x.shape[-2:]).astype(jnp.float32)
  qk = [(rows(blk["attn"]["query"]["__call__"][0]), rows(blk["attn"]["key"]["__call__"][0]))
        for blk in blocks]
  return {"residual": residual, "qk": qk}


def depth_metrics(residual) -> dict[str, jax.Array]:
  """``depth/*`` from the residual stream [L + 1, ...] (h_{-1}, h_0, ..., h_{L-1})."""
  var = jnp.var(residual.reshape(residual.shape[0], -1), axis=1)  # [L + 1]
  num_layers = residual.shape[0] - 1
  out = {"depth/var/embed": var[0]}
  for l in range(num_layers):
    out[f"depth/var/layer={l:02d}"] = var[l + 1]
    out[f"depth/var_ratio/layer={l:02d}"] = var[l + 1] / var[l]
  x = jnp.arange(num_layers, dtype=jnp.float32)
  y = jnp.log(var[1:])
  xc = x - jnp.mean(x)
  out["depth/log_var_slope"] = (jnp.sum(xc * (y - jnp.mean(y))) / jnp.sum(xc * xc)
                                if num_layers > 1 else jnp.zeros((), jnp.float32))
  return out


def weight_metrics(params, thresholds=THRESHOLDS) -> dict[str, jax.Array]:
  """``weights/small_frac_<tau>`` (global, per kind, per layer and kind) of a params tree."""
  groups: dict[str, list] = {}  # suffix -> [(small counts [len(thresholds)], size)]
  for path, w in paths.flatten(params).items():
    if w.ndim < 2:
      continue
    w = jnp.abs(w.astype(jnp.float32))
    rms = jnp.sqrt(jnp.mean(jnp.square(w)))
    small = jnp.stack([jnp.sum(w <= tau * rms) for tau in thresholds]).astype(jnp.float32)
    kind, layer = paths.kind_of(path), paths.layer_of(path)
    suffixes = ["", f"/kind={kind}"] + ([f"/layer={layer:02d}/kind={kind}"]
                                        if layer is not None else [])
    for sfx in suffixes:
      groups.setdefault(sfx, []).append((small, w.size))
  out = {}
  for sfx, members in groups.items():
    frac = sum(s for s, _ in members) / float(sum(n for _, n in members))
    for i, tau in enumerate(thresholds):
      out[f"weights/small_frac_{tau:g}{sfx}"] = frac[i]
  return out


def attention_probs(q, k):
  """Causal softmax(q . k / sqrt(d)): q [B, T, H, K], k [B, S=T, G, K] -> P [B, H, T, S]."""
  h, g = q.shape[2], k.shape[2]
  k = jnp.repeat(k, h // g, axis=2)  # query head h reads key head h // (H / G)
  t = q.shape[1]
  scores = jnp.einsum("bthk,bshk->bhts", q, k) / jnp.sqrt(jnp.float32(q.shape[-1]))
  causal = jnp.tril(jnp.ones((t, t), bool))
  return jax.nn.softmax(jnp.where(causal, scores, -jnp.inf), axis=-1)


def attention_metrics(q, k, layer: int, top_k=TOP_K) -> dict[str, jax.Array]:
  """``attention/*`` of one block from its queries [B, T, H, K] and keys [B, T, G, K]."""
  p = attention_probs(q, k)  # [B, H, T, S]
  t = p.shape[2]
  ent = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0), axis=-1)
  stats = {"entropy": jnp.mean(ent, axis=(0, 2))}  # [H]
  if t > 1:
    norm = ent[:, :, 1:] / jnp.log(jnp.arange(2, t + 1, dtype=jnp.float32))
    stats["entropy_norm"] = jnp.mean(norm, axis=(0, 2))
  top = jax.lax.top_k(p, min(max(top_k), t))[0]  # [B, H, T, k] descending
  for kk in top_k:
    stats[f"top{kk}_mass"] = jnp.mean(jnp.sum(top[..., :kk], axis=-1), axis=(0, 2))
  out = {}
  for name, per_head in stats.items():
    out[f"attention/{name}/layer={layer:02d}"] = jnp.mean(per_head)
    for head in range(per_head.shape[0]):
      out[f"attention/{name}/layer={layer:02d}/head={head:02d}"] = per_head[head]
  return out


def probe_tokens(batch: np.ndarray, num_sequences: int) -> np.ndarray:
  """The probe batch: the inputs ([:, :-1]) of the first ``num_sequences`` windows of a fixed
  eval batch (int32 [B, T + 1] -> [min(B, num_sequences), T])."""
  return np.asarray(batch)[:num_sequences, :-1]


__all__ = ["THRESHOLDS", "TOP_K", "attention_metrics", "attention_probs", "capture",
           "depth_metrics", "measure", "probe_tokens", "weight_metrics"]
