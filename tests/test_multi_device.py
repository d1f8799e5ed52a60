"""Meshes of 8 host devices (subprocesses): same training whatever the mesh, state split by fsdp.

`tests/test_train.py::test_8_devices_4x2_mesh_matches_1_device` covers the whole run loop on a
4x2 mesh. Here: the compiled step itself on every mesh shape of 8 devices (pure data parallel,
2x4, pure FSDP at 1x8 with full diagnostics on every step), the bytes each device holds, and
scripts/memory_plan.py.
"""

import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from jaxopt_study import presets
from jaxopt_study import sharding
from jaxopt_study import train

ROOT = pathlib.Path(__file__).resolve().parents[1]
ENV = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
       "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
# (data, fsdp) -> diagnostics mode ('off': disabled). 4x2 runs in tests/test_train.py. Full
# diagnostics compile slowly on CPU: they run on the most sharded mesh, where they can go wrong.
MESHES = {(8, 1): "off", (2, 4): "off", (1, 8): "full"}
STEPS = 3
D_MODEL = 32  # 'embed' dims divide by 8: every matrix splits at fsdp=8


def small_config(data=1, fsdp=1, mode="full"):
  """1 layer, d=32, 8 x 16 tokens, vocab 256, AdamW; diagnostics off, or full on every step."""
  config = presets.get_config("tiny", "adamw")
  m = config.model
  m.num_layers, m.d_model, m.num_heads, m.max_len = 1, D_MODEL, 4, 16
  config.seq_len, config.batch_size, config.data.vocab_size = 16, 8, 256
  config.schedule.warmup_steps = 1
  config.diagnostics.enabled = mode != "off"
  config.diagnostics.every = 1  # every step 'full': one compiled variant
  # Quantiles gather a strided sample of <= this many entries (by design); smaller than every
  # weight matrix here, as the default 65536 is in a real model.
  config.diagnostics.quantile_sample_size = 256
  config.mesh.data, config.mesh.fsdp = data, fsdp
  return config


def run_steps(config) -> dict:
  """STEPS compiled train steps: losses, last diagnostics scalars, bytes per device, HLO gathers."""
  from scripts import memory_plan  # pylint: disable=g-import-not-at-top

  s = train.setup(config)
  mode = "full" if config.diagnostics.enabled else None
  batches = [jax.make_array_from_process_local_data(s.batch_sharding, s.dataset.train_batch(i))
             for i in range(STEPS)]
  with sharding.activate(s.mesh):
    step = train.compile_train_step(config, s)(mode).lower(s.state, batches[0]).compile()
  state, losses = s.state, []
  for batch in batches:
    state, metrics = step(state, batch)
    losses.append(float(metrics["train/loss"]))
  diag = {}
  if mode:
    diag = {k: float(v) for k, v in metrics["diagnostics"].to_numpy().items() if v.ndim == 0}
  leaves = []
  for group in ("params", "opt_state", "diag_state"):
    for x in jax.tree.leaves(getattr(state, group)):
      leaves.append({"group": group, "sharded": "fsdp" in str(x.sharding.spec),  # (1-way too)
                     "total": x.nbytes,
                     "per_device": x.addressable_shards[0].data.nbytes,
                     "max_per_device": max(sh.data.nbytes for sh in x.addressable_shards)})
  return {"losses": losses, "diag": diag, "leaves": leaves,
          "gathers": memory_plan.all_gathers(step.as_text()),
          "param_sizes": [x.size for x in jax.tree.leaves(state.params)
                          if x.ndim >= 2 and x.addressable_shards[0].data.shape != x.shape]}


MESH_SCRIPT = """
import json
from tests.test_multi_device import MESHES, small_config, run_steps
import jax
assert jax.device_count() == 8, jax.devices()
print("RESULT" + json.dumps({f"{d}x{f}": run_steps(small_config(d, f, mode))
                             for (d, f), mode in MESHES.items()}))
"""


def _subprocess(args, timeout=600):
  out = subprocess.run(args, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)
  assert out.returncode == 0, out.stderr[-3000:]
  return out.stdout


@pytest.fixture(scope="module")
def on_meshes():
  return json.loads(_subprocess([sys.executable, "-c", MESH_SCRIPT]).split("RESULT", 1)[1])


@pytest.fixture(scope="module")
def on_one_device():
  assert jax.device_count() == 1  # the pytest process: one CPU device
  return run_steps(small_config())


def test_every_mesh_gives_the_losses_of_one_device(on_meshes, on_one_device):
  """Also: full diagnostics (one device) leave the training of no diagnostics unchanged."""
  ref = np.asarray(on_one_device["losses"])
  assert len(ref) == STEPS and ref[-1] < ref[0]  # it trains
  for mesh, got in on_meshes.items():
    np.testing.assert_allclose(got["losses"], ref, rtol=1e-5, err_msg=mesh)


# dL/d(key bias) = 0 exactly (softmax is invariant to a shift of every score of a query), so that
# gradient is rounding noise, different for every reduction order: its own metrics (signs, cosines,
# log(v / s_hat) of noise, and whether an entry is exactly zero, hence idle) differ by O(1)
# between meshes and move the small aggregates they enter (kind=attention, layer=00: a few
# thousand entries) by more than any useful tolerance. Every other parameter's metrics, and the
# global aggregates, must agree.
NOISE_PARAM = "param=block_0/attn/key/bias"
NOISE_AGGREGATES = ("kind=attention", "layer=00")


def _diag_rtol(name: str) -> float | None:
  """Tolerance of a diagnostics scalar across meshes; None: not compared."""
  if NOISE_PARAM in name or "max_min" in name:  # max/min over tensors: the min is the noise
    return None
  if "/param=" in name:
    return 1e-4
  return None if any(a in name for a in NOISE_AGGREGATES) else 1e-2


def test_fsdp_diagnostics_equal_those_of_one_device(on_meshes, on_one_device):
  """Every full-diagnostics scalar computed on 8-way sharded tensors = the unsharded one."""
  ref, got = on_one_device["diag"], on_meshes["1x8"]["diag"]
  assert len(ref) > 50 and got.keys() == ref.keys()
  compared = {n: rtol for n in ref if (rtol := _diag_rtol(n)) is not None}
  bad = {n: (got[n], ref[n]) for n, rtol in compared.items()
         if not np.isclose(got[n], ref[n], rtol=rtol, atol=1e-6, equal_nan=True)}
  assert len(compared) > 0.6 * len(ref) and not bad, sorted(bad)


def test_each_device_holds_1_over_fsdp_of_every_sharded_leaf(on_meshes, on_one_device):
  for ((data, fsdp), mode), mesh in zip(MESHES.items(), on_meshes):
    leaves = on_meshes[mesh]["leaves"]
    for leaf in leaves:
      assert leaf["max_per_device"] == leaf["per_device"], (mesh, leaf)  # equal shards
      assert leaf["per_device"] * (fsdp if leaf["sharded"] else 1) == leaf["total"], (mesh, leaf)
    # Parameters, AdamW moments and the diagnostics' per-entry state are all split.
    sharded = {l["group"] for l in leaves if l["sharded"]}
    assert sharded == {"params", "opt_state"} | ({"diag_state"} if mode == "full" else set())
    total = sum(l["total"] for l in leaves)
    replicated = sum(l["total"] for l in leaves if not l["sharded"])
    assert sum(l["per_device"] for l in leaves) == replicated + (total - replicated) // fsdp
    if fsdp > 1:
      assert replicated < 0.1 * total, mesh  # biases, norms, counters: small
  # Whatever the mesh, the same state: the same leaves, the same bytes.
  totals = lambda r: [l["total"] for l in r["leaves"]]
  assert totals(on_meshes["1x8"]) == totals(on_one_device)
  assert totals(on_meshes["8x1"]) == totals(on_meshes["2x4"])


@pytest.fixture(scope="module")
def plan(tmp_path_factory):
  """scripts/memory_plan.py on small_config's model: states on 2x4 and 1x8, 1x8 compiled."""
  out = tmp_path_factory.mktemp("plan") / "plan.json"
  stdout = _subprocess([
      sys.executable, "scripts/memory_plan.py", "--config=configs/adamw.py:tiny",
      "--config.model.num_layers=1", f"--config.model.d_model={D_MODEL}",
      "--config.data.vocab_size=256", "--config.seq_len=16", "--config.model.max_len=16",
      "--config.batch_size=8", "--config.diagnostics.quantile_sample_size=256", "--meshes=2x4,1x8", "--compile_meshes=1x8", "--modes=off,full",
      "--compile_layers=0", f"--json_out={out}",
  ])
  return stdout, {row["mesh"]: row for row in json.loads(out.read_text())["rows"]}


def test_memory_plan_per_device_state_matches_the_real_shards(plan, on_meshes, on_one_device):
  """Bytes from the abstract state's shardings = bytes of the real arrays' shard 0."""
  stdout, rows = plan
  assert "State held between steps" in stdout and "memory_analysis" in stdout
  real = {("2x4", "off"): on_meshes["2x4"], ("1x8", "full"): on_meshes["1x8"]}
  for (mesh, mode), run in real.items():
    for group in ("params", "opt_state", "diag_state"):
      leaves = [l for l in run["leaves"] if l["group"] == group]
      got = rows[mesh]["state"][mode][group]
      assert got["per_device"] == sum(l["per_device"] for l in leaves), (mesh, mode, group)
      assert got["total"] == sum(l["total"] for l in leaves), (mesh, mode, group)
  # fsdp=4 vs 8 with the same model: the parameters' bytes per device halve (up to replicated).
  p4, p8 = rows["2x4"]["state"]["off"]["params"], rows["1x8"]["state"]["off"]["params"]
  assert p4["total"] == p8["total"] and 0.5 <= p8["per_device"] / p4["per_device"] < 0.55


def test_memory_plan_compiled_arguments_are_the_state_plus_the_batch(plan):
  """memory_analysis' argument bytes = state held per device (from shardings) + batch shard."""
  _, rows = plan
  row = rows["1x8"]
  batch_shard = row["batch_per_device"] * 17 * 4  # int32 [B/dev, T+1]
  for mode, step in row["steps"].items():
    held = sum(g["per_device"] for g in row["state"][mode].values())
    mem = step["memory"]
    assert mem["argument"] == held + batch_shard, (mode, mem, held)
    assert mem["alias"] >= 0.9 * held, mode  # the donated state is written in place
    assert mem["peak"] == mem["argument"] + mem["output"] - mem["alias"] + mem["temp"]
    assert step["compiled_layers"] == [1] and not step["extrapolated"]
  assert rows["2x4"]["steps"] == {}  # not in --compile_meshes


def test_fsdp_diagnostics_gather_no_whole_parameter(plan, on_meshes):
  """FSDP all-gathers weights for the matmuls (ZeRO-3); full diagnostics add no such gather."""
  _, rows = plan
  off, full = rows["1x8"]["steps"]["off"]["all_gathers"], rows["1x8"]["steps"]["full"]
  assert off["param_sized"] > 0
  assert full["gathers_added_by_diagnostics"]["param_sized"] == 0, full
  # The same on the step the run executed (compiled from real arrays, not abstract ones).
  run = on_meshes["1x8"]
  sizes = set(run["param_sizes"])
  assert sum(int(np.prod(g[1])) in sizes for g in run["gathers"]) == off["param_sized"]
