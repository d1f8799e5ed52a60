r"""Training-step benchmark: step time, tokens/s, MFU, peak memory, diagnostics cost, input wait.

  python scripts/benchmark.py --config=configs/adamw.py:gpt2_small \
      --batch_sizes=8,16,32 --optimizers=adamw,lion,sgd_momentum,adafactor,signsgd \
      --diagnostics=off,10,1 --steps=40 --append=BENCHMARKS.md

Every setting runs in this process on the real train step (``train.compile_train_step``) fed by
the real input pipeline (synthetic corpus, background prefetch to devices). Step time is the
median over ``--steps`` device-synchronised steps after ``--warmup`` steps (diagnostics at every
10 steps are also reported as the mean over whole 10-step periods, where their cost lives).

MFU = achieved model FLOP/s / the bf16 matmul rate measured here (a 8192^3 product, median of
20) per device. Model FLOPs per token follow nanoGPT/PaLM: 6 N + 12 L T D, where N counts the
parameters of every matrix multiply (blocks, and the output head; not the embedding lookups).
Peak memory is the device allocator's peak so far in the process (settings run from the
smallest batch up).
"""

from __future__ import annotations

import datetime
import json
import subprocess
import sys
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np

from configs import default
from jaxopt_study import data as data_lib
from jaxopt_study import diagnostics
from jaxopt_study import sharding
from jaxopt_study import train

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", "configs/adamw.py:tiny", "Base config (file.py:PRESET).")
flags.DEFINE_list("batch_sizes", None, "Global batch sizes (default: the config's).")
flags.DEFINE_list("optimizers", None, "Optimizer names (default: the config's).")
flags.DEFINE_list("diagnostics", ["off"], "Diagnostics cadences: 'off' or every-N steps.")
flags.DEFINE_integer("steps", 30, "Timed steps per setting.")
flags.DEFINE_integer("warmup", 5, "Untimed steps per setting after compilation.")
flags.DEFINE_string("append", None, "Markdown file to append the table to (e.g. BENCHMARKS.md).")
flags.DEFINE_string("json_out", None, "Also write the rows as JSON here.")
flags.DEFINE_bool("breakdown", False, "Also time forward and forward+backward alone (first setting).")


def matmul_tflops(n: int = 8192, reps: int = 20) -> float:
  """Measured bf16 matmul rate of one device, TFLOP/s (random operands, median)."""
  k1, k2 = jax.random.split(jax.random.PRNGKey(0))
  a = jax.random.normal(k1, (n, n), jnp.bfloat16)
  b = jax.random.normal(k2, (n, n), jnp.bfloat16)
  f = jax.jit(lambda a, b: a @ b)
  f(a, b).block_until_ready()
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    f(a, b).block_until_ready()
    times.append(time.perf_counter() - t)
  return 2 * n**3 / float(np.median(times)) / 1e12


def flops_per_token(params, cfg) -> float:
  """6 N_matmul + 12 L T D (forward + backward)."""
  n = 0
  for path, x in jax.tree_util.tree_leaves_with_path(params):
    name = "/".join(str(getattr(k, "key", k)) for k in path)
    if name.endswith("kernel"):
      n += x.size
  if cfg.tie_embeddings:
    n += cfg.vocab_size * cfg.d_model  # the head multiplies by wte
  return 6 * n + 12 * cfg.num_layers * cfg.max_len * cfg.d_model


def peak_bytes() -> float | None:
  stats = jax.devices()[0].memory_stats() or {}
  return stats.get("peak_bytes_in_use")


def bench_one(config, steps: int, warmup: int) -> dict:
  """Times the real train step of ``config``; returns one row."""
  s = train.setup(config)
  with sharding.activate(s.mesh):
    return _bench(config, s, steps, warmup)


def _bench(config, s, steps, warmup) -> dict:
  get_step = train.compile_train_step(config, s)
  dcfg = config.diagnostics
  mode_of = (lambda i: diagnostics.mode_for_step(i, dcfg)) if dcfg.enabled else (lambda i: None)
  state = s.state
  batches = data_lib.prefetch_to_device(s.dataset.train_batch, 0, s.batch_sharding, config.prefetch)
  t_compile = time.perf_counter()
  # Compile every mode first (each once), then warm up.
  for mode in sorted({mode_of(i) for i in range(max(dcfg.every, 1) * 2)}, key=str):
    state, _ = get_step(mode)(state, next(batches)[1])
  jax.block_until_ready(state)
  compile_s = time.perf_counter() - t_compile
  step = int(state.step)
  for _ in range(warmup):
    state, _ = get_step(mode_of(step))(state, next(batches)[1])
    step += 1
  jax.block_until_ready(state)
  wait0 = batches.wait_seconds
  times = []
  t_all = time.perf_counter()
  for _ in range(steps):
    t = time.perf_counter()
    state, _ = get_step(mode_of(step))(state, next(batches)[1])
    jax.block_until_ready(state)
    times.append(time.perf_counter() - t)
    step += 1
  total = time.perf_counter() - t_all
  wait = batches.wait_seconds - wait0
  batches.close()
  tokens = config.batch_size * config.seq_len
  median = float(np.median(times))
  mean = float(np.mean(times))
  return {
      "optimizer": config.optimizer.name,
      "batch": config.batch_size,
      "diagnostics": dcfg.every if dcfg.enabled else "off",
      "step_ms_median": 1e3 * median,
      "step_ms_mean": 1e3 * mean,
      "tokens_per_sec": tokens / median,
      "tokens_per_sec_mean": tokens / mean,
      "input_wait_pct": 100 * wait / total,
      "compile_s": compile_s,
      "peak_gib": (peak_bytes() or float("nan")) / 2**30,
      "flops_per_token": flops_per_token(state.params, s.model.cfg),
      "devices": jax.device_count(),
      "diverged": int(state.diverged_at) >= 0,
  }


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
  step = train.compile_train_step(config, s)(None)
  with sharding.activate(s.mesh):
    return {
        "forward_ms": _median_ms(fwd, s.state.params, batch),
        "forward_backward_ms": _median_ms(fwd_bwd, s.state.params, batch),
        "train_step_ms": _median_ms(lambda st, b: step(st, b)[0], s.state, batch, donates=True),
    }


def main(argv):
  del argv
  base = FLAGS.config
  rate = matmul_tflops() if jax.devices()[0].platform == "gpu" else matmul_tflops(2048, 5)
  device = f"{jax.device_count()} x {jax.devices()[0].device_kind}"
  print(f"device: {device}; measured bf16 matmul {rate:.3g} TFLOP/s per device", flush=True)
  if FLAGS.breakdown:
    config = base.copy_and_resolve_references()
    config.unlock()
    config.diagnostics.enabled = False
    config.batch_size = int((FLAGS.batch_sizes or [base.batch_size])[0])
    print("breakdown:", json.dumps(breakdown(config)), flush=True)
  rows = []
  for opt in FLAGS.optimizers or [base.optimizer.name]:
    for b in [int(x) for x in (FLAGS.batch_sizes or [base.batch_size])]:
      for d in FLAGS.diagnostics:
        config = base.copy_and_resolve_references()
        config.unlock()
        config.optimizer = default.OPTIMIZER_BLOCKS[opt]()
        config.batch_size = b
        config.diagnostics.enabled = d != "off"
        if d != "off":
          config.diagnostics.every = int(d)
        try:
          row = bench_one(config, FLAGS.steps, FLAGS.warmup)
        except Exception as e:  # e.g. out of memory at a large batch: record, go on
          msg = str(e).splitlines()[0][:160]
          print(f"{opt} batch={b} diag={d}: FAILED {msg}", flush=True)
          rows.append({"optimizer": opt, "batch": b, "diagnostics": d, "error": msg})
          continue
        row["mfu_pct"] = 100 * row["tokens_per_sec"] * row["flops_per_token"] / (rate * 1e12 * row["devices"])
        rows.append(row)
        print(json.dumps(row), flush=True)
  table = render(rows, device, rate)
  print(table)
  if FLAGS.json_out:
    with open(FLAGS.json_out, "w") as f:
      json.dump({"device": device, "matmul_tflops": rate, "rows": rows}, f, indent=2)
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
      "| optimizer | batch | diagnostics | step ms (median) | step ms (mean) | tokens/s | MFU % | input wait % | peak GiB |\n"
      "|---|---|---|---|---|---|---|---|---|\n"
  )
  lines = []
  for r in rows:
    if "error" in r:
      lines.append(f"| {r['optimizer']} | {r['batch']} | {r['diagnostics']} | failed: {r['error']} | | | | | |")
      continue
    lines.append(
        f"| {r['optimizer']} | {r['batch']} | {r['diagnostics']} | {r['step_ms_median']:.1f} | "
        f"{r['step_ms_mean']:.1f} | {r['tokens_per_sec']:,.0f} | {r['mfu_pct']:.1f} | "
        f"{r['input_wait_pct']:.2f} | {r['peak_gib']:.1f} |"
    )
  return head + "\n".join(lines)


if __name__ == "__main__":
  app.run(main)
