r"""Memory plan of a train step on a device mesh, without allocating the model.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \
  python scripts/memory_plan.py --config=configs/adamw.py:gpt2_xl \
      --meshes=8x1,4x2,2x4,1x8 --compile_layers=1,2 --json_out=/tmp/plan.json

On GPUs drop the two variables: the meshes then use the real devices. A mesh ``DxF`` is
``config.mesh.data=D, config.mesh.fsdp=F`` over the first ``D*F`` devices; the global batch is
the config's (``--config.batch_size``), so per-device batch = batch / (D*F).

The train state is built abstractly (``jax.eval_shape`` over ``train.create_state``: the same
code a run uses, no array allocated), the real train step (``train.compile_train_step``) is
lowered and compiled for the mesh, and per device this prints:

* **state bytes, from the shardings**: for each leaf, ``prod(sharding.shard_shape(shape)) *
  itemsize`` -- exactly what one device holds of the parameters, the optimizer state and the
  diagnostic state between steps (exact for the full-depth model; no compile needed).
* **compiled step, from ``compiled.memory_analysis()``** (XLA's buffer assignment of the
  per-device SPMD program): ``argument`` (state + batch buffers passed in), ``output`` (new state
  + metrics), ``alias`` (outputs written in place of donated arguments), ``temp`` (everything
  live only inside the step: activations kept for the backward pass, gradients, all-gathered
  parameters, optimizer temporaries), ``code`` (generated code). Estimated peak =
  argument + output - alias + temp.
* **all-gathers** in the compiled HLO (``compiled.as_text()``): the largest one, and how many
  results have the size of a whole sharded weight matrix (any shape: flattened too). FSDP gathers each weight for its matmuls by
  design (ZeRO-3); the diagnostics must add none: the full-diagnostics step's gathers are
  compared with those of the step without diagnostics.

Compiling the full depth of a large model on a few CPU cores is slow, so ``--compile_layers``
compiles shallower copies (same width, vocab, batch, sequence) and extrapolates every compiled
number linearly in the number of layers to the config's depth (each block is identical, so its
parameters, state, saved activations and gathers add a constant per layer); the output says
where a number is extrapolated. ``--compile_layers=0`` compiles the full depth.

The compiled numbers are those of the platform that compiles: XLA:CPU with fake host devices
fuses and schedules differently from XLA:GPU (and keeps bf16 work in f32 in places), so treat
its ``temp`` as an estimate; rerun on the GPUs for theirs. The state bytes are platform-free.
"""

from __future__ import annotations

import collections
import json
import re

from absl import app
from absl import flags
import flax.linen as nn
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np

from jaxopt_study import cli
from jaxopt_study import diagnostics
from jaxopt_study import optimizers
from jaxopt_study import sharding
from jaxopt_study import train
from jaxopt_study.models import gpt

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", "configs/adamw.py:gpt2_xl", "Run config (file.py:PRESET).")
flags.DEFINE_list("meshes", None, "Meshes DATAxFSDP, e.g. 8x1,4x2,2x4,1x8 (default: the config's).")
flags.DEFINE_list("compile_meshes", None,
                  "Meshes whose step is compiled (default: all of --meshes); the others get "
                  "the state table only, which needs no compile.")
flags.DEFINE_list("modes", ["off", "full"],
                  "Steps to compile: 'off' (config.diagnostics.enabled=False) and/or a "
                  "diagnostics mode ('counters', 'prev', 'full') with the diagnostics on.")
flags.DEFINE_list("compile_layers", ["1", "2"],
                  "Depths to compile and extrapolate from (two or more); '0': the full depth.")
flags.DEFINE_list("devices_gb", ["141:H200", "80:H100"],
                  "GPU memories (GB = 1e9 bytes) to check the per-device peak against.")
flags.DEFINE_string("json_out", None, "Also write the plan as JSON here.")

GB = 1e9
# The HLO text of an all-gather: `%ag = bf16[1600,6400]{1,0} all-gather(...)`; an async
# `all-gather-start` returns a tuple (operand, result): its last shape is the result.
_ALL_GATHER = re.compile(r"=\s*(.*?)\s+all-gather(?:-start)?\(")
_SHAPE = re.compile(r"\b(pred|s8|u8|s16|u16|s32|u32|s64|u64|bf16|f16|f32|f64)\[([\d,]*)\]")
_ITEMSIZE = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4,
             "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8}
MEMORY_FIELDS = ("argument", "output", "alias", "temp", "code")


# ------------------------------------------------------------------------------ abstract set-up


def abstract_setup(config, devices) -> train.Setup:
  """``train.setup`` without data or arrays: its state is ShapeDtypeStructs with shardings.

  The vocabulary is ``config.data.vocab_size`` padded (what every data source gives the model)
  and the token frequencies uniform (they only fill the diagnostics' bucket table).
  """
  train.validate_config(config)
  mesh = sharding.make_mesh(config.mesh, devices)
  sharding.check_batch(config.batch_size, mesh)
  vocab = train.padded_vocab(config.data.vocab_size, config.model.vocab_multiple)
  model = gpt.GPT(gpt.from_config(config.model, vocab))
  params_shape = jax.eval_shape(
      lambda k: model.init(k, jnp.zeros((1, config.seq_len), jnp.int32))["params"],
      jax.random.PRNGKey(0),
  )
  tx, learning_rate = optimizers.build(config, nn.meta.unbox(params_shape))
  token_freq = np.full(vocab, 1.0 / vocab)
  state, state_sh = train.create_state(config, model, tx, mesh, token_freq, params_shape,
                                       abstract=True)
  return train.Setup(mesh, None, model, tx, learning_rate, state, state_sh,
                     sharding.batch_sharding(mesh))


def state_bytes(s: train.Setup) -> dict[str, dict[str, int]]:
  """{'params' | 'opt_state' | 'diag_state' | 'other': {'total': B, 'per_device': B}}."""

  def count(tree):
    total = per_device = 0
    for x in jax.tree.leaves(tree):
      itemsize = np.dtype(x.dtype).itemsize
      total += int(np.prod(x.shape)) * itemsize
      per_device += int(np.prod(x.sharding.shard_shape(x.shape))) * itemsize
    return {"total": total, "per_device": per_device}

  st = s.state
  return {"params": count(st.params), "opt_state": count(st.opt_state),
          "diag_state": count(st.diag_state),
          "other": count((st.step, st.rng, st.diverged_at))}


# ------------------------------------------------------------------------------ compiled step


def compile_step(config, s: train.Setup, mode):
  """The run's jitted train step of diagnostics ``mode`` (None: off), lowered and compiled."""
  batch = train.batch_struct(config, s.batch_sharding)
  with sharding.activate(s.mesh):
    return train.compile_train_step(config, s)(mode).lower(s.state, batch).compile()


def memory(compiled) -> dict[str, int]:
  """Per-device bytes of XLA's buffer assignment (see the module doc) and the estimated peak."""
  m = compiled.memory_analysis()
  out = {
      "argument": m.argument_size_in_bytes, "output": m.output_size_in_bytes,
      "alias": m.alias_size_in_bytes, "temp": m.temp_size_in_bytes,
      "code": m.generated_code_size_in_bytes,
  }
  out["peak"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
  return out


def all_gathers(hlo_text: str) -> list[tuple[str, tuple[int, ...]]]:
  """(dtype, result shape) of every all-gather in an HLO module's text."""
  out = []
  for line in hlo_text.splitlines():
    if (m := _ALL_GATHER.search(line)) and (shapes := _SHAPE.findall(m.group(1))):
      dtype, dims = shapes[-1]
      out.append((dtype, tuple(int(d) for d in dims.split(",") if d)))
  return out


def gather_bytes(g) -> int:
  return int(np.prod(g[1])) * _ITEMSIZE[g[0]]


def sharded_matrix_sizes(params) -> set[int]:
  """Entry counts of the weight matrices FSDP splits (>= 2-D; biases and scales are O(d))."""
  return {int(np.prod(x.shape)) for x in jax.tree.leaves(params)
          if len(x.shape) >= 2 and x.sharding.shard_shape(x.shape) != x.shape}


def gather_report(gathers, param_sizes) -> dict:
  """Count, largest gather, and the gathers of a whole sharded weight matrix: results with its
  number of entries (in any shape: a flattened weight counts too)."""
  largest = max(gathers, key=gather_bytes, default=None)
  whole = [g for g in gathers if int(np.prod(g[1])) in param_sizes]
  return {"count": len(gathers), "bytes": sum(map(gather_bytes, gathers)),
          "largest": _gather_str(largest), "largest_bytes": gather_bytes(largest) if largest else 0,
          "param_sized": len(whole),
          "largest_param_sized": _gather_str(max(whole, key=gather_bytes, default=None))}


def _gather_str(g) -> str | None:
  return None if g is None else f"{g[0]}[{','.join(map(str, g[1]))}]"


# ------------------------------------------------------------------------------ one mesh


def _with(config, **fields):
  c = config.copy_and_resolve_references()
  for k, v in fields.items():
    target = c
    *parents, leaf = k.split(".")
    for p in parents:
      target = target[p]
    target[leaf] = v
  return c


def _config_for(config, mode):
  """Diagnostics off for 'off'; on (the config's families) for a diagnostics mode."""
  return _with(config, **{"diagnostics.enabled": mode != "off"})


def extrapolate(by_depth: dict[int, dict[str, float]], depth: int) -> dict[str, float]:
  """Least-squares line a + b L through each number's values at the compiled depths, at ``depth``."""
  ls = np.array(sorted(by_depth), float)
  out = {}
  for key in by_depth[int(ls[0])]:
    ys = np.array([by_depth[int(l)][key] for l in ls], float)
    b, a = np.polyfit(ls, ys, 1)
    out[key] = float(a + b * depth)
  return out


def plan_mesh(config, data: int, fsdp: int, modes, depths, compile_step_too=True) -> dict:
  devices = jax.devices()[: data * fsdp]
  config = _with(config, **{"mesh.data": data, "mesh.fsdp": fsdp})
  full_depth = config.model.num_layers
  state = {mode: state_bytes(abstract_setup(_config_for(config, mode), devices))
           for mode in modes}
  row = {"mesh": f"{data}x{fsdp}", "data": data, "fsdp": fsdp, "devices": data * fsdp,
         "batch_per_device": config.batch_size // (data * fsdp), "state": state, "steps": {}}
  for mode in modes if compile_step_too else ():
    by_depth = {}
    for depth in depths or [full_depth]:  # ascending: the last is the deepest
      c = _with(_config_for(config, mode), **{"model.num_layers": depth})
      s = abstract_setup(c, devices)
      param_sizes = sharded_matrix_sizes(s.state.params)
      compiled = compile_step(c, s, None if mode == "off" else mode)
      by_depth[depth] = memory(compiled)
      gathers = all_gathers(compiled.as_text())
    mem = extrapolate(by_depth, full_depth) if depths else by_depth[full_depth]
    row["steps"][mode] = {
        "compiled_layers": sorted(by_depth),
        "extrapolated": bool(depths),
        "memory": {k: int(v) for k, v in mem.items()},
        "memory_by_depth": by_depth,
        "all_gathers": gather_report(gathers, param_sizes),
        "_gathers": gathers,
    }
  # Gathers only the diagnostics add: the full step's multiset minus the step without them.
  if "off" in row["steps"]:
    off = collections.Counter(row["steps"]["off"].pop("_gathers"))
    for mode in modes:
      if mode != "off":
        extra = collections.Counter(row["steps"][mode].pop("_gathers")) - off
        row["steps"][mode]["gathers_added_by_diagnostics"] = gather_report(
            list(extra.elements()), param_sizes)
  for step in row["steps"].values():
    step.pop("_gathers", None)
  return row


# ------------------------------------------------------------------------------ output


def _gb(b) -> str:
  return f"{b / GB:.4g}"


def render(config, rows, devices_gb) -> str:
  m = config.model
  n = rows[0]["state"][next(iter(rows[0]["state"]))]["params"]["total"] // 4
  lines = [
      f"model: {m.num_layers} layers, d={m.d_model}, {m.num_heads} heads, seq {config.seq_len}, "
      f"vocab {config.data.vocab_size}, compute {m.dtype}, remat {m.remat}; "
      f"{n / 1e9:.3f}B float32 parameters; optimizer {config.optimizer.name}; "
      f"global batch {config.batch_size}",
      f"platform: {jax.devices()[0].platform} ({jax.device_count()} devices, jax {jax.__version__}); "
      "GB = 1e9 bytes, all numbers per device",
      "",
      "State held between steps, from the shardings (exact, full depth):",
      "| mesh DxF | params GB | opt state GB | diag state GB | total (diag off) | total (diag on) |",
      "|---|---|---|---|---|---|",
  ]
  for r in rows:
    st = r["state"]
    on = st.get(next((k for k in st if k != "off"), "off"))
    off = st.get("off", on)
    tot = lambda s: sum(v["per_device"] for v in s.values())
    lines.append(f"| {r['mesh']} | {_gb(on['params']['per_device'])} | "
                 f"{_gb(on['opt_state']['per_device'])} | {_gb(on['diag_state']['per_device'])} | "
                 f"{_gb(tot(off))} | {_gb(tot(on))} |")
  mems = [(name, float(gb) * GB) for gb, name in (d.split(":") for d in devices_gb)]
  lines += ["", "Compiled train step, compiled.memory_analysis() (per device; "
            "peak = argument + output - alias + temp):",
            "| mesh DxF | batch/dev | step | layers compiled | argument | output | alias | temp | "
            "code | peak GB | " + " | ".join(f"fits {n}" for n, _ in mems) + " |",
            "|" + "---|" * (10 + len(mems))]
  for r in rows:
    for mode, st in r["steps"].items():
      mm = st["memory"]
      how = (f"{','.join(map(str, st['compiled_layers']))} -> {m.num_layers} (extrapolated)"
             if st["extrapolated"] else f"{m.num_layers}")
      fits = " | ".join("yes" if mm["peak"] <= cap else "NO" for _, cap in mems)
      lines.append(f"| {r['mesh']} | {r['batch_per_device']} | {mode} | {how} | "
                   + " | ".join(_gb(mm[k]) for k in (*MEMORY_FIELDS, "peak")) + f" | {fits} |")
  lines += ["", "All-gathers in the compiled HLO (of the deepest compiled model):",
            "| mesh DxF | step | count | largest | whole-weight results | "
            "added by diagnostics (count, largest, whole-weight) |", "|---|---|---|---|---|---|"]
  for r in rows:
    for mode, st in r["steps"].items():
      g, extra = st["all_gathers"], st.get("gathers_added_by_diagnostics")
      added = (f"{extra['count']}, {extra['largest']}, {extra['param_sized']}"
               if extra is not None else "-")
      lines.append(f"| {r['mesh']} | {mode} | {g['count']} | {g['largest']} | "
                   f"{g['param_sized']} | {added} |")
  if any(st["extrapolated"] for r in rows for st in r["steps"].values()):
    lines += ["", f"Compiled numbers marked 'extrapolated' come from the depths compiled, fitted "
              f"linearly in layers to {m.num_layers}; the state table is exact."]
  if jax.devices()[0].platform == "cpu":
    lines += ["XLA:CPU numbers: the GPU compiler's temp buffers differ (fusion, bf16); the state "
              "bytes are the same on any platform."]
  lines += ["JAX preallocates 75% of a GPU (XLA_PYTHON_CLIENT_MEM_FRACTION); a peak above that "
            "needs XLA_PYTHON_CLIENT_MEM_FRACTION=0.95."]
  return "\n".join(lines)


def parse_mesh(text: str) -> tuple[int, int]:
  try:
    data, fsdp = (int(x) for x in text.lower().split("x"))
  except ValueError:
    raise ValueError(f"--meshes: {text!r} is not DATAxFSDP (e.g. 4x2)") from None
  if data < 1 or fsdp < 1 or data * fsdp > jax.device_count():
    raise ValueError(
        f"--meshes: {text} needs {data * fsdp} devices, {jax.device_count()} available; on CPU "
        "set XLA_FLAGS=--xla_force_host_platform_device_count=N JAX_PLATFORMS=cpu")
  return data, fsdp


def main(argv):
  del argv
  config = FLAGS.config
  meshes = [parse_mesh(x) for x in FLAGS.meshes] if FLAGS.meshes else [
      sharding.mesh_shape(config.mesh, jax.device_count())]
  for mode in FLAGS.modes:
    if mode not in diagnostics.MODES:
      raise ValueError(f"--modes: {mode!r}; valid: {diagnostics.MODES}")
  depths = sorted({int(x) for x in FLAGS.compile_layers})
  if depths == [0]:
    depths = []
  elif len(depths) < 2 or depths[0] < 1 or depths[-1] > config.model.num_layers:
    raise ValueError(f"--compile_layers={FLAGS.compile_layers}: give two or more depths in "
                     f"[1, {config.model.num_layers}], or 0 for the full depth.")
  compiled = ({parse_mesh(x) for x in FLAGS.compile_meshes} if FLAGS.compile_meshes is not None
              else set(meshes))
  rows = []
  for data, fsdp in meshes:
    rows.append(plan_mesh(config, data, fsdp, FLAGS.modes, depths, (data, fsdp) in compiled))
    print(f"mesh {data}x{fsdp} done", flush=True)
  print(render(config, rows, FLAGS.devices_gb), flush=True)
  if FLAGS.json_out:
    with open(FLAGS.json_out, "w") as f:
      json.dump({"platform": jax.devices()[0].platform, "num_layers": config.model.num_layers,
                 "rows": rows}, f, indent=2)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
