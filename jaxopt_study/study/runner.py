"""Runs a study: every (condition, optimizer, learning rate, seed) through train.train_and_evaluate.

``run_study(study_config, workdir)`` expands ``configs/study.py``'s config into runs and trains
them one after the other in this process, each in its own workdir
``WORKDIR/runs/<condition>/<optimizer>/lr=<lr>/seed=<seed>``:

* identical conditions: a run's config is ``study.base`` + the condition's overrides + the
  optimizer block of ``configs.default.OPTIMIZER_BLOCKS`` with the grid's learning rate + the
  seed, and ``num_steps = token_budget // (batch_size * seq_len)``; ``config.seed`` fixes both
  the initial parameters and the data order, so every optimizer of a (condition, seed) starts
  from the same parameters and sees the same batches;
* a run whose results.json says completed (all steps) or diverged is reused, an interrupted one
  (preempted / running / no results.json but checkpoints) resumes from its checkpoint, and a run
  that raises is recorded as ``status: failed`` with the error and does not stop the study
  (re-run when ``retry_failed``);
* ``WORKDIR/study.json`` describes the study (config, conditions with their shift steps and
  token-frequency buckets, every run with its status) for the report.

A SIGTERM during a run checkpoints it (train.py) and stops the study; running the same command
again continues where it stopped.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
import time
import traceback
from typing import Any, Optional

import ml_collections
import numpy as np

from jaxopt_study import rundir
from jaxopt_study import train
from jaxopt_study.study import report as report_lib

STUDY_FILE = report_lib.STUDY_FILE


@dataclasses.dataclass
class RunSpec:
  condition: str
  optimizer: str
  learning_rate: float
  lr_multiplier: float
  seed: int
  relpath: str
  config: ml_collections.ConfigDict


# ----------------------------------------------------------------------------- configs


def flatten_overrides(tree, prefix: str = "") -> dict[str, Any]:
  """{'model': {'ln_position': 'post'}} -> {'model.ln_position': 'post'}."""
  if isinstance(tree, ml_collections.ConfigDict):
    tree = tree.to_dict()
  out = {}
  for k, v in (tree or {}).items():
    if isinstance(v, dict):
      out.update(flatten_overrides(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def apply_overrides(config: ml_collections.ConfigDict, overrides: dict[str, Any],
                    what: str) -> None:
  """Sets dotted fields; a field missing from the run config is an error naming it."""
  for dotted, value in overrides.items():
    node = config
    parts = dotted.split(".")
    for p in parts[:-1]:
      if p not in node:
        raise KeyError(f"{what}: '{dotted}' is not a field of the run config ('{p}' missing)")
      node = node[p]
    if parts[-1] not in node:
      raise KeyError(f"{what}: '{dotted}' is not a field of the run config")
    if isinstance(value, list):
      value = tuple(value)
    node[parts[-1]] = value


def round_lr(lr: float) -> float:
  """Learning rates are rounded to 3 significant digits (the run directory's spelling)."""
  return float(rundir.lr_str(lr))


def num_steps_of(config: ml_collections.ConfigDict, token_budget: int) -> int:
  tokens_per_step = config.batch_size * config.seq_len
  if token_budget <= 0:
    return int(config.num_steps)
  steps = int(token_budget // tokens_per_step)
  if steps < 1:
    raise ValueError(f"token_budget={token_budget} is less than one step "
                     f"({tokens_per_step} tokens); raise config.token_budget.")
  return steps


def run_config(study: ml_collections.ConfigDict, condition: str, optimizer: str, lr: float,
               seed: int) -> ml_collections.ConfigDict:
  """The full run config of one run of the study (see the module docstring)."""
  from configs import default  # pylint: disable=g-import-not-at-top

  if optimizer not in default.OPTIMIZER_BLOCKS:
    raise ValueError(f"config.optimizers: unknown optimizer {optimizer!r}; valid: "
                     f"{sorted(default.OPTIMIZER_BLOCKS)}")
  config = study.base.copy_and_resolve_references()
  with config.unlocked():
    config.optimizer = default.OPTIMIZER_BLOCKS[optimizer]()
    overrides = study.optimizer_overrides.get(optimizer) if "optimizer_overrides" in study else None
    if overrides:
      apply_overrides(config.optimizer, flatten_overrides(overrides),
                      f"config.optimizer_overrides.{optimizer}")
    config.optimizer.learning_rate = float(lr)
    config.seed = int(seed)
    apply_overrides(config, flatten_overrides(study.conditions[condition].overrides),
                    f"config.conditions.{condition}.overrides")
    config.num_steps = num_steps_of(config, int(study.token_budget))
  return config


def expand(study: ml_collections.ConfigDict) -> list[RunSpec]:
  """Every run of the study, in the order they are trained (condition, optimizer, lr, seed)."""
  if not study.conditions:
    raise ValueError("config.conditions is empty: a study needs at least one condition.")
  only = tuple(study.get("only_conditions", ()) or ())
  unknown = [c for c in only if c not in study.conditions]
  if unknown:
    raise ValueError(f"config.only_conditions={unknown} not in config.conditions "
                     f"{list(study.conditions)}")
  runs = []
  for cond, cinfo in study.conditions.items():
    if only and cond not in only:
      continue
    mults = tuple(cinfo.get("lr_multipliers", ()) or ()) or tuple(study.lr_multipliers)
    seeds = tuple(cinfo.get("seeds", ()) or ()) or tuple(study.seeds)
    for opt in study.optimizers:
      if opt not in study.learning_rates:
        raise ValueError(f"config.learning_rates has no entry for optimizer {opt!r}")
      for mult in mults:
        lr = round_lr(study.learning_rates[opt] * mult)
        for seed in seeds:
          cfg = run_config(study, cond, opt, lr, seed)
          runs.append(RunSpec(cond, opt, lr, float(mult), int(seed),
                              rundir.run_relpath(cond, opt, lr, seed), cfg))
  keys = [r.relpath for r in runs]
  if len(set(keys)) != len(keys):
    raise ValueError("two runs of the study share a workdir (lr multipliers that round to the "
                     "same learning rate?)")
  return runs


# ----------------------------------------------------------------------------- study.json


def frequency_buckets(config: ml_collections.ConfigDict) -> Optional[list[dict]]:
  """Per token-frequency bucket: mean token frequency, token share, expected update frequency.

  The expected update frequency of an embedding row is the probability that its token occurs
  among the batch's B*T input tokens, 1 - (1 - q)^(B*T), averaged over the topic schedule for
  the synthetic corpus (independent-draw approximation: copied spans repeat tokens, so the real
  frequency is somewhat lower). None when the dataset cannot be built here.
  """
  try:
    from jaxopt_study import data as data_lib  # pylint: disable=g-import-not-at-top
    from jaxopt_study import diagnostics  # pylint: disable=g-import-not-at-top

    ds = data_lib.build_dataset(config.data, seq_len=config.seq_len,
                                global_batch_size=config.batch_size, seed=config.seed,
                                num_train_steps=config.num_steps)
    vocab = train.padded_vocab(ds.vocab_size, config.model.vocab_multiple)
    freq = np.zeros(vocab, np.float64)
    freq[: ds.vocab_size] = ds.token_frequencies
    dcfg = config.diagnostics
    table = np.asarray(diagnostics.bucket_table(freq, dcfg.num_freq_buckets, dcfg.bucket_scheme))
    n = config.batch_size * config.seq_len
    if hasattr(ds, "topic_probs") and hasattr(ds, "horizon_weights"):
      probs = np.zeros((ds.topic_probs.shape[0], vocab))
      probs[:, : ds.vocab_size] = ds.topic_probs
      expected = ds.horizon_weights() @ (1.0 - (1.0 - probs) ** n)
    else:
      expected = 1.0 - (1.0 - freq) ** n
    out = []
    for b in range(int(dcfg.num_freq_buckets)):
      sel = table == b
      if not sel.any():
        continue
      out.append({"bucket": b, "num_tokens": int(sel.sum()),
                  "mean_token_freq": float(freq[sel].mean()),
                  "token_share": float(freq[sel].sum() / max(freq.sum(), 1e-30)),
                  "expected_update_freq": float(expected[sel].mean())})
    return out
  except Exception as e:  # pylint: disable=broad-except
    logging.warning("frequency buckets unavailable for the report: %s", e)
    return None


def condition_info(study: ml_collections.ConfigDict, cond: str,
                   config: ml_collections.ConfigDict) -> dict:
  cinfo = study.conditions[cond]
  syn = config.data.get("synthetic", None)
  info = {
      "description": cinfo.get("description", ""),
      "overrides": flatten_overrides(cinfo.overrides),
      "data": config.data.name,
      "ln_position": config.model.ln_position,
      "tie_embeddings": bool(config.model.tie_embeddings),
      "num_steps": int(config.num_steps),
      "shift_steps": report_lib.shift_steps_from_config(json.loads(config.to_json_best_effort())),
  }
  if syn is not None and config.data.name == "synthetic":
    info.update(zipf_exponent=syn.zipf_exponent, shift=syn.shift, shift_every=syn.shift_every,
                num_topics=syn.num_topics)
  info["freq_buckets"] = frequency_buckets(config)
  return info


def is_done(results: Optional[dict], num_steps: int) -> bool:
  """A run to reuse: completed with every step, or diverged (a finding, not retried)."""
  if not results:
    return False
  status = results.get("status")
  if status == "diverged":
    return True
  return status == "completed" and results.get("steps_done") == num_steps


# ----------------------------------------------------------------------------- the study


def run_study(study: ml_collections.ConfigDict, workdir: str, *, command: Optional[str] = None,
              progress: bool = True) -> dict:
  """Trains every run of ``study`` under ``workdir``; returns the study.json dict.

  Args:
    study: a configs/study.py config.
    workdir: the study directory (created).
    command: the command line that started the study (recorded in study.json and REPORT.md).
    progress: show a tqdm progress bar.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top

  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  runs = expand(study)
  if study.get("compilation_cache", False):
    enable_compilation_cache()
  study_path = os.path.join(workdir, STUDY_FILE)
  previous = rundir.read_json(study_path) or {}

  first = {}
  for r in runs:
    first.setdefault(r.condition, r)
  spec = {
      "name": study.name,
      "preset": study.get("preset"),
      "command": command or previous.get("command"),
      "created": previous.get("created") or datetime.datetime.now().isoformat(timespec="seconds"),
      # When a run last trained (a re-run that reuses every run leaves it as it was).
      "updated": previous.get("updated") or datetime.datetime.now().isoformat(timespec="seconds"),
      "optimizers": list(study.optimizers),
      "seeds": list(study.seeds),
      "lr_multipliers": list(study.lr_multipliers),
      "learning_rates": dict(study.learning_rates),
      "token_budget": int(study.token_budget),
      "num_steps": int(runs[0].config.num_steps),
      "tokens_per_step": int(runs[0].config.batch_size * runs[0].config.seq_len),
      "setup": _setup_summary(runs[0].config),
      "conditions": {c: condition_info(study, c, r.config) for c, r in first.items()},
      "report": study.report.to_dict() if "report" in study else {},
      "config": json.loads(study.to_json_best_effort()),
      "runs": [],
  }
  prev_runs = {r.get("workdir"): r for r in previous.get("runs", [])}
  for r in runs:
    rd = os.path.join(workdir, r.relpath)
    res = rundir.read_json(os.path.join(rd, rundir.RESULTS))
    spec["runs"].append({
        "condition": r.condition, "optimizer": r.optimizer, "learning_rate": r.learning_rate,
        "lr_multiplier": r.lr_multiplier, "seed": r.seed, "workdir": r.relpath,
        "num_steps": int(r.config.num_steps),
        "status": (res or {}).get("status", "pending"),
        "wall_s": prev_runs.get(r.relpath, {}).get("wall_s"),
    })
  rundir.write_json(study_path, spec)

  bar = tqdm(total=len(runs), desc=f"study {study.name}", unit="run", disable=not progress)
  stopped = False
  for i, r in enumerate(runs):
    rd = os.path.join(workdir, r.relpath)
    entry = spec["runs"][i]
    res = rundir.read_json(os.path.join(rd, rundir.RESULTS))
    if is_done(res, r.config.num_steps) or (
        res and res.get("status") == "failed" and not study.retry_failed):
      entry["status"] = res["status"]
      bar.update(1)
      continue
    bar.set_postfix_str(f"{r.condition}/{r.optimizer} lr={rundir.lr_str(r.learning_rate)} "
                        f"seed={r.seed}")
    os.makedirs(rd, exist_ok=True)
    if res and res.get("status") == "failed":  # clear the old failure before retrying
      res = {k: v for k, v in res.items() if k not in ("error", "traceback")}
      res["status"] = "running"
      rundir.write_json(os.path.join(rd, rundir.RESULTS), res)
    t0 = time.perf_counter()
    try:
      out = train.train_and_evaluate(r.config, rd)
      entry["status"] = out.get("status", "unknown")
    except KeyboardInterrupt:
      raise
    except Exception as e:  # pylint: disable=broad-except
      logging.exception("run %s failed", r.relpath)
      failed = dict(rundir.read_json(os.path.join(rd, rundir.RESULTS)) or {})
      failed.update({
          "optimizer": r.optimizer, "learning_rate": r.learning_rate, "seed": r.seed,
          "num_steps": int(r.config.num_steps), "status": "failed",
          "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(),
      })
      rundir.write_json(os.path.join(rd, rundir.RESULTS), failed)
      entry["status"] = "failed"
    entry["wall_s"] = round(time.perf_counter() - t0, 1)
    spec["updated"] = datetime.datetime.now().isoformat(timespec="seconds")
    rundir.write_json(study_path, spec)
    jax.clear_caches()  # each run compiles its own steps; free them
    bar.update(1)
    if entry["status"] == "preempted":  # SIGTERM: the run checkpointed; stop the study too
      logging.warning("run %s preempted: stopping the study (re-run to continue)", r.relpath)
      stopped = True
      break
  bar.close()
  spec["stopped_early"] = stopped
  rundir.write_json(study_path, spec)
  return spec


def enable_compilation_cache(path: Optional[str] = None) -> Optional[str]:
  """Turns on JAX's persistent compilation cache unless the user already chose a directory."""
  import jax  # pylint: disable=g-import-not-at-top

  if jax.config.jax_compilation_cache_dir:
    return jax.config.jax_compilation_cache_dir
  root = os.environ.get("JAXOPT_STUDY_CACHE") or os.path.join(
      os.path.expanduser("~"), ".cache", "jaxopt_study")
  path = path or os.path.join(root, "jax_compilation_cache")
  try:
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  except Exception as e:  # pylint: disable=broad-except
    logging.warning("no persistent compilation cache: %s", e)
    return None
  return path


def _setup_summary(config: ml_collections.ConfigDict) -> dict:
  m = config.model
  return {
      "model": f"{m.num_layers} layers, d_model {m.d_model}, {m.num_heads} heads, "
               f"{m.ln_position}-LN, {'tied' if m.tie_embeddings else 'untied'} embeddings, "
               f"{m.dtype}",
      "data": config.data.name + (
          f" (Zipf {config.data.synthetic.zipf_exponent}, vocab {config.data.vocab_size}, "
          f"shift '{config.data.synthetic.shift}' every {config.data.synthetic.shift_every} "
          f"steps, {config.data.synthetic.num_topics} topics)"
          if config.data.name == "synthetic" else f" (vocab {config.data.vocab_size})"),
      "batch": f"{config.batch_size} x {config.seq_len} tokens",
      "schedule": f"{config.schedule.name}, warmup {config.schedule.warmup_steps} steps, "
                  f"min lr ratio {config.schedule.min_lr_ratio}",
      "diagnostics": f"every {config.diagnostics.every} steps" if config.diagnostics.enabled
                     else "off",
  }
