"""README's one-run commands, exactly as written (relative paths), from a repository-like root.

Every other test passes absolute tmp paths; a relative --workdir once crashed at the first
checkpoint (orbax refuses relative paths) while the suite stayed green (issue 24).
"""

import json
import os
import re
import shlex
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme_commands(pattern):
  """README lines (inside code blocks) that run `pattern`, without their trailing comment."""
  with open(os.path.join(ROOT, "README.md")) as f:
    lines = [line.split("#")[0].strip() for line in f if line.startswith("python")]
  return [line for line in lines if re.search(pattern, line)]


@pytest.fixture(scope="module")
def cwd(tmp_path_factory):
  """A fresh directory that looks like the repository root (configs/ and scripts/), so that
  README's relative paths mean what they mean there without writing into the checkout."""
  d = tmp_path_factory.mktemp("readme")
  for name in ("configs", "scripts"):
    os.symlink(os.path.join(ROOT, name), d / name)
  return d


def run(command, cwd):
  argv = shlex.split(command)
  assert argv[0] == "python"
  env = {**os.environ, "PYTHONPATH": ROOT}
  return subprocess.run([sys.executable, *argv[1:]], cwd=cwd, env=env, capture_output=True,
                        text=True, timeout=900)


def test_readme_one_run_then_analysis_and_export_with_relative_workdir(cwd):
  (train,) = readme_commands(r"jaxopt_study\.main --config=configs/lion\.py --workdir=runs/lion$")
  analyze, export = (readme_commands(rf"scripts/{s}\.py --workdir=runs/lion$")[0]
                     for s in ("analyze_checkpoint", "export_hf"))
  p = run(train, cwd)
  assert p.returncode == 0, p.stderr[-3000:]
  run_dir = cwd / "runs" / "lion"
  results = json.loads((run_dir / "results.json").read_text())
  assert results["status"] == "completed"
  assert os.listdir(run_dir / "checkpoints")
  again = run(train, cwd)  # the same command resumes: nothing left to train, the same result
  assert again.returncode == 0, again.stderr[-3000:]
  assert json.loads((run_dir / "results.json").read_text())["final_train_loss"] == (
      results["final_train_loss"])
  for command, made in ((analyze, "analysis/analysis.json"), (export, "hf/model.safetensors")):
    p = run(command, cwd)
    assert p.returncode == 0, f"{command}\n{p.stderr[-3000:]}"
    assert (run_dir / made).exists(), command
