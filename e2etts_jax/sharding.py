"""The mesh and THE logical-axis -> mesh-axis rule table (the only place model axis names meet the mesh).

Mesh axes: `data` (pure data parallel), `fsdp` (data parallel with parameters/optimizer state sharded),
`tensor` (heads / mlp / vocab split). Batches are sharded over (`data`, `fsdp`).
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from e2etts_jax import config_lib

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Flax takes the first rule whose mesh axis is not already used in the same array, so an activation's
# 'act_embed' falls back to replicated when the batch dimension already took 'fsdp'.
LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", BATCH_AXES),
    ("length", None),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("kv", None),
    ("vocab", "tensor"),
    ("layers", None),
    ("norm", None),
    ("conv", None),
    ("feature", None),      # small feature dims (mel bins, code dims, speaker embedding): not worth splitting
    ("classes", None),      # CTC/speaker/aux classes: odd sizes, kept whole
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
)


def make_mesh(mesh_cfg, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A (data, fsdp, tensor) mesh over `devices` (default: all), sizes from the config (-1 = the rest).

  jax.make_mesh orders devices so that the inner axes (tensor, fsdp) stay within fast interconnect
  (ICI on TPU, NVLink on GPU); across slices/hosts the outer `data` axis is the one crossing DCN.
  """
  devices = list(devices) if devices is not None else jax.devices()
  shape = config_lib.resolve_mesh_shape(mesh_cfg, len(devices))
  # Auto axes: shardings come from jit's in/out shardings and the logical constraints, not from types.
  auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)


def logical_to_sharding(logical_tree: Any, mesh: Mesh) -> Any:
  """Maps a tree of logical PartitionSpecs (from `nn.get_partition_spec`) to NamedShardings on `mesh`."""
  return nn.logical_to_mesh_sharding(logical_tree, mesh, LOGICAL_RULES)


def logical_specs(boxed_tree: Any) -> Any:
  """Logical PartitionSpecs of a boxed tree: annotated leaves give their names, other leaves P().

  Unlike `nn.get_partition_spec`, empty subtrees (optax's MaskedNode for masked or frozen parameters) stay
  empty, so the result has exactly the structure of the unboxed tree.
  """
  def spec(x):
    inner = x.value if isinstance(x, nn.Partitioned) else x
    if isinstance(inner, optax.MaskedNode):   # masked optimizer slots come boxed around an empty node
      return optax.MaskedNode()
    return x.get_partition_spec() if isinstance(x, nn.Partitioned) else P()
  return jax.tree.map(spec, boxed_tree, is_leaf=lambda x: isinstance(x, (nn.Partitioned, optax.MaskedNode)))


def _fit(sharding: NamedSharding, shape: tuple[int, ...]) -> NamedSharding:
  """Drops mesh axes from dimensions they do not divide (e.g. 2 KV heads on a 4-way tensor axis): such a
  dimension is replicated instead of failing, the standard fallback for small or odd-sized layers."""
  sizes = dict(sharding.mesh.shape)
  fitted = []
  for dim, axes in zip(shape, tuple(sharding.spec) + (None,) * (len(shape) - len(sharding.spec))):
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    kept = tuple(a for a in names if dim % sizes[a] == 0)
    total = 1
    for a in kept:
      total *= sizes[a]
    fitted.append(None if not kept or dim % total else (kept[0] if len(kept) == 1 else kept))
  return NamedSharding(sharding.mesh, P(*fitted))


def param_shardings(abstract_boxed_variables: Any, mesh: Mesh) -> Any:
  """NamedShardings for a (boxed, possibly abstract) variable tree, from its logical annotations."""
  shardings = logical_to_sharding(logical_specs(abstract_boxed_variables), mesh)
  shapes = jax.tree.map(lambda x: x, nn.unbox(abstract_boxed_variables))
  return jax.tree.map(lambda s, x: _fit(s, x.shape), shardings, shapes,
                      is_leaf=lambda x: isinstance(x, NamedSharding))


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
  """Leading (batch) dimension over (data, fsdp); the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())
