"""Mesh construction and the one table that maps logical axis names to mesh axes (DESIGN §3).

Parameters carry logical names (`out_sharding` metadata, set in models/); activations are constrained with
`constrain(x, names)`. Mesh axes: 'data' (pure data parallel), 'fsdp' (data parallel with sharded parameters
and optimizer state), 'expert' (the experts of MoE layers split, and the batch too; size 1 unless asked for),
'tensor' (heads / MLP split). The batch is split over BATCH_AXES = data x fsdp x expert everywhere (train, eval,
generate, the planner): outside the MoE layers 'expert' is one more data-parallel axis, so its devices do not
repeat each other's attention / norms / router (models/moe.py sends each device's tokens to their experts).
A mesh built elsewhere without some of these axes works too: rules naming an absent axis replicate.
"""

from __future__ import annotations

from typing import Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "expert", "tensor")
BATCH_AXES = ("data", "fsdp", "expert")  # the mesh axes the batch (and so every activation's rows) is split over

# logical name -> mesh axis (or tuple of axes, or None = replicated). First match wins.
LOGICAL_AXIS_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", BATCH_AXES),
    ("layers", None),
    ("embed", "fsdp"),
    ("expert", "expert"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("vocab", "tensor"),
    ("qkv", "tensor"),
    ("norm", None),
    ("seq", None),
)


def make_mesh(shape: dict[str, int] | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A ('data', 'fsdp', 'expert', 'tensor') mesh. shape maps axis -> size; one axis may be -1 to take the remaining
  devices (default: everything on 'fsdp')."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = {"data": 1, "fsdp": -1, "expert": 1, "tensor": 1}
  sizes.update(shape or {})
  unknown = set(sizes) - set(MESH_AXES)
  if unknown:
    raise ValueError(f"unknown mesh axes {sorted(unknown)}; use {MESH_AXES}")
  fill = [a for a, s in sizes.items() if s == -1]
  if len(fill) > 1:
    raise ValueError(f"only one mesh axis may be -1, got {fill}")
  known = int(np.prod([s for s in sizes.values() if s != -1]))
  if fill:
    if len(devices) % known:
      raise ValueError(f"{len(devices)} devices do not divide into a mesh with fixed axes of size {known}")
    sizes[fill[0]] = len(devices) // known
  if int(np.prod(list(sizes.values()))) != len(devices):
    raise ValueError(f"mesh {sizes} needs {int(np.prod(list(sizes.values())))} devices, have {len(devices)}")
  arr = np.asarray(devices).reshape([sizes[a] for a in MESH_AXES])
  return Mesh(arr, MESH_AXES)


def logical_to_mesh_spec(names: Sequence[str | None] | None, rules=LOGICAL_AXIS_RULES,
                         mesh: Mesh | None = None) -> P:
  """Maps a tuple of logical names to a PartitionSpec; a mesh axis is used at most once per spec and axes of size 1
  in `mesh` are dropped (so tiny meshes give replicated specs)."""
  if names is None:
    return P()
  table = dict(rules)
  used: set[str] = set()
  out = []
  for name in names:
    target = table.get(name) if name is not None else None
    axes = (target,) if isinstance(target, str) else tuple(target or ())
    axes = tuple(a for a in axes if a not in used and (mesh is None or mesh.shape.get(a, 1) > 1))
    used.update(axes)
    out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  return P(*out)


def param_specs(state: nnx.State, rules=LOGICAL_AXIS_RULES, mesh: Mesh | None = None):
  """Per-variable PartitionSpecs (mesh axes) for an nnx State whose Variables carry logical names."""
  logical = nnx.get_partition_spec(state)
  return jax.tree.map(lambda s: logical_to_mesh_spec(tuple(s) if s is not None else None, rules, mesh), logical,
                      is_leaf=lambda x: isinstance(x, P) or x is None)


def param_shardings(state: nnx.State, mesh: Mesh, rules=LOGICAL_AXIS_RULES):
  """NamedShardings for every Variable of `state` (for jit out_shardings / device_put)."""
  return jax.tree.map(lambda spec: NamedSharding(mesh, spec), param_specs(state, rules, mesh),
                      is_leaf=lambda x: isinstance(x, P))


def constrain(x: jax.Array, names: Sequence[str | None], rules=LOGICAL_AXIS_RULES) -> jax.Array:
  """with_sharding_constraint by logical names when a mesh is in context (jax.sharding.use_mesh); else identity.
  A dimension the named axes do not divide (e.g. 2 rows over data x fsdp x expert = 8) keeps only the leading
  axes that do (possibly none), so that XLA never has to pad or rematerialize it."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty:
    return x
  spec = []
  for dim, axes in zip(x.shape, logical_to_mesh_spec(names, rules, mesh)):
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    while axes and dim % int(np.prod([mesh.shape[a] for a in axes])):
      axes = axes[:-1]
    spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  return jax.lax.with_sharding_constraint(x, P(*spec))


def batch_axes(mesh, axes: Sequence[str] = BATCH_AXES) -> tuple[str, ...]:
  """The axes of `axes` that `mesh` (a Mesh or AbstractMesh) has with size > 1, in mesh order."""
  return tuple(a for a in axes if mesh.shape.get(a, 1) > 1)


def batch_ways(mesh) -> int:
  """How many ways the batch is split: data x fsdp x expert (1 for None)."""
  return 1 if mesh is None else int(np.prod([mesh.shape[a] for a in batch_axes(mesh)]))


def split_rows_over(mesh, rows: int) -> tuple[str, ...]:
  """The batch axes to split `rows` over: all of them when they divide it, else the longest leading ones that do
  ('expert' is dropped first), else () (replicated: an array that cannot be split evenly cannot be placed split)."""
  axes = batch_axes(mesh)
  while axes and rows % int(np.prod([mesh.shape[a] for a in axes])):
    axes = axes[:-1]
  return axes


def leading_axis_sharding(mesh: Mesh, shape: Sequence[int]) -> NamedSharding:
  """The layout of a batch on `mesh`: the leading axis split over the batch axes (split_rows_over), the rest
  replicated."""
  axes = split_rows_over(mesh, shape[0]) if shape else ()
  return NamedSharding(mesh, P(axes if len(axes) > 1 else axes[0]) if axes else P())


def model_mesh(model: nnx.Module) -> Mesh | None:
  """The mesh a module's variables are laid out on (the first found), or None when they live on one device."""
  for leaf in jax.tree.leaves(nnx.state(model)):
    mesh = getattr(getattr(leaf, "sharding", None), "mesh", None)
    if isinstance(mesh, Mesh) and mesh.size > 1:
      return mesh
  return None


def check_divisible(state: nnx.State, mesh, rules=LOGICAL_AXIS_RULES) -> None:
  """Raises a one-line ValueError naming the first variable of `state` (arrays or ShapeDtypeStructs carrying
  logical names) that the rules would split unevenly over `mesh` (a Mesh or AbstractMesh): jax cannot place it."""
  specs = param_specs(state, rules, mesh)
  for (path, var), (_, spec) in zip(nnx.to_flat_state(state), nnx.to_flat_state(specs)):
    shape = var.get_value().shape
    for dim, axes in zip(shape, spec.get_value()):
      ways = int(np.prod([mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes or ())]))
      if dim % ways:
        raise ValueError(f"mesh {dict(mesh.shape)} cannot split parameter {'/'.join(map(str, path))} of shape "
                         f"{tuple(shape)} evenly ({axes} = {ways} ways over a dimension of {dim}); pick axis "
                         f"sizes that divide it")
