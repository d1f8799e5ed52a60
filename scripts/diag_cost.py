r"""XLA's cost of the diagnostics' step variants, from the compiled HLO: no array is allocated.

  JAX_PLATFORMS=cpu python scripts/diag_cost.py --config=configs/adamw.py:gpt2_small \
      --config.model.num_layers=2 --config.batch_size=1 --config.seq_len=128

The train state is built abstractly (``memory_plan.abstract_setup``: ``jax.eval_shape`` over
the code a run uses), and the real jitted train step (``train.compile_train_step``) of each
``--modes`` entry is lowered and compiled for it: 'off' (``config.diagnostics.enabled=False``)
and the diagnostics modes 'counters', 'prev', 'full' (``diagnostics.MODES``). Per variant it
prints

* ``bytes``: ``compiled.cost_analysis()['bytes accessed']``, XLA's count of the bytes every
  top-level op reads and writes (a fusion counts its operands and results once: traffic to
  memory, the quantity that bounds an elementwise or reduction kernel on a GPU);
* ``flops``: ``cost_analysis()['flops']``;
* ``fusions``: fusion instructions in the scheduled program (``compiled.as_text()``), i.e.
  instructions whose opcode is ``fusion`` outside fused computations;
* ``kernels``: every instruction outside fused computations that does work (not a parameter,
  constant, tuple, get-tuple-element or bitcast), fusions included: a proxy of the kernels
  launched per step on a GPU (loop bodies counted once);
* ``compile s``: lowering + compilation, wall time and the process's CPU time (less noisy on a
  shared machine);

and each diagnostics mode's difference to 'off', also per parameter (the diagnostics are
per-entry elementwise and reduction work that runs at memory bandwidth, so bytes per parameter
is their cost; the package docstring of ``jaxopt_study.diagnostics`` gives the expected
traffic). The command above takes about a minute on a CPU (the full step dominates); on a GPU
drop ``JAX_PLATFORMS`` and the size flags for the preset's real numbers. XLA:CPU fuses
differently from XLA:GPU (no sibling multi-output fusion: each of several loops reading the same
array reads it again; bf16 kept in f32 in places), so read a CPU table for trends, not for GPU
numbers. ``cost_analysis`` counts a fusion's whole operand even when the fusion reads only a
strided slice of it (the quantile subsamples), an over-count.
"""

from __future__ import annotations

import json
import re
import time

from absl import app
from absl import flags
import jax
import numpy as np

from jaxopt_study import cli
from jaxopt_study import diagnostics
import memory_plan  # scripts/memory_plan.py (this script's directory is on sys.path)

FLAGS = flags.FLAGS
# --config (pass it: its default is memory_plan's gpt2_xl), --modes and --json_out are
# memory_plan's flags, defined by importing it.
FLAGS.set_default("modes", list(diagnostics.MODES))
flags.DEFINE_string("hlo_dir", None, "Also write each variant's optimized HLO text here.")

# Instructions that launch no work (outside fused computations).
_FREE = {"parameter", "constant", "tuple", "get-tuple-element", "bitcast", "after-all",
         "partition-id", "replica-id", "opt-barrier"}
# `  %name = f32[2,3]{1,0} opcode(...)` or `  ROOT %name = (f32[], s32[]) opcode(...)`.
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*.*?\s([a-z][\w\-]*)\(")
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_CALLS = re.compile(r"calls=%?([\w.\-]+)")


def hlo_counts(hlo_text: str) -> dict[str, int]:
  """{'fusions', 'kernels'} of an optimized HLO module's text (see the module docstring)."""
  bodies: dict[str, list[str]] = {}
  fused: set[str] = set()
  current = None
  for line in hlo_text.splitlines():
    if current is None:
      m = _COMPUTATION.match(line)
      if m and not line.startswith("HloModule"):
        current = m.group(1)
        bodies[current] = []
      continue
    if line.strip() == "}":
      current = None
      continue
    bodies[current].append(line)
  for lines in bodies.values():
    for line in lines:
      m = _INSTR.match(line)
      if m and m.group(1) == "fusion":
        fused.update(_CALLS.findall(line))
  fusions = kernels = 0
  for name, lines in bodies.items():
    if name in fused:
      continue
    for line in lines:
      m = _INSTR.match(line)
      if not m or m.group(1) in _FREE:
        continue
      kernels += 1
      fusions += m.group(1) == "fusion"
  return {"fusions": fusions, "kernels": kernels}


def cost(compiled) -> dict[str, float]:
  """{'bytes', 'flops'} of ``compiled.cost_analysis()`` (a dict, or a list of one per jax version)."""
  c = compiled.cost_analysis()
  if isinstance(c, (list, tuple)):
    c = c[0]
  return {"bytes": float(c.get("bytes accessed", np.nan)), "flops": float(c.get("flops", np.nan))}


def measure(config, mode: str) -> dict:
  c = memory_plan._config_for(config, mode)  # pylint: disable=protected-access
  s = memory_plan.abstract_setup(c, jax.devices()[:1])
  t0, c0 = time.perf_counter(), time.process_time()
  compiled = memory_plan.compile_step(c, s, None if mode == "off" else mode)
  seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
  text = compiled.as_text()
  if FLAGS.hlo_dir:
    with open(f"{FLAGS.hlo_dir}/{mode}.hlo.txt", "w") as f:
      f.write(text)
  num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(s.state.params))
  return {"mode": mode, "params": num_params, **cost(compiled), **hlo_counts(text),
          "compile_s": seconds, "compile_cpu_s": cpu_seconds}


def render(rows) -> str:
  off = next((r for r in rows if r["mode"] == "off"), None)
  out = [f"{rows[0]['params'] / 1e6:.2f}M parameters; {jax.devices()[0].platform}, jax "
         f"{jax.__version__}",
         "| mode | bytes accessed (MB) | delta vs off (MB) | delta B/param | GFLOP | fusions "
         "| kernels | compile s (wall / CPU) |",
         "|---|---|---|---|---|---|---|---|"]
  for r in rows:
    d = (r["bytes"] - off["bytes"]) if off else np.nan
    out.append(f"| {r['mode']} | {r['bytes'] / 1e6:,.1f} | {d / 1e6:+,.1f} | "
               f"{d / r['params']:+.1f} | {r['flops'] / 1e9:,.2f} | {r['fusions']} | "
               f"{r['kernels']} | {r['compile_s']:.1f} / {r['compile_cpu_s']:.1f} |")
  return "\n".join(out)


def main(argv):
  del argv
  config = FLAGS.config
  config.mesh.data, config.mesh.fsdp = 1, 1
  rows = []
  for mode in FLAGS.modes:
    if mode not in diagnostics.MODES:
      raise ValueError(f"--modes: {mode!r}; valid: {diagnostics.MODES}")
    rows.append(measure(config, mode))
    print(f"{mode}: {rows[-1]}", flush=True)
  print(render(rows))
  if FLAGS.json_out:
    with open(FLAGS.json_out, "w") as f:
      json.dump(rows, f, indent=1)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
