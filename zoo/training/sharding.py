"""Mesh from the config and logical-axis sharding rules (MaxText style).

Parameters carry logical axis names (`logical_axes` metadata: "embed", "heads",
"kv_heads", "head_dim", "mlp", "vocab", "norm"); `RULES` maps each to mesh
axes. A mesh axis is dropped for a dimension it does not divide (say 2 KV
heads on a tensor axis of 4): that dimension is then replicated rather than
failing. Batches shard their leading axis over ("data", "fsdp").

Meshes use `AxisType.Auto` axes (STACK-NOTES: with jax 0.10's explicit default a
sharded contracting dimension needs `out_sharding=` at every matmul); XLA then
propagates activation shardings from the parameters and the batch.
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Sequence, Tuple

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

RULES: Tuple[Tuple[str, Tuple[str, ...]], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", ("fsdp",)),
    ("vocab", ("tensor",)),
    ("heads", ("tensor",)),
    ("kv_heads", ("tensor",)),
    ("mlp", ("tensor",)),
    ("head_dim", ()),
    ("norm", ()),
)


def mesh_shape(mesh_cfg, num_devices: int) -> Dict[str, int]:
  """config.mesh {data, fsdp, tensor} (one of them may be -1: the rest of the devices)."""
  shape = {a: int(mesh_cfg.get(a, 1)) for a in MESH_AXES}
  unknown = sorted(set(dict(mesh_cfg)) - set(MESH_AXES))
  if unknown:
    raise ValueError(f"unknown mesh axes {['mesh.' + u for u in unknown]}; axes are {MESH_AXES}")
  fill = [a for a, n in shape.items() if n == -1]
  if len(fill) > 1:
    raise ValueError(f"only one of mesh.{{{','.join(MESH_AXES)}}} may be -1, got {fill}")
  for a, n in shape.items():
    if n == 0 or n < -1:
      raise ValueError(f"mesh.{a}={n} must be a positive size or -1")
  known = math.prod(n for n in shape.values() if n != -1)
  if fill:
    if num_devices % known:
      raise ValueError(f"mesh.data/mesh.fsdp/mesh.tensor = {shape} do not divide the "
                       f"{num_devices} available devices")
    shape[fill[0]] = num_devices // known
  if math.prod(shape.values()) != num_devices:
    raise ValueError(
        f"mesh.data/mesh.fsdp/mesh.tensor = {shape} make {math.prod(shape.values())} devices but "
        f"{num_devices} are available; make their product match (or set one to -1)")
  return shape


def make_mesh(mesh_cfg, devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(mesh_cfg, len(devices))
  dims = tuple(shape[a] for a in MESH_AXES)
  try:
    arr = jax.experimental.mesh_utils.create_device_mesh(dims, devices)
  except Exception:  # non-TPU topologies the helper does not know: plain order
    arr = np.asarray(devices).reshape(dims)
  return Mesh(arr, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def logical_to_spec(axes: Optional[Sequence[Optional[str]]], shape: Sequence[int], mesh: Mesh,
                    rules=RULES) -> P:
  if axes is None:
    return P()
  table = dict(rules)
  used = set()
  spec = []
  for name, dim in zip(axes, shape):
    mesh_axes = []
    for a in table.get(name, ()) if name is not None else ():
      size = mesh.shape[a]
      if a in used or size == 1:
        continue
      if dim % (math.prod(mesh.shape[m] for m in mesh_axes) * size):
        continue
      mesh_axes.append(a)
      used.add(a)
    spec.append(tuple(mesh_axes) if len(mesh_axes) > 1 else (mesh_axes[0] if mesh_axes else None))
  return P(*spec)


def param_specs(abstract_state: nnx.State, mesh: Mesh, rules=RULES):
  """Pure dict of PartitionSpecs for an nnx.State whose Variables carry `logical_axes`."""
  def spec(v):
    axes = v.get_metadata().get("logical_axes")
    return logical_to_spec(axes, v.shape, mesh, rules)
  specs = jax.tree.map(spec, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))
  return nnx.to_pure_dict(specs)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(("data", "fsdp")))


def data_parallel_size(mesh: Mesh) -> int:
  return mesh.shape["data"] * mesh.shape["fsdp"]


def host_to_global(local: Dict[str, np.ndarray], sharding: NamedSharding) -> Dict[str, jax.Array]:
  """This host's rows of a batch -> global arrays sharded over the data axes."""
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}
