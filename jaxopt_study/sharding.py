"""Device mesh, logical-axis rules and the shardings of the whole train state.

The mesh has two axes: ``data`` (pure data parallelism) and ``fsdp`` (data parallelism whose
parameters and optimizer state are also sharded, ZeRO-3 style). The batch is split over both;
parameters are split over ``fsdp`` along their 'embed' dimension. The same code runs on one CPU,
on 8 GPUs (e.g. ``data=4, fsdp=2``) or on a multi-host TPU slice.

Optimizer and diagnostic state is sharded like the parameter it mirrors: a state leaf whose tree
path ends with a parameter's path and has that parameter's shape gets that parameter's sharding
(``mu``, ``nu``, ``trace``, per-entry counters, ...); everything else (step counts, Adafactor's
factored row/column statistics) is small and replicated.
"""

from __future__ import annotations

import contextlib
import logging
import os

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp")

# Logical axis name -> mesh axis (None: replicated). Activations' batch is split over both axes.
LOGICAL_RULES = (
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", None),
    # MoE expert weights [E, ...] are split by whole experts over fsdp (expert parallelism's
    # layout; same 1/fsdp memory as splitting 'embed'), and one expert's entries, which the
    # per-expert diagnostics reduce over, stay on one device. Listed before 'embed': flax gives
    # a mesh axis to the first matching rule, so those tensors' 'embed' stays unsplit. With
    # num_experts not divisible by fsdp the expert axis cannot be split (_fits): replicated.
    ("expert", "fsdp"),
    ("embed", "fsdp"),
    ("vocab", None),
    ("length", None),
    ("heads", None),
    ("kv_heads", None),
    ("kv", None),
    ("mlp", None),
    ("norm", None),
)


def maybe_initialize_distributed() -> None:
  """``jax.distributed.initialize`` when launched as one of several processes.

  Call it before anything touches a JAX device (``main.main`` does, first). Three launches:

  * ``JAX_NUM_PROCESSES=N JAX_PROCESS_ID=i JAX_COORDINATOR_ADDRESS=host:port`` (a plain shell
    loop, one process per GPU): process i drives GPU i unless ``JAX_LOCAL_DEVICE_IDS`` is set;
  * a cluster JAX detects by itself (SLURM with ``SLURM_NTASKS`` > 1, Open MPI, Cloud TPU);
  * a single process (laptop, one GPU box, Colab): nothing to do.

  An initialisation that fails raises (a run must not silently train alone in each process),
  except when JAX is already initialised, e.g. twice in one notebook.
  """
  if (n := int(os.environ.get("JAX_NUM_PROCESSES", "0"))) > 1:
    if "JAX_PROCESS_ID" not in os.environ:
      raise ValueError(f"JAX_NUM_PROCESSES={n} needs JAX_PROCESS_ID (0..{n - 1}) in each process "
                       "and JAX_COORDINATOR_ADDRESS=host:port.")
    pid = int(os.environ["JAX_PROCESS_ID"])
    kwargs = dict(num_processes=n, process_id=pid)
    if "JAX_LOCAL_DEVICE_IDS" not in os.environ:
      kwargs["local_device_ids"] = [pid]
  elif int(os.environ.get("SLURM_NTASKS", "1")) > 1 or any(
      k in os.environ for k in ("OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES")):
    kwargs = {}
  else:
    return
  if jax.distributed.is_initialized():
    logging.info("jax.distributed already initialised")
    return
  jax.distributed.initialize(**kwargs)


@contextlib.contextmanager
def activate(mesh: Mesh):
  """Mesh and logical rules in effect: jit traces the model's activation constraints with them.

  (``jax.set_mesh`` must be entered outside ``jax.jit``: wrap the calls, not the step body.)
  """
  with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
    yield


def mesh_shape(mesh_config: ml_collections.ConfigDict, num_devices: int) -> tuple[int, int]:
  """(data, fsdp) sizes; ``-1`` in one field takes the remaining devices."""
  data, fsdp = mesh_config.data, mesh_config.fsdp
  if data == -1 and fsdp == -1:
    raise ValueError("config.mesh.data and config.mesh.fsdp cannot both be -1.")
  if fsdp == -1:
    fsdp, rem = divmod(num_devices, data)
  elif data == -1:
    data, rem = divmod(num_devices, fsdp)
  else:
    rem = 0
  if data < 1 or fsdp < 1 or rem or data * fsdp != num_devices:
    raise ValueError(
        f"config.mesh.data={mesh_config.data} x config.mesh.fsdp={mesh_config.fsdp} does not "
        f"cover the {num_devices} available devices; set them so that data * fsdp == "
        f"{num_devices} (or one of them to -1)."
    )
  return data, fsdp


def make_mesh(mesh_config: ml_collections.ConfigDict, devices=None) -> Mesh:
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape(mesh_config, len(devices))
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def check_batch(batch_size: int, mesh: Mesh) -> None:
  """The global batch must split evenly over the data-parallel devices and the processes."""
  dp = mesh.shape["data"] * mesh.shape["fsdp"]
  if batch_size % dp:
    raise ValueError(
        f"config.batch_size={batch_size} is not divisible by the data-parallel size {dp} "
        f"(config.mesh.data={mesh.shape['data']} x config.mesh.fsdp={mesh.shape['fsdp']}); "
        f"use a multiple of {dp}."
    )


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """[batch, length] arrays: batch split over every device."""
  return NamedSharding(mesh, P(("data", "fsdp"), None))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def _fits(spec: P, shape, mesh: Mesh) -> P:
  """Drops sharding on dimensions the mesh axis does not divide (replicates them instead)."""
  out = []
  for dim, axis in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    axes = axis if isinstance(axis, tuple) else (axis,) if axis else ()
    size = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
    out.append(axis if dim % size == 0 else None)
  return P(*out)


def param_shardings(abstract_boxed_params, mesh: Mesh):
  """NamedShardings of the (unboxed) params from their logical partitioning annotations."""
  logical_specs = nn.get_partition_spec(abstract_boxed_params)
  mesh_specs = nn.logical_to_mesh(logical_specs, LOGICAL_RULES)
  unboxed = nn.meta.unbox(abstract_boxed_params)
  return jax.tree.map(
      lambda spec, x: NamedSharding(mesh, _fits(spec, x.shape, mesh)),
      mesh_specs,
      unboxed,
      is_leaf=lambda s: isinstance(s, P),
  )


def _key_names(path) -> tuple[str, ...]:
  names = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        names.append(str(getattr(k, attr)))
        break
  return tuple(names)


def mirror_shardings(tree, params, shardings_of_params, mesh: Mesh):
  """Shardings for a state tree whose params-shaped leaves mirror ``params`` (see module doc)."""
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  sh_flat = jax.tree.leaves(shardings_of_params, is_leaf=lambda s: isinstance(s, NamedSharding))
  by_path = {_key_names(p): (x.shape, s) for (p, x), s in zip(flat, sh_flat)}
  lengths = sorted({len(k) for k in by_path}, reverse=True)

  def pick(path, leaf):
    names = _key_names(path)
    shape = getattr(leaf, "shape", ())
    for n in lengths:
      hit = by_path.get(names[-n:]) if len(names) >= n else None
      if hit is not None and hit[0] == shape:
        return hit[1]
    return replicated(mesh)

  return jax.tree_util.tree_map_with_path(pick, tree)
