"""Tests for the mesh, the logical axis rules and the shardings built from them.

Uses the 8 fake CPU devices from conftest.py; nothing here compiles a model (only
`jax.eval_shape`), so the file runs in a few seconds.
"""

import importlib.util
import os

import flax.linen as nn
import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from test_main import Run, assert_one_error_line

from t5x_lite import config as config_lib
from t5x_lite import models, optimizers, partitioning

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs')


def _get_config(name):
  spec = importlib.util.spec_from_file_location(name, os.path.join(CONFIGS, f'{name}.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def _model_config(name, **fields):
  config = _get_config(name)
  config.model.update(fields)
  return config_lib.model_config(config)


def _boxed_params(model_config):
  """The params' shapes with their `LogicallyPartitioned` boxes (no allocation)."""
  model = models.build_model(model_config)
  return jax.eval_shape(
      lambda: model.init(jax.random.key(0), **models.dummy_batch(model_config))['params'])


def _flat(tree):
  return {'/'.join(partitioning._keys(path)): leaf
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


@pytest.fixture(scope='module')
def partitioner_222():
  return partitioning.Partitioner(partitioning.make_mesh((2, 2, 2)))


@pytest.fixture(scope='module')
def t5_boxed():
  # vocab and d_ff >= 128 with d_model 128 so Adafactor factors some moments (below).
  return _boxed_params(_model_config('t5_1_1_tiny', vocab_size=256, d_model=128))


# --- make_mesh -----------------------------------------------------------------------------


def test_eight_fake_devices():
  assert jax.device_count() == 8


@pytest.mark.parametrize('shape, expected', [
    ((-1, 1, 1), (8, 1, 1)), ((1, -1, 1), (1, 8, 1)), ((1, 1, -1), (1, 1, 8)),
    ((2, -1, 2), (2, 2, 2)), ((2, 4, -1), (2, 4, 1)), ((8, 1, 1), (8, 1, 1)),
    ([1, 2, 4], (1, 2, 4)),
])
def test_make_mesh_shapes(shape, expected):
  mesh = partitioning.make_mesh(shape)
  assert mesh.axis_names == ('data', 'fsdp', 'model')
  assert tuple(mesh.shape.values()) == expected
  assert sorted(d.id for d in mesh.devices.flat) == list(range(8))


def test_make_mesh_on_given_devices():
  one = partitioning.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  assert one.devices.size == 1 and one.devices.flat[0] == jax.devices()[0]
  four = partitioning.make_mesh((-1, 2, 1), devices=jax.devices()[4:])
  assert dict(four.shape) == {'data': 2, 'fsdp': 2, 'model': 1}
  assert sorted(d.id for d in four.devices.flat) == [4, 5, 6, 7]


@pytest.mark.parametrize('shape, fragments', [
    ((4, 1, 1), ['(4, 1, 1)', 'needs 4 devices', '8 are available']),
    ((2, 2, 4), ['(2, 2, 4)', 'needs 16 devices', '8 are available']),
    ((1, 1, 1), ['needs 1 devices', '8 are available']),
    ((3, -1, 1), ['(3, -1, 1)', 'cannot fill 8 devices', 'not a multiple of 3']),
])
def test_make_mesh_wrong_device_count(shape, fragments):
  with pytest.raises(ValueError) as error:
    partitioning.make_mesh(shape)
  message = str(error.value)
  assert '\n' not in message
  for fragment in fragments:
    assert fragment in message


@pytest.mark.parametrize('shape', [
    (8, 1), (2, 2, 2, 1), (), (-1, -1, 1), (0, 8, 1), (-2, -4, 1), (8, 1, -3)])
def test_make_mesh_bad_shape(shape):
  with pytest.raises(ValueError, match=r'must give 3 sizes for .*data.*fsdp.*model'):
    partitioning.make_mesh(shape)


# --- logical_rules -------------------------------------------------------------------------


def test_default_rules():
  rules = dict(partitioning.logical_rules())
  assert rules == dict(partitioning.DEFAULT_RULES)
  assert rules['batch'] == ('data', 'fsdp')
  assert rules['embed'] == 'fsdp'
  for name in ('mlp', 'heads', 'kv_heads', 'vocab', 'joined_kv'):
    assert rules[name] == 'model', name
  for name in ('kv', 'length', 'layers', 'relpos_buckets'):
    assert rules[name] is None, name
  assert partitioning.logical_rules({}) == partitioning.logical_rules(None)


def test_rule_overrides():
  rules = partitioning.logical_rules(
      {'embed': None, 'batch': 'data', 'mlp': ['fsdp', 'model'], 'kv': 'model'})
  as_dict = dict(rules)
  assert as_dict['embed'] is None
  assert as_dict['batch'] == 'data'
  assert as_dict['mlp'] == ('fsdp', 'model')  # lists (e.g. from JSON configs) become tuples
  assert as_dict['kv'] == 'model'
  assert as_dict['heads'] == 'model'  # untouched
  # The order of the rules (which decides who wins a mesh axis) is kept.
  assert [name for name, _ in rules] == [name for name, _ in partitioning.DEFAULT_RULES]


def test_rule_overrides_from_config():
  config = _get_config('t5_1_1_tiny')
  assert dict(partitioning.logical_rules(config.axis_rules.to_dict())) == dict(
      partitioning.DEFAULT_RULES)  # the config holds every default rule, as strings
  config.axis_rules.embed = ''  # as --config.axis_rules.embed='' sets it
  config.axis_rules.mlp = 'fsdp,model'
  config.axis_rules.heads = None
  rules = dict(partitioning.logical_rules(config.axis_rules.to_dict()))
  assert rules['embed'] is None and rules['heads'] is None
  assert rules['mlp'] == ('fsdp', 'model') and rules['vocab'] == 'model'
  with pytest.raises(ValueError, match=r"mlp -> .* names unknown mesh axis 'tensor'"):
    config.axis_rules.mlp = 'fsdp,tensor'
    partitioning.logical_rules(config.axis_rules.to_dict())


def test_unknown_logical_axis_in_rules():
  with pytest.raises(ValueError, match=r"Unknown logical axis name\(s\) \['emb'\]"):
    partitioning.logical_rules({'emb': 'fsdp'})


@pytest.mark.parametrize('target', ['tensor', ('data', 'pipeline'), ['expert']])
def test_unknown_mesh_axis_in_rules(target):
  with pytest.raises(ValueError, match=r'mlp -> .* names unknown mesh axis'):
    partitioning.logical_rules({'mlp': target})


# --- Partitioner.sharding ------------------------------------------------------------------


@pytest.mark.parametrize('axes, spec', [
    # params
    (('embed', 'mlp'), P('fsdp', 'model')),
    (('mlp', 'embed'), P('model', 'fsdp')),
    (('vocab', 'embed'), P('model', 'fsdp')),
    (('embed', 'vocab'), P('fsdp', 'model')),
    (('embed', 'heads', 'kv'), P('fsdp', 'model', None)),
    (('embed', 'kv_heads', 'kv'), P('fsdp', 'model', None)),
    (('heads', 'kv', 'embed'), P('model', None, 'fsdp')),
    (('heads', 'relpos_buckets'), P('model', None)),
    (('embed',), P('fsdp')),
    (('layers', 'embed', 'mlp'), P(None, 'fsdp', 'model')),
    # activations: batch takes fsdp first, so embed stays unsharded
    (('batch', 'length', 'embed'), P(('data', 'fsdp'), None, None)),
    (('batch', 'length', 'mlp'), P(('data', 'fsdp'), None, 'model')),
    (('batch', 'length', 'heads', 'kv'), P(('data', 'fsdp'), None, 'model', None)),
    (('batch', 'length', 'vocab'), P(('data', 'fsdp'), None, 'model')),
    (('batch', None), P(('data', 'fsdp'), None)),
])
def test_sharding_default_rules(partitioner_222, axes, spec):
  sharding = partitioner_222.sharding(axes)
  assert isinstance(sharding, NamedSharding)
  assert sharding.mesh is partitioner_222.mesh
  assert sharding.spec == spec


def test_sharding_with_overrides():
  mesh = partitioning.make_mesh((2, 2, 2))
  partitioner = partitioning.Partitioner(
      mesh, partitioning.logical_rules({'batch': 'data', 'mlp': None}))
  # With batch on data only, fsdp is free for the activation's embed dim.
  assert partitioner.sharding(('batch', 'length', 'embed')).spec == P('data', None, 'fsdp')
  assert partitioner.sharding(('embed', 'mlp')).spec == P('fsdp', None)
  assert partitioner.batch_sharding().spec == P('data', None)


def test_replicated_and_batch_sharding(partitioner_222):
  assert partitioner_222.replicated().spec == P()
  assert partitioner_222.replicated().is_fully_replicated
  assert partitioner_222.batch_sharding().spec == P(('data', 'fsdp'), None)
  assert partitioner_222.batch_sharding(3).spec == P(('data', 'fsdp'), None, None)
  assert partitioner_222.data_parallel_size == 4
  assert partitioning.Partitioner(partitioning.make_mesh((1, 1, 8))).data_parallel_size == 1
  assert partitioning.Partitioner(partitioning.make_mesh((2, 4, 1))).data_parallel_size == 8


def test_activate_applies_rules_to_constraints(partitioner_222):
  """Inside `activate`, the models' logical constraints shard activations on the mesh."""

  def f(x):
    return nn.with_logical_constraint(x * 2, ('batch', 'length', 'mlp'))

  x = np.ones((8, 4, 16), np.float32)
  with partitioner_222.activate():
    y = jax.jit(f)(x)
  assert y.sharding.spec == P(('data', 'fsdp'), None, 'model')
  np.testing.assert_array_equal(np.asarray(y), 2 * x)


# --- boxed_shardings on a real model -------------------------------------------------------


def test_boxed_shardings_follow_every_param_name(partitioner_222, t5_boxed):
  shardings = partitioner_222.boxed_shardings(t5_boxed)
  boxes = jax.tree.leaves(t5_boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  assert all(isinstance(b, nn.LogicallyPartitioned) for b in boxes)  # every param is named
  flat = jax.tree.leaves(shardings)
  assert len(flat) == len(boxes) > 20
  for box, sharding in zip(boxes, flat):
    expected = nn.logical_to_mesh_axes(box.names, partitioning.DEFAULT_RULES)
    assert sharding.spec == expected
    assert len(sharding.spec) == box.value.ndim

  by_name = _flat(shardings)
  assert by_name['token_embedder/embedding'].spec == P('model', 'fsdp')
  assert by_name['logits_dense/kernel'].spec == P('fsdp', 'model')
  assert by_name['encoder/layers_0/mlp/wi_0/kernel'].spec == P('fsdp', 'model')
  assert by_name['encoder/layers_1/mlp/wo/kernel'].spec == P('model', 'fsdp')
  assert by_name['decoder/layers_0/self_attention/query/kernel'].spec == P(
      'fsdp', 'model', None)
  assert by_name['decoder/layers_1/cross_attention/out/kernel'].spec == P(
      'model', None, 'fsdp')
  assert by_name['encoder/layers_0/pre_mlp_norm/scale'].spec == P('fsdp')
  assert by_name['encoder_relpos/rel_embedding'].spec == P('model', None)


def test_boxed_shardings_place_real_arrays(partitioner_222, t5_boxed):
  """Each device holds only its block of a sharded param (2x2 blocks on fsdp x model)."""
  shardings = _flat(partitioner_222.boxed_shardings(t5_boxed))
  sharding = shardings['encoder/layers_0/mlp/wi_0/kernel']  # [embed 128, mlp 128]
  value = np.arange(128 * 128, dtype=np.float32).reshape(128, 128)
  array = jax.device_put(value, sharding)
  assert {s.data.shape for s in array.addressable_shards} == {(64, 64)}
  np.testing.assert_array_equal(np.asarray(array), value)


def test_boxed_shardings_gqa_decoder_and_scanned_layers(partitioner_222):
  boxed = _boxed_params(_model_config('decoder_tiny', vocab_size=256, scan_layers=True))
  by_name = _flat(partitioner_222.boxed_shardings(boxed))
  # Scanned layers get a leading, unsharded `layers` dim.
  assert by_name['decoder/layers/self_attention/key/kernel'].spec == P(
      None, 'fsdp', 'model', None)
  assert by_name['decoder/layers/mlp/wi_1/kernel'].spec == P(None, 'fsdp', 'model')
  assert by_name['decoder/layers/pre_mlp_norm/scale'].spec == P(None, 'fsdp')
  assert by_name['decoder/final_norm/scale'].spec == P('fsdp')
  assert by_name['token_embedder/embedding'].spec == P('model', 'fsdp')


def test_boxed_shardings_plain_leaves_replicated(partitioner_222):
  tree = {'a': nn.LogicallyPartitioned(np.zeros((4, 8)), ('embed', 'mlp')), 'b': np.zeros(3)}
  shardings = partitioner_222.boxed_shardings(tree)
  assert shardings['a'].spec == P('fsdp', 'model')
  assert shardings['b'].spec == P()


# --- dims the mesh cannot split ---------------------------------------------------------


def test_indivisible_param_is_one_line_naming_param_axes_and_fix():
  partitioner = partitioning.Partitioner(partitioning.make_mesh((1, 1, 2), jax.devices()[:2]))
  boxed = _boxed_params(_model_config('t5_1_1_tiny', num_heads=3))
  with pytest.raises(ValueError) as error:
    partitioner.boxed_shardings(boxed)
  message = str(error.value)
  assert '\n' not in message
  assert message.startswith(
      "param decoder/layers_0/cross_attention/key/kernel of shape (64, 3, 16): dim 1 "
      "(logical axis 'kv_heads', size 3) cannot be split 2 ways over mesh axis model")
  assert message.endswith('or replicate the axis with --config.axis_rules.kv_heads=')
  # The fix it names works: with heads replicated, every param has a sharding.
  rules = partitioning.logical_rules({'heads': '', 'kv_heads': ''})
  shardings = _flat(partitioning.Partitioner(partitioner.mesh, rules).boxed_shardings(boxed))
  assert shardings['decoder/layers_0/cross_attention/key/kernel'].spec == P('fsdp', None, None)
  assert shardings['decoder/layers_0/mlp/wi_0/kernel'].spec == P('fsdp', 'model')


def test_indivisible_dims_replicated_with_one_warning_per_axis(caplog):
  """d_model 48 on 5 fsdp devices: every `embed` dim is replicated, the rest stay sharded."""
  partitioner = partitioning.Partitioner(partitioning.make_mesh((1, 5, 1), jax.devices()[:5]))
  boxed = _boxed_params(_model_config('t5_1_1_tiny', d_model=48, vocab_size=320))
  shardings = _flat(partitioner.boxed_shardings(boxed, replicate_indivisible=True))
  assert shardings['token_embedder/embedding'].spec == P('model', None)
  assert shardings['encoder/layers_0/mlp/wi_0/kernel'].spec == P(None, 'model')
  assert shardings['encoder/final_norm/scale'].spec == P(None)
  warnings = [r.getMessage() for r in caplog.records if r.levelname == 'WARNING']
  embed_params = sum('embed' in box.names for box in jax.tree.leaves(
      boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned)))
  assert warnings == [
      f"{embed_params} param(s) replicated along mesh axis fsdp, which cannot split their "
      "logical axis 'embed' (size 48) 5 ways: e.g. decoder/final_norm/scale"]
  # A dim the mesh does divide keeps its sharding: vocab 320 over fsdp when embed is free.
  rules = partitioning.logical_rules({'vocab': 'fsdp', 'embed': ''})
  by_name = _flat(partitioning.Partitioner(partitioner.mesh, rules).boxed_shardings(boxed))
  assert by_name['token_embedder/embedding'].spec == P('fsdp', None)


def test_cli_train_with_indivisible_mesh_leaves_no_workdir(tmp_path):
  workdir = tmp_path / 'run'
  run = Run(['train', '--config=configs/t5_1_1_tiny.py', f'--workdir={workdir}',
             '--config.mesh_shape=(1,1,2)', '--config.model.num_heads=3',
             '--config.train.num_steps=1'], tmp_path / 'logs', 'train', devices=2).wait()
  assert_one_error_line(run, 'param decoder/layers_0/cross_attention/key/kernel of shape '
                        "(64, 3, 16)", "logical axis 'kv_heads'", 'mesh axis model',
                        '--config.axis_rules.kv_heads=')
  assert not workdir.exists()


# --- matching_shardings on real optimizer states -------------------------------------------


def _opt_state_shardings(partitioner, boxed, optimizer_fields):
  params = nn.unbox(boxed)
  param_shardings = partitioner.boxed_shardings(boxed)
  tx = optimizers.make_optimizer(dict(optimizer_fields, schedule='constant'))
  opt_state = jax.eval_shape(tx.init, params)
  shardings = partitioner.matching_shardings(opt_state, params, param_shardings)
  assert jax.tree.structure(shardings) == jax.tree.structure(opt_state)
  return params, param_shardings, opt_state, shardings


def test_matching_shardings_adamw(partitioner_222, t5_boxed):
  params, param_shardings, opt_state, shardings = _opt_state_shardings(
      partitioner_222, t5_boxed, {'name': 'adamw', 'weight_decay': 0.1})
  adam = opt_state[0]  # ScaleByAdamState(count, mu, nu)
  adam_shardings = shardings[0]
  assert jax.tree.structure(adam.mu) == jax.tree.structure(params)
  for moment in (adam_shardings.mu, adam_shardings.nu):
    assert jax.tree.leaves(moment) == jax.tree.leaves(param_shardings)
  assert adam_shardings.count.spec == P()
  # Everything besides mu and nu (step counters, empty states) is replicated.
  others = [s for path, s in jax.tree_util.tree_leaves_with_path(shardings)
            if not {'mu', 'nu'} & set(partitioning._keys(path))]
  assert others and all(s.spec == P() for s in others)
  assert _flat(adam_shardings.mu)['encoder/layers_0/mlp/wi_0/kernel'].spec == P(
      'fsdp', 'model')


def test_matching_shardings_adafactor(partitioner_222, t5_boxed):
  params, param_shardings, opt_state, shardings = _opt_state_shardings(
      partitioner_222, t5_boxed, {'name': 'adafactor', 'min_dim_size_to_factor': 128})
  factored = opt_state[0]  # FactoredState(count, v_row, v_col, v)
  factored_shardings = shardings[0]
  params_flat, param_shardings_flat = _flat(params), _flat(param_shardings)
  v_flat, v_sharding_flat = _flat(factored.v), _flat(factored_shardings.v)
  row_flat = _flat(factored.v_row)
  num_factored = num_full = 0
  for name, param in params_flat.items():
    if v_flat[name].shape == param.shape:  # unfactored: full second moment
      num_full += 1
      assert v_sharding_flat[name] == param_shardings_flat[name], name
    else:  # factored: row/column statistics (and a placeholder v) are replicated
      num_factored += 1
      assert row_flat[name].shape != param.shape
      assert v_sharding_flat[name].spec == P(), name
      assert _flat(factored_shardings.v_row)[name].spec == P(), name
      assert _flat(factored_shardings.v_col)[name].spec == P(), name
  assert num_factored >= 3 and num_full >= 3  # embedding, logits, MLP kernels are factored
  assert _flat(factored_shardings.v)['encoder/layers_0/self_attention/query/kernel'].spec == P(
      'fsdp', 'model', None)
  assert factored_shardings.count.spec == P()


def test_matching_shardings_needs_same_shape():
  partitioner = partitioning.Partitioner(partitioning.make_mesh((1, 2, 4)))
  params = {'w': jax.ShapeDtypeStruct((8, 4), np.float32)}
  param_shardings = {'w': partitioner.sharding(('embed', 'mlp'))}
  tree = {'m': {'w': jax.ShapeDtypeStruct((8, 4), np.float32)},
          'row': {'w': jax.ShapeDtypeStruct((8,), np.float32)},
          'other': jax.ShapeDtypeStruct((8, 4), np.float32)}
  shardings = partitioner.matching_shardings(tree, params, param_shardings)
  assert shardings['m']['w'].spec == P('fsdp', 'model')
  assert shardings['row']['w'].spec == P()
  assert shardings['other'].spec == P()  # right shape, but not under a param's path


# --- shard_batch ---------------------------------------------------------------------------


@pytest.mark.parametrize('mesh_shape', [(2, 2, 2), (8, 1, 1), (1, 1, 8)])
def test_shard_batch(mesh_shape):
  partitioner = partitioning.Partitioner(partitioning.make_mesh(mesh_shape))
  rng = np.random.RandomState(0)
  local = {'decoder_target_tokens': rng.randint(0, 100, (8, 6)).astype(np.int32),
           'decoder_loss_weights': rng.rand(8, 6).astype(np.float32),
           'extra': rng.rand(8, 6, 3).astype(np.float32)}
  batch = partitioner.shard_batch(local)
  assert set(batch) == set(local)
  rows = 8 // partitioner.data_parallel_size
  for key, array in batch.items():
    assert isinstance(array, jax.Array)
    assert array.shape == local[key].shape and array.dtype == local[key].dtype
    assert array.sharding.spec == P(('data', 'fsdp'), *([None] * (local[key].ndim - 1)))
    assert array.sharding.mesh is partitioner.mesh
    assert {s.data.shape[0] for s in array.addressable_shards} == {rows}
    np.testing.assert_array_equal(np.asarray(array), local[key])
    for shard in array.addressable_shards:  # each device holds its rows of the batch
      np.testing.assert_array_equal(np.asarray(shard.data), local[key][shard.index])
