"""Every field of every config file and preset can be set from the command line (config_flags)."""

import glob
import importlib.util
import os
import pathlib
import sys

from absl import flags
import ml_collections
from ml_collections import config_flags
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG_FILES = sorted(glob.glob(str(ROOT / "configs" / "*.py")))


def _cases():
  from jaxopt_study import presets  # pylint: disable=g-import-not-at-top

  for path in CONFIG_FILES:
    names = presets.PRESETS
    if os.path.basename(path) == "study.py":
      spec = importlib.util.spec_from_file_location("study_cfg", path)
      module = importlib.util.module_from_spec(spec)
      spec.loader.exec_module(module)
      names = module.PRESETS
    for preset in names:
      yield pytest.param(path, preset, id=f"{os.path.basename(path)}:{preset}")


def _leaves(config, prefix=""):
  for key in config.keys():
    value = config[key]
    if isinstance(value, ml_collections.ConfigDict):
      yield from _leaves(value, f"{prefix}{key}.")
    else:
      yield f"{prefix}{key}", value


def _another(value):
  """A different value of the same type, and how to spell it on the command line."""
  if isinstance(value, bool):
    return (not value), str(not value)
  if isinstance(value, int):
    return value + 1, str(value + 1)
  if isinstance(value, float):
    return value * 2 + 1, repr(value * 2 + 1)
  if isinstance(value, str):
    return value + "_x", value + "_x"
  if isinstance(value, tuple):
    new = value + value[:1] if value else (1,)
    return new, "(" + ",".join(map(repr, new)) + ("," if len(new) == 1 else "") + ")"
  raise AssertionError(f"a field of type {type(value).__name__} ({value!r}) cannot be set from "
                       "the command line; give it a bool/int/float/str/tuple default")


@pytest.mark.parametrize("path,preset", list(_cases()))
def test_every_field_is_settable_from_the_command_line(path, preset, monkeypatch):
  # config_flags reads the overrides from sys.argv, as in a real command line.
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", f"{path}:{preset}", flag_values=flag_values,
                                  lock_config=True)
  flag_values(["prog", f"--config={path}:{preset}"])
  defaults = dict(_leaves(flag_values.config))
  expected, argv = {}, ["prog", f"--config={path}:{preset}"]
  for key, value in defaults.items():
    if value is None:
      pytest.fail(f"{os.path.basename(path)}:{preset}: config.{key} defaults to None, which the "
                  "command line cannot override; give it a typed default")
    expected[key], spelled = _another(value)
    argv.append(f"--config.{key}={spelled}")
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", f"{path}:{preset}", flag_values=flag_values,
                                  lock_config=True)
  monkeypatch.setattr(sys, "argv", argv)
  flag_values(argv)
  got = dict(_leaves(flag_values.config))
  for key, value in expected.items():
    assert got[key] == value, (key, got[key], value)


def test_benchmark_runs_as_written_in_benchmarks_md(tmp_path):
  """scripts/benchmark.py from the repository root, no PYTHONPATH: it imports configs/<name>.py
  for --optimizers and times train_and_evaluate beside the step (--loop_steps)."""
  import json  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top

  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  out = tmp_path / "rows.json"
  subprocess.run(
      [sys.executable, "scripts/benchmark.py", "--config=configs/adamw.py:tiny",
       "--optimizers=lion", "--config.model.num_layers=1", "--config.batch_size=4",
       "--windows=1", "--window=2", "--warmup=1", "--loop_steps=4", f"--json_out={out}"],
      cwd=ROOT, env=env, check=True, capture_output=True, timeout=600)
  (row,) = json.loads(out.read_text())["rows"]
  assert row["optimizer"] == "lion" and not row["diverged"]
  assert row["loop_tokens_per_sec"] > 0 and row["loop_steady_tokens_per_sec"] > 0
