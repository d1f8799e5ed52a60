"""K runs of a sweep in one jitted step: ``train_stacked(configs, workdirs)``.

A small model cannot fill a GPU one run at a time. Runs that differ only in their peak learning
rate and seed share everything that is compiled (the rate lives in the optimizer state, see
``optimizers.build``), so their train states are stacked along a new leading axis of size K and
one ``jax.vmap(train.train_step)`` advances all of them::

  state:  TrainState whose every leaf is [K, ...]   (run k = leaf[k])
  batch:  int32 [K, B, T + 1]                        (run k's own data order, from its seed)

Each run keeps its own workdir exactly as if it had run alone (``train.train_and_evaluate``):
the same metrics.jsonl and TensorBoard scalars, its own orbax checkpoints (saved unstacked, so
a run can be resumed alone), results.json, lock and config fingerprint; a run that diverges is
finished at the next host sync like a solo run, while the others go on (its frozen state rides
along). ``tests/test_stacked.py`` checks that a stacked run equals the same run alone.

Restrictions: the configs must be equal except ``optimizer.learning_rate`` and ``seed`` and
the loop-cadence fields must agree; resumed runs must all stand at the same step (otherwise run
them alone).
"""

from __future__ import annotations

import contextlib
import functools
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxopt_study import checkpointing
from jaxopt_study import data as data_lib
from jaxopt_study import diagnostics
from jaxopt_study import optimizers
from jaxopt_study import rundir
from jaxopt_study import sharding
from jaxopt_study import train
from jaxopt_study import writers

# Fields stacked runs may differ in (everything else is one compiled step and one loop).
PER_RUN = ("optimizer.learning_rate", "seed")


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
    cadence = {f: (configs[0][f], c[f]) for f in ("log_every", "sync_every", "eval_every",
                                                  "checkpoint_every") if configs[0][f] != c[f]}
    if diff or cadence:
      field, (a, b) = next(iter({**diff, **cadence}.items()))
      raise ValueError(f"stacked runs may differ only in {PER_RUN}; run 0 and run {k} differ in "
                       f"config.{field} ({a!r} vs {b!r}): run them in separate stacks.")


def _stack(trees):
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def _stacked_sharding(tree_of_shardings):
  return jax.tree.map(lambda s: NamedSharding(s.mesh, P(None, *s.spec)), tree_of_shardings)


def _index(tree, k):
  return jax.tree.map(lambda x: x[k], tree)


def train_stacked(configs: Sequence[ml_collections.ConfigDict],
                  workdirs: Sequence[str]) -> list[rundir.RunResults]:
  """Trains (or resumes) ``configs[k]`` in ``workdirs[k]`` for all k in one stacked step."""
  if len(configs) != len(workdirs) or not configs:
    raise ValueError("train_stacked needs one workdir per config, and at least one.")
  check_stackable(configs)
  s = train.setup(configs[0])  # validates; mesh, model, run 0's dataset and state
  config, total, dcfg = configs[0], configs[0].num_steps, configs[0].diagnostics
  datasets = [s.dataset] + [
      data_lib.build_dataset(c.data, seq_len=c.seq_len, global_batch_size=c.batch_size,
                             seed=c.seed, process_index=jax.process_index(),
                             process_count=jax.process_count(), num_train_steps=c.num_steps)
      for c in configs[1:]
  ]
  is_main = jax.process_index() == 0
  for w in workdirs:
    os.makedirs(w, exist_ok=True)

  with contextlib.ExitStack() as stack:
    locks = [stack.enter_context(rundir.Lock(w, enabled=is_main)) for w in workdirs]
    for c, w in zip(configs, workdirs):
      rundir.check_same_trajectory(w, c)
    stack.enter_context(sharding.activate(s.mesh))
    state_sh = _stacked_sharding(s.state_sharding)
    fresh = _initial_states(configs, datasets, s, state_sh)
    unstack = jax.jit(lambda st: [_index(st, k) for k in range(len(configs))],
                      out_shardings=[s.state_sharding] * len(configs))
    results = [train.start_results(c, st, ds)
               for c, st, ds in zip(configs, unstack(fresh), datasets)]
    ckpt_dirs = [rundir.path(w, rundir.CHECKPOINTS) for w in workdirs]
    restored = [checkpointing.restore_latest(d, s.state) for d in ckpt_dirs]
    steps = [0 if st is None else int(st.step) for st in restored]
    if len(set(steps)) > 1:
      raise ValueError(f"stacked runs stand at different steps {steps}; resume them alone "
                       "(train.train_and_evaluate).")
    start_step = steps[0]
    state = fresh if start_step == 0 else jax.jit(_stack, out_shardings=state_sh)(restored)
    del fresh, restored
    ckpts = [stack.enter_context(contextlib.closing(
        checkpointing.manager(d, keep=c.keep_checkpoints))) for d, c in zip(ckpt_dirs, configs)]
    writer_list = []
    for c, w in zip(configs, workdirs):
      if is_main:
        rundir.write_config(w, c)
      writer_list.append(writers.create_writer(w, just_logging=not is_main))
      stack.callback(writer_list[-1].close)
      if start_step == 0:
        writer_list[-1].write_hparams(writers.hparams(c))
    buffers = [writers.MetricBuffer(w) for w in writer_list]
    speed = writers.Throughput(results[0].tokens_per_step)
    batch_sh = NamedSharding(s.mesh, P(None, *s.batch_sharding.spec))
    train_fn, eval_fn = _compile(config, s, state_sh, batch_sh)
    probes = [train.probe_batch(c, ds) for c, ds in zip(configs, datasets)]
    probe = None if probes[0] is None else jnp.stack(probes)  # [K, n, T]: each run's own
    measure_probes = jax.jit(jax.vmap(lambda p, t: train.measure_probes(config, s.model, p, t)))
    batch = train.batch_struct(config, batch_sh, len(configs))
    train.precompile({
        **train.step_calls(train_fn, train.step_modes(start_step, total, dcfg), state, batch),
        **train.probe_calls(measure_probes, state.params, probe)}, config.parallel_compile)
    preemption = checkpointing.Preemption(ckpts[0])
    stack.callback(preemption.close)
    batches = data_lib.prefetch_to_device(
        lambda step: np.stack([ds.train_batch(step) for ds in datasets]), start_step, batch_sh,
        config.prefetch)
    stack.callback(batches.close)
    pending = []  # [(step, stacked device metrics)]
    live = set(range(len(configs)))  # runs not yet finished by divergence
    finished = {}  # run -> steps done when its divergence was found

    def sync(step):
      """Host sync: each live run's metrics to its writer; finishes runs that diverged."""
      host, pending[:] = jax.device_get(pending), []
      diverged_at = np.asarray(jax.device_get(state.diverged_at))
      for k in sorted(live):
        for at, m in host:
          buffers[k].add(at, _index(m, k))
        buffers[k].flush()
        locks[k].heartbeat()
        if diverged_at[k] >= 0:
          live.discard(k)
          finished[k] = step
      if (tps := speed.update(step)) is not None:
        for k in live:  # each run's own tokens per second of wall time
          writer_list[k].write_scalars(step, {"train/tokens_per_sec": tps / len(configs)})

    status, last_eval = "completed", [{} for _ in configs]
    for step in range(start_step + 1, total + 1):
      if preemption.reached(step - 1):
        status = "preempted"
        break
      state, metrics, mode = train.advance(train_fn, state, batches, step, dcfg)
      if train.itstime(step, config.log_every, total) or "diagnostics" in metrics:
        pending.append((step, metrics))
      if probe is not None and train.probes_due(step, mode, config):
        measured = measure_probes(state.params, probe)  # every run at once
        for k in sorted(live):
          buffers[k].add(step, _index(measured, k))
      if train.itstime(step, config.sync_every, total):
        sync(step)
        if not live:
          break
      if train.itstime(step, config.eval_every, total):
        for split in s.dataset.eval_splits:
          totals = train.eval_totals(eval_fn, state, _stacked_eval(datasets, split), batch_sh)
          for k in sorted(live):
            last_eval[k][split] = train.summarize_eval(_index(totals, k))
            writer_list[k].write_scalars(step, train.eval_scalars(split, last_eval[k][split]))
      if step % config.checkpoint_every == 0 and step != total:
        sync(step)  # only finite states are saved
        run_states = unstack(state)
        for k in sorted(live):
          checkpointing.save(ckpts[k], step, run_states[k])
        del run_states
    sync(int(state.step[0]))
    out = []
    for k, (w, ckpt, run_state) in enumerate(zip(workdirs, ckpts, unstack(state))):
      diverged = k in finished
      steps_done = finished.get(k, int(run_state.step))
      if diverged:
        writer_list[k].write_scalars(int(run_state.diverged_at), {"train/diverged": 1.0})
      elif steps_done > 0 and ckpt.latest_step() != steps_done:
        checkpointing.save(ckpt, steps_done, run_state, force=True)
      ckpt.wait_until_finished()
      tps = None if speed.tokens_per_second is None else speed.tokens_per_second / len(configs)
      out.append(train.final_results(
          results[k], status="diverged" if diverged else status, steps_done=steps_done,
          diverged_at=int(run_state.diverged_at) if diverged else None,
          last_train=buffers[k].last_train, last_eval=last_eval[k], tokens_per_second=tps))
  return [train.record_results(w, r, is_main) for w, r in zip(workdirs, out)]


def _initial_states(configs, datasets, s: train.Setup, state_sh):
  """The K runs' initial states, stacked: one compiled initialiser (run 0's, vmapped over the
  seeds), then each run's own peak learning rate and frequency-bucket table put in place. A
  run alone (``train.create_state``) starts from the same state."""
  freqs = [train.token_frequencies(s.model, ds) for ds in datasets]
  init = train.state_init(configs[0], s.model, s.tx, freqs[0])
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


def _stacked_eval(datasets, split):
  """Run k's eval batches of ``split``, stacked: [K, B, T + 1] per batch."""
  for rows in zip(*(ds.eval_batches(split) for ds in datasets)):
    yield np.stack(rows)


def _compile(config, s: train.Setup, state_sh, batch_sh):
  """``(mode -> vmapped jitted train step, vmapped jitted eval step)``."""

  @functools.cache
  def train_fn(mode):
    step = functools.partial(
        train.train_step, model=s.model, tx=s.tx, learning_rate=s.learning_rate,
        diag_config=config.diagnostics, diag_mode=mode, nan_step=config.inject_nan_at_step)
    return jax.jit(jax.vmap(step), in_shardings=(state_sh, batch_sh),
                   out_shardings=(state_sh, None), donate_argnums=0)

  eval_fn = jax.jit(
      jax.vmap(functools.partial(train.eval_step, model=s.model, diag_config=config.diagnostics)),
      in_shardings=(state_sh.params, batch_sh, state_sh.diag_state))
  return train_fn, eval_fn
