"""Mesh, logical-axis sharding rules, global batches and multi-host start-up.

The whole codebase talks about devices through this file:

* `make_mesh(config.mesh)` builds a `jax.sharding.Mesh` with axes ('data', 'fsdp', 'tensor');
  a size of -1 takes the remaining devices (MaxText convention).
* Model parameters carry *logical* axis names ('embed', 'mlp', 'heads', ...), attached with
  `nn.with_logical_partitioning`. `config.sharding_rules` maps logical names to mesh axes, and
  `logical_to_shardings` turns an abstract, boxed parameter tree into `NamedSharding`s. A dim
  that is not divisible by its mesh axes stays replicated (so tiny test models run on any mesh).
* Batches are sharded over BATCH_AXES = ('data', 'fsdp'): FSDP is data parallelism whose
  parameters are also split, so both axes see different examples.
"""
from __future__ import annotations

import collections
import json
import logging
import math
import os
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Default logical -> mesh rules. 'batch' is for activations; parameters shard their width over
# fsdp and their MLP / head dims over tensor (Megatron-style column/row split).
DEFAULT_RULES = (
    ("batch", BATCH_AXES),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("vocab", "tensor"),
    ("kv", None),
    ("length", None),
    ("classes", None),
    ("layers", None),  # scan-stacked blocks: the layer axis stays whole on every device
)


def maybe_initialize_distributed() -> None:
  """Calls `jax.distributed.initialize()` when the environment says we are one of many hosts.

  JAX discovers the coordinator itself on TPU pods and under SLURM; on other clusters set
  JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID (what tpu_scripts/ export).
  """
  env = os.environ
  explicit = "JAX_COORDINATOR_ADDRESS" in env
  slurm = int(env.get("SLURM_NTASKS", "1")) > 1
  tpu_pod = "," in env.get("TPU_WORKER_HOSTNAMES", "")
  if not (explicit or slurm or tpu_pod):
    return
  if jax.distributed.is_initialized():
    return
  kwargs = {}
  if explicit:
    kwargs = dict(coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
                  num_processes=int(env["JAX_NUM_PROCESSES"]),
                  process_id=int(env["JAX_PROCESS_ID"]))
  jax.distributed.initialize(**kwargs)
  logging.info("jax.distributed: process %d of %d, %d global devices",
               jax.process_index(), jax.process_count(), jax.device_count())


def resolve_mesh_shape(mesh_cfg, num_devices: int) -> tuple[int, ...]:
  """Mesh config {'data': -1, 'fsdp': 2, 'tensor': 1} -> concrete sizes; errors are one line."""
  sizes = [int(mesh_cfg[a]) for a in MESH_AXES]
  if sizes.count(-1) > 1:
    raise ValueError(f"mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
  bad = [a for a, s in zip(MESH_AXES, sizes) if s == 0 or s < -1]
  if bad:
    raise ValueError(f"mesh.{bad[0]}: size must be a positive int or -1, got {mesh_cfg[bad[0]]}")
  fixed = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % fixed:
      raise ValueError(f"mesh: {dict(zip(MESH_AXES, sizes))} needs a multiple of {fixed} devices,"
                       f" but {num_devices} exist")
    sizes[sizes.index(-1)] = num_devices // fixed
  if math.prod(sizes) != num_devices:
    raise ValueError(f"mesh: {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, but "
                     f"{num_devices} exist (use -1 on one axis to take the rest)")
  return tuple(sizes)


def make_mesh(mesh_cfg, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds the ('data', 'fsdp', 'tensor') mesh. Axes are Auto: XLA propagates shardings from
  the jit boundaries and logical constraints (pjit semantics), rather than jax 0.10's default
  Explicit sharding-in-types."""
  devices = list(devices if devices is not None else jax.devices())
  shape = resolve_mesh_shape(mesh_cfg, len(devices))
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def rules_from_config(rules_cfg) -> tuple[tuple[str, Any], ...]:
  """config.sharding_rules (list of [logical, mesh axis | [axes] | None]) -> tuple of pairs."""
  out = []
  for logical, mesh_axes in rules_cfg:
    if isinstance(mesh_axes, (list, tuple)):
      mesh_axes = tuple(mesh_axes)
    out.append((logical, mesh_axes))
  return tuple(out)


def _mesh_axes_for(name, rules):
  for logical, mesh_axes in rules:
    if logical == name:
      return mesh_axes
  return None  # Unknown logical names are replicated.


def logical_to_pspec(logical: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                     rules) -> P:
  """One array's logical names -> PartitionSpec, replicating dims the mesh does not divide."""
  out, used = [], set()
  for name, dim in zip(logical, shape):
    axes = _mesh_axes_for(name, rules) if name is not None else None
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    # A mesh axis can shard only one dim of an array; drop axes of size 1 (no-ops).
    axes = tuple(a for a in axes if a not in used and mesh.shape[a] > 1)
    size = math.prod(mesh.shape[a] for a in axes)
    if not axes or dim % size:
      out.append(None)
      continue
    used.update(axes)
    out.append(axes[0] if len(axes) == 1 else axes)
  return P(*out)


def logical_to_shardings(abstract_boxed_tree, mesh: Mesh, rules):
  """Abstract tree whose leaves may be `nn.Partitioned` boxes -> tree of NamedShardings for the
  *unboxed* tree. Leaves without logical names (step counters, RNG keys) are replicated."""
  def one(leaf):
    if isinstance(leaf, nn.Partitioned):
      value = leaf.value
      return NamedSharding(mesh, logical_to_pspec(leaf.names, value.shape, mesh, rules))
    return NamedSharding(mesh, P())
  return jax.tree.map(one, abstract_boxed_tree,
                      is_leaf=lambda x: isinstance(x, nn.Partitioned))


def shardings_following_params(abstract_tree, param_shardings, abstract_params, mesh: Mesh):
  """Shardings for a tree that mirrors the params inside wrappers (optimiser state: Adam's
  mu / nu, masked or multi-transform partitions). A leaf whose dict-key path and shape match
  a parameter gets that parameter's sharding; counters and the like are replicated."""
  def dict_path(path):
    return tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))
  by_path = {dict_path(p): (s, a.shape) for (p, s), (_, a) in zip(
      jax.tree_util.tree_flatten_with_path(param_shardings)[0],
      jax.tree_util.tree_flatten_with_path(abstract_params)[0])}
  def one(path, leaf):
    match = by_path.get(dict_path(path))
    if match is not None and match[1] == leaf.shape:
      return match[0]
    return NamedSharding(mesh, P())
  return jax.tree_util.tree_map_with_path(one, abstract_tree)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def data_parallel_size(mesh: Mesh) -> int:
  return math.prod(mesh.shape[a] for a in BATCH_AXES)


def global_batch(local_batch: dict, mesh: Mesh):
  """Each process's local slice (numpy, leading dim = global // process_count) -> global
  `jax.Array`s sharded over the batch axes. Non-numeric leaves (captions) stay on the host."""
  sharding = batch_sharding(mesh)
  def one(x):
    x = np.asarray(x)
    if x.dtype.kind in "OSU":
      return x
    return jax.make_array_from_process_local_data(sharding, x)
  return jax.tree.map(one, local_batch)


def with_sharding_rules(rules):
  """Context manager that makes `nn.with_logical_constraint` inside models use our rules."""
  return nn.logical_axis_rules(list(rules))


class DevicePrefetch:
  """Iterator of global device batches that keeps `depth` batches already on their way to the
  devices, so the host-to-device copy of batch n+1 overlaps step n (flax's
  `prefetch_to_device`, for global arrays). `depth=0` fetches on demand.

  Checkpointable like the host iterator it wraps (grain's checkpoint handler calls
  get_state / set_state): the saved position is the host iterator's position *before* the
  batches still waiting in the buffer, so a resumed run sees exactly the batches this run had
  not consumed — prefetching never skips or repeats data.
  """

  def __init__(self, host_iter, to_device, depth: int = 1):
    self._host, self._to_device, self._depth = host_iter, to_device, max(0, int(depth))
    self._buffer = collections.deque()  # (host state before the batch, device batch)

  def __iter__(self):
    return self

  def _fill(self, n):
    while len(self._buffer) < n:
      state = self._host.get_state()
      self._buffer.append((state, self._to_device(next(self._host))))

  def __next__(self):
    self._fill(1)
    _, batch = self._buffer.popleft()
    self._fill(self._depth)
    return batch

  def get_state(self) -> bytes:
    state = self._buffer[0][0] if self._buffer else self._host.get_state()
    return json.dumps(state).encode()

  def set_state(self, state: bytes) -> None:
    self._buffer.clear()
    self._host.set_state(json.loads(state))

  def start_prefetch(self) -> None:  # Called by grain's restore; the buffer refills lazily.
    pass
