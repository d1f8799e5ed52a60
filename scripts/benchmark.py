r"""Training-step benchmark: step time, tokens/s, MFU, memory, compile time, diagnostics cost.

  python scripts/benchmark.py --config=configs/adamw.py:gpt2_small \
      --config.model.attention_impl=cudnn --config.model.tie_embeddings=True \
      --batch_sizes=8,16,32 --optimizers=adamw,lion,sgd_momentum,adafactor,signsgd \
      --diagnostics=off,10,1 --append=BENCHMARKS.md

Every setting runs in this process on the real train step (``train.compile_train_step``) fed by
the real input pipeline (synthetic corpus, background prefetch to devices), dispatched the way
the training loop dispatches it: asynchronously, with no host sync per step. Steps are timed in
windows of ``--window`` consecutive steps (default 10, aligned so that each window holds one
whole diagnostics period: with diagnostics every 10 steps a window has exactly one full-metrics
step and nine counter steps), synchronised at the end of each window; the step time is the
median over ``--windows`` windows of (window time / window length), i.e. the mean over whole
periods. ``--breakdown`` also times the forward pass, forward + backward and the raw jitted
step on one fixed batch (device-synchronised, median of 10).

MFU = model FLOP/s / the bf16 matmul rate measured in this process (8192^3 products, timed as a
block of 20 after warm-up) per device. Model FLOPs per token follow nanoGPT/PaLM: 6 N + 12 L T D,
where N counts the parameters of every matrix multiply (blocks and the output head, which is the
token embedding when tied; not the lookups) and T is ``config.seq_len``.

Memory: "step GiB" is XLA's own account of the compiled step (arguments + outputs - donated
aliases + temporaries), exact per setting; "peak GiB" is the device allocator's peak so far in
the process (monotone over settings; settings run from the smallest batch up). Compile time is
the wall time of ``train.precompile`` over the step's variants (diagnostics modes): lowering one
after another, then XLA compiling them in parallel threads, as a run does.
``--profile=DIR`` traces a few steps of the first setting with ``jax.profiler`` and prints the
top device kernels per step (open DIR in Perfetto/TensorBoard for the timeline).
"""

from __future__ import annotations

import collections
import datetime
import functools
import gc
import glob
import gzip
import importlib
import json
import os
import subprocess
import sys
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # configs/

# pylint: disable=g-import-not-at-top,wrong-import-position
from jaxopt_study import cli
from jaxopt_study import data as data_lib
from jaxopt_study import sharding
from jaxopt_study import train

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", "configs/adamw.py:tiny", "Base config (file.py:PRESET).")
flags.DEFINE_list("batch_sizes", None, "Global batch sizes (default: the config's).")
flags.DEFINE_list("optimizers", None, "Optimizer names: configs/<name>.py (default: the config's).")
flags.DEFINE_list("diagnostics", ["off"], "Diagnostics cadences: 'off' or every-N steps.")
flags.DEFINE_integer("window", 10, "Steps per timed window (rounded up to whole diagnostics periods).")
flags.DEFINE_integer("windows", 4, "Timed windows per setting.")
flags.DEFINE_integer("steps", None, "Timed steps per setting; if set, windows = ceil(steps / window).")
flags.DEFINE_integer("warmup", 5, "Untimed steps per setting after compilation.")
flags.DEFINE_string("append", None, "Markdown file to append the table to (e.g. BENCHMARKS.md).")
flags.DEFINE_string("json_out", None, "Also write the rows as JSON here.")
flags.DEFINE_bool("breakdown", False, "Also time forward and forward+backward alone (first setting).")
flags.DEFINE_integer("loop_steps", 0, "Also train each setting with train.train_and_evaluate "
                     "itself for this many steps (in a temporary workdir) and report the loop's "
                     "tokens/s beside the step's (issue 8: the loop within 2% of the step). "
                     "Sets every setting's num_steps to it (the schedule is part of the step); "
                     "with JAX_COMPILATION_CACHE_DIR set the loop reuses the compiled step.")
flags.DEFINE_string("profile", None, "Trace the first setting into this folder; print top kernels.")
flags.DEFINE_integer("profile_top", 30, "How many device ops --profile prints (by time per step).")


def matmul_tflops(n: int = 8192, reps: int = 20) -> float:
  """Measured bf16 matmul rate of one device, TFLOP/s (random operands; a block of ``reps``)."""
  k1, k2 = jax.random.split(jax.random.PRNGKey(0))
  a = jax.random.normal(k1, (n, n), jnp.bfloat16)
  b = jax.random.normal(k2, (n, n), jnp.bfloat16)
  f = jax.jit(lambda a, b: a @ b)
  jax.block_until_ready([f(a, b) for _ in range(3)])
  t = time.perf_counter()
  jax.block_until_ready([f(a, b) for _ in range(reps)])
  return 2 * n**3 * reps / (time.perf_counter() - t) / 1e12


def flops_per_token(params, cfg, seq_len: int) -> float:
  """6 N_matmul + 12 L T D (forward + backward)."""
  n = 0
  for path, x in jax.tree_util.tree_leaves_with_path(params):
    name = "/".join(str(getattr(k, "key", k)) for k in path)
    if name.endswith("kernel"):
      n += x.size
  if cfg.tie_embeddings:
    n += cfg.vocab_size * cfg.d_model  # the head multiplies by wte
  return 6 * n + 12 * cfg.num_layers * seq_len * cfg.d_model


def peak_bytes() -> float | None:
  stats = jax.devices()[0].memory_stats() or {}
  return stats.get("peak_bytes_in_use")


def step_bytes(compiled) -> float:
  """XLA's account of one compiled step: arguments + outputs - donated aliases + temporaries."""
  m = compiled.memory_analysis()
  if m is None:
    return float("nan")
  return m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes


def bench_one(config, windows: int, window: int, warmup: int, profile: str | None = None,
              profile_top: int = 30) -> dict:
  """Times the real train step of ``config``; returns one row."""
  s = train.setup(config)
  with sharding.activate(s.mesh):
    return _bench(config, s, windows, window, warmup, profile, profile_top)


def _bench(config, s, windows, window, warmup, profile, profile_top) -> dict:
  get_step = train.compile_train_step(config, s)
  dcfg = config.diagnostics
  period = dcfg.every if dcfg.enabled else 1
  mode_of = functools.partial(train.step_mode, diag_config=dcfg)
  window = -(-window // period) * period  # whole diagnostics periods
  state = s.state
  batches = data_lib.prefetch_to_device(s.dataset.train_batch, 0, s.batch_sharding, config.prefetch)
  # Every variant compiled ahead of time, as the loop does (in parallel; the jitted step reuses
  # the executables): compile_s is the wall time a run spends compiling its train steps.
  t = time.perf_counter()
  compiled = train.precompile(
      train.step_calls(get_step, train.step_modes(0, period, dcfg), state, next(batches)[1]),
      config.parallel_compile)
  compile_s = time.perf_counter() - t
  mem = max(step_bytes(c) for c in compiled.values())
  step = 0
  for _ in range(warmup + (-warmup % period)):  # warm up, ending at a period boundary
    state, _ = get_step(mode_of(step))(state, next(batches)[1])
    step += 1
  jax.block_until_ready(state)
  wait0 = batches.wait_seconds
  per_step = []
  t_all = time.perf_counter()
  for _ in range(windows):
    t = time.perf_counter()
    for _ in range(window):
      state, _ = get_step(mode_of(step))(state, next(batches)[1])
      step += 1
    jax.block_until_ready(state)
    per_step.append((time.perf_counter() - t) / window)
  total = time.perf_counter() - t_all
  wait = batches.wait_seconds - wait0
  if profile:
    state, report = profile_steps(
        lambda st, i: get_step(mode_of(i))(st, next(batches)[1])[0], state, step, window, profile,
        profile_top)
    print(report, flush=True)
  batches.close()
  tokens = config.batch_size * config.seq_len
  median = float(np.median(per_step))
  return {
      "optimizer": config.optimizer.name,
      "batch": config.batch_size,
      "tied": bool(config.model.tie_embeddings),
      "diagnostics": dcfg.every if dcfg.enabled else "off",
      "step_ms": 1e3 * median,
      "step_ms_spread": 1e3 * float(np.max(per_step) - np.min(per_step)),
      "tokens_per_sec": tokens / median,
      "input_wait_pct": 100 * wait / total,
      "compile_s": compile_s,
      "step_gib": mem / 2**30,
      "peak_gib": (peak_bytes() or float("nan")) / 2**30,
      "flops_per_token": flops_per_token(state.params, s.model.cfg, config.seq_len),
      "devices": jax.device_count(),
      "diverged": int(state.diverged_at) >= 0,
  }


def profile_steps(run, state, step: int, steps: int, out_dir: str, top: int = 30):
  """Traces ``state = run(state, i)`` for i = step, ..., step + steps - 1; returns the final
  state and a report of the top device ops per step."""
  jax.profiler.start_trace(out_dir, create_perfetto_trace=True)
  for i in range(step, step + steps):
    state = run(state, i)
  jax.block_until_ready(state)
  jax.profiler.stop_trace()
  path = sorted(glob.glob(os.path.join(out_dir, "**", "*perfetto_trace.json.gz"), recursive=True))[-1]
  events = json.load(gzip.open(path))
  events = events["traceEvents"] if isinstance(events, dict) else events
  procs = {e["pid"]: e.get("args", {}).get("name", "") for e in events
           if e.get("ph") == "M" and e.get("name") == "process_name"}
  device = [e for e in events if e.get("ph") == "X" and "dur" in e
            and any(k in procs.get(e.get("pid"), "") for k in ("GPU", "TPU", "/device:"))]
  by_name = collections.defaultdict(lambda: [0.0, 0])
  for e in device:
    by_name[e["name"]][0] += e["dur"]
    by_name[e["name"]][1] += 1
  busy = sum(d for d, _ in by_name.values()) / 1e3 / steps
  lines = [f"profile: {len(device)} device ops over {steps} steps, busy {busy:.1f} ms/step; {path}"]
  for name, (d, c) in sorted(by_name.items(), key=lambda kv: -kv[1][0])[:top]:
    lines.append(f"  {d / 1e3 / steps:7.2f} ms/step {c / steps:6.1f}x  {name[:90]}")
  return state, "\n".join(lines)


def loop_tokens_per_sec(config) -> tuple[float, float]:
  """tokens/s of ``train.train_and_evaluate`` itself (metric buffer, probes, progress, preemption
  checks, host syncs: everything the loop adds to the step) on ``config`` for its
  ``num_steps``, with a host sync every quarter of the run (in whole diagnostics periods):

  - whole: its own ``results.tokens_per_second``, between its first and last host sync (so
    compilation, the final evaluation and the final checkpoint are not counted), which
    includes the run's end (the final probes, and a last sync with no step queued behind it);
  - steady: the same up to the second-to-last sync (the ``train/tokens_per_sec`` it logged
    there), the rate of a long run, whose end is amortised over thousands of steps.
  """
  import tempfile  # pylint: disable=g-import-not-at-top
  from jaxopt_study import rundir  # pylint: disable=g-import-not-at-top
  from jaxopt_study.study import loading  # pylint: disable=g-import-not-at-top
  c = config.copy_and_resolve_references()
  period, steps = (c.diagnostics.every if c.diagnostics.enabled else 1), c.num_steps
  c.sync_every = max(period, steps // 4 // period * period)
  c.eval_every = c.checkpoint_every = steps
  with tempfile.TemporaryDirectory() as workdir:
    whole = float(train.train_and_evaluate(c, workdir).tokens_per_second)
    logged = loading.read_metrics(rundir.path(workdir, rundir.METRICS))["train/tokens_per_sec"]
    logged = logged.dropna()
  return whole, float(logged.iloc[-2]) if len(logged) > 1 else whole


def _median_ms(fn, *args, reps=10, donates=False):
  """Median device-synchronised time of fn(*args); a donating fn is fed its own output."""
  out = jax.block_until_ready(fn(*args))
  times = []
  for _ in range(reps):
    if donates:
      args = (out,) + args[1:]
    t = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t)
  return 1e3 * float(np.median(times))


def breakdown(config) -> dict:
  """Where a step's time goes: forward, forward + backward, and the whole train step."""
  s = train.setup(config)
  batch = jax.device_put(s.dataset.train_batch(0), s.batch_sharding)

  def loss(params, batch):
    logits = s.model.apply({"params": params}, batch[:, :-1])
    return train.cross_entropy(logits, batch[:, 1:]).mean()

  fwd = jax.jit(loss)
  fwd_bwd = jax.jit(jax.value_and_grad(loss))
  with sharding.activate(s.mesh):
    step = train.compile_train_step(config, s)(None)
    return {
        "forward_ms": _median_ms(fwd, s.state.params, batch),
        "forward_backward_ms": _median_ms(fwd_bwd, s.state.params, batch),
        "train_step_ms": _median_ms(lambda st, b: step(st, b)[0], s.state, batch, donates=True),
    }


def optimizer_block(name: str, preset: str):
  """``config.optimizer`` of configs/<name>.py (the per-optimizer config files differ in nothing
  else); unknown names list the files."""
  try:
    module = importlib.import_module(f"configs.{name}")
  except ModuleNotFoundError:
    files = sorted(os.path.basename(f)[:-3] for f in glob.glob("configs/*.py"))
    raise ValueError(f"--optimizers: no configs/{name}.py; valid: {files}") from None
  return module.get_config(preset).optimizer


def main(argv):
  del argv
  base = FLAGS.config
  rate = matmul_tflops() if jax.devices()[0].platform == "gpu" else matmul_tflops(2048, 5)
  device = f"{jax.device_count()} x {jax.devices()[0].device_kind}"
  print(f"device: {device}; measured bf16 matmul {rate:.3g} TFLOP/s per device", flush=True)
  settings = []
  for opt in FLAGS.optimizers or [base.optimizer.name]:
    block = optimizer_block(opt, base.preset)  # before any compile: a bad name fails at once
    for b in sorted(int(x) for x in (FLAGS.batch_sizes or [base.batch_size])):
      for d in FLAGS.diagnostics:
        config = base.copy_and_resolve_references()
        config.unlock()
        config.optimizer = block
        config.batch_size = b
        if FLAGS.loop_steps:  # the loop's run length; the schedule's constants are in the step
          config.num_steps = FLAGS.loop_steps
        config.diagnostics.enabled = d != "off"
        if d != "off":
          config.diagnostics.every = int(d)
        settings.append(config)
  if FLAGS.breakdown:
    config = settings[0].copy_and_resolve_references()
    config.diagnostics.enabled = False
    print("breakdown:", json.dumps(breakdown(config)), flush=True)
  rows = []
  for i, config in enumerate(settings):
    opt, b = config.optimizer.name, config.batch_size
    d = config.diagnostics.every if config.diagnostics.enabled else "off"
    windows = -(-FLAGS.steps // FLAGS.window) if FLAGS.steps else FLAGS.windows
    gc.collect()  # the previous setting's buffers, before this one's large temporaries
    try:
      row = bench_one(config, windows, FLAGS.window, FLAGS.warmup,
                      FLAGS.profile if i == 0 else None, FLAGS.profile_top)
    except Exception as e:  # e.g. out of memory at a large batch: record, go on
      msg = str(e).splitlines()[0][:160]
      print(f"{opt} batch={b} diag={d}: FAILED {msg}", flush=True)
      rows.append({"optimizer": opt, "batch": b, "tied": bool(config.model.tie_embeddings),
                   "diagnostics": d, "error": msg})
      continue
    row["mfu_pct"] = 100 * row["tokens_per_sec"] * row["flops_per_token"] / (rate * 1e12 * row["devices"])
    if FLAGS.loop_steps:
      gc.collect()
      row["loop_tokens_per_sec"], row["loop_steady_tokens_per_sec"] = loop_tokens_per_sec(config)
      row["loop_vs_step_pct"] = 100 * (row["tokens_per_sec"] / row["loop_tokens_per_sec"] - 1)
      row["loop_steady_vs_step_pct"] = 100 * (
          row["tokens_per_sec"] / row["loop_steady_tokens_per_sec"] - 1)
    rows.append(row)
    print(json.dumps(row), flush=True)
    if FLAGS.json_out:  # after every row: a run cut short keeps what it measured
      with open(FLAGS.json_out, "w") as f:
        json.dump({"device": device, "matmul_tflops": rate, "rows": rows}, f, indent=2)
  table = render(rows, device, rate)
  print(table)
  if FLAGS.append:
    with open(FLAGS.append, "a") as f:
      f.write(table + "\n")


def render(rows, device, rate) -> str:
  try:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
  except OSError:
    commit = "?"
  head = (
      f"\n### {device}, {datetime.date.today().isoformat()}, commit {commit or '?'}\n\n"
      f"`{' '.join(['python'] + sys.argv)}`\n\n"
      f"jax {jax.__version__}; measured bf16 matmul rate {rate:.3g} TFLOP/s per device.\n\n"
      "| optimizer | batch | tied | diagnostics | step ms | spread ms | tokens/s | MFU % | "
      "compile s | step GiB | peak GiB | input wait % | loop tokens/s (step - loop) | "
      "steady loop tokens/s (step - loop) |\n"
      "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
  )
  lines = []
  for r in rows:
    if "error" in r:
      lines.append(f"| {r['optimizer']} | {r['batch']} | {r['tied']} | {r['diagnostics']} | "
                   f"failed: {r['error']} | | | | | | | | | |")
      continue
    lines.append(
        f"| {r['optimizer']} | {r['batch']} | {r['tied']} | {r['diagnostics']} | "
        f"{r['step_ms']:.1f} | {r['step_ms_spread']:.1f} | {r['tokens_per_sec']:,.0f} | "
        f"{r['mfu_pct']:.1f} | {r['compile_s']:.0f} | {r['step_gib']:.1f} | {r['peak_gib']:.1f} | "
        f"{r['input_wait_pct']:.2f} | "
        + (f"{r['loop_tokens_per_sec']:,.0f} ({r['loop_vs_step_pct']:+.1f}%) | "
           f"{r['loop_steady_tokens_per_sec']:,.0f} ({r['loop_steady_vs_step_pct']:+.1f}%) |"
           if "loop_tokens_per_sec" in r else "| |")
    )
  return head + "\n".join(lines)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
