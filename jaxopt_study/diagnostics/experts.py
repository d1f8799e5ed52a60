r"""Per-expert family: mixture-of-experts weights as explicit sources of sparse gradients.

An expert that receives no token in a step gets an exactly zero gradient (models/moe.py), like
the embedding row of a token absent from the batch; this family reports for experts what
:mod:`.sparsity` and :mod:`.aging` report for embedding rows. Absent for a dense model.

Expert tensors are those of kind ``moe_expert`` (:data:`.paths.KIND_RULES`:
``.../mlp/experts/...``), each ``[E, ...]`` with the expert on axis 0. Expert (l, e) is the
union of the e-th slices of layer l's expert tensors (fc and proj kernels and biases), N_le
entries. Notation as in
:mod:`.sparsity` / :mod:`.aging`: ``a = |g_t| > active_threshold``, per-entry count c, raw EMA of
the active indicator r (decay d_u = update_ema_decay), age = t - last active step (t + 1 if
never), second moment v (before this step's update), s = raw EMA of g^2 (decay d_s =
sq_ema_decay), n = update() calls so far.

Per expert, names ``experts/<metric>/layer=NN/expert=EE``:

* ``grad_zero_frac`` = #{g == 0} / N_le: share of the expert's entries with an exactly zero
  gradient this step.
* ``got_grad`` = 1 if any entry is active this step, else 0 (the expert received a token).
* ``update_freq`` = mean over the entries of c / n (share of steps with a gradient; exactly the
  expert's share of steps when its entries are active together, as they are: one routed token
  gives every entry of its kernels a gradient, barring exact zeros).
* ``update_freq_ema`` = mean over the entries of r / (1 - d_u^n): the same over an exponential
  window of ~1 / (1 - d_u) steps.
* ``age`` = min over the entries of the age = t - (last step the expert got any gradient).
* ``active_window`` = 1 if age < W (the expert got a gradient in the last W = window steps).
* ``log_staleness`` = log(mean v / mean (s / (1 - d_s^n))) over the expert's entries, as
  ``aging/emb_row_log_staleness_mean`` for embedding rows (> 0: the optimizer's second moment
  remembers larger, older gradients than the recent ones). Defined, as for embedding rows,
  only for an expert active at some step before t (so v_{t-1} holds one of its gradients) with
  both means > 0; NaN otherwise: an expert first routed at t has only Adafactor's epsilon
  floor in v (log(1e-30 / s) ~ -65 would swamp the mean); absent without a second moment.

Aggregates over all (layer, expert) pairs: ``experts/got_grad_frac`` (mean of got_grad),
``experts/grad_zero_frac`` (pooled over entries), ``experts/update_freq_mean``,
``experts/age_mean``, ``experts/frac_older_than_H`` (share of experts with age >= H = horizon),
``experts/log_staleness_mean`` (over experts where it is defined).

The counters behind age, update_freq(_ema) and log_staleness are exact per-expert sums kept by
:mod:`.core` (``DiagState.experts``: last step with any active entry, the running sum and EMA of
the share of active entries, the EMA of the sum of g^2), equal to the per-entry definitions
above for every ``entry_sample_size``; a metric whose switch is off (``update_count``,
``update_ema``, no second moment) is absent.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jaxopt_study.diagnostics import context

EXPERT_KIND = "moe_expert"


def _per_expert(ctx: context.Context):
  """{quantity: float32 [num_layers, E]} summed over each layer's expert tensors, and layers.

  zero / active / v come from this step's stacked groups; age, freq (sum over steps of the
  share of active entries), ema (its EMA) and s (EMA of the sum of g^2) from the exact
  per-expert counters ``ctx.experts`` (:class:`.core.DiagState`)."""
  cfg = ctx.cfg
  sums: dict[int, dict[str, list]] = {}
  for grp in ctx.groups:
    if grp.kind != EXPERT_KIND:
      continue
    axes = tuple(range(2, grp.g.ndim))  # [member, expert, ...] -> [member, expert]
    f32 = lambda x: x.astype(jnp.float32)
    q = {
        "size": jnp.full(grp.g.shape[:2], np.prod(grp.shape[1:]), jnp.float32),
        "zero": jnp.sum(f32(grp.g == 0), axis=axes),
        "active": jnp.max(f32(jnp.abs(grp.g) > cfg.active_threshold), axis=axes),
    }
    if grp.v is not None:
      q["v"] = jnp.sum(grp.v, axis=axes)
    for i, layer in enumerate(grp.layers):
      if layer is None:
        continue
      acc = sums.setdefault(layer, {})
      for name, x in q.items():
        acc.setdefault(name, []).append(x[i])
  layers = sorted(sums)
  if not layers:
    return {}, []
  reducers = {"active": jnp.max}
  out = {}
  for name in sums[layers[0]]:
    red = reducers.get(name, jnp.sum)
    out[name] = jnp.stack([red(jnp.stack(sums[l][name]), axis=0) for l in layers])  # [L, E]
  state = [ctx.experts.get(f"layer_{l:02d}") for l in layers]
  if all(x is not None for x in state):
    for name, key in (("last_active", "last_active"), ("freq", "active_frac"),
                      ("ema", "active_frac_ema"), ("s", "sq_ema")):
      if key in state[0]:
        out[name] = jnp.stack([x[key] for x in state]).astype(jnp.float32)
    if "last_active" in out:
      out["age"] = ctx.step.astype(jnp.float32) - out.pop("last_active")
  if all(f"layer_{l:02d}" in ctx.experts_seen for l in layers):
    out["seen"] = jnp.stack([ctx.experts_seen[f"layer_{l:02d}"] for l in layers])  # [L, E]
  if "s" not in out:
    out.pop("v", None)
  return out, layers


def compute(ctx: context.Context):
  cfg = ctx.cfg
  q, layers = _per_expert(ctx)
  if not layers:
    return
  num_experts = q["size"].shape[1]
  names = lambda metric: [f"experts/{metric}/layer={l:02d}/expert={e:02d}"
                          for l in layers for e in range(num_experts)]
  per = {"grad_zero_frac": q["zero"] / q["size"], "got_grad": q["active"]}
  if "freq" in q:
    per["update_freq"] = q["freq"] / ctx.n.astype(jnp.float32)
  if "ema" in q:
    per["update_freq_ema"] = q["ema"] / ctx.bias_correction(cfg.update_ema_decay)
  if "age" in q:
    per["age"] = q["age"]
    per["active_window"] = (q["age"] < cfg.window).astype(jnp.float32)
  if "v" in q:
    s_hat = q["s"] / ctx.bias_correction(cfg.sq_ema_decay)
    ok = (q["v"] > 0) & (s_hat > 0) & q.get("seen", True)
    per["log_staleness"] = jnp.where(
        ok, jnp.log(jnp.where(ok, q["v"], 1.0)) - jnp.log(jnp.where(ok, s_hat, 1.0)), jnp.nan)
  for metric, x in per.items():
    ctx.add(names(metric), x)

  ctx.add_scalar("experts/got_grad_frac", jnp.mean(q["active"]))
  ctx.add_scalar("experts/grad_zero_frac", jnp.sum(q["zero"]) / jnp.sum(q["size"]))
  if "update_freq" in per:
    ctx.add_scalar("experts/update_freq_mean", jnp.mean(per["update_freq"]))
  if "age" in q:
    ctx.add_scalar("experts/age_mean", jnp.mean(q["age"]))
    ctx.add_scalar("experts/frac_older_than_H", jnp.mean(q["age"] >= int(cfg.horizon)))
  if "log_staleness" in per:
    x = per["log_staleness"]
    ctx.add_scalar("experts/log_staleness_mean", context.safe_div(
        jnp.sum(jnp.nan_to_num(x, nan=0.0)), jnp.sum(~jnp.isnan(x))))
