"""One training run: ``train_and_evaluate(config, workdir)``.

mesh -> dataset -> model, optimizer and diagnostic state (sharded) -> jitted steps -> loop.

Per-step metrics stay on the device (``writers.MetricBuffer``) until a host sync: every
``config.sync_every`` steps (once the next step is queued, so the GPU never waits for the host),
and at evaluation, checkpoint and the end. A non-finite loss, gradient norm or learning rate is
caught inside the jitted step: that step's update is dropped (``train_step`` says how overflow
in the update is handled), ``diverged_at`` records the step, and the host stops at its next sync
and records ``status: diverged``; checkpoints are saved only after a sync has found the state
finite, so the last checkpoint of a diverged run is its last good state.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import os
from typing import Any, Iterable, NamedTuple, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxopt_study import checkpointing
from jaxopt_study import data as data_lib
from jaxopt_study import diagnostics
from jaxopt_study import optimizers
from jaxopt_study import probes
from jaxopt_study import rundir
from jaxopt_study import sharding
from jaxopt_study import writers
from jaxopt_study.models import gpt
from jaxopt_study.models import moe


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

  A step whose loss, gradient norm or learning rate is NaN or inf is dropped: the returned
  state keeps the old parameters, optimizer and diagnostic state, with ``step`` advanced and
  ``diverged_at`` set to the first such step; every later step is dropped too. These three are
  known before the update, so the keep-or-drop select fuses into the optimizer's update: one
  pass over parameters and optimizer state. (Deciding on the new parameters' norm instead needs
  a second pass over all of them: 1-3% of a gpt2_small step on an H100, BENCHMARKS.md.) An update
  or new parameters whose norm is not finite although those three were (overflow inside the
  optimizer, e.g. a learning rate of 1e30, which ``validate_config`` rejects) also set
  ``diverged_at``; that step's state is kept, and the loop never checkpoints a diverged state.

  Args:
    state: the current TrainState (donated).
    batch: int32 [B, T + 1] token windows; inputs are [:, :-1], targets [:, 1:].
    diag_mode: static; diagnostics.update's mode for this step (None: diagnostics off).
    nan_step: static fault injection for tests: the loss at this step is made NaN (-1: never).
  """
  inputs, targets = batch[:, :-1], batch[:, 1:]  # [B, T] each
  dropout_rng = jax.random.fold_in(state.rng, state.step)

  def loss_fn(params):
    logits, moe_stats = moe.apply(
        model, params, inputs, deterministic=False, rngs={"dropout": dropout_rng}
    )  # [B, T, V]; moe_stats: {} for a dense model
    loss = cross_entropy(logits, targets).mean()
    return loss + model.cfg.moe_aux_loss_coef * moe.aux_loss(moe_stats), (loss, moe_stats)

  (_, (loss, moe_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
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
  metrics.update(moe.train_metrics(moe_stats, full=diag_mode == "full"))  # MoE: aux, load
  diag_state = state.diag_state
  if diag_mode is not None:
    # The optimizer state *before* this update: cos(g_t, m_{t-1}) asks whether the momentum
    # the optimizer carried into this step points where the new gradient points.
    diag_metrics, diag_state = diagnostics.update(
        state.params, grads, updates, state.opt_state, state.diag_state, state.step, diag_config,
        mode=diag_mode,
    )
    if diag_metrics:
      # A diagnostics.Metrics: thousands of scalars packed in one vector (one output buffer).
      metrics["diagnostics"] = diag_metrics

  # Divergence: keep the last finite state, remember the first bad step. A norm is finite iff
  # every entry is finite and the sum of squares does not overflow (an entry above ~1e19), so
  # the norms the metrics need anyway catch NaN/inf gradients (and a learning rate of nan or
  # inf, e.g. 1e39 in float32) at the cost of a few scalar ops. Only inputs of the update decide
  # (see the docstring): `ok` is known before the update, so XLA fuses the select into it.
  finite_in = (jnp.isfinite(loss) & jnp.isfinite(norms["train/grad_norm"])
               & jnp.isfinite(metrics["train/learning_rate"]))
  finite = (finite_in & jnp.isfinite(norms["train/update_norm"])
            & jnp.isfinite(norms["train/param_norm"]))
  ok = finite_in & (state.diverged_at < 0)
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


_POSITIVE = ("num_steps", "batch_size", "seq_len", "log_every", "sync_every", "eval_every",
             "checkpoint_every", "keep_checkpoints")


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Every check that needs no data or compile; errors name the field and the fix."""
  for field in _POSITIVE:
    value = config[field]
    if not isinstance(value, int) or value < 1:
      raise ValueError(f"config.{field}={value!r} must be an integer >= 1.")
  if config.seq_len > config.model.max_len:
    raise ValueError(
        f"config.seq_len={config.seq_len} > config.model.max_len={config.model.max_len}; "
        "raise config.model.max_len or shorten config.seq_len."
    )
  if int(config.probes.every) < 0:
    raise ValueError(f"config.probes.every={config.probes.every} must be >= 0 (steps between "
                     "probe measurements; 0 measures at every full diagnostics step).")
  if config.diagnostics.enabled and config.diagnostics.every < 1:
    raise ValueError(
        f"config.diagnostics.every={config.diagnostics.every} must be >= 1 (steps between full "
        "diagnostics); turn them off with --config.diagnostics.enabled=False."
    )
  n = config.diagnostics.entry_sample_size
  if not isinstance(n, int) or n < 0:
    raise ValueError(
        f"config.diagnostics.entry_sample_size={n!r} must be an integer >= 0 (0: per-entry "
        "counters on every parameter entry; N: on a fixed grid of about N entries).")
  m = config.model.vocab_multiple
  if not isinstance(m, int) or m < 1:
    raise ValueError(f"config.model.vocab_multiple={m!r} must be an integer >= 1 (the vocabulary "
                     "is padded to a multiple of it; 64 suits GPU matmuls, 1 pads nothing).")
  if config.schedule.warmup_steps > config.num_steps:
    logging.warning("config.schedule.warmup_steps=%d > config.num_steps=%d: the learning rate "
                    "never reaches its peak; shorten the warmup or train longer.",
                    config.schedule.warmup_steps, config.num_steps)
  optimizers.validate(config)
  gpt.from_config(config.model, vocab_size=1)  # model-field checks
  data_lib.check_config(config.data, seq_len=config.seq_len, global_batch_size=config.batch_size,
                        prefetch=config.prefetch)


def padded_vocab(vocab_size: int, multiple: int) -> int:
  return int(math.ceil(vocab_size / multiple) * multiple)


def state_init(config, model, tx, token_frequencies):
  """The pure initialiser ``PRNGKey(seed) -> TrainState`` of a run (jit it; ``Stack`` vmaps
  it over the seeds of a sweep). The peak learning rate (in ``tx``) and the frequency-bucket
  table (from ``token_frequencies``) are constants of it: ``Stack`` sets each run's own."""
  tokens = jnp.zeros((1, config.seq_len), jnp.int32)

  def init(key):
    init_rng, dropout_rng = jax.random.split(key)
    params = nn.meta.unbox(model.init(init_rng, tokens, deterministic=True)["params"])
    opt_state = tx.init(params)
    diag_state = (
        diagnostics.init(params, config.diagnostics, token_frequencies, opt_state=opt_state)
        if config.diagnostics.enabled
        else None
    )
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state,
                      diag_state=diag_state, rng=dropout_rng,
                      diverged_at=jnp.full((), -1, jnp.int32))

  return init


def state_shardings(abstract_state, mesh, params_shape):
  """TrainState of shardings: parameters by their logical axes, optimizer and diagnostics
  state mirroring them, scalars replicated."""
  params_sh = sharding.param_shardings(params_shape, mesh)
  rep = sharding.replicated(mesh)
  return TrainState(
      step=rep, params=params_sh,
      opt_state=sharding.mirror_shardings(abstract_state.opt_state, abstract_state.params,
                                          params_sh, mesh),
      diag_state=sharding.mirror_shardings(abstract_state.diag_state, abstract_state.params,
                                           params_sh, mesh),
      rng=rep, diverged_at=rep)


def create_state(config, model, tx, mesh, token_frequencies, params_shape, abstract=False):
  """Sharded initial TrainState (and its shardings) from ``config.seed`` alone; initialised
  once, already sharded. ``abstract``: ShapeDtypeStructs with those shardings instead (nothing
  compiled or allocated)."""
  init = state_init(config, model, tx, token_frequencies)
  key = jax.random.PRNGKey(config.seed)
  shapes = jax.eval_shape(init, key)
  state_sh = state_shardings(shapes, mesh, params_shape)
  if abstract:
    return jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
                        shapes, state_sh), state_sh
  return jax.jit(init, out_shardings=state_sh)(key), state_sh


def token_frequencies(model, ds) -> np.ndarray:
  """float64 [model vocab]: the dataset's training unigram, zero on the padding ids."""
  freq = np.zeros(model.cfg.vocab_size, np.float64)
  freq[: ds.vocab_size] = ds.token_frequencies
  return freq


def initial_state(config, model, mesh, ds, abstract=False):
  """``(state, state_shardings, tx, learning_rate)`` of run ``config``: its seed's parameters
  and its peak learning rate in the optimizer state, sharded over ``mesh`` (``abstract``: the
  state's shapes only, :func:`create_state`)."""
  token_freq = token_frequencies(model, ds)
  # Abstract parameters (boxed with their logical axes): the optimizer's masks and the
  # shardings come from them; the real ones are initialised once, already sharded.
  params_shape = jax.eval_shape(
      lambda k: model.init(k, jnp.zeros((1, config.seq_len), jnp.int32))["params"],
      jax.random.PRNGKey(0),
  )
  tx, learning_rate = optimizers.build(config, nn.meta.unbox(params_shape))
  return (*create_state(config, model, tx, mesh, token_freq, params_shape, abstract), tx,
          learning_rate)


class Setup(NamedTuple):
  """What a run is made of, before its loop (also used by scripts/benchmark.py)."""

  mesh: Any
  dataset: Any
  model: gpt.GPT
  tx: optax.GradientTransformation
  learning_rate: Any  # (opt_state, step) -> the rate of that step
  state: TrainState  # run `config`'s initial state (ShapeDtypeStructs with setup(abstract=True))
  state_sharding: TrainState
  batch_sharding: Any


def setup(config: ml_collections.ConfigDict, *, validate: bool = True,
          abstract: bool = False) -> Setup:
  """Validates ``config`` (before any compile; ``validate=False``: the caller did), then builds
  mesh, data, model and the state (``abstract``: its shapes and shardings only, for a stack,
  which initialises its K runs itself)."""
  if validate:
    validate_config(config)
  sharding.maybe_initialize_distributed()
  mesh = sharding.make_mesh(config.mesh)
  sharding.check_batch(config.batch_size, mesh)
  if config.batch_size % jax.process_count():
    raise ValueError(
        f"config.batch_size={config.batch_size} is not divisible by the "
        f"{jax.process_count()} processes."
    )
  ds = _dataset(config)
  model = gpt.GPT(gpt.from_config(config.model, padded_vocab(ds.vocab_size,
                                                            config.model.vocab_multiple)))
  state, state_sh, tx, learning_rate = initial_state(config, model, mesh, ds, abstract)
  return Setup(mesh, ds, model, tx, learning_rate, state, state_sh, sharding.batch_sharding(mesh))


def compile_train_step(config, s: Setup):
  """``mode -> jitted train step``, each diagnostics mode compiled once, on first use (one run;
  :meth:`Stack.compile` for the loop's K).

  Call the steps inside ``sharding.activate(s.mesh)`` so that the model's activation sharding
  constraints are traced against the mesh.
  """
  return _jit_steps(config, s, s.state_sharding, s.batch_sharding, vmapped=False)[0]


def _jit_steps(config, s: Setup, state_sh, batch_sh, *, vmapped: bool):
  """``(mode -> jitted train step, jitted eval step, jitted probes)``, vmapped over a leading
  run axis when ``vmapped`` (:class:`Stack`)."""
  vmap = jax.vmap if vmapped else (lambda f: f)

  @functools.cache
  def train_fn(mode):
    step = functools.partial(
        train_step, model=s.model, tx=s.tx, learning_rate=s.learning_rate,
        diag_config=config.diagnostics, diag_mode=mode, nan_step=config.inject_nan_at_step,
    )
    return jax.jit(vmap(step), in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, None),
                   donate_argnums=0)

  eval_fn = jax.jit(
      vmap(functools.partial(eval_step, model=s.model, diag_config=config.diagnostics)),
      in_shardings=(state_sh.params, batch_sh, state_sh.diag_state))
  probes_fn = probe_fn(config, s.model)  # jitted; vmapped, jitted again as one program
  return train_fn, eval_fn, jax.jit(vmap(probes_fn)) if vmapped else probes_fn


def precompile(calls: dict[Any, tuple[Any, tuple]], parallel: bool = True) -> dict[Any, Any]:
  """Compiles every ``fn(*args)`` of ``calls`` ({key: (jitted fn, args)}) before it runs:
  ``{key: jax.stages.Compiled}``; a later call of ``fn`` on arguments like these reuses it.

  Tracing and lowering hold the GIL, so they run here one after another (seconds); XLA releases
  it while compiling (optimisation passes, kernel code generation, autotuning), so two or more
  compile in parallel threads: the step variants of diagnostics and the probes cost the slowest
  compile, not the sum. A single one, or any with ``parallel=False`` (``config.parallel_compile``),
  compiles in this thread. Args may be arrays or ``jax.ShapeDtypeStruct``s. Call inside
  ``sharding.activate(mesh)``.
  """
  import concurrent.futures  # pylint: disable=g-import-not-at-top

  lowered = {key: fn.lower(*args) for key, (fn, args) in calls.items()}
  if len(lowered) < 2 or not parallel:
    return {key: low.compile() for key, low in lowered.items()}
  with concurrent.futures.ThreadPoolExecutor(len(lowered)) as pool:
    return dict(zip(lowered, pool.map(lambda low: low.compile(), lowered.values())))


def batch_struct(config, sharding, *lead: int) -> jax.ShapeDtypeStruct:
  """The abstract int32 [*lead, B, T + 1] global batch (for lowering before any data)."""
  return jax.ShapeDtypeStruct((*lead, config.batch_size, config.seq_len + 1), jnp.int32,
                              sharding=sharding)


def step_calls(train_fn, modes, state: TrainState, batch) -> dict[Any, tuple[Any, tuple]]:
  """:func:`precompile`'s calls for the train step variants ``modes`` of ``train_fn``."""
  return {mode: (train_fn(mode), (state, batch)) for mode in modes}


def loop_calls(config, stack: Stack, fns, state: TrainState, start_step: int,
               probe) -> dict[Any, tuple[Any, tuple]]:
  """:func:`precompile`'s calls for everything the loop runs from ``start_step``: the step
  variants, the probes (key 'probes', unless ``probe`` is None) and the eval step ('eval');
  ``fns`` is :meth:`Stack.compile`'s."""
  train_fn, eval_fn, probes_fn = fns
  batch = batch_struct(config, stack.batch_sharding, *stack.lead)
  modes = step_modes(start_step, config.num_steps, config.diagnostics)
  return {**step_calls(train_fn, modes, state, batch),
          **({} if probe is None else {"probes": (probes_fn, (state.params, probe))}),
          "eval": (eval_fn, (state.params, batch, state.diag_state))}


# ------------------------------------------------------------------------------ K runs, one step

# Fields the runs of one loop may differ in (everything else is one compiled step and one loop).
PER_RUN = ("optimizer.learning_rate", "seed")
CADENCE = ("log_every", "sync_every", "eval_every", "checkpoint_every")


def check_stackable(configs: Sequence[ml_collections.ConfigDict]) -> None:
  """Raises naming the first field (other than ``PER_RUN``) in which two configs differ."""
  def shared(c):
    d = c.to_dict()
    d.pop("seed")
    d["optimizer"].pop("learning_rate")
    return d

  first = shared(configs[0])
  for k, c in enumerate(configs[1:], 1):
    diff = rundir.config_diff(first, shared(c))
    cadence = {f: (configs[0][f], c[f]) for f in CADENCE if configs[0][f] != c[f]}
    if diff or cadence:
      field, (a, b) = next(iter({**diff, **cadence}.items()))
      raise ValueError(f"runs of one loop may differ only in {PER_RUN}; run 0 and run {k} "
                       f"differ in config.{field} ({a!r} vs {b!r}): train them separately.")


def _take(tree, k):
  return jax.tree.map(lambda x: x[k], tree)


class Stack:
  """How the loop's K runs share one step. K = 1: the state, batch and steps as they are.
  K > 1 (runs that differ only in ``PER_RUN``: a sweep's rates and seeds share everything
  compiled, the rate lives in the optimizer state, ``optimizers.build``): every leaf gains a
  leading run axis and one ``jax.vmap(train_step)`` advances all of them, so that a small model
  fills a GPU::

    state:   TrainState whose every leaf is [K, ...]   (run k = leaf[k])
    batch:   int32 [K, B, T + 1]                        (run k's own data order, from its seed)
    metrics: {name: [K, ...]}                           (writers.MetricBuffer(stacked=True))
  """

  def __init__(self, configs: Sequence[ml_collections.ConfigDict], s: Setup):
    self.setup, self.k = s, len(configs)
    self.stacked = self.k > 1
    self.datasets = [s.dataset] + [_dataset(c) for c in configs[1:]]
    self.eval_splits = s.dataset.eval_splits
    self.lead = (self.k,) if self.stacked else ()  # the run axis of batches
    lead = lambda sh: NamedSharding(sh.mesh, P(None, *sh.spec))
    self.state_sharding = (jax.tree.map(lead, s.state_sharding) if self.stacked
                           else s.state_sharding)
    self.batch_sharding = lead(s.batch_sharding) if self.stacked else s.batch_sharding
    self._unstack = jax.jit(lambda st: [_take(st, k) for k in range(self.k)],
                            out_shardings=[s.state_sharding] * self.k)

  def take(self, tree, k: int):
    """Run ``k``'s part of a (host) tree of the stack."""
    return _take(tree, k) if self.stacked else tree

  def unstack(self, state: TrainState) -> list[TrainState]:
    """Each run's own state (what its checkpoints hold)."""
    return self._unstack(state) if self.stacked else [state]

  def steps_done(self, state: TrainState) -> int:
    return int(state.step[0] if self.stacked else state.step)

  def train_batch(self, step: int) -> np.ndarray:
    """The host batch of ``step``: [B, T + 1], or [K, B, T + 1]."""
    if not self.stacked:
      return self.datasets[0].train_batch(step)
    return np.stack([ds.train_batch(step) for ds in self.datasets])

  def eval_batches(self, split: str):
    if not self.stacked:
      yield from self.datasets[0].eval_batches(split)
      return
    for rows in zip(*(ds.eval_batches(split) for ds in self.datasets)):
      yield np.stack(rows)

  def probe_batch(self, configs):
    """The fixed probe tokens of each run (None when probes are off), stacked for K > 1."""
    probe = [probe_batch(c, ds) for c, ds in zip(configs, self.datasets)]
    if probe[0] is None or not self.stacked:
      return probe[0]
    return jnp.stack(probe)  # [K, n, T]: each run's own

  def compile(self, config, s: Setup):
    """``(mode -> jitted train step, jitted eval step, jitted probes)`` of the stack."""
    return _jit_steps(config, s, self.state_sharding, self.batch_sharding, vmapped=self.stacked)

  def name(self, workdirs) -> str:
    """The progress line's label: the run's directory name, or how many runs."""
    return (os.path.basename(os.path.normpath(workdirs[0])) if not self.stacked
            else f"{self.k} runs")

  def initial_state(self, configs, workdirs):
    """``(state, start_step, results)``: each run restored from its latest good checkpoint, or
    fresh; ``results[k]``: run k's identity and starting point (:func:`start_results`)."""
    s = self.setup
    if self.stacked:
      fresh = _initial_states(configs, self.datasets, s, self.state_sharding)
      runs = self.unstack(fresh)
    else:
      fresh = s.state
      runs = [fresh]
    results = [start_results(c, st, ds) for c, st, ds in zip(configs, runs, self.datasets)]
    del runs
    restored = [restore(w, c, s.state) for c, w in zip(configs, workdirs)]
    steps = [0 if st is None else int(st.step) for st in restored]
    if len(set(steps)) > 1:
      raise ValueError(f"the runs stand at different steps {steps}; resume them one at a time "
                       "(train.train_and_evaluate).")
    if not steps[0]:
      return fresh, 0, results
    if not self.stacked:
      return restored[0], steps[0], results
    return jax.jit(lambda ts: jax.tree.map(lambda *xs: jnp.stack(xs), *ts),
                   out_shardings=self.state_sharding)(restored), steps[0], results


def _dataset(config):
  return data_lib.build_dataset(
      config.data, seq_len=config.seq_len, global_batch_size=config.batch_size,
      seed=config.seed, process_index=jax.process_index(), process_count=jax.process_count(),
      num_train_steps=config.num_steps)


def _initial_states(configs, datasets, s: Setup, state_sh):
  """The K runs' initial states, stacked: one compiled initialiser (run 0's, vmapped over the
  seeds), then each run's own peak learning rate and frequency-bucket table put in place. A
  run alone (:func:`create_state`) starts from the same state."""
  freqs = [token_frequencies(s.model, ds) for ds in datasets]
  init = state_init(configs[0], s.model, s.tx, freqs[0])
  keys = jnp.stack([jax.random.PRNGKey(c.seed) for c in configs])
  state = jax.jit(jax.vmap(init), out_shardings=state_sh)(keys)
  state = state.replace(opt_state=optimizers.with_peak_lr(
      state.opt_state, [c.optimizer.learning_rate for c in configs]))
  if state.diag_state is not None and state.diag_state.token_bucket is not None:
    tables = np.stack([diagnostics.token_bucket_table(s.state.params, c.diagnostics, f)
                       for c, f in zip(configs, freqs)])
    bucket = state.diag_state.token_bucket
    state = state.replace(diag_state=state.diag_state._replace(
        token_bucket=jax.device_put(tables.astype(bucket.dtype), bucket.sharding)))
  return state


# ------------------------------------------------------------------------------ the run


def eval_totals(eval_fn, state: TrainState, batches: Iterable[np.ndarray], batch_sharding):
  """``eval_step``'s sums over a finite set of batches, fetched to the host."""
  totals = None
  for local in batches:
    batch = jax.make_array_from_process_local_data(batch_sharding, local)
    out = eval_fn(state.params, batch, state.diag_state)
    totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
  return jax.device_get(totals)


def summarize_eval(totals) -> dict:
  """``{"loss", "perplexity", "loss_by_frequency": [float | None, ...]}`` from eval sums.

  ``loss_by_frequency`` (only with the diagnostics' frequency buckets) has None for a bucket
  with no target tokens.
  """
  loss = float(totals["loss_sum"] / totals["tokens"])
  ev = {"loss": loss, "perplexity": float(np.exp(min(loss, 50.0)))}
  if "freq_loss_sum" in totals:
    sums, counts = totals["freq_loss_sum"], totals["freq_tokens"]
    ev["loss_by_frequency"] = [float(l / n) if n > 0 else None for l, n in zip(sums, counts)]
  return ev


def evaluate(eval_fn, state: TrainState, batches: Iterable[np.ndarray], batch_sharding) -> dict:
  """Mean loss, perplexity and loss by target-token frequency (``summarize_eval``)."""
  return summarize_eval(eval_totals(eval_fn, state, batches, batch_sharding))


def eval_scalars(split: str, ev: dict) -> dict[str, float]:
  """TensorBoard names: ``eval/...`` for the validation split, ``eval_<split>/...`` otherwise."""
  prefix = "eval" if split == "validation" else f"eval_{split}"
  out = {f"{prefix}/loss": ev["loss"], f"{prefix}/perplexity": ev["perplexity"]}
  for b, loss in enumerate(ev.get("loss_by_frequency", ())):
    if loss is not None:
      out[f"{prefix}/loss_by_frequency/freq_bucket={b:02d}"] = loss
  return out


def start_results(config, state: TrainState, ds) -> rundir.RunResults:
  """What a run's results.json says before it trains: its identity and starting point."""
  return rundir.RunResults(
      optimizer=config.optimizer.name, learning_rate=config.optimizer.learning_rate,
      seed=config.seed, num_params=sum(x.size for x in jax.tree.leaves(state.params)),
      num_steps=config.num_steps, tokens_per_step=config.batch_size * config.seq_len,
      init_params_fingerprint=params_fingerprint(state.params), baselines=ds.baselines(),
      config_fingerprint=rundir.config_fingerprint(config), data_sha256=ds.text_sha256,
  )


def params_fingerprint(params) -> list[float]:
  """[global L2 norm, sum] of the parameters: runs of a study must start from the same ones."""
  return [float(x) for x in jax.device_get(_fingerprint(params))]


@jax.jit  # module level: one compile per parameter structure, not one per run
def _fingerprint(params):
  return jnp.stack([optax.tree.norm(params), sum(jnp.sum(x) for x in jax.tree.leaves(params))])


def probe_batch(config, ds):
  """The fixed probe tokens of ``probes.measure`` (None when probes are off)."""
  if not (config.probes.enabled and config.diagnostics.enabled):
    return None
  return probes.probe_tokens(next(iter(ds.eval_batches("validation"))),
                             config.probes.num_sequences)


def probe_fn(config, model):
  """The jitted ``(params, probe tokens) -> metrics`` of ``config.probes`` (probes.measure_fn)."""
  return probes.measure_fn(model, thresholds=config.probes.thresholds, top_k=config.probes.top_k)


def probes_due(step: int, mode, config) -> bool:
  """Whether the probes are measured after step ``step``: every ``config.probes.every`` steps and
  at the end, or at each full diagnostics step when it is 0."""
  every = int(config.probes.every)
  return mode == "full" if every <= 0 else itstime(step, every, config.num_steps)


def step_mode(step: int, diag_config):
  """The train step variant of step ``step`` (0-based): a diagnostics mode, None when off."""
  return diagnostics.mode_for_step(step, diag_config) if diag_config.enabled else None


def step_modes(start: int, stop: int, diag_config) -> list:
  """The variants steps ``start .. stop - 1`` use (the modes repeat every ``every`` steps)."""
  period = int(diag_config.every) if diag_config.enabled else 1
  return sorted({step_mode(i, diag_config) for i in range(start, min(stop, start + period))},
                key=str)


def advance(train_fn, state, batches, step: int, diag_config):
  """Runs the loop's step number ``step`` (steps done once it is): ``(state, metrics, mode)``."""
  mode = step_mode(step - 1, diag_config)
  with jax.profiler.StepTraceAnnotation("train", step_num=step - 1):
    state, metrics = train_fn(mode)(state, next(batches)[1])
  return state, metrics, mode


def itstime(step: int, every: int, total: int) -> bool:
  """The one periodic-action rule (big_vision's ``itstime``): every ``every`` steps and at the end."""
  return step % every == 0 or step == total


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> rundir.RunResults:
  """Trains (or resumes) the run described by ``config`` in ``workdir``; returns its results.

  Raises, before any data is built or anything compiles: ``ValueError`` naming the field of a
  bad config, ``rundir.BadWorkdir`` for a workdir that cannot hold a run, ``rundir.Locked``
  while another process runs there, ``rundir.ConfigChanged`` if it holds a run with another
  trajectory config, ``rundir.BadFile`` if its bookkeeping is unreadable.
  """
  return train_runs([config], [workdir])[0]


def train_runs(configs: Sequence[ml_collections.ConfigDict],
               workdirs: Sequence[str]) -> list[rundir.RunResults]:
  """Trains (or resumes) ``configs[k]`` in ``workdirs[k]``: K >= 1 runs in one loop and one step.

  K = 1 is :func:`train_and_evaluate`. K > 1 runs differing only in ``PER_RUN`` (a sweep's rates
  and seeds) share one ``vmap(train_step)`` (:class:`Stack`); each keeps its own workdir exactly
  as if it had run alone: metrics.jsonl and TensorBoard scalars, orbax checkpoints (saved
  unstacked: a run resumes alone too), results.json, lock and config fingerprint. A run that
  diverges is finished at the sync that finds it (recorded ``diverged``, never checkpointed
  after it; its frozen state rides along) while the others go on. Raises as
  :func:`train_and_evaluate` does, for any of the runs, and ``ValueError`` for configs that
  cannot share a step or resumed runs that stand at different steps.
  """
  if len(configs) != len(workdirs) or not configs:
    raise ValueError("train_runs needs one workdir per config, and at least one.")
  for c in configs:
    validate_config(c)
  check_stackable(configs)
  sharding.maybe_initialize_distributed()
  is_main = jax.process_index() == 0
  for w in workdirs:
    rundir.make_workdir(w)
  config, runs = configs[0], range(len(configs))
  total, dcfg = config.num_steps, config.diagnostics
  with contextlib.ExitStack() as stack:
    # 1. Bookkeeping first: another process's lock, another trajectory, unreadable files stop
    #    the runs before any data is built.
    locks = [stack.enter_context(rundir.Lock(w, enabled=is_main)) for w in workdirs]
    for c, w in zip(configs, workdirs):
      rundir.check_same_trajectory(w, c)
    previous = [rundir.RunResults.load(w) for w in workdirs]
    # 2. Mesh, data, model, the state of each run (restored where a checkpoint exists).
    s = setup(config, validate=False, abstract=len(configs) > 1)  # a stack inits its own
    stack.enter_context(sharding.activate(s.mesh))
    st = Stack(configs, s)
    for w, prev, ds in zip(workdirs, previous, st.datasets):
      rundir.check_same_text(w, prev, ds.text_sha256)
    state, start_step, results = st.initial_state(configs, workdirs)
    for w, prev in zip(workdirs, previous):
      if start_step and prev and prev.devices not in (None, jax.device_count()):
        logging.warning(
            "%s: resuming at step %d on %d devices; the earlier segments trained on %d: the run "
            "goes on, but not bit for bit on the same trajectory (reductions split differently; "
            "docs/RELIABILITY.md).", w, start_step, jax.device_count(), prev.devices)
    logging.info("model: %.2fM parameters, vocab %d, mesh %s; %d run(s) starting at step %d",
                 results[0].num_params / 1e6, s.model.cfg.vocab_size, dict(s.mesh.shape),
                 len(runs), start_step)
    # 3. Each run's checkpoints, config.json and writers; one metric buffer for all of them.
    ckpts = [stack.enter_context(contextlib.closing(checkpointing.manager(
        rundir.path(w, rundir.CHECKPOINTS), keep=c.keep_checkpoints)))
             for c, w in zip(configs, workdirs)]
    run_writers = []
    for c, w in zip(configs, workdirs):
      if is_main:
        rundir.write_config(w, c)
      run_writers.append(writers.create_writer(w, just_logging=not is_main))
      stack.callback(run_writers[-1].close)
      if start_step == 0:
        run_writers[-1].write_hparams(writers.hparams(c))
    live = set(runs)  # runs whose divergence no sync has found yet
    found = {}  # diverged run -> steps done at the sync that found it
    # Every write goes through the buffer: kept on the device, fetched and written at host syncs.
    buffer = writers.MetricBuffer(run_writers, stacked=st.stacked)
    stack.callback(lambda: buffer.flush(live))  # before the writers close (LIFO)
    speed = writers.Throughput(results[0].tokens_per_step)  # each run's own tokens/s
    progress = writers.report_progress(total, writers.fanout(run_writers))
    bar = writers.ProgressBar(total, start_step, desc=st.name(workdirs))
    stack.callback(bar.close)
    preemption = checkpointing.Preemption(ckpts[0])
    stack.callback(preemption.close)
    batches = data_lib.prefetch_to_device(st.train_batch, start_step, st.batch_sharding,
                                          config.prefetch)
    stack.callback(batches.close)
    # 4. Every step variant, the probes and the eval step compile before the first step.
    fns = train_fn, eval_fn, probes_fn = st.compile(config, s)
    probe = st.probe_batch(configs)
    precompile(loop_calls(config, st, fns, state, start_step, probe), config.parallel_compile)

    def sync(step, diverged_at) -> bool:
      """Host sync after ``step``: fetches the buffered metrics (written a few after each later
      step, while the device computes) and finishes the runs found diverged; True once no run
      is left."""
      diverged_at = np.atleast_1d(jax.device_get(diverged_at))  # waits: the clock is exact
      if (tps := speed.update(step)) is not None:
        for k in live:
          buffer.add(step, {"train/tokens_per_sec": tps}, run=k)
      buffer.fetch(live)
      for k in sorted(live):
        locks[k].heartbeat()
        if diverged_at[k] >= 0:
          live.discard(k)
          found[k] = step
          buffer.add(int(diverged_at[k]), {"train/diverged": 1.0}, run=k)
          logging.warning("%s diverged at step %d: non-finite loss, gradient, update or "
                          "parameters", workdirs[k], int(diverged_at[k]))
      bar.show(loss=buffer.last_train[0].get("train/loss"), tokens_per_sec=speed.tokens_per_second)
      return not live

    # 5. The loop: a list of periodic actions after each step.
    status, last_eval = "completed", [{} for _ in runs]
    due = None  # (step, its diverged_at): a periodic sync, done once the next step is queued
    for step in range(start_step + 1, total + 1):  # `step`: steps done once this one is
      if preemption.reached(step - 1):
        status = "preempted"
        break
      state, metrics, mode = advance(train_fn, state, batches, step, dcfg)
      # The GPU runs this step while the host waits for the previous one and fetches the
      # buffered metrics, then writes them a couple of records per step: neither a periodic
      # sync nor the writing costs GPU time (syncing right after a step, or writing a whole
      # interval's records at once, would idle the GPU until the host queued the next step).
      if due is not None and sync(*due):
        break
      due = None
      buffer.write(limit=2)  # e.g. a full diagnostics step's record and a sync's tokens/s
      if itstime(step, config.log_every, total) or "diagnostics" in metrics:
        buffer.add(step, metrics)
      if probe is not None and probes_due(step, mode, config):
        buffer.add(step, {"diagnostics": probes_fn(state.params, probe)})
      progress(step)
      bar(step)
      evaluates = itstime(step, config.eval_every, total)  # always at the last step
      saves = step % config.checkpoint_every == 0 and step != total
      if itstime(step, config.sync_every, total) or saves:
        due = (step, jnp.copy(state.diverged_at))  # a copy: the next step donates the state
      if due is not None and (evaluates or saves):  # the host waits here anyway: sync now
        due, stop = None, sync(*due)
        if stop:
          break
      if evaluates:
        for split in st.eval_splits:
          totals = eval_totals(eval_fn, state, st.eval_batches(split), st.batch_sharding)
          for k in sorted(live):
            last_eval[k][split] = summarize_eval(st.take(totals, k))
            buffer.add(step, eval_scalars(split, last_eval[k][split]), run=k)
      if saves:  # only states a sync has found finite are saved
        buffer.write()  # the metrics of every step up to the checkpoint, before it
        for k, run_state in zip(runs, st.unstack(state)):
          if k in live:
            checkpointing.save(ckpts[k], step, run_state)
    # 6. The end: a last sync, each live run's last state saved, results recorded.
    end = st.steps_done(state)
    sync(end, state.diverged_at)
    buffer.flush(live)  # as at every checkpoint: its steps' metrics first
    out = []
    for k, ckpt, run_state in zip(runs, ckpts, st.unstack(state)):
      if k in live and end > 0 and ckpt.latest_step() != end:
        checkpointing.save(ckpt, end, run_state, force=True)
      ckpt.wait_until_finished()
      diverged_at = int(np.atleast_1d(jax.device_get(state.diverged_at))[k])
      out.append(final_results(
          results[k], status="diverged" if k in found else status,
          steps_done=found.get(k, end), diverged_at=diverged_at if k in found else None,
          last_train=buffer.last_train[k], last_eval=last_eval[k],
          tokens_per_second=speed.tokens_per_second))
  return [record_results(w, r, is_main) for w, r in zip(workdirs, out)]


def restore(workdir: str, config, state):
  """The latest good checkpoint of ``workdir`` restored into ``state``'s layout (arrays or
  ShapeDtypeStructs with shardings), else None.

  A checkpoint of another state layout, from a change to a field the trajectory fingerprint
  ignores (``diagnostics.enabled``, ``diagnostics.entry_sample_size``: the diagnostic state's
  arrays), raises ``rundir.ConfigChanged`` naming the changed fields: the training state is
  intact, so the fix is the old value (or ``--restart``), never a silent start from step 0.
  """
  try:
    return checkpointing.restore_latest(rundir.path(workdir, rundir.CHECKPOINTS), state)
  except checkpointing.StateMismatch as e:
    old = rundir.read_json(rundir.path(workdir, rundir.CONFIG))
    diff = rundir.config_diff(old, config, trajectory=False) if old else {}
    shown = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in list(diff.items())[:8])
    shown = shown or ("no field of config.json" if old else "unknown (no config.json)")
    raise rundir.ConfigChanged(
        f"{workdir}: {e}; changed since it was saved: {shown}. "
        "Resume with the old values, or pass --restart to move the run aside and start "
        "fresh.") from None


def final_results(results: rundir.RunResults, *, status: str, steps_done: int,
                  diverged_at: int | None, last_train: dict, last_eval: dict,
                  tokens_per_second: float | None) -> rundir.RunResults:
  """This segment's results (``record_results`` merges them with earlier segments')."""
  val = last_eval.get("validation", {})
  return dataclasses.replace(
      results, status=status, steps_done=steps_done,
      tokens_seen=steps_done * results.tokens_per_step, diverged_at_step=diverged_at,
      final_train_loss=last_train.get("train/loss"), final_eval_loss=val.get("loss"),
      final_eval_perplexity=val.get("perplexity"),
      final_eval_losses={split: ev["loss"] for split, ev in last_eval.items()},
      eval_loss_by_frequency=val.get("loss_by_frequency", []),
      tokens_per_second=tokens_per_second, devices=jax.device_count(),
      platform=jax.devices()[0].platform,
  )


def record_results(workdir: str, results: rundir.RunResults, is_main: bool) -> rundir.RunResults:
  """Merges ``results`` into what earlier segments of the run wrote, saves and returns them."""
  previous = rundir.RunResults.load(workdir)
  results = previous.merge(results) if previous else results
  if is_main:
    results.save(workdir)
  fmt = lambda x: "-" if x is None else f"{x:.4f}"
  logging.info("%s: %s after %d steps; train loss %s, eval loss %s", workdir, results.status,
               results.steps_done, fmt(results.final_train_loss), fmt(results.final_eval_loss))
  return results
