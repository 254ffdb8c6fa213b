"""Tests for t5x_lite.optimizers: schedules at hand-computed steps, the weight-decay mask on real
model params, AdamW decay, Adafactor state, clipping and update math against numpy references,
and a few training steps of each optimizer on a tiny model."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from t5x_lite import losses, models, optimizers


def _lr(schedule, step):
  return float(schedule(jnp.asarray(step, jnp.int32)))


def _config(**fields):
  config = optimizers.default_optimizer_config()
  config.update(fields)
  return config


def _apply(tx, params, grads_seq):
  """Runs `tx` over a sequence of gradient trees; returns the params after each step."""
  @jax.jit
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  state = tx.init(params)
  out = []
  for grads in grads_seq:
    params, state = step(params, state, grads)
    out.append(params)
  return out


# ----------------------------------------------------------------------------------------
# schedules
# ----------------------------------------------------------------------------------------


def test_rsqrt_schedule_is_t5_pretraining():
  schedule = optimizers.make_schedule_from_config(optimizers.default_optimizer_config())
  for step in (0, 1, 5000, 10000):
    assert _lr(schedule, step) == pytest.approx(0.01, rel=1e-6)
  assert _lr(schedule, 40000) == pytest.approx(0.005, rel=1e-6)
  assert _lr(schedule, 1_000_000) == pytest.approx(0.001, rel=1e-6)
  base = optimizers.make_schedule('rsqrt', learning_rate=2.0, warmup_steps=100)
  assert _lr(base, 400) == pytest.approx(2.0 / 20, rel=1e-6)


def test_constant_schedule_ignores_warmup():
  schedule = optimizers.make_schedule('constant', learning_rate=1e-3, warmup_steps=500)
  for step in (0, 499, 500, 10**6):
    assert _lr(schedule, step) == pytest.approx(1e-3)


def test_linear_schedule():
  schedule = optimizers.make_schedule('linear', learning_rate=1.0, warmup_steps=10,
                                      total_steps=110, end_learning_rate=0.1)
  expected = {0: 0.0, 5: 0.5, 10: 1.0, 60: 0.55, 110: 0.1, 500: 0.1}
  for step, lr in expected.items():
    assert _lr(schedule, step) == pytest.approx(lr, abs=1e-6), step
  no_warmup = optimizers.make_schedule('linear', learning_rate=2.0, total_steps=10)
  assert [_lr(no_warmup, s) for s in (0, 5, 10)] == pytest.approx([2.0, 1.0, 0.0])


def test_cosine_schedule():
  schedule = optimizers.make_schedule('cosine', learning_rate=1.0, warmup_steps=10,
                                      total_steps=110, end_learning_rate=0.1)
  # Cosine from 1.0 to 0.1 over steps 10..110: at the quarter point 0.1 + 0.9 * (1 + cos(pi/4))/2.
  expected = {0: 0.0, 5: 0.5, 10: 1.0, 35: 0.1 + 0.45 * (1 + math.cos(math.pi / 4)),
              60: 0.55, 110: 0.1, 500: 0.1}
  for step, lr in expected.items():
    assert _lr(schedule, step) == pytest.approx(lr, abs=1e-6), step


def test_schedule_errors():
  with pytest.raises(ValueError, match=r"schedule='exp'.*'rsqrt', 'constant', 'linear'"):
    optimizers.make_schedule('exp', learning_rate=1.0)
  with pytest.raises(ValueError, match='warmup_steps'):
    optimizers.make_schedule('rsqrt', learning_rate=1.0, warmup_steps=0)
  with pytest.raises(ValueError, match='total_steps'):
    optimizers.make_schedule('cosine', learning_rate=1.0, warmup_steps=10, total_steps=10)


# ----------------------------------------------------------------------------------------
# config
# ----------------------------------------------------------------------------------------


def test_default_config_is_t5_adafactor():
  config = optimizers.default_optimizer_config()
  assert (config.name, config.schedule, config.learning_rate, config.warmup_steps) == (
      'adafactor', 'rsqrt', 1.0, 10000)
  assert (config.decay_rate, config.clipping_threshold, config.multiply_by_parameter_scale,
          config.factored, config.min_dim_size_to_factor, config.epsilon1,
          config.epsilon2) == (0.8, 1.0, True, True, 128, 1e-30, 1e-3)


def test_make_optimizer_accepts_mappings_and_rejects_bad_fields():
  assert isinstance(optimizers.make_optimizer(optimizers.default_optimizer_config()),
                    optax.GradientTransformation)
  assert isinstance(optimizers.make_optimizer({'name': 'adamw', 'schedule': 'constant'}),
                    optax.GradientTransformation)
  with pytest.raises(ValueError, match=r"Unknown optimizer config field\(s\) \['lr'\]"):
    optimizers.make_optimizer({'lr': 1.0})
  with pytest.raises(ValueError, match=r"name='sgd'.*'adafactor', 'adamw'"):
    optimizers.make_optimizer({'name': 'sgd'})
  with pytest.raises(ValueError, match='clipping_threshold'):
    optimizers.make_optimizer({'clipping_threshold': 0.5})


# ----------------------------------------------------------------------------------------
# weight-decay mask
# ----------------------------------------------------------------------------------------

TINY = dict(vocab_size=40, d_model=16, num_heads=2, head_dim=8, d_ff=32, num_encoder_layers=2,
            num_decoder_layers=2)


@pytest.mark.parametrize('scan_layers', [False, True])
def test_weight_decay_mask_on_model_params(scan_layers):
  shapes = models.param_shapes(models.ModelConfig(**TINY, scan_layers=scan_layers))
  mask = optimizers.weight_decay_mask(shapes)
  flat = {jax.tree_util.keystr(path): value
          for path, value in jax.tree_util.tree_leaves_with_path(mask)}
  decayed = {k for k, v in flat.items() if v}
  kept = set(flat) - decayed
  assert all(k.endswith("['kernel']") or k.endswith("['embedding']") for k in decayed)
  assert all(k.endswith("['scale']") or k.endswith("['rel_embedding']") for k in kept)
  assert "['token_embedder']['embedding']" in decayed
  assert "['logits_dense']['kernel']" in decayed
  assert "['encoder_relpos']['rel_embedding']" in kept
  assert "['decoder']['final_norm']['scale']" in kept
  assert any('query' in k for k in decayed) and any('wo' in k for k in decayed)
  # Encoder: 2 norms per layer + final; decoder: 3 per layer + final. Scanned, the per-layer
  # scales are stacked into [layers, embed] arrays: excluded by name, not by ndim.
  scales = [k for k in kept if 'scale' in k]
  assert len(scales) == (7 if scan_layers else 2 * 2 + 3 * 2 + 2)
  if scan_layers:
    stacked = shapes['encoder']['layers']['pre_mlp_norm']['scale']
    assert stacked.shape == (2, 16) and not mask['encoder']['layers']['pre_mlp_norm']['scale']


def test_adamw_decays_only_masked_params():
  params = {'dense': {'kernel': jnp.full((3, 4), 2.0)}, 'norm': {'scale': jnp.full((4,), 2.0)},
            'relpos': {'rel_embedding': jnp.full((2, 3), 2.0)}, 'bias': jnp.full((4,), 2.0)}
  tx = optimizers.make_optimizer(_config(name='adamw', schedule='constant', learning_rate=0.1,
                                         weight_decay=0.5))
  zeros = jax.tree.map(jnp.zeros_like, params)
  (new,) = _apply(tx, params, [zeros])
  # Adam's own step is 0 for zero gradients, leaving the decay: p - lr * wd * p = 1.9.
  np.testing.assert_allclose(new['dense']['kernel'], 2.0 - 0.1 * 0.5 * 2.0, rtol=1e-6)
  for unchanged in (new['norm']['scale'], new['relpos']['rel_embedding'], new['bias']):
    np.testing.assert_array_equal(unchanged, 2.0)


def test_adafactor_weight_decay_is_not_scaled_by_lr():
  params = {'kernel': jnp.full((3, 4), 2.0), 'scale': jnp.full((4,), 2.0)}
  tx = optimizers.make_optimizer(_config(schedule='constant', learning_rate=0.1,
                                         weight_decay=0.01))
  (new,) = _apply(tx, params, [jax.tree.map(jnp.zeros_like, params)])
  # Zero grads: v = epsilon1, update 0; T5X's new_param = (1 - wd) * param.
  np.testing.assert_allclose(new['kernel'], 2.0 * 0.99, rtol=1e-6)
  np.testing.assert_array_equal(new['scale'], 2.0)


# ----------------------------------------------------------------------------------------
# Adafactor
# ----------------------------------------------------------------------------------------


def _factored_state(state):
  (found,) = [s for s in jax.tree.leaves(state, is_leaf=lambda s: hasattr(s, 'v_row'))
              if hasattr(s, 'v_row')]
  return found


def test_adafactor_factors_only_large_matrices():
  params = {'big': jnp.ones((256, 256)), 'tall': jnp.ones((128, 512)),
            'small': jnp.ones((64, 64)), 'thin': jnp.ones((512, 64)), 'vector': jnp.ones(300)}
  state = _factored_state(optimizers.make_optimizer(_config()).init(params))
  shapes = lambda tree: {k: v.shape for k, v in tree.items()}
  assert shapes(state.v_row) == {'big': (256,), 'tall': (128,), 'small': (1,), 'thin': (1,),
                                 'vector': (1,)}
  assert shapes(state.v_col) == {'big': (256,), 'tall': (512,), 'small': (1,), 'thin': (1,),
                                 'vector': (1,)}
  assert shapes(state.v) == {'big': (1,), 'tall': (1,), 'small': (64, 64), 'thin': (512, 64),
                             'vector': (300,)}
  unfactored = _factored_state(optimizers.make_optimizer(_config(factored=False)).init(params))
  assert unfactored.v['big'].shape == (256, 256)


def _numpy_adafactor(param, grads, lr, decay_rate=0.8, eps1=1e-30, eps2=1e-3, clip=1.0,
                     factored=False):
  """Adafactor per Shazeer & Stern (2018), Algorithms 4/5 with T5's options, in float64."""
  p = param.astype(np.float64)
  v = r = c = 0.0
  for t, g in enumerate(grads, start=1):
    g = g.astype(np.float64)
    beta2 = 1.0 - t ** -decay_rate
    g2 = g * g + eps1
    if factored:  # rows and columns of a 2-D param; V ~ outer(R, C) / sum(R)
      r = beta2 * r + (1 - beta2) * g2.mean(axis=1)
      c = beta2 * c + (1 - beta2) * g2.mean(axis=0)
      v_hat = np.outer(r, c) / r.mean()
    else:
      v = v_hat = beta2 * v + (1 - beta2) * g2
    u = g / np.sqrt(v_hat)
    u = u / max(1.0, np.sqrt(np.mean(u * u)) / clip)
    p = p - lr * max(np.sqrt(np.mean(p * p)), eps2) * u
  return p


@pytest.mark.parametrize('shape, factored', [((4, 6), False), ((128, 160), True)])
def test_adafactor_matches_numpy_reference(shape, factored):
  rng = np.random.default_rng(0)
  param = rng.normal(size=shape).astype(np.float32) * 0.05
  grads = [rng.normal(size=shape).astype(np.float32) * s for s in (1.0, 30.0, 0.1)]
  lr = 0.01
  tx = optimizers.make_optimizer(_config(schedule='constant', learning_rate=lr))
  got = _apply(tx, {'w': jnp.asarray(param)}, [{'w': jnp.asarray(g)} for g in grads])[-1]['w']
  expected = _numpy_adafactor(param, grads, lr, factored=factored)
  np.testing.assert_allclose(got, expected, rtol=2e-5, atol=1e-7)


def test_adafactor_equals_optax_adafactor_with_default_epsilon2():
  rng = np.random.default_rng(1)
  params = {'m': jnp.asarray(rng.normal(size=(130, 140)), jnp.float32),
            'v': jnp.asarray(rng.normal(size=(7,)), jnp.float32)}
  grads = [jax.tree.map(lambda p, s=s: p * s + 0.1, params) for s in (1.0, -2.0, 0.5)]
  ours = _apply(optimizers.make_optimizer(_config(schedule='constant', learning_rate=0.02)),
                params, grads)[-1]
  theirs = _apply(optax.adafactor(0.02), params, grads)[-1]
  for key in params:
    np.testing.assert_allclose(ours[key], theirs[key], rtol=1e-6, atol=1e-7)


def test_adafactor_second_moment_decay_is_one_minus_t_to_the_minus_0_8():
  # Unfactored, no clipping or parameter scale, lr 1: the update is -g / sqrt(v_t), so v_t can
  # be read back; grads 1 then 0 give v_2 = beta2_2 * 1 with beta2_2 = 1 - 2^-0.8.
  params = {'w': jnp.zeros(3)}
  tx = optimizers.make_optimizer(_config(
      schedule='constant', learning_rate=1.0, clipping_threshold=0.0,
      multiply_by_parameter_scale=False, epsilon1=0.0))
  state = tx.init(params)
  _, state = tx.update({'w': jnp.ones(3)}, state, params)
  assert float(_factored_state(state).v['w'][0]) == pytest.approx(1.0)  # beta2_1 = 0
  _, state = tx.update({'w': jnp.zeros(3)}, state, params)
  assert float(_factored_state(state).v['w'][0]) == pytest.approx(1 - 2 ** -0.8, rel=1e-6)
  _, state = tx.update({'w': jnp.zeros(3)}, state, params)
  assert float(_factored_state(state).v['w'][0]) == pytest.approx(
      (1 - 2 ** -0.8) * (1 - 3 ** -0.8), rel=1e-6)


def test_adafactor_update_clipping():
  # A step-1 gradient of ones then a 1000x larger one: y = g / sqrt(v) has RMS
  # 1000 / sqrt(beta2 + (1 - beta2) 1000^2) ~ 1.32, clipped to 1 (the lr then scales it).
  params = {'w': jnp.zeros((4, 4))}
  grads = [{'w': jnp.ones((4, 4))}, {'w': jnp.full((4, 4), 1000.0)}]
  rms = lambda x: float(jnp.sqrt(jnp.mean(jnp.square(x))))
  common = dict(schedule='constant', learning_rate=1.0, multiply_by_parameter_scale=False)
  clipped = _apply(optimizers.make_optimizer(_config(**common)), params, grads)
  assert rms(clipped[1]['w'] - clipped[0]['w']) == pytest.approx(1.0, rel=1e-6)
  free = _apply(optimizers.make_optimizer(_config(**common, clipping_threshold=0.0)), params,
                grads)
  beta2 = 1 - 2 ** -0.8
  assert rms(free[1]['w'] - free[0]['w']) == pytest.approx(
      1000 / math.sqrt(beta2 + (1 - beta2) * 1000 ** 2), rel=1e-5)


# ----------------------------------------------------------------------------------------
# global-norm clipping
# ----------------------------------------------------------------------------------------


def test_global_norm_clipping_bounds_a_huge_gradient():
  # eps=1 makes AdamW's first step g / (|g| + 1) depend on the gradient's scale.
  params = {'a': jnp.zeros((2, 3)), 'b': jnp.zeros(4)}
  huge = {'a': jnp.full((2, 3), 1e6), 'b': jnp.arange(4.0) * 1e6}
  common = dict(name='adamw', schedule='constant', learning_rate=1.0, eps=1.0)
  (clipped,) = _apply(optimizers.make_optimizer(_config(**common, grad_clip_norm=1.0)),
                      params, [huge])
  norm = float(optax.tree.norm(huge))
  rescaled = jax.tree.map(lambda g: g / norm, huge)
  (expected,) = _apply(optimizers.make_optimizer(_config(**common)), params, [rescaled])
  for key in params:
    np.testing.assert_allclose(clipped[key], expected[key], rtol=1e-5, atol=1e-7)
  # |update| = |g_c| / (|g_c| + 1) with |g_c| <= 1: at most 1/2 everywhere.
  assert max(float(jnp.abs(x).max()) for x in jax.tree.leaves(clipped)) <= 0.5
  (unclipped,) = _apply(optimizers.make_optimizer(_config(**common)), params, [huge])
  assert float(jnp.abs(unclipped['b']).max()) > 0.99


# ----------------------------------------------------------------------------------------
# a few training steps
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize('fields', [
    dict(schedule='constant', learning_rate=0.01),
    dict(name='adamw', schedule='cosine', learning_rate=3e-3, warmup_steps=2, total_steps=10,
         weight_decay=0.01, grad_clip_norm=1.0),
], ids=['adafactor', 'adamw'])
def test_optimizers_reduce_loss_on_tiny_model(fields):
  config = models.ModelConfig(architecture='decoder_only', vocab_size=32, d_model=16,
                              num_heads=2, head_dim=8, d_ff=32, num_decoder_layers=1,
                              position_embedding='rope')
  model = models.build_model(config)
  params = jax.jit(models.init_params, static_argnums=0)(config, jax.random.key(0))
  rng = np.random.default_rng(0)
  batch = {'decoder_input_tokens': jnp.asarray(rng.integers(2, 32, (4, 6))),
           'decoder_target_tokens': jnp.asarray(rng.integers(2, 32, (4, 6)))}
  tx = optimizers.make_optimizer(_config(**fields))

  def loss_fn(params):
    logits = model.apply({'params': params}, **batch)
    return losses.cross_entropy_with_z_loss(
        logits, batch['decoder_target_tokens'], batch['decoder_target_tokens'] > 0,
        loss_normalizing_factor='NUM_REAL_TARGET_TOKENS')[0]

  @jax.jit
  def step(params, state):
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  state = tx.init(params)
  history = []
  for _ in range(10):
    params, state, loss = step(params, state)
    history.append(float(loss))
  assert all(np.isfinite(history))
  assert history[-1] < history[0] - 0.1, history
