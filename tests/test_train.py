"""End to end: a tiny run, resume, preemption, 8-device sharding, divergence, and every failure path."""

import json
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from jaxopt_study import presets
from jaxopt_study import rundir
from jaxopt_study import train

ROOT = pathlib.Path(__file__).resolve().parents[1]
STEPS = 24


def tiny_config(optimizer="adamw", **overrides):
  """2 layers, d=32, 24 steps of 8 x 16 tokens; diagnostics every 4 steps."""
  config = presets.get_config("tiny", optimizer)
  config.model.num_layers, config.model.d_model, config.model.num_heads = 2, 32, 4
  config.model.max_len = config.seq_len = 16
  config.batch_size, config.num_steps = 8, STEPS
  config.data.vocab_size = 256
  config.schedule.warmup_steps = 4
  config.log_every, config.sync_every, config.eval_every, config.checkpoint_every = 4, 4, 12, 8
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
  assert results.status == "completed" and results.steps_done == STEPS
  assert results.diverged_at_step is None and results.tokens_per_second > 0
  assert np.isclose(results.final_eval_perplexity, np.exp(results.final_eval_loss))
  assert results.final_train_loss < np.log(256)  # learned something beyond uniform
  assert set(results.final_eval_losses) >= {"validation", "test"}
  assert results.final_eval_losses["validation"] == results.final_eval_loss
  assert results.config_fingerprint == rundir.config_fingerprint(tiny_config())
  assert rundir.RunResults.load(workdir) == results
  files = os.listdir(workdir)
  assert any(f.startswith("events.out.tfevents") for f in files), files
  assert {"config.json", "results.json", "metrics.jsonl"} <= set(files)
  assert "run.lock" not in files  # released
  assert _ckpts(workdir)[-1] == STEPS
  scalars = losses(workdir)
  assert set(range(4, STEPS + 1, 4)) <= set(scalars)  # every log step (and diagnostics steps)
  evals = losses(workdir, "eval/loss")
  assert set(evals) == {12, 24} and evals[24] == results.final_eval_loss
  assert set(losses(workdir, "eval_test/loss")) == {12, 24}
  # Probes at every full diagnostics step (steps 0, 4, ... are logged as steps done 1, 5, ...).
  assert set(losses(workdir, "depth/log_var_slope")) == set(range(1, STEPS + 1, 4))


def test_step_modes_are_the_variants_the_loop_runs():
  """Diagnostics every 4 steps with drift (needs g_{t-1}): full at 0 mod 4, prev at 3 mod 4."""
  dcfg = tiny_config().diagnostics
  assert train.step_modes(0, STEPS, dcfg) == ["counters", "full", "prev"]
  assert train.step_modes(5, 7, dcfg) == ["counters"]  # steps 5 and 6
  assert train.step_modes(7, 9, dcfg) == ["full", "prev"]
  dcfg.enabled = False
  assert train.step_modes(0, STEPS, dcfg) == [None]


def test_an_abstract_setup_has_the_real_states_layout_and_allocates_nothing():
  # A stack initialises its K runs itself: its Setup's single-run state is shapes only.
  config = tiny_config()
  real, abstract = train.setup(config).state, train.setup(config, abstract=True).state
  leaves = jax.tree.leaves(abstract)
  assert leaves and all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
  assert jax.tree.structure(real) == jax.tree.structure(abstract)
  for r, a in zip(jax.tree.leaves(real), leaves):
    assert (r.shape, r.dtype, r.sharding) == (a.shape, a.dtype, a.sharding)


def test_precompiled_variants_are_not_compiled_again_by_the_loop():
  """``precompile`` compiles every variant, the probes and the eval step before step 1 (in
  parallel); the jitted steps, probes and evaluation then reuse them."""
  from jaxopt_study import sharding  # pylint: disable=g-import-not-at-top

  config = tiny_config()
  s = train.setup(config)
  compiles = []

  def listen(event, secs, **kw):
    del secs, kw
    if event.endswith("backend_compile_duration"):  # XLA compiles (not cache hits)
      compiles.append(event)

  stack = train.Stack([config], s)
  fns = get, eval_fn, probes_fn = stack.compile(config, s)
  modes = train.step_modes(0, STEPS, config.diagnostics)
  probe = stack.probe_batch([config])
  jax.monitoring.register_event_duration_secs_listener(listen)
  try:
    with sharding.activate(s.mesh):
      compiled = train.precompile(train.loop_calls(config, stack, fns, s.state, 0, probe))
      assert sorted(compiled, key=str) == sorted(modes + ["eval", "probes"], key=str)
      done = len(compiles)  # the steps' (others may be in the jit cache of an earlier test)
      assert done >= len(modes)
      state = s.state
      for step in range(2 * config.diagnostics.every):
        state, _ = get(train.step_mode(step, config.diagnostics))(
            state, jax.device_put(s.dataset.train_batch(step), s.batch_sharding))
      probes_fn(state.params, probe)
      train.evaluate(eval_fn, state, s.dataset.eval_batches(), s.batch_sharding)
  finally:
    jax.monitoring.unregister_event_duration_listener(listen)
  assert int(state.step) == 8 and len(compiles) == done  # none after precompile


def _ckpts(workdir):
  return sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit())


def test_rerun_of_a_finished_run_changes_nothing(reference_run):
  """Running a finished workdir again trains nothing, evaluates nothing and keeps its results."""
  workdir, results = reference_run
  metrics_before = open(os.path.join(workdir, "metrics.jsonl")).read()
  again = train.train_and_evaluate(tiny_config(), workdir)
  assert again == results  # the in-memory results of the first run, field by field
  assert open(os.path.join(workdir, "metrics.jsonl")).read() == metrics_before
  assert _ckpts(workdir)[-1] == STEPS


def _run_until_checkpoint(workdir, config_expr, step=8, main_flags=None):
  """Starts a run in a subprocess; returns once the checkpoint of `step` is complete (orbax
  renames it into place when it is). With `main_flags`, the run is `python -m jaxopt_study.main`
  with those flags; otherwise `train_and_evaluate(<config_expr>, workdir)`."""
  if main_flags is not None:
    cmd = [sys.executable, "-m", "jaxopt_study.main", f"--workdir={workdir}", *main_flags]
  else:
    code = ("import sys; sys.path.insert(0, %r); from tests.test_train import tiny_config;"
            "from jaxopt_study import train; train.train_and_evaluate(%s, %r)"
            ) % (str(ROOT), config_expr, str(workdir))
    cmd = [sys.executable, "-c", code]
  proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  deadline = time.time() + 300
  while not (workdir / "checkpoints" / str(step)).exists():
    assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-3000:]
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
  assert results.status == "completed"
  assert losses(str(workdir)) == losses(ref_dir)  # bitwise: same floats


TINY_FLAGS = ["--config=configs/adamw.py:tiny", "--config.model.num_layers=1",
              "--config.model.d_model=32", "--config.model.max_len=16", "--config.seq_len=16",
              "--config.batch_size=8", "--config.data.vocab_size=256",
              "--config.checkpoint_every=8", "--config.diagnostics.enabled=False"]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_checkpoints_and_exits_with_the_preempted_code(tmp_path, signum):
  """SIGTERM (a preemption) or SIGINT (Ctrl-C) saves a checkpoint of the current step; main
  exits with 75."""
  workdir = tmp_path / "preempted"
  proc = _run_until_checkpoint(workdir, None, main_flags=[*TINY_FLAGS, "--config.num_steps=10000"])
  proc.send_signal(signum)
  assert proc.wait(timeout=120) == 75, proc.stderr.read()[-3000:]
  results = rundir.RunResults.load(str(workdir))
  assert results.status == "preempted" and 8 <= results.steps_done < 10_000
  assert _ckpts(workdir)[-1] == results.steps_done


def test_injected_nan_is_recorded_as_divergence_and_a_clean_rerun_clears_it(tmp_path):
  results = train.train_and_evaluate(tiny_config(inject_nan_at_step=10), str(tmp_path))
  assert results.status == "diverged" and results.diverged_at_step == 10
  assert results.steps_done <= 13  # stops at the next host sync (12), once step 13 is queued
  assert _ckpts(tmp_path) == [8]  # the last good checkpoint, nothing after the NaN
  assert np.isfinite(results.final_train_loss)
  assert rundir.RunResults.load(str(tmp_path)).status == "diverged"
  assert losses(str(tmp_path), "train/diverged") == {10: 1.0}
  # The fault was transient (fault injection is not part of the trajectory): a rerun resumes
  # from the last good checkpoint, completes, and no divergence stays on record.
  again = train.train_and_evaluate(tiny_config(), str(tmp_path))
  assert again.status == "completed" and again.diverged_at_step is None
  assert rundir.RunResults.load(str(tmp_path)).diverged_at_step is None


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
        ({"optimizer.learning_rate": float("nan")}, r"config\.optimizer\.learning_rate=nan"),
        ({"optimizer.learning_rate": float("inf")}, r"config\.optimizer\.learning_rate=inf"),
        ({"optimizer.learning_rate": 1e39}, r"config\.optimizer\.learning_rate=1e\+39"),
        ({"optimizer.clip_norm": -1.0}, r"config\.optimizer\.clip_norm=-1.0 .*ascends"),
        ({"optimizer.weight_decay": -0.1}, r"config\.optimizer\.weight_decay=-0.1"),
        ({"schedule.warmup_steps": -5}, r"config\.schedule\.warmup_steps=-5"),
        ({"schedule.min_lr_ratio": 2.0}, r"config\.schedule\.min_lr_ratio=2.0"),
        ({"keep_checkpoints": 0}, r"config\.keep_checkpoints=0 must be an integer >= 1"),
        ({"prefetch": 0}, r"config\.prefetch=0"),
        ({"sync_every": 0}, r"config\.sync_every=0"),
        ({"diagnostics.every": 0}, r"config\.diagnostics\.every=0 must be >= 1"),
        ({"model.vocab_multiple": 0}, r"config\.model\.vocab_multiple=0 must be an integer >= 1"),
        ({"model.vocab_multiple": -64}, r"config\.model\.vocab_multiple=-64"),
    ],
)
def test_bad_input_fails_before_compile(overrides, error, tmp_path, monkeypatch):
  compiled = []
  monkeypatch.setattr(jax, "jit", lambda *a, **k: compiled.append(1))
  with pytest.raises((ValueError, FileNotFoundError), match=error):
    train.train_and_evaluate(tiny_config(**overrides), str(tmp_path))
  assert not compiled


def test_resume_with_another_config_is_refused_and_restart_moves_the_run_aside(reference_run,
                                                                                tmp_path):
  workdir = tmp_path / "changed"
  shutil.copytree(reference_run[0], workdir)
  with pytest.raises(rundir.ConfigChanged, match=r"optimizer\.learning_rate.*--restart"):
    train.train_and_evaluate(tiny_config(**{"optimizer.learning_rate": 1e-3}), str(workdir))
  # Cadence fields do not change the trajectory: not refused.
  assert rundir.config_fingerprint(tiny_config(log_every=2)) == rundir.config_fingerprint(
      tiny_config())
  moved = rundir.move_aside(str(workdir))
  assert os.path.exists(os.path.join(moved, "results.json")) and not os.path.exists(
      workdir / "results.json")


def test_a_second_process_is_locked_out_and_a_stale_lock_is_taken_over(tmp_path):
  workdir = tmp_path / "locked"
  workdir.mkdir()
  (workdir / "run.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid()}))
  with pytest.raises(rundir.Locked, match="another process is training in this workdir"):
    train.train_and_evaluate(tiny_config(num_steps=4), str(workdir))
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  (workdir / "run.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid}))
  assert train.train_and_evaluate(tiny_config(num_steps=4), str(workdir)).status == "completed"
  assert not (workdir / "run.lock").exists()


def _truncate(step_dir):
  for f in step_dir.rglob("*"):
    if f.is_file() and f.stat().st_size > 16:
      f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _metadata_gone(step_dir):
  for f in step_dir.rglob("*"):
    if f.is_file() and "metadata" in f.name.lower():
      f.unlink()


def _emptied(step_dir):
  shutil.rmtree(step_dir)
  step_dir.mkdir()


def _data_file(step_dir):
  """The checkpoint's largest file: tensorstore's array data (not orbax's JSON metadata)."""
  return max((f for f in step_dir.rglob("*") if f.is_file()), key=lambda f: f.stat().st_size)


def _one_bit_flipped(step_dir):
  f = _data_file(step_dir)
  data = bytearray(f.read_bytes())
  data[len(data) // 2] ^= 0x10
  f.write_bytes(bytes(data))


def _three_bytes_flipped(step_dir):
  f = _data_file(step_dir)
  data = bytearray(f.read_bytes())
  for i in (len(data) // 3, len(data) // 2, 2 * len(data) // 3):
    data[i] ^= 0xFF
  f.write_bytes(bytes(data))


@pytest.mark.parametrize("corrupt", [_truncate, _metadata_gone, _emptied, _one_bit_flipped,
                                     _three_bytes_flipped])
def test_a_corrupt_latest_checkpoint_falls_back_to_the_previous_one(reference_run, tmp_path,
                                                                    corrupt):
  """Damage checkpoint 24 of a finished run: the rerun restores 16, warns, keeps the bad one
  as 24.corrupt, retrains 16 -> 24 and lands on the same losses bit for bit."""
  ref_dir, ref = reference_run
  workdir = tmp_path / "corrupt"
  shutil.copytree(ref_dir, workdir)
  corrupt(workdir / "checkpoints" / str(STEPS))
  results = train.train_and_evaluate(tiny_config(), str(workdir))
  assert results.status == "completed" and results.steps_done == STEPS
  assert results.final_train_loss == ref.final_train_loss
  assert (workdir / "checkpoints" / f"{STEPS}.corrupt").is_dir()
  assert _ckpts(workdir)[-1] == STEPS


def test_a_full_disk_is_one_clear_error(tmp_path):
  """ENOSPC while saving: main prints one line naming the problem and the fix, exit code 1."""
  code = (
      "import errno, sys\n"
      "from absl import app\n"
      "from jaxopt_study import checkpointing, main\n"
      "def full(*a, **k):\n"
      "  raise OSError(errno.ENOSPC, 'No space left on device', 'checkpoints/8')\n"
      "checkpointing.save = full\n"
      f"sys.argv = ['main', '--workdir={tmp_path}', *{TINY_FLAGS!r}, '--config.num_steps=12']\n"
      "app.run(main.main)\n"
  )
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
  assert out.returncode == 1, out.stderr[-3000:]
  assert "No space left on device" in out.stderr and "--workdir" in out.stderr
  assert "Traceback" not in out.stderr and "ImportError" not in out.stderr


# ------------------------------------------------------------------ resumes that must not mislead


def _copy_of(reference_run, tmp_path, name="copy"):
  workdir = tmp_path / name
  shutil.copytree(reference_run[0], workdir)
  return workdir


def test_restart_refuses_to_move_a_live_run_aside(tmp_path):
  workdir = tmp_path / "live"
  workdir.mkdir()
  lock = {"host": socket.gethostname(), "pid": os.getpid()}
  (workdir / "run.lock").write_text(json.dumps(lock))
  (workdir / "metrics.jsonl").write_text("{}\n")
  with pytest.raises(rundir.Locked):
    rundir.move_aside(str(workdir))
  assert sorted(os.listdir(workdir)) == ["metrics.jsonl", "run.lock"]  # nothing moved


@pytest.mark.parametrize("field,value", [("diagnostics.enabled", False),
                                         ("diagnostics.entry_sample_size", 64)])
def test_a_diagnostics_change_is_refused_by_name_and_keeps_every_checkpoint(
    reference_run, tmp_path, field, value):
  """Fields outside the fingerprint that change the state's arrays: the intact checkpoints are
  never renamed .corrupt (once, every one was, and the run restarted from step 0)."""
  workdir = _copy_of(reference_run, tmp_path)
  before = _ckpts(workdir)
  with pytest.raises(rundir.ConfigChanged, match=rf"{field}.*--restart"):
    train.train_and_evaluate(tiny_config(**{field: value}), str(workdir))
  assert _ckpts(workdir) == before
  assert not list((workdir / "checkpoints").glob("*.corrupt*"))


def test_without_config_json_the_results_fingerprint_still_refuses_another_config(
    reference_run, tmp_path):
  workdir = _copy_of(reference_run, tmp_path)
  (workdir / "config.json").unlink()
  with pytest.raises(rundir.ConfigChanged, match="fingerprint"):
    train.train_and_evaluate(tiny_config(**{"optimizer.learning_rate": 1e-3}), str(workdir))
  assert train.train_and_evaluate(tiny_config(), str(workdir)).status == "completed"


def test_a_truncated_results_json_is_an_error_naming_it(reference_run, tmp_path):
  workdir = _copy_of(reference_run, tmp_path)
  text = (workdir / "results.json").read_text()
  (workdir / "results.json").write_text(text[: len(text) // 2])
  with pytest.raises(rundir.BadFile, match="results.json"):
    train.train_and_evaluate(tiny_config(), str(workdir))
  assert (workdir / "results.json").read_text() == text[: len(text) // 2]  # left as it was


def test_resuming_on_another_device_count_says_so(reference_run, tmp_path, caplog):
  workdir = _copy_of(reference_run, tmp_path)
  results = json.loads((workdir / "results.json").read_text())
  (workdir / "results.json").write_text(json.dumps({**results, "devices": 4}))
  with caplog.at_level("WARNING"):
    train.train_and_evaluate(tiny_config(), str(workdir))
  assert "earlier segments trained on 4" in caplog.text


def _a_file(tmp_path):
  (tmp_path / "f").write_text("")
  return tmp_path / "f"


@pytest.mark.parametrize("where,error", [
    (_a_file, "is a file"),
    (lambda t: _a_file(t) / "run", "a parent of it is a file"),
])
def test_a_workdir_that_cannot_hold_a_run_is_refused_before_any_work(tmp_path, monkeypatch,
                                                                     where, error):
  built = []
  monkeypatch.setattr(train, "setup", lambda *a, **k: built.append(1))
  with pytest.raises(rundir.BadWorkdir, match=error):
    train.train_and_evaluate(tiny_config(), str(where(tmp_path)))
  assert not built


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_an_unwritable_workdir_is_refused(tmp_path):
  ro = tmp_path / "ro"
  ro.mkdir(mode=0o500)
  with pytest.raises(rundir.BadWorkdir, match="not writable|cannot be created"):
    train.train_and_evaluate(tiny_config(), str(ro / "run"))


def test_warmup_longer_than_the_run_warns(caplog):
  with caplog.at_level("WARNING"):
    train.validate_config(tiny_config(**{"schedule.warmup_steps": STEPS + 1}))
  assert "never reaches its peak" in caplog.text


@pytest.mark.parametrize("flag,expected", [
    ("--config.optimizer.learnin_rate=1", 'Did you mean "learning_rate"'),
    ("--config=configs/nonexistent.py", "no such file.*configs/lion.py"),
])
def test_a_typo_is_one_line_with_the_fix(tmp_path, flag, expected):
  argv = [sys.executable, "-m", "jaxopt_study.main", f"--workdir={tmp_path}",
          "--config=configs/lion.py", flag]
  out = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert out.returncode == 1
  assert "Traceback" not in out.stderr, out.stderr[-2000:]
  lines = out.stderr.strip().splitlines()
  assert len(lines) == 1 and re.search(expected, lines[0]), out.stderr[-2000:]


def test_local_text_is_identified_by_content_not_by_where_it_lies(tmp_path):
  """A run on local files resumes from a copy of them elsewhere (data.path is not part of its
  identity: a study continues on another machine), and refuses other text at the same path."""
  from tests.test_data import _write_wikitext

  first = _write_wikitext(tmp_path / "here")

  def config(folder):
    return tiny_config(**{"data.name": "local", "data.path": str(folder), "data.vocab_size": 400,
                          "data.cache_dir": str(tmp_path / "cache"), "num_steps": 8})

  workdir = str(tmp_path / "run")
  done = train.train_and_evaluate(config(first), workdir)
  assert done.status == "completed"
  assert set(done.data_sha256) == {"train", "validation", "test"}
  moved = shutil.copytree(first, tmp_path / "elsewhere")
  assert rundir.config_fingerprint(config(moved)) == done.config_fingerprint
  again = train.train_and_evaluate(config(moved), workdir)
  assert again.status == "completed" and again.steps_done == done.steps_done
  with open(moved / "wiki.train.tokens", "a", encoding="utf-8") as f:
    f.write(" the river castle storm . \n")
  with pytest.raises(rundir.ConfigChanged, match=r"other text \(sha256 of train.*data.path"):
    train.train_and_evaluate(config(moved), workdir)


def test_runs_recorded_with_data_path_in_the_fingerprint_match_at_that_path(monkeypatch):
  # Before data.path left the fingerprint, it was in: such a record matches a config holding
  # the same path, and only that path.
  config = tiny_config(**{"data.name": "local", "data.path": "/data/wt2"})
  monkeypatch.setattr(rundir, "NON_TRAJECTORY",
                      tuple(f for f in rundir.NON_TRAJECTORY if f != "data.path"))
  recorded = rundir.config_fingerprint(config)  # the fingerprint as it was computed then
  monkeypatch.undo()
  assert recorded != rundir.config_fingerprint(config)
  assert recorded in rundir.config_fingerprints(config)
  config.data.path = "/elsewhere/wt2"
  assert recorded not in rundir.config_fingerprints(config)
