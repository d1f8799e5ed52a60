"""Runs a study under the protocol: bracketed lr sweeps, then seeds at each best rate.

``run_study(study_config, workdir)`` expands ``configs/study.py``'s config into runs and trains
them one after the other in this process, each in its own workdir
``WORKDIR/runs/<condition>/<optimizer>/lr=<lr>/seed=<seed>`` (:mod:`jaxopt_study.rundir`).

**Protocol** (every study follows it; a smoke test, ``config.report.smoke_test``, may use
fewer points and seeds and is reported without verdicts):

1. *Sweep*: for each (condition, optimizer), the learning rates ``learning_rates[opt] * m`` for
   the multipliers ``lr_multipliers`` (at least :data:`MIN_GRID_POINTS`, log-spaced: one
   constant ratio) with each of ``sweep_seeds``.
2. *Bracket*: the best rate is chosen on the validation split (``tables.choose_lr``, the
   report's rule). While it is on an edge of the grid, the grid is extended on that side by
   ``lr_grid_extension_points`` points (the same ratio, trained together), at most
   ``lr_grid_max_extensions`` points per side; the report says when the optimum is still not
   bracketed.
3. *Seeds*: every seed of ``seeds`` (at least :data:`MIN_SEEDS`) at the best rate; the report
   gives final test-split numbers over them with 95% Student-t intervals.

4. *Layer scores* (``analyze_layers``, off when the field is absent): as soon as an
   optimizer's runs of a condition are done (its checkpoints are then on this machine),
   ``analysis.report.analyze_run`` (Jacobians, usefulness, causal and permutation scores of
   the last checkpoint, ``RUN/analysis/analysis.json``) on every completed run at its best
   rate, skipped where analysis.json is current (``analysis.files.is_current``) or the run has
   no checkpoint here (trained elsewhere); a failure is logged and recorded in study.json
   (``analysis``: 'done', 'skipped: ...' or 'failed: ...'), never stops the study. A
   condition's runs share the model's shapes, so its analyses share their compiled functions.

**Many runs per device**: with ``stack_runs = K > 1``, the fresh runs of one step above (they
differ only in learning rate and seed) train K at a time in one vmapped step
(``train.train_runs``), each in its own run directory exactly as if alone.

**Identical conditions**: a run's config is ``study.base`` + the condition's overrides + the
optimizer's default block (``optimizers.default_config``) with ``optimizer_overrides`` and the
grid's learning rate + the seed, and ``num_steps = token_budget // (batch_size * seq_len)``;
``config.seed`` fixes both the initial parameters and the data order, so every optimizer of a
(condition, seed) starts from the same parameters and sees the same batches.

**Reuse**: a run whose results.json says completed (all steps) or diverged is reused, an
interrupted one (preempted / running / checkpoints only) resumes, and a run that raises is
recorded as ``status: failed`` with the error and does not stop the study (re-run when
``retry_failed``). A run directory trained under a different config (its
``rundir.config_fingerprint`` differs from the one the study would give it now) is never
reused: the study stops with ``rundir.ConfigChanged`` naming the run and the changed fields,
or, with ``on_config_change='rerun'``, moves the old run aside (``rundir.move_aside``) and
trains it again. A run directory locked by another live process (``rundir.Locked``) stops the
study: two studies are running in one workdir.

``WORKDIR/study.json`` describes the study (config, protocol, conditions with their shift steps
and token-frequency buckets, every run with its phase, status and fingerprint) for the report;
an invocation with ``config.only_conditions`` / ``config.optimizers`` keeps what earlier ones
recorded of the rest (:func:`add_earlier_parts`), so a study run in parts has one. A SIGTERM
during a run checkpoints it (train.py) and stops the study; running the same command
again continues where it stopped. :func:`exit_code` maps the outcome to the process exit code.
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import os
import signal
import time
import traceback
from typing import Optional, Sequence

import ml_collections
import numpy as np

from jaxopt_study import rundir
from jaxopt_study import train
from jaxopt_study.study import loading
from jaxopt_study.study import protocol
from jaxopt_study.study import tables

# Exit codes of scripts/run_study.py.
EXIT_OK = 0  # at least one run completed (failed / diverged runs are findings, in the report)
EXIT_NO_RUN_COMPLETED = 3  # every run failed or diverged
EXIT_CONFIG_CHANGED = 4  # a run's config changed since it was trained (on_config_change=refuse)
EXIT_LOCKED = 5  # another live process trains in one of the study's run directories
# SIGTERM: the running run checkpointed and the study stopped; run the same command again to
# continue (EX_TEMPFAIL, for schedulers that requeue; the code main.py gives a preempted run).
EXIT_PREEMPTED = 75


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
      "overrides": rundir.flatten(cinfo.overrides.to_dict()),
      "data": config.data.name,
      "ln_position": config.model.ln_position,
      "tie_embeddings": bool(config.model.tie_embeddings),
      "num_steps": int(config.num_steps),
      "shift_steps": loading.shift_steps_from_config(json.loads(config.to_json_best_effort())),
  }
  if syn is not None and config.data.name == "synthetic":
    info.update(zipf_exponent=syn.zipf_exponent, shift=syn.shift, shift_every=syn.shift_every,
                num_topics=syn.num_topics, eval_at=syn.eval_at)
  info["freq_buckets"] = frequency_buckets(config)
  return info


def add_earlier_parts(spec: dict, previous: dict, sweep, condition_order) -> list[dict]:
  """Adds to ``spec`` (this invocation's study.json) the conditions and optimizers an earlier
  invocation in this workdir recorded for the (condition, optimizer) pairs this one leaves out
  (``config.only_conditions`` / ``config.optimizers``), conditions in ``condition_order`` (the
  study config's); returns those pairs' run entries (saved before this invocation's own). None
  of it when ``previous`` is another preset's study.json.

  A study run in parts into one workdir (one invocation per model size, as the `wikitext2_sizes`
  preset does) then keeps ONE study.json describing all of them: before, each invocation
  rewrote it with its own conditions only, and the report lost the others' descriptions, shift
  steps and frequency buckets.
  """
  if not previous or previous.get("preset") != spec["preset"]:
    return []
  pairs = {(r.condition, r.optimizer) for r in sweep}
  runs = [e for e in previous.get("runs", []) if (e["condition"], e["optimizer"]) not in pairs]
  old = previous.get("conditions", {})
  conds = {**{e["condition"]: old[e["condition"]] for e in runs if e["condition"] in old},
           **spec["conditions"]}
  order = [c for c in condition_order if c in conds] + [c for c in conds
                                                         if c not in condition_order]
  spec["conditions"] = {c: conds[c] for c in order}
  spec["optimizers"] = list(dict.fromkeys(spec["optimizers"] + [e["optimizer"] for e in runs]))
  return runs


def is_done(results: Optional[rundir.RunResults], num_steps: int) -> bool:
  """A run to reuse: completed with every step, or diverged (a finding, not retried)."""
  if results is None:
    return False
  if results.status == "diverged":
    return True
  return results.status == "completed" and results.steps_done == num_steps


def exit_code(spec: dict) -> int:
  """The process exit code of a study (the EXIT_* constants)."""
  if spec.get("stopped_early"):
    return EXIT_PREEMPTED
  statuses = [r["status"] for r in spec.get("runs", [])]
  if statuses and "completed" not in statuses:
    return EXIT_NO_RUN_COMPLETED
  return EXIT_OK


# ----------------------------------------------------------------------------- the study


STOPPED_ANALYSIS = "stopped: the study stopped (SIGTERM) before these scores; re-run to continue"


class _Runner:
  """Trains RunSpecs one at a time, keeping study.json up to date."""

  def __init__(self, study, workdir: str, spec: dict, previous: dict, progress: bool,
               earlier_runs: Sequence[dict] = ()):
    from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top

    self.study, self.workdir, self.spec = study, workdir, spec
    self.earlier_runs = list(earlier_runs)  # add_earlier_parts: saved before spec["runs"]
    self.path = os.path.join(workdir, loading.STUDY_FILE)
    self.previous = {r.get("workdir"): r for r in previous.get("runs", [])}  # study.json's
    self.entries: dict[str, dict] = {}
    self.bar = tqdm(total=0, desc=f"study {study.name}", unit="run", disable=not progress)
    self.stopped = False  # set by a preempted run or SIGTERM: no new run starts
    # Layer scores archived with a seeded study (seed_from_archive), in the directory that holds
    # runs/ (a --processes child's runs/ links to its parent's): those runs need no retraining.
    home = os.path.dirname(os.path.realpath(os.path.join(workdir, "runs")))
    self.archived_scores = set(loading.read_layer_scores(
        os.path.join(home, loading.RESULTS_DIR, loading.ARCHIVE_LAYER_SCORES)))
    try:  # SIGTERM between runs stops the study; during a run, checkpointing.Preemption chains here
      self._old_sigterm = signal.signal(signal.SIGTERM, self._on_sigterm)
    except ValueError:  # not the main thread
      self._old_sigterm = None

  def _on_sigterm(self, signum, frame):
    del signum, frame
    logging.warning("SIGTERM: the study stops after the current run")
    self.stopped = True

  def close(self) -> None:
    self.bar.close()
    if self._old_sigterm is not None:
      signal.signal(signal.SIGTERM, self._old_sigterm)

  def entry(self, r: protocol.RunSpec) -> dict:
    """The run's study.json entry (added, as pending, the first time)."""
    if r.relpath not in self.entries:
      res = rundir.RunResults.load(os.path.join(self.workdir, r.relpath))
      before = self.previous.get(r.relpath, {})  # its entry in an earlier study.json
      e = {"condition": r.condition, "optimizer": r.optimizer, "learning_rate": r.learning_rate,
           "lr_multiplier": r.lr_multiplier, "seed": r.seed, "phase": r.phase,
           "workdir": r.relpath, "num_steps": int(r.config.num_steps),
           "config_fingerprint": rundir.config_fingerprint(r.config),
           "status": res.status if res and res.status else "pending",
           "wall_s": before.get("wall_s")}
      if before.get("analysis"):  # e.g. "done (retrained here: ...)"
        e["analysis"] = before["analysis"]
      self.entries[r.relpath] = e
      self.spec["runs"].append(e)
      self.bar.total += 1  # shown at the next update: no 0/1, 0/2, ... count-up on screen
    return self.entries[r.relpath]

  def save(self) -> None:
    self.spec["stopped_early"] = self.stopped
    rundir.write_json(self.path, {**self.spec, "runs": self.earlier_runs + self.spec["runs"]})

  def check_config(self, r: protocol.RunSpec) -> Optional[rundir.RunResults]:
    """The run's results if its directory was trained under r.config (module docstring)."""
    rd = os.path.join(self.workdir, r.relpath)
    old = rundir.read_json(rundir.path(rd, rundir.CONFIG))
    if old is None or rundir.same_trajectory(old, r.config):
      return rundir.RunResults.load(rd)
    diff = ", ".join(f"{k}: {a!r} -> {b!r}"
                     for k, (a, b) in rundir.config_diff(old, r.config).items())
    what = f"run {r.relpath}: its config changed since it was trained ({diff})"
    if self.study.on_config_change != "rerun":
      raise rundir.ConfigChanged(
          f"{what}. Reusing it would mix two configs: train it again with "
          "--config.on_config_change=rerun (the old run is kept in its directory's "
          "replaced-<time>/), or use a new --workdir.")
    logging.warning("%s: training it again; the old run is at %s", what, rundir.move_aside(rd))
    return None

  def run(self, runs: list[protocol.RunSpec]) -> None:
    """Trains (or reuses) ``runs``, ``stack_runs`` at a time in one vmapped step where it can.

    Runs of one phase differ only in learning rate and seed, so they can share a step
    (``train.train_runs``) when they stand at the same step: fresh runs (no checkpoint,
    e.g. failed before their first one) are stacked, and so are runs whose latest checkpoints
    are at the same step (a stack stopped together, by SIGTERM or killed after its last save).
    """
    fresh, resumed = [], {}
    for r in runs:
      entry = self.entry(r)
      res = self.check_config(r)
      if is_done(res, r.config.num_steps) or (
          res and res.status == "failed" and not self.study.retry_failed):
        entry["status"] = res.status
        self.bar.update(1)
        continue
      rd = os.path.join(self.workdir, r.relpath)
      os.makedirs(rd, exist_ok=True)
      if res and res.status == "failed":  # clear the old failure before retrying
        res.status, res.error, res.traceback = "running", None, None
        res.save(rd)
      steps = rundir.checkpoint_steps(rd)
      if steps:
        resumed.setdefault(steps[-1], []).append(r)
      else:
        fresh.append(r)
    k = max(1, int(self.study.stack_runs))
    groups = [g[i:i + k] for g in [fresh, *resumed.values()] for i in range(0, len(g), k)]
    for group in groups:
      if self.stopped:
        return
      self._train(group)

  def _train(self, group: list[protocol.RunSpec]) -> None:
    """Trains one run, or several stacked; records each run's status (failed on an error)."""
    import jax  # pylint: disable=g-import-not-at-top

    rds = [os.path.join(self.workdir, r.relpath) for r in group]
    r0 = group[0]
    lrs = ", ".join(rundir.lr_str(r.learning_rate) for r in group)
    self.bar.set_postfix_str(f"{r0.condition}/{r0.optimizer} lr={lrs} "
                             f"seed={', '.join(str(r.seed) for r in group)} ({r0.phase})")
    t0 = time.perf_counter()
    try:
      if len(group) == 1:
        train.train_and_evaluate(r0.config, rds[0])
      else:
        train.train_runs([r.config for r in group], rds)
      errors, killed = [None] * len(group), False
    except (KeyboardInterrupt, rundir.Locked, rundir.ConfigChanged):
      raise  # not this run's failure: another process holds it, or it belongs to another config
    except Exception as e:  # pylint: disable=broad-except
      # After SIGTERM the error is the stop's (it reached the compiler too, e.g. ptxas exits
      # with code 15): the runs are preempted, not failed.
      killed = self.stopped
      logging.log(logging.WARNING if killed else logging.ERROR, "run(s) %s %s",
                  ", ".join(r.relpath for r in group),
                  f"stopped by SIGTERM: {e}" if killed else "failed", exc_info=not killed)
      errors = [(f"{type(e).__name__}: {e}", traceback.format_exc())] * len(group)
    wall = time.perf_counter() - t0
    for r, rd, err in zip(group, rds, errors):
      entry = self.entry(r)
      if err is not None:
        outcome = rundir.RunResults(
            optimizer=r.optimizer, learning_rate=r.learning_rate, seed=r.seed,
            num_steps=int(r.config.num_steps), status="preempted" if killed else "failed",
            config_fingerprint=rundir.config_fingerprint(r.config),
            error=None if killed else err[0], traceback=None if killed else err[1])
        (rundir.RunResults.load(rd) or rundir.RunResults()).merge(outcome).save(rd)
      entry["status"] = (rundir.RunResults.load(rd) or rundir.RunResults()).status or "unknown"
      # This run's share of the group's wall time (study.json sums to the study's).
      entry["wall_s"], entry["stacked"] = round(wall / len(group), 1), len(group)
      if entry["status"] == "preempted":  # SIGTERM: the run checkpointed; stop the study too
        logging.warning("run %s preempted: stopping the study (re-run to continue)", r.relpath)
        self.stopped = True
    self.spec["updated"] = datetime.datetime.now().isoformat(timespec="seconds")
    self.save()
    jax.clear_caches()  # each group compiles its own steps; free them
    self.bar.update(len(group))

  def analyze(self, condition: str, opt: str) -> None:
    """Layer scores of (condition, opt)'s completed runs at its best rate (protocol step 4)."""
    from jaxopt_study.analysis import files as analysis_files  # pylint: disable=g-import-not-at-top
    from jaxopt_study.analysis import report as analysis_report  # pylint: disable=g-import-not-at-top

    best = tables.choose_lr(self.records(condition, opt))
    if best is None:
      return
    for e in self.spec["runs"]:
      if self.stopped:  # SIGTERM: no new retrain or analysis starts
        return
      if ((e["condition"], e["optimizer"]) != (condition, opt) or e["status"] != "completed"
          or not math.isclose(e["learning_rate"], best, rel_tol=1e-9)):
        continue
      rd = os.path.join(self.workdir, e["workdir"])
      if analysis_files.is_current(rd):
        if not str(e.get("analysis", "")).startswith("done"):
          e["analysis"] = "done"
        continue
      retrain = not rundir.checkpoint_steps(rd)
      if retrain and e["workdir"] in self.archived_scores:
        e["analysis"] = "done (archived)"
        continue
      if retrain and not self.study.retrain_for_layer_scores:
        e["analysis"] = "skipped: no checkpoint in this run directory (trained elsewhere)"
        continue
      self.bar.set_postfix_str(f"{condition}/{opt} seed={e['seed']} (layer scores)")
      try:
        if retrain:
          e["analysis"] = self.retrain_and_analyze(e, rd)
        else:
          analysis_report.analyze_run(rd)
          e["analysis"] = "done"
      except Exception as ex:  # pylint: disable=broad-except
        if self.stopped:  # SIGTERM killed a compile (ptxas) or the retrain: continue later
          e["analysis"] = STOPPED_ANALYSIS
        else:
          logging.exception("layer scores of run %s failed", e["workdir"])
          e["analysis"] = f"failed: {type(ex).__name__}: {ex}"
      self.save()

  def retrain_and_analyze(self, e: dict, rd: str) -> str:
    """Layer scores of a finished run whose checkpoints are elsewhere (``retrain_for_layer_scores``):
    trains its config again in ``RUN/retrain`` (its recorded results stay as they are), writes
    the analysis of that checkpoint to ``RUN/analysis/``, then deletes the retrained run."""
    import shutil  # pylint: disable=g-import-not-at-top
    from jaxopt_study.analysis import report as analysis_report  # pylint: disable=g-import-not-at-top

    tmp = os.path.join(rd, "retrain")
    shutil.rmtree(tmp, ignore_errors=True)  # a retrain cut short starts again
    config = protocol.run_config(self.study, e["condition"], e["optimizer"], e["learning_rate"],
                                 e["seed"])
    again = train.train_and_evaluate(config, tmp)
    if again.status == "preempted":  # SIGTERM (self.stopped is set): retrained from 0 next time
      return STOPPED_ANALYSIS
    recorded = rundir.RunResults.load(rd)
    if again.status != "completed":
      return f"failed: the retrain {again.status} (recorded: {recorded.status})"
    analysis_report.analyze_run(tmp)
    out = os.path.join(rd, analysis_report.DIRNAME)
    shutil.rmtree(out, ignore_errors=True)
    shutil.move(os.path.join(tmp, analysis_report.DIRNAME), out)
    shutil.rmtree(tmp)
    return (f"done (retrained here: final validation loss {again.final_eval_loss:.4f}, "
            f"recorded {recorded.final_eval_loss:.4f})")

  def records(self, condition: str, optimizer: str) -> list[tuple[float, str, Optional[float]]]:
    """(lr, status, validation loss) of the sweep-seed runs of (condition, optimizer)."""
    out = []
    for e in self.spec["runs"]:
      if (e["condition"], e["optimizer"]) != (condition, optimizer) or (
          e["seed"] not in tuple(self.study.sweep_seeds)):
        continue
      res = rundir.RunResults.load(os.path.join(self.workdir, e["workdir"]))
      if res is not None:
        out.append((e["learning_rate"], res.status, res.final_eval_loss))
    return out


def run_study(study: ml_collections.ConfigDict, workdir: str, *, command: Optional[str] = None,
              progress: bool = True) -> dict:
  """Trains every run of ``study`` under ``workdir`` (module docstring); returns study.json.

  Args:
    study: a configs/study.py config.
    workdir: the study directory (created).
    command: the command line that started the study (recorded in study.json and REPORT.md).
    progress: show a tqdm progress bar.

  Raises:
    rundir.ConfigChanged: a run directory was trained under another config (and
      ``study.on_config_change`` is 'refuse'); raised before anything trains when the run is
      one of the sweep's.
    rundir.Locked: another live process trains in one of the run directories.
  """
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  sweep = protocol.expand(study)
  if study.compilation_cache:
    enable_compilation_cache()
  previous = rundir.read_json(os.path.join(workdir, loading.STUDY_FILE)) or {}
  now = datetime.datetime.now().isoformat(timespec="seconds")
  first = {}
  for r in sweep:
    first.setdefault(r.condition, r)
  spec = {
      "name": study.name,
      "preset": study.preset,
      "command": command or previous.get("command"),
      "created": previous.get("created") or now,
      # When a run last trained (a re-run that reuses every run leaves it as it was).
      "updated": previous.get("updated") or now,
      "optimizers": list(study.optimizers),
      "lr_multipliers": list(study.lr_multipliers),
      "learning_rates": dict(study.learning_rates),
      "lr_grid_max_extensions": int(study.lr_grid_max_extensions),
      "lr_grid_extension_points": int(study.lr_grid_extension_points),
      "sweep_seeds": list(study.sweep_seeds),
      "seeds": list(study.seeds),
      "token_budget": int(study.token_budget),
      "num_steps": int(sweep[0].config.num_steps),
      "tokens_per_step": int(sweep[0].config.batch_size * sweep[0].config.seq_len),
      "setup": _setup_summary(sweep[0].config),
      "conditions": {c: condition_info(study, c, r.config) for c, r in first.items()},
      "report": study.report.to_dict(),
      "config": json.loads(study.to_json_best_effort()),
      "runs": [],
  }
  if previous.get("note"):  # hand-written (the report prints it first): kept, for its author
    spec["note"] = previous["note"]
  earlier_runs = add_earlier_parts(spec, previous, sweep, list(study.conditions))
  runner = _Runner(study, workdir, spec, previous, progress, earlier_runs)
  try:
    for r in sweep:
      if study.on_config_change == "refuse":  # refuse a changed config before anything trains
        runner.check_config(r)
      runner.entry(r)
    runner.save()
    for cond in protocol.conditions_of(study):
      for opt in study.optimizers:
        if not _sweep_and_seeds(study, runner, cond, opt):
          break
        if study.analyze_layers:
          runner.analyze(cond, opt)
      if runner.stopped:
        break
      if study.analyze_layers:
        import jax  # pylint: disable=g-import-not-at-top
        jax.clear_caches()  # the analyses' compiled functions
  finally:
    runner.close()
  runner.save()
  return spec


def _sweep_and_seeds(study, runner: _Runner, cond: str, opt: str) -> bool:
  """Steps 1-3 of the protocol for (cond, opt); False when the study was stopped."""
  mults = sorted(float(m) for m in study.lr_multipliers)
  todo, phase, extended = mults, "sweep", {"low": 0, "high": 0}
  while todo:
    runner.run([protocol.make_run(study, cond, opt, mult, seed, phase)
                for mult in todo for seed in study.sweep_seeds])
    if runner.stopped:
      return False
    todo = protocol.next_multipliers(study, mults, runner.records(cond, opt), extended)
    phase = "extension" if todo else phase
    mults = sorted(mults + todo)
  best = tables.choose_lr(runner.records(cond, opt))
  if best is None:
    return True  # nothing completed: no best rate, no seeds (the report says so)
  lr_of = lambda m: protocol.round_lr(study.learning_rates[opt] * m)
  mult = min(mults, key=lambda m: abs(math.log(lr_of(m) / best)))
  # The sweep seeds are already trained at every grid point.
  runner.run([protocol.make_run(study, cond, opt, mult, seed, "seeds") for seed in study.seeds
              if seed not in tuple(study.sweep_seeds)])
  return not runner.stopped


def record_session(workdir: str, *, command: str, start: datetime.datetime, processes: int,
                   end: Optional[datetime.datetime] = None, device: Optional[str] = None) -> None:
  """Writes this invocation's entry of WORKDIR/sessions.json (the report's device and wall time).

  Called at the start (no end yet: a parent killed before its end, e.g. by ``timeout -k`` while
  its children finish a compile, still leaves its start), at SIGTERM (the end of its work) and
  at the end. The entry is the one with the same start and command.
  """
  path = os.path.join(workdir, loading.SESSIONS_FILE)
  sessions = rundir.read_json(path) or []
  key = start.isoformat(timespec="seconds")
  entry = next((s for s in sessions if s.get("start") == key and s.get("command") == command),
               None)
  if entry is None:
    entry = {"start": key, "command": command, "processes": processes}
    sessions.append(entry)
  entry["end"] = end.isoformat(timespec="seconds") if end else None
  entry["wall_s"] = round((end - start).total_seconds(), 1) if end else None
  if device:
    entry["device"] = device
  rundir.write_json(path, sessions)


def seed_from_archive(study: ml_collections.ConfigDict, archive: str, workdir: str) -> int:
  """Seeds ``workdir`` with the finished runs of a committed study so that the runner reuses them.

  ``archive`` is a study directory as committed beside its report (study.json, sessions.json,
  ``results/`` with :data:`loading.ARCHIVE_RESULTS`): on another machine, or after the run
  directories are gone, the study continues where it stopped. Every archived run that
  completed or diverged, with the config fingerprint of this study's config for it, gets
  ``RUN/results.json`` and ``RUN/config.json``; the report then reads its per-step series and
  layer scores from the archive, copied to ``workdir/results/`` (:func:`loading.load_study`).
  The archive may be another study sharing runs with this one (a finer grid, fewer optimizers):
  then only this study's runs (its optimizers, conditions and reachable rates) are seeded, and
  the archive's study.json and sessions.json are not copied. Nothing already in ``workdir`` is
  overwritten. Returns the number of runs seeded.
  """
  import shutil  # pylint: disable=g-import-not-at-top

  archived = rundir.read_json(
      os.path.join(archive, loading.RESULTS_DIR, loading.ARCHIVE_RESULTS))
  if not archived:
    raise FileNotFoundError(f"--from_archive={archive}: no {loading.RESULTS_DIR}/"
                            f"{loading.ARCHIVE_RESULTS} there (a committed study's directory)")
  same_study = (rundir.read_json(os.path.join(archive, loading.STUDY_FILE)) or {}).get(
      "name") == study.name
  os.makedirs(workdir, exist_ok=True)
  for name in (loading.STUDY_FILE, loading.SESSIONS_FILE, loading.RESULTS_DIR):
    src, dst = os.path.join(archive, name), os.path.join(workdir, name)
    if (os.path.exists(src) and not os.path.exists(dst)
        and (same_study or name == loading.RESULTS_DIR)):
      (shutil.copytree if os.path.isdir(src) else shutil.copy)(src, dst)
  rates = {o: protocol.reachable_lrs(study, o) for o in study.optimizers}

  def ours(ident):
    return (ident and ident["condition"] in study.conditions
            and protocol.round_lr(ident["learning_rate"]) in rates.get(ident["optimizer"], ()))

  n = 0
  for rel, res in archived.items():
    ident = rundir.parse_run_relpath(rel)
    rd = os.path.join(workdir, rel)
    if (not ours(ident) or res.get("status") not in ("completed", "diverged")
        or os.path.exists(rundir.path(rd, rundir.RESULTS))):
      continue
    config = protocol.run_config(study, ident["condition"], ident["optimizer"],
                                 ident["learning_rate"], ident["seed"])
    if res.get("config_fingerprint") not in rundir.config_fingerprints(config):
      logging.warning("%s: trained under another config; not seeded", rel)
      continue
    os.makedirs(rd, exist_ok=True)
    rundir.write_config(rd, config)
    rundir.write_json(rundir.path(rd, rundir.RESULTS), res)
    n += 1
  if not same_study:  # the report lists every run of results/'s archive: keep this study's
    path = os.path.join(workdir, loading.RESULTS_DIR, loading.ARCHIVE_RESULTS)
    rundir.write_json(path, {rel: res for rel, res in (rundir.read_json(path) or {}).items()
                             if ours(rundir.parse_run_relpath(rel))})
  return n


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
