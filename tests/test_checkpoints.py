"""Tests for t5x_lite.checkpoints on a real TrainState of the tiny T5.1.1 model.

One train state is saved once (module fixture) from an fsdp mesh, with the data pipeline's
iterator state; the tests restore it as is, into meshes that shard the params differently,
as params only (fine-tuning), and into `trainer.train` via `train.init_from`. State values are
drawn with numpy into the shapes from `trainer.abstract_state` and placed with `device_put`,
so only the `init_from` test compiles anything.
"""

import importlib.util
import json
import os
import shutil
import types

import jax
import numpy as np
import pytest

from t5x_lite import checkpoints, models, optimizers, trainer
from t5x_lite import config as config_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAVED_STEP = 7
SAVE_MESH = (1, 8, 1)  # (data, fsdp, model): params' embed dim split 8 ways over fsdp


def tiny_config():
  spec = importlib.util.spec_from_file_location(
      't5_1_1_tiny', os.path.join(REPO, 'configs', 't5_1_1_tiny.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.data.feature_lengths.inputs = 16
  config.data.feature_lengths.targets = 16
  config.train.batch_size = 8
  config.train.num_steps = 10
  return config


def setup(config, mesh_shape):
  """Model, optimizer, and the state's shapes and shardings on a mesh of the 8 devices."""
  with config.unlocked():
    config.mesh_shape = mesh_shape
  partitioner = trainer.setup_partitioner(config)
  model_config = config_lib.model_config(config)
  model = models.build_model(model_config)
  tx = optimizers.make_optimizer(trainer.optimizer_settings(config.optimizer,
                                                           config.train.num_steps))
  shapes, shardings = trainer.abstract_state(model_config, tx, partitioner)
  return types.SimpleNamespace(model=model, model_config=model_config, tx=tx, shapes=shapes,
                               shardings=shardings, partitioner=partitioner)


def random_state(shapes, shardings, seed):
  """A TrainState of random floats (and SAVED_STEP for the step counters), sharded."""
  rng = np.random.default_rng(seed)

  def leaf(shape, sharding):
    if np.issubdtype(shape.dtype, np.integer):
      value = np.full(shape.shape, SAVED_STEP, shape.dtype)
    else:
      value = rng.standard_normal(shape.shape).astype(shape.dtype)
    return jax.device_put(value, sharding)

  return jax.tree.map(leaf, shapes, shardings)


def host(tree):
  return jax.tree.map(np.asarray, jax.device_get(tree))


def assert_trees_equal(a, b):
  """Same structure and bitwise-equal leaves."""
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(host(a)), jax.tree.leaves(host(b))):
    assert x.dtype == y.dtype and x.shape == y.shape, jax.tree_util.keystr(path)
    np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path), strict=True)


def data_iterator(config):
  return iter(trainer.pipeline_batches(config, 0, 1))


def step_dirs(directory):
  return sorted(int(name) for name in os.listdir(directory) if name.isdigit())


@pytest.fixture(scope='module')
def saved(tmp_path_factory):
  """A run's checkpoint directory holding one state (step SAVED_STEP) saved from SAVE_MESH,
  with the data iterator's state after two batches and the batch that comes next."""
  config = tiny_config()
  run = setup(config, SAVE_MESH)
  state = random_state(run.shapes, run.shardings, seed=1)
  iterator = data_iterator(config)
  next(iterator), next(iterator)
  data_state = iterator.get_state()
  next_batch = next(iterator)
  directory = str(tmp_path_factory.mktemp('pretrained') / 'checkpoints')
  checkpointer = checkpoints.Checkpointer(directory, save_every=1)
  assert checkpointer.save(SAVED_STEP, state, data_state)
  checkpointer.wait()
  checkpointer.close()
  return types.SimpleNamespace(directory=directory, config=config, run=run, state=host(state),
                               data_state=data_state, next_batch=next_batch)


def test_round_trip_restores_state_and_data_iterator(saved):
  checkpointer = checkpoints.Checkpointer(saved.directory, save_every=1)
  assert checkpointer.latest_step() == SAVED_STEP
  target = checkpoints.abstract_with_shardings(saved.run.shapes, saved.run.shardings)
  state, data_state = checkpointer.restore(SAVED_STEP, target)
  checkpointer.close()
  assert isinstance(state, trainer.TrainState)
  assert_trees_equal(state, saved.state)
  assert int(state.step) == SAVED_STEP
  for restored, sharding in zip(jax.tree.leaves(state), jax.tree.leaves(saved.run.shardings)):
    assert restored.sharding.is_equivalent_to(sharding, restored.ndim)
  # The data state is plain JSON and resumes the pipeline at the batch after the save.
  assert data_state == json.loads(json.dumps(saved.data_state))
  iterator = data_iterator(saved.config)
  iterator.set_state(data_state)
  batch = next(iterator)
  assert sorted(batch) == sorted(saved.next_batch)
  for key in batch:
    np.testing.assert_array_equal(batch[key], saved.next_batch[key], err_msg=key)


@pytest.mark.parametrize('mesh_shape', [(1, 2, 4), (8, 1, 1)])
def test_restore_into_a_different_mesh(saved, mesh_shape):
  """Saved with the embed dim over 8 fsdp devices; restored with fsdp=2 x model=4 (heads, mlp
  and vocab now split 4 ways too) or pure data parallelism (params replicated)."""
  run = setup(tiny_config(), mesh_shape)
  shard_shapes = lambda shardings: [
      s.shard_shape(x.shape) for x, s in zip(jax.tree.leaves(run.shapes.params),
                                             jax.tree.leaves(shardings.params))]
  assert shard_shapes(saved.run.shardings) != shard_shapes(run.shardings)
  checkpointer = checkpoints.Checkpointer(saved.directory, save_every=1)
  state, _ = checkpointer.restore(
      SAVED_STEP, checkpoints.abstract_with_shardings(run.shapes, run.shardings))
  checkpointer.close()
  assert_trees_equal(state, saved.state)
  for restored, sharding in zip(jax.tree.leaves(state), jax.tree.leaves(run.shardings)):
    assert restored.sharding.mesh.shape_tuple == sharding.mesh.shape_tuple
    assert restored.sharding.is_equivalent_to(sharding, restored.ndim)
  if mesh_shape == (1, 2, 4):
    kernel = state.params['encoder']['layers_0']['mlp']['wi_0']['kernel']  # [embed, mlp]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec('fsdp', 'model')
    assert kernel.addressable_shards[0].data.shape == (64 // 2, 128 // 4)


def test_restore_params_from_another_run(saved):
  run = setup(tiny_config(), (2, 1, 4))
  target = checkpoints.abstract_with_shardings(run.shapes.params, run.shardings.params)
  params = checkpoints.restore_params(saved.directory, target)
  assert_trees_equal(params, saved.state.params)
  for restored, sharding in zip(jax.tree.leaves(params), jax.tree.leaves(run.shardings.params)):
    assert restored.sharding.is_equivalent_to(sharding, restored.ndim)
  with pytest.raises(FileNotFoundError, match='No checkpoint'):
    checkpoints.restore_params(os.path.join(saved.directory, 'nothing_here'), target)


def test_train_init_from_starts_at_step_zero_with_those_params(saved, tmp_path):
  """Fine-tuning: params come from the other run, the step and optimizer state are fresh.
  With learning rate 0 one step leaves the params as loaded, so checkpoint 1 shows them."""
  config = tiny_config()
  with config.unlocked():
    config.mesh_shape = (-1, 1, 1)
  config.train.num_steps = 1
  config.train.checkpoint_every = 1
  config.train.log_every = 1
  config.train.init_from = saved.directory
  config.optimizer.learning_rate = 0.0
  config.optimizer.schedule = 'constant'
  workdir = str(tmp_path)
  metrics = trainer.train(config, workdir)
  records = [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'))]
  assert [r['step'] for r in records] == [1]
  assert np.isfinite(metrics['loss'])
  run = setup(config, (-1, 1, 1))
  checkpointer = checkpoints.Checkpointer(os.path.join(workdir, 'checkpoints'), save_every=1)
  assert step_dirs(os.path.join(workdir, 'checkpoints')) == [1]
  state, _ = checkpointer.restore(
      1, checkpoints.abstract_with_shardings(run.shapes, run.shardings))
  checkpointer.close()
  assert int(state.step) == 1
  assert_trees_equal(state.params, saved.state.params)
  # A fresh optimizer state after one update: its counters read 1, not SAVED_STEP + 1.
  counters = [x for x in jax.tree.leaves(host(state.opt_state)) if x.dtype.kind == 'i']
  assert counters and all(int(c) == 1 for c in counters)
  saved_moments = [x for x in jax.tree.leaves(saved.state.opt_state) if x.dtype.kind == 'f']
  new_moments = [x for x in jax.tree.leaves(host(state.opt_state)) if x.dtype.kind == 'f']
  assert not any(np.array_equal(a, b) for a, b in zip(saved_moments, new_moments) if a.size > 1)


def test_keep_last_n_async_saves(saved, tmp_path):
  directory = str(tmp_path / 'checkpoints')
  checkpointer = checkpoints.Checkpointer(directory, save_every=1, keep=2, async_save=True)
  assert checkpointer.latest_step() is None
  state = jax.device_put(saved.state, saved.run.shardings)
  for step in range(1, 6):
    step_array = jax.device_put(np.int32(step), saved.run.shardings.step)
    assert checkpointer.save(step, state.replace(step=step_array), {'step': step})
  checkpointer.wait()
  assert checkpointer.latest_step() == 5
  assert step_dirs(directory) == [4, 5]
  assert not [n for n in os.listdir(directory) if 'tmp' in n]
  target = checkpoints.abstract_with_shardings(saved.run.shapes, saved.run.shardings)
  restored, data_state = checkpointer.restore(4, target)
  assert int(restored.step) == 4 and data_state == {'step': 4}
  assert_trees_equal(restored.params, saved.state.params)
  checkpointer.close()


def test_saves_only_multiples_of_save_every(tmp_path):
  """Orbax's default policy also saves the first step of a fresh run; ours does not."""
  checkpointer = checkpoints.Checkpointer(str(tmp_path), save_every=5)
  assert [s for s in range(1, 21) if checkpointer.should_save(s)] == [5, 10, 15, 20]
  checkpointer.close()


def test_unfinished_checkpoint_is_not_latest(saved, tmp_path):
  """Orbax writes a step into a temporary directory and renames it when complete; a leftover
  temporary directory (e.g. from a killed run) is neither the latest step nor restorable."""
  directory = tmp_path / 'checkpoints'
  directory.mkdir()
  shutil.copytree(os.path.join(saved.directory, str(SAVED_STEP)), directory / str(SAVED_STEP))
  for name in ('9.orbax-checkpoint-tmp', '11.orbax-checkpoint-tmp-1700000000'):
    (directory / name / 'state').mkdir(parents=True)
    (directory / name / 'state' / 'partial').write_bytes(b'\0' * 10)
  checkpointer = checkpoints.Checkpointer(str(directory), save_every=1)
  assert checkpointer.latest_step() == SAVED_STEP
  state, _ = checkpointer.restore(
      SAVED_STEP, checkpoints.abstract_with_shardings(saved.run.shapes, saved.run.shardings))
  checkpointer.close()
  assert_trees_equal(state.params, saved.state.params)


def test_keep_0_keeps_every_checkpoint_and_existing_ones_survive(saved, tmp_path):
  """keep=0 means keep all (never "delete all"); opening a run's directory deletes nothing."""
  directory = tmp_path / 'checkpoints'
  shutil.copytree(saved.directory, directory)
  checkpointer = checkpoints.Checkpointer(directory, save_every=1, keep=0)
  state = jax.device_put(saved.state, saved.run.shardings)
  for step in range(8, 12):
    step_array = jax.device_put(np.int32(step), saved.run.shardings.step)
    assert checkpointer.save(step, state.replace(step=step_array), {'step': step})
  checkpointer.wait()
  checkpointer.close()
  assert step_dirs(directory) == [SAVED_STEP, 8, 9, 10, 11]
