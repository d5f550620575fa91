"""The device mesh, logical-axis rules, and the shardings of a state and a batch.

Models name logical axes only ('batch', 'embed', 'mlp', ...). The rule table
in the config maps them onto the mesh axes ('data', 'fsdp', 'tensor'); one
CPU, eight fake CPU devices and a TPU pod slice differ only in the mesh shape.
"""
import contextlib

import flax.linen as nn
import jax
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from diffusion_jax.config import resolve_mesh_shape

# Rows of a packed batch are split over every data-parallel axis.
BATCH_AXES = ("data", "fsdp")


def make_mesh(mesh_config, devices=None) -> jax.sharding.Mesh:
  """Builds the mesh of `mesh_config.shape` (-1 = the rest of the devices).

  Axes are Auto (not Explicit) because linen's logical partitioning works
  through sharding constraints that the compiler propagates.
  """
  devices = jax.devices() if devices is None else devices
  shape = resolve_mesh_shape(mesh_config.shape, len(devices))
  axes = tuple(mesh_config.axes)
  return jax.make_mesh(shape, axes, axis_types=(AxisType.Auto,) * len(axes), devices=devices)


def data_mesh(mesh_config) -> jax.sharding.Mesh:
  """The config's axes with every device on the first (data) axis: params replicated, rows split.
  For sampling, and for restoring onto devices the run's mesh shape does not fit."""
  axes = tuple(mesh_config.axes)
  return jax.make_mesh((jax.device_count(),) + (1,) * (len(axes) - 1), axes,
                       axis_types=(AxisType.Auto,) * len(axes))


def logical_rules(mesh_config) -> tuple:
  """The config's rule table as the tuple of (logical, mesh axes) pairs linen wants."""
  return tuple((name, tuple(axes) if isinstance(axes, (list, tuple)) else axes) for name, axes in mesh_config.rules)


@contextlib.contextmanager
def activate(mesh, rules):
  """Mesh and rules in scope, so the model's logical constraints resolve."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield


def shardings_of(boxed_tree, mesh, rules):
  """NamedShardings for a tree whose leaves may be logically boxed params.

  Leaves without logical names (step counters, rng) are replicated. A masked optax state (Muon's
  AdamW part) holds empty MaskedNode()s, boxed like the params they stand for; they hold no array
  and get no sharding.
  """
  def is_box(x):
    return isinstance(x, nn.meta.AxisMetadata)

  boxed_tree = jax.tree_util.tree_map(lambda x: x.unbox() if is_box(x) and not jax.tree_util.tree_leaves(x) else x,
                                      boxed_tree, is_leaf=is_box)
  specs = nn.get_partition_spec(boxed_tree)
  return jax.tree_util.tree_map(lambda spec: NamedSharding(mesh, nn.logical_to_mesh_axes(spec, rules)), specs,
                                is_leaf=lambda x: isinstance(x, PartitionSpec))


def batch_sharding(mesh) -> NamedSharding:
  """Leading (row) axis over data x fsdp; all other axes replicated."""
  axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
  return NamedSharding(mesh, PartitionSpec(axes))


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())
