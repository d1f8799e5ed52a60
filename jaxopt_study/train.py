"""One training run: ``train_and_evaluate(config, workdir)``.

mesh -> dataset -> model, optimizer and diagnostic state (sharded) -> jitted steps -> loop.

The loop syncs with the host only on logging, evaluation and checkpoint steps. A non-finite loss
or gradient is caught inside the jitted step: that step's update is dropped, ``diverged_at``
records the step, and the host stops at its next sync and records ``status: diverged`` in
``results.json``; the last checkpoint (saved only from finite states) stays the last good one.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import signal
import time
from typing import Any, NamedTuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from jaxopt_study import checkpointing
from jaxopt_study import data as data_lib
from jaxopt_study import diagnostics
from jaxopt_study import optimizers
from jaxopt_study import sharding
from jaxopt_study import writers
from jaxopt_study.models import gpt


class TrainState(flax.struct.PyTreeNode):
  """Everything a run needs to continue; what orbax saves and the mesh shards."""

  step: jax.Array  # int32 []: steps done; also the data position (batch s = f(seed, s)).
  params: Any
  opt_state: Any
  diag_state: Any
  rng: jax.Array  # uint32 [2]: dropout key, folded with the step.
  diverged_at: jax.Array  # int32 []: first step with a non-finite loss/gradient, -1 if none.


# ------------------------------------------------------------------------------ steps


@jax.custom_vjp
def cross_entropy(logits, targets):
  """Per-token -log softmax(z)[y]: logits [B, T, V] (any float dtype), targets [B, T] -> [B, T] f32.

  ``loss = lse(z) - z_y`` with ``lse(z) = m + log sum_v exp(z_v - m)``, ``m = max_v z_v``, all in
  float32 whatever the logits' dtype (bfloat16 logits are upcast inside the reductions, never
  written out as a float32 [B, T, V] copy).

  Gradient (a custom VJP): ``dloss/dz_v = g * (softmax(z)_v - [v == y])``, one elementwise pass
  that reads the saved logits and writes the cotangent in their dtype. Autodiff of the label
  gather would instead build a float32 [B, T, V] buffer of zeros, scatter into it and convert it.
  """
  return _cross_entropy_fwd(logits, targets)[0]


def _cross_entropy_fwd(logits, targets):
  z = logits.astype(jnp.float32)
  m = jnp.max(z, axis=-1, keepdims=True)  # [B, T, 1]
  lse = m + jnp.log(jnp.sum(jnp.exp(z - m), axis=-1, keepdims=True))  # [B, T, 1]
  z_y = jnp.take_along_axis(z, targets[..., None], axis=-1)  # [B, T, 1]
  return (lse - z_y)[..., 0], (logits, targets, lse)


def _cross_entropy_bwd(residuals, g):
  logits, targets, lse = residuals
  softmax = jnp.exp(logits.astype(jnp.float32) - lse)  # [B, T, V]
  onehot = targets[..., None] == jnp.arange(logits.shape[-1], dtype=targets.dtype)
  dz = (softmax - onehot) * g[..., None]
  return dz.astype(logits.dtype), None  # integer targets: no cotangent


cross_entropy.defvjp(_cross_entropy_fwd, _cross_entropy_bwd)


def train_step(state: TrainState, batch, *, model, tx, learning_rate, diag_config, diag_mode,
               nan_step):
  """One optimizer step; returns the new state and a dict of device scalars.

  A step whose loss, gradient, update or new parameters hold a NaN or inf (their norms are not
  finite) is dropped: the returned state keeps the old parameters, optimizer and diagnostic
  state, with ``step`` advanced and ``diverged_at`` set to the first such step; every later
  step is dropped too.

  Args:
    state: the current TrainState (donated).
    batch: int32 [B, T + 1] token windows; inputs are [:, :-1], targets [:, 1:].
    diag_mode: static; diagnostics.update's mode for this step (None: diagnostics off).
    nan_step: static fault injection for tests: the loss at this step is made NaN (-1: never).
  """
  inputs, targets = batch[:, :-1], batch[:, 1:]  # [B, T] each
  dropout_rng = jax.random.fold_in(state.rng, state.step)

  def loss_fn(params):
    logits = model.apply(
        {"params": params}, inputs, deterministic=False, rngs={"dropout": dropout_rng}
    )  # [B, T, V]
    return cross_entropy(logits, targets).mean()

  loss, grads = jax.value_and_grad(loss_fn)(state.params)
  if nan_step >= 0:
    loss = jnp.where(state.step == nan_step, jnp.nan, loss)
    grads = jax.tree.map(lambda g: jnp.where(state.step == nan_step, jnp.nan, g), grads)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  norms = {
      "train/grad_norm": optax.tree.norm(grads),
      "train/update_norm": optax.tree.norm(updates),
      "train/param_norm": optax.tree.norm(params),
  }
  metrics = {
      "train/loss": loss,
      **norms,
      "train/learning_rate": learning_rate(state.opt_state, state.step),
  }
  diag_state = state.diag_state
  if diag_mode is not None:
    # The optimizer state *before* this update: cos(g_t, m_{t-1}) asks whether the momentum
    # the optimizer carried into this step points where the new gradient points.
    diag_metrics, diag_state = diagnostics.update(
        state.params, grads, updates, state.opt_state, state.diag_state, state.step, diag_config,
        full=diag_mode,
    )
    if diag_metrics:
      # A diagnostics.Metrics: thousands of scalars packed in one vector (one output buffer).
      metrics["diagnostics"] = diag_metrics

  # Divergence: keep the last finite state, remember the first bad step. A norm is finite iff
  # every entry is finite and the sum of squares does not overflow (an entry above ~1e19), so
  # the norms the metrics need anyway also catch NaN/inf gradients, updates and new parameters
  # (e.g. from a learning rate of nan, inf or 1e39) at the cost of a few scalar ops.
  finite = jnp.isfinite(loss)
  for norm in norms.values():
    finite &= jnp.isfinite(norm)
  ok = finite & (state.diverged_at < 0)
  keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)
  new_state = state.replace(
      step=state.step + 1,
      params=keep(params, state.params),
      opt_state=keep(opt_state, state.opt_state),
      diag_state=keep(diag_state, state.diag_state),
      diverged_at=jnp.where((state.diverged_at < 0) & ~finite, state.step, state.diverged_at),
  )
  return new_state, metrics


def eval_step(params, batch, diag_state, *, model, diag_config):
  """Summed loss and token count of one eval batch, and the loss by target-token frequency."""
  inputs, targets = batch[:, :-1], batch[:, 1:]
  logits = model.apply({"params": params}, inputs, deterministic=True)
  loss = cross_entropy(logits, targets)  # [B, T]
  out = {"loss_sum": loss.sum(), "tokens": jnp.asarray(loss.size, jnp.float32)}
  if diag_config.enabled and diag_config.loss_by_frequency:
    sums, counts = diagnostics.loss_by_frequency(
        loss, targets, diag_state, num_buckets=diag_config.num_freq_buckets
    )
    out["freq_loss_sum"], out["freq_tokens"] = sums, counts
  return out


# ------------------------------------------------------------------------------ set-up


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Every check that needs no data or compile; errors name the field and the fix."""
  optimizers.validate(config)
  if config.seq_len > config.model.max_len:
    raise ValueError(
        f"config.seq_len={config.seq_len} > config.model.max_len={config.model.max_len}; "
        "raise config.model.max_len or shorten config.seq_len."
    )
  for field in ("num_steps", "batch_size", "seq_len", "log_every", "eval_every", "checkpoint_every"):
    if config[field] < 1:
      raise ValueError(f"config.{field}={config[field]} must be >= 1.")
  gpt.from_config(config.model, vocab_size=1)  # model-field checks


def padded_vocab(vocab_size: int, multiple: int) -> int:
  return int(math.ceil(vocab_size / multiple) * multiple)


def create_state(config, model, tx, mesh, token_frequencies, *, dummy_len):
  """Sharded initial TrainState (and its shardings) from ``config.seed`` alone."""
  rng = jax.random.PRNGKey(config.seed)
  init_rng, dropout_rng = jax.random.split(rng)
  tokens = jnp.zeros((1, dummy_len), jnp.int32)

  def init_params(key):
    return model.init(key, tokens, deterministic=True)["params"]

  abstract_boxed = jax.eval_shape(init_params, init_rng)
  params_sh = sharding.param_shardings(abstract_boxed, mesh)
  params = jax.jit(lambda k: nn.meta.unbox(init_params(k)), out_shardings=params_sh)(init_rng)

  def init_rest(params):
    opt_state = tx.init(params)
    diag_state = (
        diagnostics.init(params, config.diagnostics, token_frequencies, opt_state=opt_state)
        if config.diagnostics.enabled
        else None
    )
    return opt_state, diag_state

  abstract_opt, abstract_diag = jax.eval_shape(init_rest, params)
  rest_sh = (
      sharding.mirror_shardings(abstract_opt, params, params_sh, mesh),
      sharding.mirror_shardings(abstract_diag, params, params_sh, mesh),
  )
  opt_state, diag_state = jax.jit(init_rest, out_shardings=rest_sh)(params)
  rep = sharding.replicated(mesh)
  state = TrainState(
      step=jax.device_put(jnp.zeros((), jnp.int32), rep),
      params=params,
      opt_state=opt_state,
      diag_state=diag_state,
      rng=jax.device_put(dropout_rng, rep),
      diverged_at=jax.device_put(jnp.full((), -1, jnp.int32), rep),
  )
  state_sh = TrainState(
      step=rep, params=params_sh, opt_state=rest_sh[0], diag_state=rest_sh[1], rng=rep,
      diverged_at=rep,
  )
  return state, state_sh


def write_json(path: str, obj) -> None:
  """Atomic: a reader never sees half a file. NumPy scalars become floats, anything else str."""

  def default(x):
    return float(x) if isinstance(x, (np.floating, np.integer, np.ndarray)) else str(x)

  tmp = f"{path}.tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True, default=default)
  os.replace(tmp, path)


class _Preempted:
  """Turns SIGTERM into a flag the loop checks between steps (checkpoint, then exit)."""

  def __init__(self):
    self.flag = False
    try:
      self._old = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # Not the main thread (e.g. some notebook runners).
      self._old = None

  def _handle(self, signum, frame):
    logging.warning("SIGTERM: checkpointing and stopping.")
    self.flag = True

  def restore(self):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)


def _float(x):
  return None if x is None else float(x)


def _flatten(tree: dict, prefix=""):
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) else str(v)
  return out


# ------------------------------------------------------------------------------ the run


class Setup(NamedTuple):
  """What a run is made of, before its loop (also used by scripts/benchmark.py)."""

  mesh: Any
  dataset: Any
  model: gpt.GPT
  tx: optax.GradientTransformation
  learning_rate: Any  # (opt_state, step) -> the rate of that step
  state: TrainState
  state_sharding: TrainState
  batch_sharding: Any


def setup(config: ml_collections.ConfigDict) -> Setup:
  """Validates ``config`` (before any compile), then builds mesh, data, model and the state."""
  validate_config(config)
  sharding.maybe_initialize_distributed()
  mesh = sharding.make_mesh(config.mesh)
  sharding.check_batch(config.batch_size, mesh)
  if config.batch_size % jax.process_count():
    raise ValueError(
        f"config.batch_size={config.batch_size} is not divisible by the "
        f"{jax.process_count()} processes."
    )
  ds = data_lib.build_dataset(
      config.data,
      seq_len=config.seq_len,
      global_batch_size=config.batch_size,
      seed=config.seed,
      process_index=jax.process_index(),
      process_count=jax.process_count(),
      num_train_steps=config.num_steps,
  )
  vocab = padded_vocab(ds.vocab_size, config.model.vocab_multiple)
  model = gpt.GPT(gpt.from_config(config.model, vocab))
  token_freq = np.zeros(vocab, np.float64)
  token_freq[: ds.vocab_size] = ds.token_frequencies
  # Initialisation needs no mesh context: its shardings come from out_shardings (and flax's
  # DenseGeneral initialises kernels flat, which per-axis constraints would reject).
  params_shape = jax.eval_shape(
      lambda k: nn.meta.unbox(model.init(k, jnp.zeros((1, config.seq_len), jnp.int32))["params"]),
      jax.random.PRNGKey(0),
  )
  tx, learning_rate = optimizers.build(config, params_shape)
  state, state_sh = create_state(config, model, tx, mesh, token_freq, dummy_len=config.seq_len)
  return Setup(mesh, ds, model, tx, learning_rate, state, state_sh, sharding.batch_sharding(mesh))


def compile_train_step(config, s: Setup):
  """``mode -> jitted train step``, each diagnostics mode compiled once, on first use.

  Call the steps inside ``sharding.activate(s.mesh)`` so that the model's activation sharding
  constraints are traced against the mesh.
  """
  cache = {}

  def get(mode):
    if mode not in cache:

      cache[mode] = jax.jit(
          functools.partial(
              train_step, model=s.model, tx=s.tx, learning_rate=s.learning_rate,
              diag_config=config.diagnostics, diag_mode=mode,
              nan_step=config.inject_nan_at_step,
          ),
          in_shardings=(s.state_sharding, s.batch_sharding),
          out_shardings=(s.state_sharding, None),
          donate_argnums=0,
      )
    return cache[mode]

  return get


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains (or resumes) the run described by ``config`` in ``workdir``; returns results.json."""
  s = setup(config)
  mesh, ds, model, state, state_sh = s.mesh, s.dataset, s.model, s.state, s.state_sharding
  os.makedirs(workdir, exist_ok=True)
  is_main = jax.process_index() == 0
  if is_main:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))

  with sharding.activate(mesh):
    num_params = sum(x.size for x in jax.tree.leaves(state.params))
    # Runs compared in a study must start from the same parameters: record a fingerprint of
    # the initial ones (global L2 norm and sum) that any two runs can be checked against.
    fingerprint = jax.jit(
        lambda p: jnp.stack([optax.tree.norm(p), sum(jnp.sum(x) for x in jax.tree.leaves(p))])
    )(state.params)
    logging.info(
        "model: %.2fM parameters, vocab %d, mesh %s",
        num_params / 1e6, model.cfg.vocab_size, dict(mesh.shape),
    )

    ckpt = checkpointing.manager(os.path.join(workdir, "checkpoints"), keep=config.keep_checkpoints)
    restored = checkpointing.restore_latest(ckpt, state)
    if restored is not None:
      state = restored
      logging.info("resumed from step %d", int(state.step))

    batch_sh = s.batch_sharding
    dcfg = config.diagnostics
    step_fn = compile_train_step(config, s)

    p_eval = jax.jit(
        functools.partial(eval_step, model=model, diag_config=dcfg),
        in_shardings=(state_sh.params, batch_sh, state_sh.diag_state),
    )

    def evaluate(state):
      totals = None
      for local in ds.eval_batches():
        batch = jax.make_array_from_process_local_data(batch_sh, local)
        out = p_eval(state.params, batch, state.diag_state)
        totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
      totals = jax.device_get(totals)
      loss = float(totals["loss_sum"] / totals["tokens"])
      ev = {"eval/loss": loss, "eval/perplexity": float(np.exp(min(loss, 50.0)))}
      if "freq_loss_sum" in totals:
        per_bucket = totals["freq_loss_sum"] / np.maximum(totals["freq_tokens"], 1)
        for b, (l, n) in enumerate(zip(per_bucket, totals["freq_tokens"])):
          if n > 0:
            ev[f"eval/loss_by_frequency/bucket={b:02d}"] = float(l)
      return ev

    writer = writers.create_writer(workdir, just_logging=not is_main)
    start_step = int(state.step)
    if start_step == 0:
      writer.write_hparams(_flatten(config.to_dict()))
    progress = writers.report_progress(config.num_steps, writer)
    preempt = _Preempted()

    results_path = os.path.join(workdir, "results.json")
    results = {
        "optimizer": config.optimizer.name,
        "learning_rate": config.optimizer.learning_rate,
        "seed": config.seed,
        "num_params": int(num_params),
        "num_steps": config.num_steps,
        "tokens_per_step": config.batch_size * config.seq_len,
        "diverged_at_step": None,
        "init_params_fingerprint": [float(x) for x in jax.device_get(fingerprint)],
    }
    if os.path.exists(results_path):
      with open(results_path) as f:
        results = {**json.load(f), **{k: v for k, v in results.items() if k != "diverged_at_step"}}

    batches = data_lib.prefetch_to_device(ds.train_batch, start_step, batch_sh, config.prefetch)
    pending = []  # (step, device metrics) waiting for the next host sync
    last_train, last_eval = {}, {}
    timer = {"t0": None, "step0": start_step, "tokens_per_sec": results.get("tokens_per_second")}
    status = "running"

    def flush(step):
      """Host sync: writes pending metrics; returns True if the run has diverged."""
      nonlocal last_train
      host = jax.device_get(pending)
      pending.clear()
      for at, m in host:
        diag = m.pop("diagnostics", {})
        m.update(diag)
        scalars = {k: v for k, v in m.items() if np.ndim(v) == 0}
        # Histogram samples: drop non-finite entries (e.g. log-staleness of a zero moment).
        hists = {k: v[np.isfinite(v)] for k, v in m.items() if np.ndim(v) == 1}
        hists = {k: v for k, v in hists.items() if v.size}
        writer.write_scalars(at, scalars)
        if hists:
          writer.write_histograms(at, hists)
        if all(np.isfinite(float(v)) for k, v in scalars.items() if k.startswith("train/")):
          last_train = scalars
      now = time.perf_counter()
      if timer["t0"] is None:  # first sync: the compile is behind us now
        timer["t0"], timer["step0"] = now, step
      elif step > timer["step0"]:
        timer["tokens_per_sec"] = (
            (step - timer["step0"]) * results["tokens_per_step"] / (now - timer["t0"])
        )
        writer.write_scalars(step, {"train/tokens_per_sec": timer["tokens_per_sec"]})
      return int(jax.device_get(state.diverged_at)) >= 0

    diverged = False
    for step in range(start_step, config.num_steps):
      if preempt.flag:
        status = "preempted"
        break
      mode = diagnostics.mode_for_step(step, dcfg) if dcfg.enabled else None
      _, batch = next(batches)
      state, metrics = step_fn(mode)(state, batch)
      done = step + 1
      keep_metrics = done % config.log_every == 0 or mode == "full"
      if keep_metrics:
        pending.append((done, metrics))
      progress(done)
      if done % config.log_every == 0 or done == config.num_steps:
        diverged = flush(done)
        if diverged:
          break
      if done % config.eval_every == 0 or done == config.num_steps:
        last_eval = evaluate(state)
        writer.write_scalars(done, last_eval)
      if done % config.checkpoint_every == 0 and done != config.num_steps:
        diverged = flush(done)  # only finite states are saved
        if diverged:
          break
        checkpointing.save(ckpt, done, state)
    else:
      status = "completed"
    if pending:
      diverged = flush(int(state.step)) or diverged
    batches.close()

    steps_done = int(state.step)
    if diverged:
      status = "diverged"
      results["diverged_at_step"] = int(state.diverged_at)
      writer.write_scalars(int(state.diverged_at), {"train/diverged": 1.0})
      logging.warning("diverged at step %d: non-finite loss or gradient", int(state.diverged_at))
    else:
      if steps_done > 0 and ckpt.latest_step() != steps_done:
        checkpointing.save(ckpt, steps_done, state, force=True)
      if status == "completed" and not last_eval:
        last_eval = evaluate(state)
    ckpt.wait_until_finished()
    ckpt.close()
    preempt.restore()
    writer.close()

  results.update(
      status=status,
      steps_done=steps_done,
      tokens_seen=steps_done * results["tokens_per_step"],
      final_train_loss=_float(last_train.get("train/loss", results.get("final_train_loss"))),
      final_eval_loss=last_eval.get("eval/loss", results.get("final_eval_loss")),
      final_eval_perplexity=last_eval.get("eval/perplexity", results.get("final_eval_perplexity")),
      eval_loss_by_frequency={
          k.rsplit("=", 1)[1]: v for k, v in last_eval.items() if "loss_by_frequency" in k
      } or results.get("eval_loss_by_frequency", {}),
      tokens_per_second=timer["tokens_per_sec"],
      devices=jax.device_count(),
      platform=jax.devices()[0].platform,
  )
  if is_main:
    write_json(results_path, results)
  logging.info("results: %s", {k: v for k, v in results.items() if not isinstance(v, dict)})
  return results
