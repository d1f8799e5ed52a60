"""Writes a study's report: ``results/`` (tables and the archive), ``plots/``, ``REPORT.md``.

``make_report(study_dir)`` loads the study (:mod:`.loading`), builds the tables
(:mod:`.tables`), checks the literature (:mod:`.literature`), draws the figures (:mod:`.plots`)
and renders the Markdown below, one function per section. Nothing is hand-written: every number
in REPORT.md is computed from ``results.json`` / ``metrics.jsonl`` (or their archive in
``results/``, which is written beside every report so that it can be regenerated from the
committed files alone). The protocol it reports on is the runner's (:mod:`.runner`): the best
learning rate chosen on the validation split over the sweep seeds, final numbers on the test
split over every seed at that rate, each "±" a 95% Student-t interval, and two optimizers
"different" only when their intervals are disjoint.
"""

from __future__ import annotations

import datetime
import math
import os
import re
from typing import Any, Optional

import numpy as np
import pandas as pd

from jaxopt_study import rundir
from jaxopt_study.study import depth
from jaxopt_study.study import literature
from jaxopt_study.study import loading
from jaxopt_study.study import plots
from jaxopt_study.study import tables
from jaxopt_study.study.loading import Study


def _fmt(v, digits=3) -> str:
  if v is None or (isinstance(v, (float, np.floating)) and not math.isfinite(v)):
    return "–"
  if isinstance(v, (bool, np.bool_)):
    return "yes" if v else "no"
  if isinstance(v, (int, np.integer)):
    return str(int(v))
  if isinstance(v, (float, np.floating)):
    v = float(v)
    if v != 0 and (abs(v) < 1e-2 or abs(v) >= 1e4):
      return f"{v:.{digits - 1}e}"
    return f"{v:.{digits}f}"
  return str(v)


def _int(v) -> str:
  v = pd.to_numeric(v, errors="coerce")
  return "–" if v is None or not np.isfinite(v) else str(int(round(float(v))))


def _md_table(headers: list[str], rows: list[list[Any]]) -> str:
  lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
  for r in rows:
    lines.append("| " + " | ".join(_fmt(x) if not isinstance(x, str) else x for x in r) + " |")
  return "\n".join(lines)


def _jsonable(obj):
  if isinstance(obj, dict):
    return {str(k): _jsonable(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [_jsonable(v) for v in obj]
  if isinstance(obj, (np.integer,)):
    return int(obj)
  if isinstance(obj, (np.floating, float)):
    return float(obj) if math.isfinite(float(obj)) else None
  if isinstance(obj, np.bool_):
    return bool(obj)
  return obj


def _records(df: pd.DataFrame) -> list[dict]:
  return _jsonable(df.astype(object).where(pd.notna(df), None).to_dict(orient="records"))


def _ci(mean, half, n=None) -> str:
  """'4.012 ± 0.031 (n=3)' (the header says 95% t); '4.012 (n=1)'; '–'. Without ``n``: no
  '(n=...)' (a table that gives n in its header)."""
  if mean is None or (isinstance(mean, float) and not math.isfinite(mean)):
    return "–"
  count = "" if n is None else f" (n={_int(n)})"
  if half is None or not np.isfinite(pd.to_numeric(half, errors="coerce")):
    return f"{_fmt(mean)}{count}"
  return f"{_fmt(mean)} ± {_fmt(half)}{count}"


# ----------------------------------------------------------------------------- the tables


def make_report(study_dir: str, settings: Optional[dict] = None) -> str:
  """Writes results/, plots/ and REPORT.md into ``study_dir``; returns REPORT.md's path.

  Args:
    study_dir: the study's workdir (run directories, or the archive of an earlier report).
    settings: overrides of the report settings (:class:`loading.Settings` field names).
  """
  study = loading.load_study(study_dir, settings)
  results_dir = os.path.join(study.study_dir, loading.RESULTS_DIR)
  os.makedirs(results_dir, exist_ok=True)

  runs = tables.runs_table(study)
  sweep_seeds = study.spec.get("sweep_seeds")
  best = tables.select_best_lr(runs, sweep_seeds)
  findings = tables.findings_table(runs, best)
  comparisons = pd.concat(
      [tables.comparisons_table(runs, best, c, study.optimizers) for c in study.conditions] or
      [tables.comparisons_table(runs, best, "", [])], ignore_index=True)
  checks = literature.literature_checks(study, runs, best, findings)
  depth_rows = depth.depth_table(study, best)
  depth_cmp = depth.condition_comparisons(depth_rows, study.conditions,
                                          study.settings.smoke_test)

  runs.to_csv(os.path.join(results_dir, "runs.csv"), index=False)
  findings.to_csv(os.path.join(results_dir, "findings.csv"), index=False)
  best.to_csv(os.path.join(results_dir, "best_lr.csv"), index=False)
  comparisons.to_csv(os.path.join(results_dir, "comparisons.csv"), index=False)
  depth_rows.to_csv(os.path.join(results_dir, "depth.csv"), index=False)
  depth_cmp.to_csv(os.path.join(results_dir, "depth_comparisons.csv"), index=False)
  rundir.write_json(os.path.join(results_dir, "results.json"), {
      "runs": _records(runs), "best_lr": _records(best), "findings": _records(findings),
      "comparisons": _records(comparisons), "literature": checks,
      "settings": _jsonable(study.settings.__dict__)})
  # The compact archive: regenerates this report without the run directories.
  rundir.write_json(os.path.join(results_dir, loading.ARCHIVE_RESULTS),
                    {r.relpath: r.results.to_dict() for r in study.runs if r.status != "missing"})
  _write_parquet(tables.scalars_long(study), os.path.join(results_dir, loading.ARCHIVE_SCALARS))
  legacy = os.path.join(results_dir, loading.LEGACY_ARCHIVE_SCALARS)
  if os.path.exists(legacy):  # superseded by the parquet file just written
    os.remove(legacy)
  loading.write_layer_scores(
      os.path.join(results_dir, loading.ARCHIVE_LAYER_SCORES),
      {r.relpath: {k: v for k, v in r.analysis.items() if k != "workdir"}  # a local path
       for r in study.runs if r.analysis})

  figures = plots.make_all(study, best, runs, os.path.join(study.study_dir, "plots"))
  text = render_markdown(study, runs, best, findings, comparisons, checks, figures,
                         depth_rows, depth_cmp)
  path = os.path.join(study.study_dir, "REPORT.md")
  with open(path, "w") as f:
    f.write(text)
  return path


# ----------------------------------------------------------------------------- sections


def header_section(study: Study) -> list[str]:
  spec = study.spec
  name = spec.get("name") or os.path.basename(study.study_dir.rstrip("/"))
  out = [f"# Optimizer study: {name}", ""]
  if study.settings.smoke_test:
    out += ["> **Smoke test.** This preset exercises the machinery (training, diagnostics, "
            "report) in minutes; it follows none of the protocol (one seed, one learning "
            "rate, a tiny model). Nothing below is a finding: there are no verdicts and no "
            "comparisons.", ""]
  out.append(f"Generated {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')} by "
             "`jaxopt_study.study.report.make_report`; every number below is computed from the "
             "runs' `results.json` / `metrics.jsonl` (or their archive in `results/`).")
  out.append("")
  if spec.get("note"):  # study.json's "note": provenance a reader must see first (set by hand)
    out += [f"> **Note.** {spec['note']}", ""]
  if spec.get("command"):
    out += ["Command:", "", "```", spec["command"], "```", ""]
  # scripts/run_study.py's record of every invocation: device and wall time.
  sessions = rundir.read_json(os.path.join(study.study_dir, loading.SESSIONS_FILE)) or []
  for s in sessions:
    when = (f"ran {s.get('start')} to {s['end']} ({(s.get('wall_s') or 0) / 60:.1f} min)"
            if s.get("end") else f"started {s.get('start')}, killed before it recorded its end,")
    out.append(f"- {when} on {s.get('device') or 'a device it did not record'}, "
               f"{s.get('processes')} process(es): {s.get('command')}"
               + (f" ({s['note']})" if s.get("note") else ""))
  return out + ([""] if sessions else [])


def _texts(study: Study) -> Optional[str]:
  """The text corpus's identity from the runs' ``data_sha256`` (None for synthetic data);
  more than one text among the runs is said in bold."""
  recorded = [r.results.data_sha256 for r in study.runs if r.results and r.results.data_sha256]
  if not recorded:
    return None
  texts = {tuple(sorted(d.items())) for d in recorded}
  n = f"{len(recorded)} of {len(study.runs)} runs record it; older runs predate the record"
  if len(texts) > 1:
    return f"**{len(texts)} different texts** among the runs ({n}): runs.csv lists each run's"
  return ", ".join(f"{k} `{v[:16]}`" for k, v in sorted(recorded[0].items())) + (
      f" ({n})" if len(recorded) < len(study.runs) else "")


def setup_section(study: Study) -> list[str]:
  spec = study.spec
  setup = spec.get("setup", {})
  if not setup and not spec.get("optimizers"):
    return []
  out = ["## Setup", ""]
  items = [
      ("preset", spec.get("preset")),
      ("optimizers", ", ".join(spec.get("optimizers", []))),
      ("lr grid (multipliers of each optimizer's centre)",
       ", ".join(f"{x:.3g}" for x in spec.get("lr_multipliers", []))),
      ("lr grid centres", ", ".join(f"{o} {rundir.lr_str(v)}"
                                    for o, v in spec.get("learning_rates", {}).items()
                                    if o in spec.get("optimizers", ()))),
      ("sweep seeds", ", ".join(map(str, spec.get("sweep_seeds", [])))),
      ("seeds at the best lr", ", ".join(map(str, spec.get("seeds", [])))),
      ("token budget per run", spec.get("token_budget")),
      ("steps per run", spec.get("num_steps")),
      ("tokens per step", spec.get("tokens_per_step")),
  ] + list(setup.items()) + [("text trained and evaluated on (sha256)", _texts(study))]
  for k, v in items:
    if v not in (None, "", []):
      out.append(f"- **{k}**: {v}")
  if spec.get("conditions"):
    out.append("- **conditions**:")
    for c, info in spec["conditions"].items():
      ov = info.get("overrides") or {}
      desc = ", ".join(f"`{k}={v}`" for k, v in ov.items()) or "the base config"
      sh = info.get("shift_steps") or []
      shs = f"; shifts at steps {', '.join(map(str, sh))}" if sh else ""
      out.append(f"  - `{c}`: {desc}{shs}")
  out.append("")
  return out


def protocol_section(study: Study, runs: pd.DataFrame) -> list[str]:
  split = "test" if tables.report_column(runs) == tables.TEST_COLUMN else "validation"
  ext = study.spec.get("lr_grid_max_extensions")
  out = ["## Protocol", ""]
  extension = ("the runner extends the grid on that side until it is (at most "
               f"{ext} points per side)" if ext else "this study does not extend its grids")
  out.append(
      "The best learning rate of each (condition, optimizer) is the one with the lowest mean "
      "final **validation** loss over the sweep seeds (fewest diverged runs first). A best rate "
      f"on the edge of the grid is *not bracketed*: {extension}, and the tables say when it is "
      "not. Final numbers are on the "
      f"**{split}** split over every completed seed at the best rate; every \"±\" is the "
      "half-width of a **95% Student-t interval** of the mean over those seeds (n given). Two "
      "optimizers are *different* only when their intervals are disjoint, otherwise they "
      "*tie*.")
  if split == "validation":
    out += ["", "> The runs recorded no test split (`final_eval_losses[\"test\"]`): the final "
            "numbers below are on the validation split that also chose the learning rate, so "
            "they are optimistic."]
  out.append("")
  return out


def coverage(study: Study, runs: pd.DataFrame) -> str:
  """One line: the conditions whose every planned run has an outcome (complete), none (no run
  finished), or some (partial, naming each optimizer with runs left: 'incomplete', or 'no run
  finished').

  An outcome is completed, diverged or failed; missing, preempted or running runs have none.
  """
  done = runs["status"].isin(("completed",) + loading.UNSTABLE)
  complete, partial, empty = [], [], []
  for cond in study.conditions:
    in_cond = runs["condition"] == cond
    if not done[in_cond].any():
      empty.append(cond)
      continue
    gaps = []
    for opt in study.optimizers:
      mine = in_cond & (runs["optimizer"] == opt)
      if not done[mine].all() or not mine.any():
        gaps.append(f"{opt} {'incomplete' if done[mine].any() else 'no run finished'}")
    (partial if gaps else complete).append(f"{cond} ({', '.join(gaps)})" if gaps else cond)
  return (f"Coverage: complete: {', '.join(complete) or 'none'}; partial: "
          f"{'; '.join(partial) or 'none'}; no run finished: {', '.join(empty) or 'none'}.")


def runs_section(study: Study, runs: pd.DataFrame) -> list[str]:
  out = ["## Runs", ""]
  counts = runs["status"].value_counts().to_dict() if len(runs) else {}
  out.append(f"{len(runs)} runs: " + (", ".join(f"{v} {k}" for k, v in counts.items()) or
                                      "none found") + ".")
  if len(runs):
    out.append(coverage(study, runs))
  walls = [r.get("wall_s") for r in study.spec.get("runs", []) if r.get("wall_s") is not None]
  if walls:
    out.append(f"Training wall time: {sum(walls) / 60:.1f} min over {len(walls)} runs "
               f"(study.json, {study.spec.get('created', '?')} to "
               f"{study.spec.get('updated', '?')}); tokens/s per run: see the last table.")
  odd = runs[runs["status"] != "completed"] if len(runs) else runs
  if len(odd):
    out += ["", "Runs that did not complete (kept in every table and marked; runs of one sweep "
            "with the same status and detail share a row):", ""]
    groups: dict[tuple, list] = {}  # (condition, optimizer, status, detail) -> [(lr, seed)]
    for _, r in odd.iterrows():
      if r["status"] == "diverged":
        at = pd.to_numeric(r.get("diverged_at_step"), errors="coerce")
        detail = f"non-finite loss at step {int(at) if np.isfinite(at) else '?'}"
      elif r["status"] == "failed":
        detail = str(r.get("error") or "")[:120].replace("|", "/").replace("\n", " ")
      elif r["status"] == "missing":
        detail = "no results.json"
      else:
        detail = f"{_int(r.get('steps_done'))} / {_int(r.get('num_steps'))} steps"
      key = (r["condition"], r["optimizer"], f"**{r['status']}**", detail)
      groups.setdefault(key, []).append((r["learning_rate"], r["seed"]))
    rows = []
    for (cond, opt, status, detail), members in groups.items():
      lrs = ", ".join(rundir.lr_str(lr) for lr in sorted({lr for lr, _ in members}))
      seeds = ", ".join(str(s) for s in sorted({s for _, s in members}))
      rows.append([cond, opt, lrs, seeds, str(len(members)), status, detail])
    out.append(_md_table(["condition", "optimizer", "lr", "seed", "runs", "status", "detail"],
                         rows))
  out.append("")
  return out


# What the synthetic corpus's held-out splits hold (data.synthetic.eval_at), for the reader
# comparing train and test losses.
EVAL_SPLITS = {
    "seen": ("from the mixture of every topic of the training schedule, weighted by the steps "
             "spent on each: the train loss is measured on the current topic, so after a "
             "switch a train loss below the test loss is adaptation to it, not only overfitting"),
    "last": "from the topic of the last training step (adaptation to the present topic)",
}


def findings_section(study: Study, findings: pd.DataFrame) -> list[str]:
  st = study.settings
  split = findings["report_split"].iloc[0] if len(findings) else "test"
  # A smoke test's banner says nothing below is a finding: so must its heading.
  out = ["## Numbers (smoke test: no findings)" if st.smoke_test else "## Findings", ""]
  out.append(
      "Per optimizer at its best learning rate. *Stability*: diverged runs over the whole lr "
      "sweep, and loss spikes (train loss above mean + "
      f"{_fmt(float(st.spike_sigma), 1)} sigma of the preceding {st.spike_window} steps) at the "
      f"best lr / over the sweep. *Final {split} loss*: mean ± 95% t interval over the "
      "completed seeds (n). *Rare / frequent*: final eval loss on the rarest / most frequent "
      "token-frequency bucket. *Recovery*: steps until the train loss is back within "
      f"{100 * st.shift_tolerance:g}% of its pre-shift level (recovered shifts / shifts "
      "seen). *Staleness*: median log(nu / short EMA of g^2), and share of the momentum's mass "
      f"on entries idle for at least H steps (last {100 * st.tail_fraction:g}% of training). "
      "Measures other than the losses are means over the seeds.")
  splits = tables.other_split_columns(findings)
  if splits:
    out[-1] += (" *" + " / ".join(c[len("final_"):-len("_loss")] for c in splits) + " loss*: "
                "the final loss on those eval splits (for the synthetic corpus: the current "
                "topic mixture, adaptation, and past topics, forgetting).")
  out.append("")
  for cond in study.conditions:
    f = findings[findings["condition"] == cond] if len(findings) else findings
    if f.empty:
      continue
    out += [f"### Condition `{cond}`", ""]
    baselines = study.baselines(cond)
    if baselines:
      out += ["Reference losses of the data (nats/token): " + ", ".join(
          f"{k} {_fmt(v)}" for k, v in baselines.items()) + ".", ""]
    if (where := EVAL_SPLITS.get(study.condition_info(cond).get("eval_at"))):
      out += [f"Validation and test splits: fresh held-out sequences of the synthetic corpus "
              f"drawn {where}.", ""]
    rows = []
    for _, r in f.iterrows():
      lr = "–" if r["best_lr"] is None or not np.isfinite(r["best_lr"]) else rundir.lr_str(
          r["best_lr"])
      if lr != "–":
        mult = r["best_lr_multiplier"]
        lr += f" (x{mult:.3g})" if mult is not None and np.isfinite(mult) else ""
        if not r["bracketed"]:
          lr += (" **single rate**" if r["unbracketed_side"] == "single"
                 else f" **not bracketed ({r['unbracketed_side']} edge)**")
      stab = f"{r['diverged']}/{r['runs']} diverged"
      if r["diverged_lrs"]:
        stab += f" (lr {r['diverged_lrs']})"
      if r["failed"]:
        stab += f", {r['failed']} failed"
      if r["missing"]:
        stab += f", {r['missing']} missing"
      rec = "–"
      if r["shifts_seen"]:
        rec = f"{_fmt(r['recovery_steps'], 1)} ({r['shifts_recovered']}/{r['shifts_seen']})"
      rows.append([f"**{r['optimizer']}**", lr, stab,
                   f"{_fmt(r['spikes_best_lr'])} / {r['spikes_sweep']}",
                   _ci(r["final_loss"], r["final_loss_ci95"], r["final_loss_n"]),
                   _fmt(r["final_train_loss"]),
                   *([" / ".join(_fmt(r[c]) for c in splits)] if splits else []),
                   f"{_fmt(r['rare_token_loss'])} / {_fmt(r['frequent_token_loss'])}",
                   rec, _fmt(r["shift_loss_jump"]),
                   _fmt(r["aging/log_staleness_q50"]), _fmt(r["idle/update_sq_share/kind=token_embedding"]),
                   _fmt(r["heterogeneity/grad_norm_cv"])])
    out.append(_md_table(
        ["optimizer", "best lr", "stability", "spikes (best lr / sweep)",
         f"final {split} loss (95% t)", "final train loss",
         *([" / ".join(c[len("final_"):-len("_loss")] for c in splits) + " loss"]
           if splits else []), "rare / frequent loss",
         "recovery steps", "shift loss jump", "nu staleness (log)", "|u|^2 share on idle emb. entries",
         "grad-norm CV"], rows))
    out.append("")
    out += against_baselines(f, baselines, split)
  return out


def against_baselines(f: pd.DataFrame, baselines: dict, split: str) -> list[str]:
  """How far each optimizer's final loss (mean over seeds at its best lr) is below the data's
  context-free baselines, and how much of what is learnable it learnt: ``learnt`` =
  (marginal - loss) / (marginal - floor), 0 at the marginal (per-topic unigram) entropy, 1 at
  the entropy floor (synthetic corpus only). *Train eval - test* < 0 is memorisation: the final
  loss on the training text's first windows (``data.TRAIN_SAMPLE``, text corpora) minus the test
  loss, per run (``tables.TRAIN_GAP_COLUMN``), averaged over the seeds that have both; *last
  train batch - test* uses the last step's batch loss instead (one batch, drawn while the model
  still learns, so biased upward early in training). Tokens per parameter = tokens seen /
  parameters."""
  if f.empty:
    return []
  uni, marg, floor = (baselines.get(k) for k in ("unigram", "marginal_entropy", "entropy_floor"))
  rows = []
  for _, r in f.iterrows():
    loss, train = r["final_loss"], r["final_train_loss"]
    gap = r.get(tables.TRAIN_GAP_COLUMN)  # per run, then the mean over seeds
    ok = loss is not None and np.isfinite(loss)
    learnt = None
    if ok and marg is not None and floor is not None and marg - floor > 1e-9:
      learnt = (marg - loss) / (marg - floor)
    tpp = None
    if r.get("num_params") and r.get("tokens_seen"):
      tpp = r["tokens_seen"] / r["num_params"]
    rows.append([f"**{r['optimizer']}**", _fmt(loss - uni) if ok and uni is not None else "–",
                 _fmt(loss - marg) if ok and marg is not None else "–",
                 _fmt(learnt, 2) if learnt is not None else "–",
                 _fmt(gap) if gap is not None and np.isfinite(gap) else "–",
                 _fmt(train - loss) if ok and train is not None and np.isfinite(train) else "–",
                 _fmt(tpp, 2) if tpp is not None else "–"])
  return [f"Against the data's baselines (final {split} loss, mean over seeds at the best lr; "
          "*learnt*: share of the way from the marginal entropy to the entropy floor; *train eval "
          f"- {split}*: final loss on the training text's first windows (evaluated like the "
          f"held-out splits) minus the final {split} loss, below 0 when the model memorises; "
          f"*last train batch - {split}*: the last step's training-batch loss instead, one batch "
          "drawn while the model still learns):", "",
          _md_table(["optimizer", "- unigram", "- marginal entropy", "learnt",
                     f"train eval - {split}", f"last train batch - {split}",
                     "tokens / parameter"], rows), ""]


def comparisons_section(study: Study, comparisons: pd.DataFrame) -> list[str]:
  out = ["## Comparisons", ""]
  if study.settings.smoke_test:
    return out + ["None: a smoke test compares nothing.", ""]
  if comparisons.empty:
    return out + ["None: no two optimizers have a final loss.", ""]
  out += ["Every pair of optimizers at their best learning rates: *lower* / *higher* when the "
          "95% intervals are disjoint, *tie* when they overlap, *no interval* with fewer than "
          "2 seeds. *Paired*: a seed gives every optimizer the same initial parameters and data "
          "order, so the per-seed difference a - b over the seeds both completed, with its 95% t "
          "interval, is the sharper test: *lower* / *higher* when that interval excludes 0.", ""]
  for cond, g in comparisons.groupby("condition", sort=False):
    out += [f"### Condition `{cond}`", ""]
    out.append(_md_table(["a", "b", "final loss of a", "final loss of b", "a vs b",
                          "paired a - b", "paired"],
                         [[f"**{r['a']}**", f"**{r['b']}**", r["a_loss"], r["b_loss"],
                           f"**{r['verdict']}**", r["paired"], f"**{r['paired_verdict']}**"]
                          for _, r in g.iterrows()]))
    out.append("")
  return out


def _write_parquet(df: pd.DataFrame, path: str) -> None:
  """Writes ``df`` to ``path`` atomically, leaving an existing file with the same table alone:
  a committed archive (tens of MB) regenerated with the same data stays byte-identical, so
  re-making a report does not add a copy of it to the repository's history."""
  tmp = path + ".tmp"
  df.to_parquet(tmp, index=False, compression="zstd")
  if os.path.exists(path) and pd.read_parquet(path).equals(pd.read_parquet(tmp)):
    os.remove(tmp)
  else:
    os.replace(tmp, path)


def literature_section(checks: list[dict]) -> list[str]:
  """One row per claim and condition (the claims were measured on stationary data; a shifting
  corpus may move them), with a one-line tally per claim."""
  tally = {}
  for c in checks:
    by = tally.setdefault(c["claim"], {})  # "**verdict** in " -> its conditions
    if c["condition"] in ("", "–"):  # no condition to run on: say why (e.g. no such optimizer)
      by.setdefault(f"not measured here ({c['reason']})", [])
    else:
      by.setdefault(f"**{c['verdict']}** in ", []).append(c["condition"])
  lines = [f"- {claim}: " + "; ".join(k + ", ".join(conds) for k, conds in by.items())
           for claim, by in tally.items()]
  return ["## Against the literature", "", *lines, "",
          _md_table(["claim", "condition", "measured here", "verdict", "why"],
                    [[c["claim"], c["condition"], c["measured"], f"**{c['verdict']}**",
                      c["reason"]] for c in checks]), ""]


def notes_section(study: Study) -> list[str]:
  notes = os.path.join(study.study_dir, "NOTES.md")
  if not os.path.exists(notes):  # optional hand-written reading of the tables (no numbers)
    return []
  with open(notes) as f:
    return ["## Notes", "", f.read().strip(), ""]


def figures_section(study: Study, figures: list) -> list[str]:
  out = ["## Figures", ""]
  for fig in figures:
    out += [f"### {fig.title}", "", fig.caption, ""]
    if fig.note:
      out += [f"> **Data absent or partial:** {fig.note}", ""]
    rel = os.path.relpath(fig.path, study.study_dir).replace(os.sep, "/")
    out += [f"![{fig.title}]({rel})", ""]
  return out


def every_run_section(runs: pd.DataFrame) -> list[str]:
  rows = []
  for _, r in runs.iterrows():
    mult = pd.to_numeric(r.get("lr_multiplier"), errors="coerce")
    rows.append([r["condition"], r["optimizer"], rundir.lr_str(r["learning_rate"]),
                 "–" if not np.isfinite(mult) else f"{mult:.3g}", r["seed"], r["status"],
                 _int(r.get("steps_done")), _fmt(r.get("final_train_loss")),
                 _fmt(r.get(tables.SELECTION_COLUMN)), _fmt(r.get(tables.TEST_COLUMN)),
                 _int(r.get("loss_spikes")), _int(r.get("tokens_per_second"))])
  return ["## Every run", "",
          _md_table(["condition", "optimizer", "lr", "x", "seed", "status", "steps",
                     "final train loss", "final validation loss", "final test loss", "spikes",
                     "tokens/s"], rows), "",
          "Tables: `results/runs.csv` (every run), `results/findings.csv`, "
          "`results/best_lr.csv`, `results/comparisons.csv`, `results/results.json`. Archive "
          "(regenerates this report): `results/run_results.json` and the per-step scalars in "
          "long format, `results/scalars_long.parquet`.", ""]


# ----------------------------------------------------------------------------- depth section


def _pm(row) -> str:
  """A depth-table row as '1.234 ± 0.056' (the section says 95% t and gives n)."""
  return "–" if row is None else _ci(row["mean"], row["ci95"])


def _by_layer_tables(study: Study, table: pd.DataFrame, part: str, measure: str,
                     extra: tuple = ()) -> list[str]:
  """One :func:`_by_layer_table` per condition."""
  return [line for cond in study.conditions
          for line in _by_layer_table(study, table, part, measure, cond, extra)]


def _by_layer_table(study: Study, table: pd.DataFrame, part: str, measure: str, cond: str,
                    extra: tuple = ()) -> list[str]:
  """Rows = blocks (then ``extra`` whole-model measures), columns = optimizers (n seeds)."""
  rows_of = {o: depth.select(table, part, measure, condition=cond, optimizer=o, per_layer=True)
             for o in study.optimizers}
  opts = [o for o in study.optimizers if not rows_of[o].empty]
  if not opts:
    return []
  cell = {(o, int(r["layer"])): r for o in opts for _, r in rows_of[o].iterrows()}
  layers = sorted({l for _, l in cell})
  lines = [[f"block {l}", *[_pm(cell.get((o, l))) for o in opts]] for l in layers]
  for label, p, m in extra:
    whole = {o: depth.select(table, p, m, condition=cond, optimizer=o, per_layer=False)
             for o in opts}
    lines.append([label, *[_pm(whole[o].iloc[0]) if len(whole[o]) else "–" for o in opts]])
  n = {o: int(rows_of[o]["n"].max()) for o in opts}
  return [f"#### Condition `{cond}`", "",
          _md_table(["", *[f"**{o}** (n={n[o]})" for o in opts]], lines), ""]


def _summary_table(study: Study, table: pd.DataFrame, columns: list[tuple[str, str, str]]
                   ) -> list[str]:
  """Rows = (condition, optimizer), columns = whole-model measures (label, part, measure)."""
  rows = []
  for cond in study.conditions:
    for opt in study.optimizers:
      sel = table[(table["condition"] == cond) & (table["optimizer"] == opt)
                  & table["layer"].isna()]
      cells = []
      for _, part, measure in columns:
        r = sel[(sel["part"] == part) & (sel["measure"] == measure)]
        cells.append(_pm(r.iloc[0]) if len(r) else "–")
      if any(c != "–" for c in cells):
        n = int(sel[sel["part"].isin({p for _, p, _ in columns})]["n"].max())
        rows.append([f"`{cond}`", f"**{opt}**", str(n), *cells])
  if not rows:
    return []
  return [_md_table(["condition", "optimizer", "n", *[c[0] for c in columns]], rows), ""]


_RETRAINED = re.compile(r"done \(retrained here(?:: final validation loss ([-\d.naif]+), "
                        r"recorded ([-\d.naif]+))?")


def retrained_note(spec: dict) -> list[str]:
  """How many runs' layer scores come from a retrain (``runner.retrain_and_analyze``: study.json
  says ``done (retrained here...``), and how far the retrained final validation losses are from
  the recorded ones; [] when none."""
  notes = [_RETRAINED.match(str(e.get("analysis", ""))) for e in spec.get("runs", [])]
  notes = [m for m in notes if m]
  if not notes:
    return []
  diffs = np.array([float(m[1]) - float(m[2]) for m in notes if m[1] is not None])
  out = (f"{len(notes)} runs' layer scores come from training their config again on the "
         "machine that scored them (`retrain_for_layer_scores`: their own checkpoints stayed on "
         "another machine), not from the recorded trajectory")
  if diffs.size:
    out += (f"; for {diffs.size} of them the retrained final validation loss minus the "
            f"recorded one is {diffs.mean():+.4f} on average, largest |difference| "
            f"{np.abs(diffs).max():.4f} (GPU runs are not bitwise reproducible: stacked vs "
            "single runs, atomic reductions)")
  return [out + ".", ""]


def depth_section(study: Study, table: pd.DataFrame, cmp: pd.DataFrame) -> list[str]:
  """Variance, layer scores and sparsity by layer per condition and optimizer (study/depth.py)."""
  out = ["## Depth and sparsity", "",
         "Per condition and optimizer at its best learning rate, over its completed seeds: "
         "mean ± the half-width of the **95% Student-t interval** (n seeds). Probe values "
         "(`jaxopt_study/probes.py`, a fixed probe batch) are taken at each run's final probe "
         "step; layer scores (`jaxopt_study/analysis/`) are those of its last checkpoint "
         "(`RUN/analysis/analysis.json`). Block 0 is the first block. Every value, per layer: "
         "`results/depth.csv`; the conditions against the primary one: "
         "`results/depth_comparisons.csv`; figures: *Residual-stream variance by layer*, "
         "*Layer scores by depth*, *Layer usefulness vs depth*, *Attention and weight sparsity "
         "by layer*.", ""]

  out += ["### Residual-stream variance by layer", ""]
  if not depth.has(table, "variance", "residual_variance"):
    out += ["No probe data (`depth/var/layer=NN`) in any run at a best rate: the runs were "
            "trained with `probes.enabled=False` or without diagnostics.", ""]
  else:
    out += ["Var of the residual stream after each block; *log-var slope*: least-squares "
            "slope of ln Var against the block index (exp(slope) = growth per block).", ""]
    out += _by_layer_tables(study, table, "variance", "residual_variance",
                            (("log-var slope", "variance", "log_var_slope"),))

  out += ["### Layer scores by depth", ""]
  if not depth.has(table, "layer_scores"):
    out += ["No layer scores (`analysis/analysis.json`) for any run at a best rate: run the "
            "study with `--config.analyze_layers=True`, or `scripts/analyze_checkpoint.py "
            "--workdir=RUN` on each run, then make the report again.", ""]
  else:
    out += ["*Useful*: a block whose replacement by its least-squares affine map raises the "
            "loss by more than 10%; *usefulness*, *skip* and *‖J - I‖* are means over the "
            "blocks of the loss increase when a block is replaced / skipped and of its token "
            "Jacobian's distance from the identity (‖J - I‖_F / sqrt(D)); *swap*: the mean "
            "normalised loss change of swapping two blocks.", ""]
    out += retrained_note(study.spec)
    out += _summary_table(study, table, [
        ("share of useful blocks", "layer_scores", "share_useful"),
        ("usefulness", "layer_scores", "usefulness_loss_increase"),
        ("skip", "layer_scores", "causal_skip_loss_increase"),
        ("‖J - I‖", "layer_scores", "jacobian_identity_deviation"),
        ("swap", "layer_scores", "permutation_loss_change")])
    out += ["Loss increase (relative) when one block is replaced by its affine map:", ""]
    out += _by_layer_tables(study, table, "layer_scores", "usefulness_loss_increase")

  out += ["### Weight and attention sparsity", ""]
  taus = sorted({m for m in depth.select(table, "weights", per_layer=False)["measure"]
                 if "/" not in m}, key=lambda m: float(m[len("small_frac_"):]))
  tops = sorted({m for m in depth.select(table, "attention", per_layer=False)["measure"]
                 if m.startswith("top")}, key=lambda m: int(m[3:-5]))
  if not taus and not depth.has(table, "attention"):
    out += ["No probe data (`weights/small_frac_*`, `attention/*`) in any run at a best rate: "
            "the runs were trained with `probes.enabled=False` or without diagnostics.", ""]
  else:
    out += ["*abs(w) <= tau rms*: share of weights (matrices and embeddings) at most tau times "
            "their tensor's rms, pooled over the model; *attention entropy*: mean over layers "
            "of the normalised entropy of the attention distribution (1 = uniform over the "
            "visible keys); *top-k mass*: mean over layers of the probability on the k "
            "largest keys. Per layer and parameter kind: `results/depth.csv`.", ""]
    out += _summary_table(study, table, [
        *[(f"abs(w) <= {m[len('small_frac_'):]} rms", "weights", m) for m in taus],
        ("attention entropy", "attention", "entropy_norm"),
        *[(f"{m[:-5]} mass", "attention", m) for m in tops]])
    if depth.has(table, "attention", "entropy_norm"):
      out += ["Normalised attention entropy by layer:", ""]
      out += _by_layer_tables(study, table, "attention", "entropy_norm")

  out += ["### Conditions against the primary one", ""]
  if study.settings.smoke_test:
    out += ["None: a smoke test compares nothing.", ""]
  elif cmp.empty:
    out += ["None: no second condition with these measures.", ""]
  else:
    measures_ = list(dict.fromkeys(zip(cmp["part"], cmp["measure"])))
    out += [f"Each condition against `{cmp['reference'].iloc[0]}`, per optimizer (each at its "
            "best rate), on the whole-model values of the tables above: *higher* / *lower* "
            "when the condition's 95% interval lies entirely above / below the reference's, "
            "*tie* when they overlap, *no interval* with fewer than 2 seeds; the values: "
            "`results/depth_comparisons.csv`.", ""]
    verdict = {(r["condition"], r["optimizer"], r["part"], r["measure"]): r["verdict"]
               for _, r in cmp.iterrows()}
    rows = []
    for (cond, opt), _ in cmp.groupby(["condition", "optimizer"], sort=False):
      rows.append([f"`{cond}`", f"**{opt}**", *[
          f"**{verdict[(cond, opt, p, m)]}**" if (cond, opt, p, m) in verdict else "–"
          for p, m in measures_]])
    out += [_md_table(["condition", "optimizer", *[m for _, m in measures_]], rows), ""]
  return out


def render_markdown(study: Study, runs: pd.DataFrame, best: pd.DataFrame,
                    findings: pd.DataFrame, comparisons: pd.DataFrame, checks: list[dict],
                    figures: list, depth_rows: pd.DataFrame, depth_cmp: pd.DataFrame) -> str:
  del best  # in findings
  sections = [header_section(study), setup_section(study), protocol_section(study, runs),
              runs_section(study, runs), findings_section(study, findings),
              comparisons_section(study, comparisons), literature_section(checks),
              depth_section(study, depth_rows, depth_cmp), notes_section(study),
              figures_section(study, figures), every_run_section(runs)]
  return "\n".join(line for s in sections for line in s)

