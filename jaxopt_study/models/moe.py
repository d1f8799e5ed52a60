r"""Mixture-of-Experts MLP (Switch Transformer / GShard routing) for the GPT's blocks.

Every expert is an explicit source of sparse gradients: an expert that receives no token in a
step gets an exactly zero gradient, the architectural counterpart of a rare token's embedding row.

Routing (per block, x: [B, T, D] the MLP's input, E experts, k in {1, 2}):

* Router: ``logits = x W_r`` (W_r: [D, E], no bias, computed in float32 whatever the compute
  dtype: Switch's "selective precision"), ``p = softmax(logits)`` over experts.
* Top-k: expert ``e_1 = argmax_e p`` (first index on ties), then ``e_2 = argmax_{e != e_1} p``.
  Gates: k=1: ``g_1 = p_{e_1}`` (Switch; the router learns through it); k=2: ``g_j = p_{e_j} /
  (p_{e_1} + p_{e_2})`` (GShard), normalised before any dropping.
* Groups and capacity: each sequence is one routing group of S = T tokens (GShard's groups), so
  what a token gets never depends on the other sequences of the batch or on the mesh. Each expert
  has ``C = min(S, max(1, ceil(capacity_factor * k * S / E)))`` slots per group;
  ``capacity_factor >= E / k`` makes C = S: no token is ever dropped.
* Dropping rule (exact): within a group, an expert's slots are filled by choice rank first, then
  by position: all first choices (j=1) in increasing position t, then all second choices (j=2) in
  increasing t. The assignment (t, j) -> e gets slot ``c = #{(t', j') before it with e_{j'}(t')
  = e}`` and is kept iff c < C. A dropped assignment contributes 0; a token whose every
  assignment is dropped gets MLP output exactly 0 and is carried by the residual connection only.
* Output: ``y_t = sum_j g_j(t) * keep_j(t) * FFN_{e_j(t)}(x_t)``, FFN_e(x) = gelu(x W1_e + b1_e)
  W2_e + b2_e (the dense MLP's function, one weight set per expert).

Dispatch and combine are dense one-hot einsums (Mesh-TensorFlow / GShard style): dispatch
``[G, S, E, C]`` in {0, 1} and combine = gate * dispatch. They hold ``N * k * cf * S`` entries
(N = B*T tokens) and cost ``2 * N * k * cf * S * D`` flops each, about S / (2 F) of the experts'
``4 * N * k * cf * D * F``: fine for the sequence lengths of this study (S <= 1024, F = 4D), not
for long-context runs, where a sort-based (megablocks-style) dispatch would be needed.

Load-balancing auxiliary loss (Switch eq. 4, GShard): over the N tokens of the layer's batch,
``f_e = #{t: e_1(t) = e} / N`` (first choices, before capacity dropping), ``P_e = mean_t
p_e(t)``, ``aux = E * sum_e f_e P_e`` (= 1 when routing is uniform; its gradient flows through
P only). The training loss adds ``moe_aux_loss_coef * mean over MoE layers of aux``
(:func:`aux_loss`), so the coefficient means the same at every depth.

The statistics leave the model through ``self.sow(COLLECTION, ...)``: per MoE layer ``aux_loss``
(scalar), ``load`` ([E]: share of the k*N routing assignments choosing each expert, before
capacity; sums to 1, 1/E when balanced) and ``dropped_frac`` (share of assignments dropped by
capacity). :func:`apply` runs a GPT and returns them; a dense model returns ``{}``. Sowing into a
collection that ``apply`` does not mark mutable is a no-op, so eval and inference pay nothing.

Sharding: the expert weights are stored split by whole experts over the ``fsdp`` mesh axis
(``sharding.LOGICAL_RULES``: 'expert' -> fsdp), with their optimizer and diagnostic state, and
gathered for the computation like any FSDP weight; the slots [E, G, C, D] stay split over the
batch like their tokens. (True expert parallelism would move tokens to experts with an
all-to-all; XLA's SPMD partitioner does not derive one from these einsums and would replicate
the slots instead.) A 2 x 2 (data x fsdp) mesh of 4 CPU devices gives the 1-device losses.

Parameters (logical axes in brackets)::

  mlp/router/kernel        [D, E]     ('embed', 'expert')
  mlp/experts/fc/kernel    [E, D, F]  ('expert', 'embed', 'mlp')
  mlp/experts/fc/bias      [E, F]     ('expert', 'mlp')
  mlp/experts/proj/kernel  [E, F, D]  ('expert', 'mlp', 'embed')
  mlp/experts/proj/bias    [E, D]     ('expert', 'embed')

References: Shazeer et al. 2017 (arXiv 1701.06538); Lepikhin et al. 2020, GShard (arXiv
2006.16668); Fedus et al. 2021, Switch Transformers (arXiv 2101.03961).
"""

from __future__ import annotations

import math
import re
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

# The flax variable collection the MoE layers sow their statistics into.
COLLECTION = "moe"
TOP_K = (1, 2)
# Logical axes of the experts' activations [E, G, C, D] (names of models/gpt.py; unlisted names
# are replicated).
_SLOTS = ("activation_expert", "activation_batch", "activation_capacity", "activation_embed")


def capacity(group_size: int, num_experts: int, top_k: int, capacity_factor: float) -> int:
  """Slots per expert and group: ``min(S, max(1, ceil(capacity_factor * k * S / E)))``."""
  c = math.ceil(capacity_factor * top_k * group_size / num_experts)
  return int(min(group_size, max(1, c)))


class Routing(NamedTuple):
  """What the router decided for G groups of S tokens (E experts, C slots)."""

  dispatch: jax.Array      # float32 [G, S, E, C]: 1 where token s fills slot c of expert e
  combine: jax.Array       # float32 [G, S, E, C]: gate * dispatch
  aux_loss: jax.Array      # float32 []: E * sum_e f_e P_e
  load: jax.Array          # float32 [E]: share of the k*G*S assignments choosing e (pre-capacity)
  dropped_frac: jax.Array  # float32 []: share of the assignments over capacity


def route(logits, top_k: int, num_slots: int) -> Routing:
  """Top-k routing with capacity ``num_slots`` (rule in the module docstring).

  Args:
    logits: float [G, S, E] router logits.
    top_k: 1 or 2.
    num_slots: C, slots per expert and group (:func:`capacity`).
  """
  if top_k not in TOP_K:
    raise ValueError(f"top_k={top_k}; valid: {TOP_K}")
  logits = logits.astype(jnp.float32)
  g, s, e = logits.shape
  probs = jax.nn.softmax(logits, axis=-1)  # [G, S, E]
  masks, gates, remaining = [], [], probs
  for _ in range(top_k):
    mask = jax.nn.one_hot(jnp.argmax(remaining, axis=-1), e, dtype=jnp.float32)  # [G, S, E]
    masks.append(mask)
    gates.append(jnp.sum(probs * mask, axis=-1))  # [G, S]
    remaining = jnp.where(mask > 0, -1.0, remaining)  # probabilities are >= 0: never re-chosen
  if top_k > 1:
    total = sum(gates)
    gates = [gt / total for gt in gates]

  dispatch = jnp.zeros((g, s, e, num_slots), jnp.float32)
  combine = jnp.zeros((g, s, e, num_slots), jnp.float32)
  filled = jnp.zeros((g, 1, e), jnp.float32)  # slots already taken by earlier choice ranks
  kept = jnp.zeros((), jnp.float32)
  for mask, gate in zip(masks, gates):
    slot = jnp.cumsum(mask, axis=1) - 1.0 + filled  # [G, S, E] slot if it chose e
    filled = filled + jnp.sum(mask, axis=1, keepdims=True)
    keep = mask * (slot < num_slots)  # [G, S, E]
    slot_1h = jax.nn.one_hot(jnp.sum(slot * mask, axis=-1).astype(jnp.int32), num_slots,
                             dtype=jnp.float32)  # [G, S, C]
    d = keep[..., None] * slot_1h[:, :, None, :]  # [G, S, E, C]
    dispatch = dispatch + d
    combine = combine + gate[..., None, None] * d
    kept = kept + jnp.sum(keep)

  n = g * s
  f = jnp.mean(masks[0], axis=(0, 1))  # [E] first-choice fractions
  p_mean = jnp.mean(probs, axis=(0, 1))  # [E]
  return Routing(
      dispatch=dispatch,
      combine=combine,
      aux_loss=e * jnp.sum(f * p_mean),
      load=sum(jnp.sum(m, axis=(0, 1)) for m in masks) / (top_k * n),
      dropped_frac=1.0 - kept / (top_k * n),
  )


class ExpertProjection(nn.Module):
  """E independent affine maps: [E, G, C, a] -> [E, G, C, b] (kernel [E, a, b], bias [E, b])."""

  shape: tuple[int, int, int]
  axes: tuple[str, str, str]
  std: float
  dtype: Any
  param_dtype: Any

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", nn.with_logical_partitioning(
        nn.initializers.normal(self.std), self.axes), self.shape, self.param_dtype)
    bias = self.param("bias", nn.with_logical_partitioning(
        nn.initializers.zeros, (self.axes[0], self.axes[2])), (self.shape[0], self.shape[2]),
        self.param_dtype)
    # Gathered whole for the computation (FSDP: stored split over 'expert', used replicated).
    kernel = nn.with_logical_constraint(kernel, (_SLOTS[0], None, None))
    bias = nn.with_logical_constraint(bias, (_SLOTS[0], None))
    y = jnp.einsum("egca,eab->egcb", x.astype(self.dtype), kernel.astype(self.dtype))
    return y + bias.astype(self.dtype)[:, None, None, :]


class _Router(nn.Module):
  """x [G, S, D] -> float32 logits [G, S, E] (kernel [D, E], no bias, as in Switch)."""

  cfg: Any

  @nn.compact
  def __call__(self, x):
    cfg = self.cfg
    kernel = self.param("kernel", nn.with_logical_partitioning(
        nn.initializers.normal(cfg.init_std), ("embed", "expert")),
        (cfg.d_model, cfg.num_experts), cfg.param_dtype)
    # float32 whatever the compute dtype (Switch's selective precision): argmax and softmax
    # over experts are sensitive to rounding.
    return jnp.einsum("gsd,de->gse", x.astype(jnp.float32), kernel.astype(jnp.float32))


class MoEMLP(nn.Module):
  """Drop-in replacement of the GPT's MLP: x [B, T, D] -> [B, T, D] (see the module docstring).

  ``cfg`` is the GPT's config (d_model, mlp_dim, num_experts, moe_top_k, moe_capacity_factor,
  dtype, param_dtype, init_std, num_layers, dropout_rate); the initialisation matches the dense
  MLP's (GPT-2's residual-projection scaling on ``proj``).
  """

  cfg: Any

  @nn.compact
  def __call__(self, x, *, deterministic: bool):
    cfg = self.cfg
    t, e = x.shape[1], cfg.num_experts
    logits = _Router(cfg, name="router")(x)  # [B, T, E] float32
    r = route(logits, cfg.moe_top_k,
              capacity(t, e, cfg.moe_top_k, cfg.moe_capacity_factor))  # groups = sequences
    self.sow(COLLECTION, "aux_loss", r.aux_loss)
    self.sow(COLLECTION, "load", r.load)
    self.sow(COLLECTION, "dropped_frac", r.dropped_frac)

    h = jnp.einsum("gsec,gsd->egcd", r.dispatch.astype(cfg.dtype), x.astype(cfg.dtype))
    # Slots stay split like their tokens (see the module docstring's sharding note).
    h = nn.with_logical_constraint(h, _SLOTS)
    h = _Experts(cfg, name="experts")(h)  # [E, G, C, D]
    h = nn.with_logical_constraint(h, _SLOTS)
    y = jnp.einsum("gsec,egcd->gsd", r.combine.astype(cfg.dtype), h)  # [B, T, D]
    return nn.Dropout(cfg.dropout_rate)(y, deterministic=deterministic)


class _Experts(nn.Module):
  """The E feed-forward networks on their slots: [E, G, C, D] -> [E, G, C, D]."""

  cfg: Any

  @nn.compact
  def __call__(self, h):
    cfg = self.cfg
    e, d, f = cfg.num_experts, cfg.d_model, cfg.mlp_dim
    out_std = cfg.init_std / (2 * cfg.num_layers) ** 0.5  # as the dense MLP's proj
    proj = lambda shape, axes, std, name: ExpertProjection(
        shape, axes, std, cfg.dtype, cfg.param_dtype, name=name)
    h = proj((e, d, f), ("expert", "embed", "mlp"), cfg.init_std, "fc")(h)
    h = nn.gelu(h, approximate=True)  # [E, G, C, F]
    return proj((e, f, d), ("expert", "mlp", "embed"), out_std, "proj")(h)


# ------------------------------------------------------------------------ the train step's side


def apply(model, params, inputs, **kwargs):
  """``model.apply`` that also returns the MoE layers' sown statistics.

  Returns ``(logits, stats)``; ``stats`` is the flax collection ``{'block_i': {'mlp':
  {'aux_loss': (x,), 'load': (x,), 'dropped_frac': (x,)}}}``, ``{}`` for a dense model (which is
  then applied exactly as before).
  """
  if not model.cfg.num_experts:
    return model.apply({"params": params}, inputs, **kwargs), {}
  logits, state = model.apply({"params": params}, inputs, mutable=[COLLECTION], **kwargs)
  return logits, state.get(COLLECTION, {})


def _by_layer(stats, name: str) -> dict[int, jax.Array]:
  """{layer index: sown value ``name``} from ``apply``'s stats."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(
      stats, is_leaf=lambda x: isinstance(x, tuple))[0]:
    keys = [getattr(k, "key", None) for k in path]
    m = re.fullmatch(r"block_(\d+)", str(keys[0]))
    if keys[-1] == name and m:
      out[int(m.group(1))] = leaf[0]
  return dict(sorted(out.items()))


def aux_loss(stats):
  """Mean over MoE layers of the load-balancing loss E * sum_e f_e P_e (0.0 without MoE)."""
  values = list(_by_layer(stats, "aux_loss").values())
  return sum(values) / len(values) if values else 0.0


def train_metrics(stats, *, full: bool) -> dict[str, jax.Array]:
  """Device scalars for the train step's metrics ({} for a dense model).

  Every step: ``train/moe_aux_loss`` (mean over layers). With ``full`` (the diagnostics' full
  steps): ``moe/load/layer=NN/expert=EE`` (share of routing assignments, pre-capacity),
  ``moe/dropped_frac/layer=NN`` and ``moe/aux_loss/layer=NN``.
  """
  aux = _by_layer(stats, "aux_loss")
  if not aux:
    return {}
  out = {"train/moe_aux_loss": aux_loss(stats)}
  if full:
    for layer, load in _by_layer(stats, "load").items():
      for e in range(load.shape[0]):
        out[f"moe/load/layer={layer:02d}/expert={e:02d}"] = load[e]
    for layer, x in _by_layer(stats, "dropped_frac").items():
      out[f"moe/dropped_frac/layer={layer:02d}"] = x
    for layer, x in aux.items():
      out[f"moe/aux_loss/layer={layer:02d}"] = x
  return out
