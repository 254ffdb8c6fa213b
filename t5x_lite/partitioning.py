"""Device mesh and logical-axis rules: the one module that knows the mesh axis names.

The mesh has axes `data` (pure data parallelism), `fsdp` (data parallelism with params and
optimizer state sharded over it) and `model` (tensor parallelism). Models name their axes
logically (`batch`, `embed`, `mlp`, ...); the rules below map those names onto mesh axes.
"""

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from absl import logging
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ('data', 'fsdp', 'model')

# Earlier rules win a mesh axis: activations [batch, length, embed] take fsdp for the batch,
# so `embed` stays unsharded there, while params (which have no batch axis) shard embed on fsdp.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ('batch', ('data', 'fsdp')),
    ('vocab', 'model'),
    ('mlp', 'model'),
    ('heads', 'model'),
    ('kv_heads', 'model'),
    ('joined_kv', 'model'),
    ('embed', 'fsdp'),
    ('kv', None),
    ('length', None),
    ('layers', None),
    ('relpos_buckets', None),
)


def default_rule_strings() -> dict[str, str]:
  """The default rules in the string form a run config holds (so each one can be overridden
  on the command line): 'model', 'data,fsdp', or '' for replicated."""
  return {name: ','.join((target,) if isinstance(target, str) else (target or ()))
          for name, target in DEFAULT_RULES}


def _parse_target(target: Any) -> Any:
  """A rule target from its string form ('' -> None, 'a,b' -> ('a', 'b')), else as given."""
  if not isinstance(target, str):
    return target
  axes = tuple(axis.strip() for axis in target.split(',') if axis.strip())
  return None if not axes else axes[0] if len(axes) == 1 else axes


def logical_rules(overrides: Mapping[str, Any] | None = None) -> tuple[tuple[str, Any], ...]:
  """The default rules with `overrides` applied: logical name -> a mesh axis, a sequence of
  them, None (replicated), or the string forms of `default_rule_strings`."""
  overrides = {name: _parse_target(target) for name, target in (overrides or {}).items()}
  unknown = sorted(set(overrides) - {name for name, _ in DEFAULT_RULES})
  if unknown:
    raise ValueError(f'Unknown logical axis name(s) {unknown} in axis rules; known: '
                     f'{[name for name, _ in DEFAULT_RULES]}')
  for name, target in overrides.items():
    for axis in (target,) if isinstance(target, str) else (target or ()):
      if axis not in MESH_AXES:
        raise ValueError(f'Axis rule {name} -> {target!r} names unknown mesh axis {axis!r}; '
                         f'mesh axes are {MESH_AXES}')
  return tuple((name, _as_rule(overrides.get(name, target))) for name, target in DEFAULT_RULES)


def _as_rule(target: Any) -> Any:
  return tuple(target) if isinstance(target, (list, tuple)) else target


def make_mesh(mesh_shape: Sequence[int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A (data, fsdp, model) mesh; one entry of `mesh_shape` may be -1 to take the rest."""
  devices = list(devices if devices is not None else jax.devices())
  shape = list(mesh_shape)
  if len(shape) != len(MESH_AXES) or shape.count(-1) > 1 or any(
      s == 0 or s < -1 for s in shape):
    raise ValueError(f'mesh_shape={tuple(mesh_shape)} must give {len(MESH_AXES)} sizes for '
                     f'{MESH_AXES}, positive or one -1 to fill.')
  known = int(np.prod([s for s in shape if s != -1]))
  if -1 in shape:
    if len(devices) % known:
      raise ValueError(f'mesh_shape={tuple(mesh_shape)} cannot fill {len(devices)} devices: '
                       f'{len(devices)} is not a multiple of {known}.')
    shape[shape.index(-1)] = len(devices) // known
  if int(np.prod(shape)) != len(devices):
    raise ValueError(f'mesh_shape={tuple(mesh_shape)} needs {int(np.prod(shape))} devices but '
                     f'{len(devices)} are available; use -1 for one axis to fill.')
  # Auto axes: shardings flow from jit's in/out shardings and the logical constraints.
  return jax.make_mesh(tuple(shape), MESH_AXES, axis_types=(AxisType.Auto,) * len(shape),
                       devices=devices)


class Partitioner:
  """Turns logical axis names into `NamedSharding`s on one mesh."""

  def __init__(self, mesh: Mesh, rules: Sequence[tuple[str, Any]] = DEFAULT_RULES):
    self.mesh = mesh
    self.rules = tuple(rules)

  @property
  def data_parallel_size(self) -> int:
    """How many ways the batch is split."""
    return self.mesh.shape['data'] * self.mesh.shape['fsdp']

  @contextlib.contextmanager
  def activate(self) -> Iterator[None]:
    """Scope in which the models' logical activation constraints take effect."""
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      yield

  def sharding(self, logical_axes: Sequence[str | None]) -> NamedSharding:
    """The sharding of one array whose dims have these logical names."""
    spec = nn.logical_to_mesh_axes(tuple(logical_axes), self.rules)
    return NamedSharding(self.mesh, spec)

  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, PartitionSpec())

  def boxed_shardings(self, boxed_tree: Any, replicate_indivisible: bool = False) -> Any:
    """Shardings for a tree whose leaves are `nn.LogicallyPartitioned` (or plain) values.

    Args:
      boxed_tree: e.g. `models.boxed_param_shapes(config)`.
      replicate_indivisible: a dim whose size the mesh axes it maps to do not divide is
        replicated along them, with one warning per logical axis (as T5X's and MaxText's
        partitioners allow); False raises a ValueError naming the first such param, its
        shape, the logical and the mesh axes.
    """
    replicated = {}  # (logical axis, size, mesh axes, ways) -> params replicated for it

    def leaf_sharding(path, x):
      if not isinstance(x, nn.LogicallyPartitioned):
        return self.replicated()
      dims = list(nn.logical_to_mesh_axes(tuple(x.names), self.rules))
      for dim, (size, logical) in enumerate(zip(getattr(x.value, 'shape', ()), x.names)):
        axes = (dims[dim],) if isinstance(dims[dim], str) else tuple(dims[dim] or ())
        ways = int(np.prod([self.mesh.shape[axis] for axis in axes]))
        if size % ways == 0:
          continue
        name = '/'.join(_keys(path))
        if not replicate_indivisible:
          raise ValueError(
              f'param {name} of shape {tuple(x.value.shape)}: dim {dim} (logical axis '
              f'{logical!r}, size {size}) cannot be split {ways} ways over mesh axis '
              f'{"+".join(axes)} (mesh {dict(self.mesh.shape)}); choose a mesh_shape whose '
              f'{"+".join(axes)} size divides {size}, or replicate the axis with '
              f'--config.axis_rules.{logical}=')
        replicated.setdefault((logical, size, '+'.join(axes), ways), []).append(name)
        dims[dim] = None
      return NamedSharding(self.mesh, PartitionSpec(*dims))

    shardings = jax.tree_util.tree_map_with_path(
        leaf_sharding, boxed_tree, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    for (logical, size, axes, ways), names in replicated.items():
      logging.warning('%d param(s) replicated along mesh axis %s, which cannot split their '
                      'logical axis %r (size %d) %d ways: e.g. %s', len(names), axes, logical,
                      size, ways, names[0])
    return shardings

  def matching_shardings(self, tree: Any, params: Any, param_shardings: Any) -> Any:
    """Shardings for an optimizer state: a leaf shaped like the param whose path it contains
    gets that param's sharding; anything else (factored moments, counters) is replicated."""
    by_path = {}
    for (path, p), s in zip(jax.tree_util.tree_leaves_with_path(params),
                            jax.tree.leaves(param_shardings)):
      by_path[_keys(path)] = (p.shape, s)

    def pick(path, leaf):
      keys = _keys(path)
      for start in range(len(keys)):
        for end in range(len(keys), start, -1):
          shape_and_sharding = by_path.get(keys[start:end])
          if shape_and_sharding and shape_and_sharding[0] == leaf.shape:
            return shape_and_sharding[1]
      return self.replicated()

    return jax.tree_util.tree_map_with_path(pick, tree)

  def batch_sharding(self, ndim: int = 2) -> NamedSharding:
    """[batch, length, ...] arrays: batch over the data-parallel axes."""
    return self.sharding(('batch',) + (None,) * (ndim - 1))

  def shard_batch(self, local_batch: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
    """Assembles each process's slice of the batch into global sharded arrays."""
    return {k: jax.make_array_from_process_local_data(self.batch_sharding(v.ndim), v)
            for k, v in local_batch.items()}


def _keys(path) -> tuple[str, ...]:
  return tuple(str(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k)))) for k in path)
