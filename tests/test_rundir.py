"""jaxopt_study.rundir: atomic JSON, the config fingerprint, RunResults and its resume merge."""

import json
import os

import numpy as np
import pytest

from jaxopt_study import presets
from jaxopt_study import rundir


def test_write_json_is_atomic(tmp_path, monkeypatch):
  path = str(tmp_path / "results.json")
  rundir.write_json(path, {"a": np.float32(1.5), "b": np.int64(3), "c": np.arange(2)})
  assert json.loads(open(path).read()) == {"a": 1.5, "b": 3, "c": [0, 1]}
  umask = os.umask(0)
  os.umask(umask)
  assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask  # like open(path, "w")

  def broken_dump(obj, f, **kw):  # dies half way through writing
    f.write('{"a": ')
    raise OSError("disk full")

  monkeypatch.setattr(rundir.json, "dump", broken_dump)
  with pytest.raises(OSError, match="disk full"):
    rundir.write_json(path, {"a": 2.0})
  monkeypatch.undo()
  assert rundir.read_json(path)["a"] == 1.5  # the old file, whole
  assert os.listdir(tmp_path) == ["results.json"]  # no temporary file left behind
  assert rundir.read_json(str(tmp_path / "absent.json")) is None
  (tmp_path / "half.json").write_text('{"a": ')
  with pytest.raises(rundir.BadFile, match="half.json is unreadable"):  # never guessed at
    rundir.read_json(str(tmp_path / "half.json"))
  assert rundir.read_json(str(tmp_path / "half.json"), strict=False) is None  # e.g. a lock


def test_config_fingerprint_covers_the_trajectory_only():
  base = presets.get_config("tiny")
  fp = rundir.config_fingerprint(base)
  assert len(fp) == 64 and int(fp, 16) >= 0
  assert rundir.config_fingerprint(base.copy_and_resolve_references()) == fp

  def changed(field, value):
    c = base.copy_and_resolve_references()
    node, parts = c, field.split(".")
    for p in parts[:-1]:
      node = node[p]
    node[parts[-1]] = value
    return rundir.config_fingerprint(c)

  lr = base.optimizer.learning_rate
  assert changed("optimizer.learning_rate", lr * 2) != fp
  assert changed("seed", base.seed + 1) != fp
  assert changed("model.d_model", base.model.d_model * 2) != fp
  assert changed("log_every", base.log_every + 7) == fp
  assert changed("eval_every", base.eval_every + 7) == fp
  assert changed("diagnostics.every", base.diagnostics.every + 3) == fp
  assert changed("diagnostics.enabled", not base.diagnostics.enabled) == fp
  # The resolved config.json read back as a plain dict has the same fingerprint; 1 == 1.0.
  as_dict = json.loads(base.to_json_best_effort())
  assert rundir.config_fingerprint(as_dict) == fp
  as_dict["optimizer"]["learning_rate"] = lr * 2
  assert rundir.config_fingerprint(as_dict) == changed("optimizer.learning_rate", lr * 2)
  as_dict["seed"] = float(as_dict["seed"])
  as_dict["optimizer"]["learning_rate"] = lr
  assert rundir.config_fingerprint(as_dict) == fp


def test_fields_added_later_keep_the_runs_recorded_before():
  # A run recorded before data.synthetic.eval_at existed matches a config holding the value that
  # reproduces the old behaviour ('seen'), and no other value.
  base = presets.get_config("tiny")
  recorded = json.loads(base.to_json_best_effort())
  del recorded["data"]["synthetic"]["eval_at"]
  old_fp = rundir.config_fingerprint(recorded)
  for value, same in (("seen", True), ("last", False)):
    c = base.copy_and_resolve_references()
    c.data.synthetic.eval_at = value
    assert (old_fp in rundir.config_fingerprints(c)) == same, value
    assert rundir.same_trajectory(recorded, c) == same, value
    assert rundir.config_fingerprint(c) in rundir.config_fingerprints(c)
  c.optimizer.learning_rate *= 2
  assert not rundir.same_trajectory(recorded, c)
  # A run recorded after eval_at was added but before model.use_bias: any subset of the added
  # fields may be missing from a record.
  c = base.copy_and_resolve_references()
  between = json.loads(c.to_json_best_effort())
  del between["model"]["use_bias"]
  assert rundir.same_trajectory(between, c)
  c.model.use_bias = False
  assert not rundir.same_trajectory(between, c)


def test_run_results_roundtrip_and_old_bucket_format(tmp_path):
  r = rundir.RunResults(optimizer="adamw", learning_rate=1e-3, seed=0, status="completed",
                        eval_loss_by_frequency=[1.0, None, 3.0],
                        final_eval_losses={"validation": 2.0, "test": 2.1})
  r.save(str(tmp_path))
  assert rundir.RunResults.load(str(tmp_path)) == r
  assert rundir.RunResults.load(str(tmp_path / "nothing")) is None
  old = rundir.RunResults.from_dict({"eval_loss_by_frequency": {"00": 1.0, "02": 3.0},
                                     "unknown_key": 1})
  assert old.eval_loss_by_frequency == [1.0, None, 3.0]


def test_resume_merge_rule():
  first = rundir.RunResults(
      optimizer="adamw", status="diverged", steps_done=25, diverged_at_step=25,
      final_train_loss=4.0, final_eval_loss=4.5, tokens_per_second=100.0,
      final_eval_losses={"validation": 4.5, "test": 4.6}, eval_loss_by_frequency=[1.0, 2.0],
      baselines={"uniform": 6.9})
  # Resumed from the last good checkpoint and completed; it evaluated only the validation split
  # and measured no throughput (say it ran no step after the compile).
  second = rundir.RunResults(optimizer="adamw", status="completed", steps_done=80,
                             final_train_loss=3.0, final_eval_loss=3.5,
                             final_eval_losses={"validation": 3.5})
  m = first.merge(second)
  assert m.status == "completed" and m.steps_done == 80
  assert m.diverged_at_step is None  # reset: the resumed run completed
  assert m.final_train_loss == 3.0 and m.final_eval_loss == 3.5
  assert m.final_eval_losses == {"validation": 3.5, "test": 4.6}
  assert m.eval_loss_by_frequency == [1.0, 2.0] and m.tokens_per_second == 100.0
  assert m.baselines == {"uniform": 6.9}
  # A failed segment keeps its error; a later successful one clears it.
  failed = rundir.RunResults(status="failed", error="RuntimeError: boom")
  assert rundir.RunResults().merge(failed).error == "RuntimeError: boom"
  assert failed.merge(rundir.RunResults(status="completed")).error is None


def test_run_relpath_roundtrip():
  rel = rundir.run_relpath("base", "adamw", 0.00060000001, 2)
  assert rel == "runs/base/adamw/lr=0.0006/seed=2"
  assert rundir.parse_run_relpath(rel) == {"condition": "base", "optimizer": "adamw",
                                           "learning_rate": 0.0006, "seed": 2}
  assert rundir.parse_run_relpath("runs/base/adamw/lr=x/seed=2") is None
