"""Tests for the trainer: sharded runs on different meshes, gradient accumulation, precision,
remat and scanned layers, determinism, the NaN guard, bad input and the logged metrics.

Compiling dominates the run time, so the expensive pieces are module-scoped fixtures: the
end-to-end `trainer.train` runs (one per mesh) and one initial state with batches that the
step-level tests share. The end-to-end runs train T5.1.1 tiny (one layer a side, 8 heads) on
`translate_en_de`, the step-level tests the Llama-layout decoder_tiny as a prefix-LM; both
with an 8192-token vocabulary (the task's ende_8k vocabulary has 8100 pieces) and 16/16-token
features.

The mesh runs use dropout 0.1: with `jax_threefry_partitionable` (on by default) random bits
do not depend on the sharding, so the dropout masks, like the init, agree across meshes.
"""

import collections
import functools
import importlib.util
import json
import os

import flax.linen as nn
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from t5x_lite import checkpoints, models, optimizers, partitioning, trainer
from t5x_lite import config as config_lib

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs')
MESHES = [(1, 1, 1), (8, 1, 1), (2, 2, 2), (1, 1, 8)]
NUM_STEPS = 5
METRIC_NAMES = ('loss', 'accuracy', 'z_loss', 'grad_norm', 'param_norm', 'lr',
                'tokens_per_second', 'mfu')


def _get_config(name='t5_1_1_tiny'):
  spec = importlib.util.spec_from_file_location(name, os.path.join(CONFIGS, f'{name}.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def _run_config(mesh_shape=(8, 1, 1), **train_fields):
  """T5.1.1 tiny, one layer each side, 8 heads (so `model` can split them 8 ways)."""
  config = _get_config()
  config.model.update(vocab_size=8192, num_heads=8, head_dim=8, num_encoder_layers=1,
                      num_decoder_layers=1, dropout_rate=0.1)
  config.data.feature_lengths.update(inputs=16, targets=16)
  config.mesh_shape = mesh_shape
  config.train.update(batch_size=8, num_steps=NUM_STEPS, log_every=1, checkpoint_every=1000,
                      peak_flops_per_device=1e9)
  config.train.update(train_fields)
  return config


def _records(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
    return [json.loads(line) for line in f]


def _train(config, workdir, devices=None, make_batches=None):
  """`trainer.train`, optionally on a subset of the devices; also returns the initial state's
  shardings, shard shapes and one of its arrays (to check donation)."""
  seen = {}
  init_state = trainer.init_state
  make_mesh = partitioning.make_mesh

  def recording_init_state(*args, **kwargs):
    state = init_state(*args, **kwargs)
    seen['shardings'] = jax.tree.map(lambda x: x.sharding, state)
    seen['shard_shapes'] = jax.tree.map(lambda x: x.addressable_shards[0].data.shape, state)
    seen['array'] = state.params['token_embedder']['embedding']
    return state

  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(trainer, 'init_state', recording_init_state)
    if devices is not None:
      patch.setattr(partitioning, 'make_mesh', lambda shape: make_mesh(shape, devices))
    last = trainer.train(config, str(workdir), make_batches=make_batches)
  return last, _records(workdir), seen


class _Poisoned:
  """The pipeline's batches, but batch number `nan_at` has a token id far outside the
  vocabulary: its embedding lookup gives NaN (jnp.take fills out-of-range rows with NaN), so
  that step's loss and gradients are NaN, as with a corrupted input."""

  def __init__(self, inner, nan_at):
    self.inner, self.nan_at, self.count = inner, nan_at, 0

  def __next__(self):
    batch = dict(next(self.inner))
    self.count += 1
    if self.count == self.nan_at:
      batch['decoder_input_tokens'] = _poison(batch['decoder_input_tokens'])
    return batch

  def get_state(self):
    return self.inner.get_state()

  def set_state(self, state):
    self.inner.set_state(state)


def _poison(tokens):
  tokens = tokens.copy()
  tokens[0, 0] = 2**30
  return tokens


def _batches_with_nan_at(step):
  return lambda config, index, count: _Poisoned(
      trainer.pipeline_batches(config, index, count), nan_at=step)


def _equations(jaxpr):
  """All equations of a jaxpr, including those of nested (pjit, remat, scan) jaxprs."""
  for eqn in jaxpr.eqns:
    yield eqn
    for param in eqn.params.values():
      for sub in param if isinstance(param, (list, tuple)) else (param,):
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          yield from _equations(sub.jaxpr)
        elif isinstance(sub, jax.extend.core.Jaxpr):
          yield from _equations(sub)


def _max_diff(a, b):
  """The largest absolute difference between two trees of arrays of the same structure."""
  assert jax.tree.structure(a) == jax.tree.structure(b)
  return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


# --- End-to-end runs on four meshes ------------------------------------------------------


@pytest.fixture(scope='module')
def mesh_runs(tmp_path_factory):
  """The same 5-step run (dropout 0.1) on 1 device and on 8 devices in three layouts."""
  runs = {}
  for shape in MESHES:
    workdir = tmp_path_factory.mktemp('mesh_' + '_'.join(map(str, shape)))
    devices = jax.devices()[:1] if shape == (1, 1, 1) else None
    runs[shape] = _train(_run_config(shape), workdir, devices)
  return runs


def test_same_losses_on_every_mesh(mesh_runs):
  losses = {shape: [r['loss'] for r in records] for shape, (_, records, _) in mesh_runs.items()}
  reference = losses[(1, 1, 1)]
  assert len(reference) == NUM_STEPS and np.all(np.isfinite(reference))
  assert len(set(reference)) == NUM_STEPS  # the loss moves: different batches and params
  for shape, values in losses.items():
    np.testing.assert_allclose(values, reference, rtol=0, atol=1e-5, err_msg=str(shape))


def test_state_is_sharded_per_mesh(mesh_runs):
  """The 8-device runs really shard params and optimizer state (the equality has teeth)."""
  # wi_0 kernel is [embed 64, mlp 128]: fsdp x model.
  expected_shard = {(1, 1, 1): (64, 128), (8, 1, 1): (64, 128), (2, 2, 2): (32, 64),
                    (1, 1, 8): (64, 16)}
  for shape, (_, _, seen) in mesh_runs.items():
    sharding = seen['shardings'].params['decoder']['layers_0']['mlp']['wi_0']['kernel']
    assert tuple(sharding.mesh.shape.values()) == shape
    assert sharding.spec == P('fsdp', 'model')
    shard_shape = seen['shard_shapes'].params['decoder']['layers_0']['mlp']['wi_0']['kernel']
    assert shard_shape == expected_shard[shape]
    # Adafactor's unfactored second moment is laid out like its param.
    moment = seen['shardings'].opt_state[0].v['decoder']['layers_0']['mlp']['wi_0']['kernel']
    assert moment == sharding
    query = seen['shard_shapes'].params['encoder']['layers_0']['self_attention']['query']
    assert query['kernel'] == {(2, 2, 2): (32, 4, 8), (1, 1, 8): (64, 1, 8)}.get(
        shape, (64, 8, 8))
    assert seen['shardings'].step.is_fully_replicated
  # (8, 1, 1) is pure data parallelism: params replicated on all 8 devices.
  assert len(mesh_runs[(8, 1, 1)][2]['shardings'].params['token_embedder'][
      'embedding'].device_set) == 8


def test_state_buffers_are_donated(mesh_runs):
  for _, _, seen in mesh_runs.values():
    assert seen['array'].is_deleted()  # the first step took over the initial state's buffers


def test_logged_metrics(mesh_runs):
  last, records, _ = mesh_runs[(2, 2, 2)]
  assert [r['step'] for r in records] == list(range(1, NUM_STEPS + 1))
  for record in records:
    for name in METRIC_NAMES:
      assert np.isfinite(record[name]), name
    assert 0 <= record['accuracy'] <= 1
    assert 0 < record['z_loss'] < record['loss']
    assert record['grad_norm'] > 0 and record['param_norm'] > 0
    assert record['lr'] == pytest.approx(0.01)  # rsqrt: 1.0 / sqrt(10000 warmup steps)
    assert record['tokens_per_second'] > 0
    assert record['mfu'] > 0  # peak_flops_per_device is set
  assert last == {k: v for k, v in records[-1].items() if k not in ('step', 'split')}


def test_identical_runs_are_bitwise_equal_and_nan_stops(mesh_runs, tmp_path):
  """A run repeating the (8, 1, 1) run, but with a NaN-producing batch at step 4.

  Steps 1-3 must be bitwise those of the earlier run (fresh init, fresh pipeline); step 4 is a
  checkpoint step, so the guard must stop before saving: step 2's checkpoint stays the latest.
  """
  config = _run_config((8, 1, 1), checkpoint_every=2)
  with pytest.raises(trainer.NonFiniteLossError, match=r'loss=nan .*at step 4: stopping'):
    _train(config, tmp_path, make_batches=_batches_with_nan_at(4))

  records = _records(tmp_path)
  reference = [r['loss'] for r in mesh_runs[(8, 1, 1)][1]]
  assert [r['step'] for r in records] == [1, 2, 3]
  assert [r['loss'] for r in records] == reference[:3]  # bitwise

  checkpointer = checkpoints.Checkpointer(os.path.join(tmp_path, 'checkpoints'), save_every=2)
  try:
    assert checkpointer.latest_step() == 2
    assert sorted(os.listdir(os.path.join(tmp_path, 'checkpoints'))) == ['2']
    model_config = config_lib.model_config(config)
    tx = optimizers.make_optimizer(
        trainer.optimizer_settings(config.optimizer, config.train.num_steps))
    partitioner = trainer.setup_partitioner(config)
    shapes, shardings = trainer.abstract_state(model_config, tx, partitioner)
    state, _ = checkpointer.restore(2, checkpoints.abstract_with_shardings(shapes, shardings))
  finally:
    checkpointer.close()
  assert int(state.step) == 2
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state))


def test_nan_guard_names_the_first_bad_step_between_checks(tmp_path):
  """NaN at step 2 while metrics are logged every 4 steps and checkpoints saved every 4: the
  guard runs at step 4 yet names step 2, and neither logs nor saves anything after it."""
  config = _run_config((8, 1, 1), log_every=4, checkpoint_every=4)
  with pytest.raises(trainer.NonFiniteLossError, match=r'loss=nan .*at step 2: stopping'):
    _train(config, tmp_path, make_batches=_batches_with_nan_at(2))
  assert _records(tmp_path) == []
  assert os.listdir(os.path.join(tmp_path, 'checkpoints')) == []


def test_other_seed_differs_and_nan_skip(mesh_runs, tmp_path):
  """seed=1, nan_policy='skip' and a NaN-producing batch at step 2: that update is skipped
  and reported, training goes on; and the losses differ from the seed-0 runs."""
  config = _run_config((8, 1, 1), nan_policy='skip')
  config.seed = 1
  last, records, _ = _train(config, tmp_path, make_batches=_batches_with_nan_at(2))
  assert [r['skipped'] for r in records] == [0, 1, 0, 0, 0]
  assert np.isnan(records[1]['loss'])
  for record in records[:1] + records[2:]:
    assert np.isfinite(record['loss']) and np.isfinite(record['grad_norm'])
  assert np.isfinite(last['param_norm'])
  seed0 = [r['loss'] for r in mesh_runs[(8, 1, 1)][1]]
  assert abs(records[0]['loss'] - seed0[0]) > 1e-3


# --- Bad input ---------------------------------------------------------------------------


@pytest.mark.parametrize('mesh_shape, batch_size, num_microbatches, fragment', [
    ((8, 1, 1), 12, 1, 'train.batch_size=12 with num_microbatches=1 must split into '
     'microbatches divisible by the data-parallel size 8'),
    ((2, 2, 2), 8, 4, 'data-parallel size 4'),
    ((-1, 1, 1), 8, 3, 'train.batch_size=8 with num_microbatches=3'),
])
def test_batch_not_divisible(tmp_path, mesh_shape, batch_size, num_microbatches, fragment):
  config = _run_config(mesh_shape, batch_size=batch_size, num_microbatches=num_microbatches)
  with pytest.raises(ValueError) as error:
    trainer.train(config, str(tmp_path))
  assert fragment in str(error.value)
  assert '\n' not in str(error.value)
  assert not os.path.exists(os.path.join(tmp_path, 'checkpoints'))


@pytest.mark.parametrize('mesh_shape', [(4, 1, 1), (2, 2, 4), (3, -1, 1)])
def test_mesh_not_matching_devices(tmp_path, mesh_shape):
  with pytest.raises(ValueError, match=r'mesh_shape=.* (needs \d+ devices but 8 are available|'
                     r'cannot fill 8 devices)') as error:
    trainer.train(_run_config(mesh_shape), str(tmp_path))
  assert '\n' not in str(error.value)


# --- The train step on one shared initial state -----------------------------------------
#
# Decoder-only (Llama layout: RoPE, grouped-query attention) prefix-LM, so that these tests
# cover the other model family. Float32, no dropout. The optimizer is SGD with momentum, so
# that an update (and the momentum) is the gradient: comparing updates to 1e-6 compares the
# gradients. (A first Adam or Adafactor update is about sign(g), which float noise flips for
# the |g| ~ 1e-9 of rarely seen logits: 5e-6 apart with AdamW at lr 1e-3.) SGD's update is
# also elementwise, so a scanned model's update can be compared with the looped one's.

SGD_LEARNING_RATE = 0.1


@pytest.fixture(scope='module')
def pieces():
  """A state on a (2, 2, 2) mesh, two real batches of 16 packed rows, and the reference step:
  no accumulation, no remat, not scanned (with nan_policy 'skip', which must not matter)."""
  config = _get_config('decoder_tiny')
  config.model.vocab_size = 8192
  config.data.feature_lengths.update(inputs=16, targets=16)
  config.mesh_shape = (2, 2, 2)
  config.train.batch_size = 16
  model_config = config_lib.model_config(config)
  tx = optax.sgd(SGD_LEARNING_RATE, momentum=0.9)
  partitioner = trainer.setup_partitioner(config)
  model = models.build_model(model_config)
  shapes, shardings = trainer.abstract_state(model_config, tx, partitioner)
  state = trainer.init_state(model, model_config, tx, shardings, jax.random.key(0))
  batches = trainer.pipeline_batches(config, 0, 1)
  local = [next(batches) for _ in range(2)]
  ns = dict(config=config, model_config=model_config, tx=tx, partitioner=partitioner,
            shapes=shapes, shardings=shardings, state=state, local=local,
            batches=[partitioner.shard_batch(b) for b in local], rng=jax.random.key(1))
  ns['skip_step'] = _step(ns, model_config, trainer.StepOptions(skip_nonfinite=True))
  ns['base'] = ns['skip_step'](state, ns['batches'][0], ns['rng'])
  return ns


def _step(ns, model_config, options, shardings=None):
  """A jitted train step (no donation, so the shared state survives)."""
  fn = functools.partial(trainer.train_step, model=models.build_model(model_config),
                         tx=ns['tx'], options=options)
  partitioner, shardings = ns['partitioner'], shardings or ns['shardings']
  jitted = jax.jit(fn, in_shardings=(shardings, partitioner.batch_sharding(),
                                     partitioner.replicated()),
                   out_shardings=(shardings, partitioner.replicated()))

  def run(state, batch, rng):
    with partitioner.activate():
      return jitted(state, batch, rng)

  return run


def _model_config(ns, **fields):
  return models.ModelConfig.from_dict({**ns['config'].model.to_dict(), **fields})


def _assert_same_step(ns, state, metrics, tolerance=1e-6):
  """`state` and `metrics` are those of the reference step (`ns['base']`)."""
  base_state, base_metrics = ns['base']
  for name in ('loss', 'accuracy', 'z_loss', 'num_tokens', 'grad_norm', 'param_norm'):
    np.testing.assert_allclose(metrics[name], base_metrics[name], rtol=tolerance,
                               err_msg=name)
  assert int(state.step) == 1
  assert _max_diff(state.params, base_state.params) <= tolerance
  # The momentum is the gradient: compare it at the scale of the update.
  assert _max_diff(state.opt_state, base_state.opt_state) * SGD_LEARNING_RATE <= tolerance


def test_reference_step(pieces):
  state, metrics = pieces['base']
  assert int(metrics['skipped']) == 0
  assert np.isfinite(metrics['loss']) and 0 < metrics['z_loss'] < metrics['loss']
  assert metrics['num_tokens'] == np.sum(pieces['local'][0]['decoder_loss_weights'] > 0)
  assert _max_diff(state.params, pieces['state'].params) > 1e-4  # the update is not trivial


def test_init_state_in_shardings(pieces):
  state, shardings = pieces['state'], pieces['shardings']
  assert int(state.step) == 0
  jax.tree.map(lambda x, s: x.sharding == s or pytest.fail(f'{x.sharding} != {s}'),
               state, shardings)
  jax.tree.map(lambda x, s: x.shape == s.shape or pytest.fail(), state, pieces['shapes'])
  assert {x.dtype for x in jax.tree.leaves(state.params)} == {jnp.dtype('float32')}
  kernel = state.params['decoder']['layers_0']['mlp']['wi_0']['kernel']  # [64, 172]
  assert kernel.sharding.spec == P('fsdp', 'model')
  assert {s.data.shape for s in kernel.addressable_shards} == {(32, 86)}


def test_gradient_accumulation_matches_full_batch(pieces):
  num_microbatches = 4
  weights = pieces['local'][0]['decoder_loss_weights']
  per_micro = weights.reshape(num_microbatches, -1).sum(1)
  assert len(set(per_micro)) > 1  # uneven token counts: normalisation must be global

  step = _step(pieces, pieces['model_config'],
               trainer.StepOptions(num_microbatches=num_microbatches))
  state, metrics = step(pieces['state'], pieces['batches'][0], pieces['rng'])
  _assert_same_step(pieces, state, metrics)


def _op_counts(ns, model_config):
  """How often each primitive occurs in the train step's jaxpr (traced, not compiled)."""
  model = models.build_model(model_config)
  shapes, _ = trainer.abstract_state(model_config, ns['tx'], ns['partitioner'])
  batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), ns['batches'][0])
  fn = functools.partial(trainer.train_step, model=model, tx=ns['tx'],
                         options=trainer.StepOptions())
  jaxpr = jax.make_jaxpr(fn)(shapes, batch, ns['rng'])
  return collections.Counter(e.primitive.name for e in _equations(jaxpr.jaxpr))


def test_remat_dots_gives_same_update(pieces):
  model_config = _model_config(pieces, remat_policy='dots')
  # The policy is applied: the backward pass recomputes elementwise ops, but no matmul.
  counts, plain = _op_counts(pieces, model_config), _op_counts(pieces, pieces['model_config'])
  assert counts['dot_general'] == plain['dot_general']
  assert sum(counts.values()) > sum(plain.values())

  step = _step(pieces, model_config, trainer.StepOptions())
  state, metrics = step(pieces['state'], pieces['batches'][0], pieces['rng'])
  _assert_same_step(pieces, state, metrics)


def _stack_layers(params, num_layers=2):
  params = dict(params)
  decoder = dict(params['decoder'])
  layers = [decoder.pop(f'layers_{i}') for i in range(num_layers)]
  params['decoder'] = dict(decoder, layers=jax.tree.map(lambda *xs: jnp.stack(xs), *layers))
  return params


def _unstack_layers(params, num_layers=2):
  params = dict(params)
  decoder = dict(params['decoder'])
  layers = decoder.pop('layers')
  for i in range(num_layers):
    decoder[f'layers_{i}'] = jax.tree.map(lambda x, i=i: x[i], layers)
  params['decoder'] = decoder
  return params


def test_scan_layers_with_full_remat_gives_same_update(pieces):
  """The scanned model with remat 'full', on the same weights stacked along `layers`."""
  model_config = _model_config(pieces, scan_layers=True, remat_policy='full')
  # Scanned, and the backward pass recomputes the matmuls too.
  counts = _op_counts(pieces, model_config)
  scanned_plain = _op_counts(pieces, _model_config(pieces, scan_layers=True))
  assert counts['scan'] >= 1
  assert counts['dot_general'] > scanned_plain['dot_general']

  shapes, shardings = trainer.abstract_state(model_config, pieces['tx'], pieces['partitioner'])
  assert shardings.params['decoder']['layers']['mlp']['wi_0']['kernel'].spec == P(
      None, 'fsdp', 'model')
  params = _stack_layers(pieces['state'].params)
  assert jax.tree.map(lambda x: x.shape, params) == jax.tree.map(lambda x: x.shape,
                                                                shapes.params)
  params = jax.device_put(params, shardings.params)
  state = trainer.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                             opt_state=jax.jit(pieces['tx'].init)(params))

  step = _step(pieces, model_config, trainer.StepOptions(), shardings)
  state, metrics = step(state, pieces['batches'][0], pieces['rng'])
  momentum = state.opt_state[0]  # TraceState
  momentum = momentum._replace(trace=_unstack_layers(momentum.trace))
  _assert_same_step(pieces, state.replace(params=_unstack_layers(state.params),
                                          opt_state=(momentum,) + state.opt_state[1:]), metrics)


def test_bfloat16_activations(pieces):
  model_config = _model_config(pieces, dtype='bfloat16')
  model = models.build_model(model_config)
  inputs = trainer._model_inputs(pieces['batches'][0])
  apply = lambda params: model.apply({'params': params}, **inputs)
  assert jax.eval_shape(apply, pieces['state'].params).dtype == jnp.float32  # logits
  # Every matmul (projections, attention, logits) takes bfloat16 operands.
  dots = [e for e in _equations(jax.make_jaxpr(apply)(pieces['state'].params).jaxpr)
          if e.primitive.name == 'dot_general']
  assert len(dots) > 10
  assert {v.aval.dtype for e in dots for v in e.invars} == {jnp.dtype('bfloat16')}

  # Params and optimizer state are float32, at init and through the updates.
  shapes, _ = trainer.abstract_state(model_config, pieces['tx'], pieces['partitioner'])
  float32_or_int = {jnp.dtype('float32'), jnp.dtype('int32')}
  assert {x.dtype for x in jax.tree.leaves(shapes)} <= float32_or_int
  step = _step(pieces, model_config, trainer.StepOptions())
  state, losses = pieces['state'], []
  for i in range(3):
    state, metrics = step(state, pieces['batches'][i % 2], pieces['rng'])
    losses.append(float(metrics['loss']))
  assert np.all(np.isfinite(losses))
  assert metrics['loss'].dtype == jnp.float32
  assert {x.dtype for x in jax.tree.leaves(state.params)} == {jnp.dtype('float32')}
  assert {x.dtype for x in jax.tree.leaves(state.opt_state)} <= float32_or_int
  assert losses[0] == pytest.approx(float(pieces['base'][1]['loss']), abs=0.05)
  assert losses[2] < losses[0]  # batch 0 again, after two updates


def test_skip_nonfinite_keeps_state(pieces):
  poisoned = dict(pieces['local'][0])
  poisoned['decoder_input_tokens'] = _poison(poisoned['decoder_input_tokens'])
  state, metrics = pieces['skip_step'](
      pieces['state'], pieces['partitioner'].shard_batch(poisoned), pieces['rng'])
  assert int(metrics['skipped']) == 1 and np.isnan(metrics['loss'])
  assert int(state.step) == 1
  for new, old in zip(jax.tree.leaves((state.params, state.opt_state)),
                      jax.tree.leaves((pieces['state'].params, pieces['state'].opt_state))):
    np.testing.assert_array_equal(new, old)


class _TinyLM(nn.Module):
  """A two-layer stand-in model: compiles in a moment."""

  @nn.compact
  def __call__(self, decoder_input_tokens, decoder_target_tokens=None, deterministic=True):
    return nn.Dense(16)(nn.Embed(16, 8)(decoder_input_tokens))


@pytest.mark.filterwarnings('ignore:overflow encountered in cast:RuntimeWarning')
@pytest.mark.parametrize('policy', ['stop', 'skip'])
def test_guard_catches_overflowing_update(policy):
  """Finite loss and gradients, but an update that overflows the params (a learning rate of
  1e39 is inf in float32): that state must neither be saved ('stop') nor kept ('skip')."""
  model, tx = _TinyLM(), optax.sgd(1e39)
  tokens = np.arange(1, 9, dtype=np.int32).reshape(2, 4)
  batch = {'decoder_input_tokens': tokens, 'decoder_target_tokens': tokens,
           'decoder_loss_weights': np.ones((2, 4), np.int32)}
  params = model.init(jax.random.key(0), tokens)['params']
  state = trainer.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                             opt_state=tx.init(params))
  options = trainer.StepOptions(skip_nonfinite=policy == 'skip')
  new_state, metrics = jax.jit(functools.partial(
      trainer.train_step, model=model, tx=tx, options=options))(state, batch, jax.random.key(1))
  metrics = jax.device_get(metrics)
  assert np.isfinite(metrics['loss']) and np.isfinite(metrics['grad_norm'])
  if policy == 'stop':
    assert not np.all(np.isfinite(new_state.params['Dense_0']['kernel']))
    first_bad = trainer._first_nonfinite(trainer._NO_NONFINITE_STEP, metrics, 7)
    with pytest.raises(trainer.NonFiniteLossError, match=r'param_norm=(nan|inf) at step 7'):
      trainer._check_finite(jax.device_get(first_bad))
  else:
    assert metrics['skipped'] == 1
    assert int(new_state.step) == 1
    jax.tree.map(np.testing.assert_array_equal, new_state.params, state.params)


def test_first_nonfinite_step_is_kept():
  good = {'loss': 2.5, 'grad_norm': 1.0, 'param_norm': 30.0, 'accuracy': float('nan')}
  first_bad = trainer._first_nonfinite(trainer._NO_NONFINITE_STEP, good, 2)
  trainer._check_finite(jax.device_get(first_bad))  # unguarded metrics do not count
  for name in ('loss', 'grad_norm', 'param_norm'):
    bad = dict(good, **{name: float('nan')})
    first_bad = trainer._first_nonfinite(trainer._NO_NONFINITE_STEP, good, 2)
    first_bad = trainer._first_nonfinite(first_bad, bad, 3)
    first_bad = trainer._first_nonfinite(first_bad, dict(good, loss=float('inf')), 4)
    first_bad = trainer._first_nonfinite(first_bad, good, 5)
    with pytest.raises(trainer.NonFiniteLossError, match=r'at step 3: stopping') as error:
      trainer._check_finite(jax.device_get(first_bad))
    assert f'{name}=nan' in str(error.value)