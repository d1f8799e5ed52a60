"""End to end: a tiny run, resume after SIGKILL, 8-device sharding, divergence, bad input."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from configs import default
from jaxopt_study import train

ROOT = pathlib.Path(__file__).resolve().parents[1]
STEPS = 24


def tiny_config(optimizer="adamw", **overrides):
  """2 layers, d=32, 24 steps of 8 x 16 tokens; diagnostics every 4 steps."""
  config = default.with_optimizer(optimizer, "tiny")
  config.model.num_layers, config.model.d_model, config.model.num_heads = 2, 32, 4
  config.model.max_len = config.seq_len = 16
  config.batch_size, config.num_steps = 8, STEPS
  config.data.vocab_size = 256
  config.schedule.warmup_steps = 4
  config.log_every, config.eval_every, config.checkpoint_every = 4, 12, 8
  config.diagnostics.every = 4
  for k, v in overrides.items():
    target = config
    *parents, leaf = k.split(".")
    for p in parents:
      target = target[p]
    target[leaf] = v
  return config


def losses(workdir, key="train/loss"):
  """{step: value}, the last record of each step (a resumed run may repeat steps)."""
  out = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      row = json.loads(line)
      if key in row:
        out[row["step"]] = row[key]
  return out


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("reference"))
  return workdir, train.train_and_evaluate(tiny_config(), workdir)


def test_run_writes_everything(reference_run):
  workdir, results = reference_run
  assert results["status"] == "completed" and results["steps_done"] == STEPS
  for key in ("optimizer", "final_train_loss", "final_eval_loss", "final_eval_perplexity",
              "tokens_per_second", "diverged_at_step"):
    assert key in results
  assert np.isclose(results["final_eval_perplexity"], np.exp(results["final_eval_loss"]))
  assert results["final_train_loss"] < np.log(256)  # learned something beyond uniform
  on_disk = json.load(open(os.path.join(workdir, "results.json")))
  assert on_disk["status"] == "completed"
  files = os.listdir(workdir)
  assert any(f.startswith("events.out.tfevents") for f in files), files
  assert "config.json" in files
  assert sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit())[-1] == STEPS
  scalars = losses(workdir)
  assert set(range(4, STEPS + 1, 4)) <= set(scalars)  # every log step (and diagnostics steps)
  assert any(k.startswith("eval/loss") for r in map(json.loads, open(os.path.join(workdir, "metrics.jsonl"))) for k in r)


def test_rerun_of_a_finished_run_changes_nothing(reference_run):
  workdir, results = reference_run
  again = train.train_and_evaluate(tiny_config(), workdir)
  assert again["steps_done"] == STEPS and again["final_train_loss"] == results["final_train_loss"]


def _run_until_checkpoint(workdir, config_expr, step=8):
  """Starts `train_and_evaluate(<config_expr>, workdir)` in a subprocess; returns once the
  checkpoint of `step` is complete (orbax renames it into place when it is)."""
  code = ("import sys; sys.path.insert(0, %r); from tests.test_train import tiny_config;"
          "from jaxopt_study import train; train.train_and_evaluate(%s, %r)"
          ) % (str(ROOT), config_expr, str(workdir))
  proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  deadline = time.time() + 300
  while not (workdir / "checkpoints" / str(step)).exists():
    assert proc.poll() is None and time.time() < deadline, "run ended before its checkpoint"
    time.sleep(0.05)
  return proc


def test_resume_after_sigkill_is_bitwise_identical(reference_run, tmp_path):
  """Kill -9 a run after its step-8 checkpoint; the resumed run reproduces every loss exactly."""
  ref_dir, _ = reference_run
  workdir = tmp_path / "killed"
  proc = _run_until_checkpoint(workdir, "tiny_config()")
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  results = train.train_and_evaluate(tiny_config(), str(workdir))
  assert results["status"] == "completed"
  assert losses(str(workdir)) == losses(ref_dir)  # bitwise: same floats


def test_sigterm_checkpoints_and_records_preemption(tmp_path):
  """SIGTERM (a preemption) saves a checkpoint of the current step and exits cleanly."""
  workdir = tmp_path / "preempted"
  proc = _run_until_checkpoint(
      workdir, 'tiny_config(**{"num_steps": 10_000, "diagnostics.enabled": False})')
  proc.send_signal(signal.SIGTERM)
  assert proc.wait(timeout=120) == 0
  results = json.load(open(workdir / "results.json"))
  assert results["status"] == "preempted" and 8 <= results["steps_done"] < 10_000
  ckpts = sorted(int(s) for s in os.listdir(workdir / "checkpoints") if s.isdigit())
  assert ckpts[-1] == results["steps_done"]


def test_injected_nan_is_recorded_as_divergence(tmp_path):
  results = train.train_and_evaluate(tiny_config(inject_nan_at_step=10), str(tmp_path))
  assert results["status"] == "diverged" and results["diverged_at_step"] == 10
  assert results["steps_done"] <= 12  # stops at the next host sync
  ckpts = sorted(int(s) for s in os.listdir(tmp_path / "checkpoints") if s.isdigit())
  assert ckpts == [8]  # the last good checkpoint, nothing after the NaN
  assert np.isfinite(results["final_train_loss"])
  assert json.load(open(tmp_path / "results.json"))["status"] == "diverged"
  assert losses(str(tmp_path), "train/diverged") == {10: 1.0}


SHARDED = """
import json, sys
sys.path.insert(0, {root!r})
import jax, optax
from tests.test_train import tiny_config, losses
from jaxopt_study import train
assert jax.device_count() == 8, jax.devices()
config = tiny_config(**{{"mesh.data": 4, "mesh.fsdp": 2, "num_steps": 8}})
results = train.train_and_evaluate(config, {workdir!r})
# Parameters, and the optimizer and diagnostic state that mirror them, are really sharded.
state = train.setup(config).state
shards = {{}}
for name, leaf in [("param", state.params["wte"]["embedding"]),
                   ("mu", optax.tree_utils.tree_get(state.opt_state, "mu")["wte"]["embedding"]),
                   ("diag", state.diag_state.last_active["wte"]["embedding"])]:
  shards[name] = [list(leaf.sharding.spec), list(leaf.addressable_shards[0].data.shape), list(leaf.shape)]
errors = {{}}
for name, kw in {{"batch": {{"batch_size": 12}}, "mesh": {{"mesh.data": 3}}}}.items():
  try:
    train.train_and_evaluate(tiny_config(**kw), {workdir!r} + "/bad_" + name)
  except ValueError as e:
    errors[name] = str(e)
print("RESULT" + json.dumps({{"losses": losses({workdir!r}), "errors": errors, "shards": shards}}))
"""


def test_8_devices_4x2_mesh_matches_1_device(tmp_path):
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
  script = SHARDED.format(root=str(ROOT), workdir=str(tmp_path / "sharded"))
  out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  got = json.loads(out.stdout.split("RESULT", 1)[1])
  single = str(tmp_path / "single")
  train.train_and_evaluate(tiny_config(num_steps=8), single)
  ref = losses(single)
  assert got["losses"].keys() == {str(k) for k in ref}
  for k, v in ref.items():
    assert np.isclose(got["losses"][str(k)], v, rtol=1e-5), (k, got["losses"][str(k)], v)
  for name, (spec, shard, full) in got["shards"].items():
    assert spec == [None, "fsdp"] and shard == [full[0], full[1] // 2], (name, spec, shard)
  assert "config.batch_size=12 is not divisible by the data-parallel size 8" in got["errors"]["batch"]
  assert "config.mesh.data=3" in got["errors"]["mesh"]


def test_params_are_really_sharded_over_fsdp():
  """Checked in-process on however many devices there are; the subprocess test covers 8."""
  from jaxopt_study import sharding
  import ml_collections
  mesh = sharding.make_mesh(ml_collections.ConfigDict({"data": 1, "fsdp": -1}))
  config = tiny_config()
  from jaxopt_study.models import gpt
  model = gpt.GPT(gpt.from_config(config.model, 256))
  abstract = jax.eval_shape(lambda k: model.init(k, np.zeros((1, 16), np.int32))["params"], jax.random.PRNGKey(0))
  sh = sharding.param_shardings(abstract, mesh)
  assert sh["wte"]["embedding"].spec == jax.sharding.PartitionSpec(None, "fsdp")
  assert sh["block_0"]["mlp"]["fc"]["kernel"].spec == jax.sharding.PartitionSpec("fsdp", None)
  assert sh["ln_f"]["scale"].spec == jax.sharding.PartitionSpec(None)


@pytest.mark.parametrize(
    "overrides,error",
    [
        ({"optimizer.name": "adam"}, r"config\.optimizer\.name='adam'.*valid"),
        ({"seq_len": 32}, r"config\.seq_len=32 > config\.model\.max_len=16"),
        ({"batch_size": 0}, r"config\.batch_size=0"),
        ({"mesh.data": 2}, r"config\.mesh\.data=2"),
        ({"data.name": "c4"}, r"config\.data\.name"),
        ({"data.name": "local", "data.path": "/nonexistent/wikitext", "data.vocab_size": 1024},
         r"config\.data\.path"),
    ],
)
def test_bad_input_fails_before_compile(overrides, error, tmp_path, monkeypatch):
  compiled = []
  monkeypatch.setattr(jax, "jit", lambda *a, **k: compiled.append(1))
  with pytest.raises((ValueError, FileNotFoundError), match=error):
    train.train_and_evaluate(tiny_config(**overrides), str(tmp_path))
  assert not compiled
