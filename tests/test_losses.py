"""Tests for t5x_lite.losses: hand-computed losses, torch cross-checks, normalisation variants,
gradients against the naive formula, metrics and the FLOPs formula."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from t5x_lite import losses, models

# One sequence, two tokens, three classes. Token 0: logits (1, 2, 3), target 2;
# token 1: logits (0, 0, 0), target 0.
LOGITS = np.array([[[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]]], np.float32)
TARGETS = np.array([[2, 0]], np.int32)
# log Z: log(e + e^2 + e^3) and log 3; per-token losses log Z - logit[target].
LOG_Z = (3.40760596444438, math.log(3.0))
TOKEN_LOSSES = (0.40760596444438013, 1.0986122886681098)


def _loss(logits=LOGITS, targets=TARGETS, weights=None, **kw):
  kw.setdefault('z_loss', 0.0)
  loss, z = losses.cross_entropy_with_z_loss(jnp.asarray(logits), jnp.asarray(targets),
                                             weights, **kw)
  return float(loss), float(z)


def _naive_per_token(logits, targets, label_smoothing, z_loss):
  """T5X's formula written out with dense soft targets."""
  vocab = logits.shape[-1]
  confidence = 1.0 - label_smoothing
  low = label_smoothing / (vocab - 1)
  soft = jax.nn.one_hot(targets, vocab) * (confidence - low) + low
  entropy = -(confidence * jnp.log(confidence) + (vocab - 1) * low * jnp.log(low + 1e-20))
  log_z = jax.scipy.special.logsumexp(logits, axis=-1)
  ce = -jnp.sum(soft * (logits - log_z[..., None]), axis=-1) - entropy
  return ce + z_loss * log_z ** 2


# ----------------------------------------------------------------------------------------
# cross_entropy_with_z_loss
# ----------------------------------------------------------------------------------------


def test_plain_cross_entropy_matches_hand_values_and_torch():
  loss, z = _loss()
  assert loss == pytest.approx(sum(TOKEN_LOSSES), rel=1e-6)  # 1.50621825...
  assert z == 0.0
  expected = torch.nn.functional.cross_entropy(
      torch.tensor(LOGITS[0]), torch.tensor(TARGETS[0], dtype=torch.long), reduction='sum')
  assert loss == pytest.approx(float(expected), rel=1e-6)


def test_z_loss_value_and_inclusion():
  loss, z = _loss(z_loss=1e-4)
  expected_z = 1e-4 * (LOG_Z[0] ** 2 + LOG_Z[1] ** 2)  # 0.00128187...
  assert z == pytest.approx(expected_z, rel=1e-5)
  assert loss == pytest.approx(sum(TOKEN_LOSSES) + expected_z, rel=1e-6)


def test_default_z_loss_is_1e_4():
  loss, z = losses.cross_entropy_with_z_loss(jnp.asarray(LOGITS), jnp.asarray(TARGETS))
  assert float(z) == pytest.approx(1e-4 * (LOG_Z[0] ** 2 + LOG_Z[1] ** 2), rel=1e-5)


def test_label_smoothing_hand_value():
  # Token 0 with smoothing 0.1 over V = 3: confidence 0.9 on the target, 0.05 elsewhere.
  lp = np.array([1.0, 2.0, 3.0]) - LOG_Z[0]
  ce = -(0.9 * lp[2] + 0.05 * (lp[0] + lp[1]))  # 0.55760596...
  entropy = -(0.9 * math.log(0.9) + 2 * 0.05 * math.log(0.05))  # 0.39439769...
  loss, _ = _loss(LOGITS[:, :1], TARGETS[:, :1], label_smoothing=0.1)
  assert loss == pytest.approx(ce - entropy, rel=1e-5)  # 0.16320827...
  assert ce - entropy == pytest.approx(0.1632082729969374, rel=1e-9)


def test_label_smoothing_matches_torch_after_convention_mapping():
  # torch spreads e over all V classes: target 1 - e + e/V, others e/V. That is T5X's
  # smoothing s = e (V - 1) / V; T5X then subtracts the soft targets' entropy.
  rng = np.random.default_rng(0)
  vocab, eps = 7, 0.2
  logits = rng.normal(size=(2, 5, vocab)).astype(np.float32) * 3
  targets = rng.integers(0, vocab, size=(2, 5)).astype(np.int32)
  smoothing = eps * (vocab - 1) / vocab
  confidence, low = 1 - smoothing, smoothing / (vocab - 1)
  entropy = -(confidence * math.log(confidence) + (vocab - 1) * low * math.log(low))
  ours, _ = _loss(logits, targets, label_smoothing=smoothing)
  theirs = torch.nn.functional.cross_entropy(
      torch.tensor(logits.reshape(-1, vocab)), torch.tensor(targets.reshape(-1)).long(),
      label_smoothing=eps, reduction='sum')
  assert ours == pytest.approx(float(theirs) - targets.size * entropy, rel=1e-5)


def test_perfect_soft_prediction_costs_zero():
  vocab, smoothing = 5, 0.3
  soft = np.full(vocab, smoothing / (vocab - 1))
  soft[3] = 1 - smoothing
  logits = np.log(soft)[None, None].astype(np.float32)
  loss, _ = _loss(logits, np.array([[3]]), label_smoothing=smoothing)
  assert loss == pytest.approx(0.0, abs=1e-6)


def test_invalid_label_smoothing():
  with pytest.raises(ValueError, match='label_smoothing'):
    _loss(label_smoothing=1.0)


def test_padding_weights_exclude_tokens_from_loss_and_gradient():
  weights = jnp.array([[1.0, 0.0]])
  loss, z = _loss(weights=weights, z_loss=1e-4)
  assert loss == pytest.approx(TOKEN_LOSSES[0] + 1e-4 * LOG_Z[0] ** 2, rel=1e-6)
  assert z == pytest.approx(1e-4 * LOG_Z[0] ** 2, rel=1e-5)
  other = LOGITS.copy()
  other[0, 1] = [5.0, -3.0, 9.0]
  assert _loss(other, weights=weights, z_loss=1e-4)[0] == pytest.approx(loss, rel=1e-6)
  grad = jax.grad(lambda x: losses.cross_entropy_with_z_loss(x, TARGETS, weights)[0])(
      jnp.asarray(LOGITS))
  np.testing.assert_array_equal(np.asarray(grad[0, 1]), 0.0)
  assert np.abs(np.asarray(grad[0, 0])).sum() > 0


def test_weights_none_counts_every_position():
  # T5X: no weights means every position (padding id or not) weighs 1.
  assert _loss(targets=np.array([[2, 0]]))[0] == pytest.approx(sum(TOKEN_LOSSES), rel=1e-6)


# ----------------------------------------------------------------------------------------
# loss normalisation
# ----------------------------------------------------------------------------------------

BATCH_LOGITS = np.random.default_rng(1).normal(size=(2, 4, 6)).astype(np.float32)
BATCH_TARGETS = np.array([[3, 1, 4, 0], [5, 0, 0, 0]], np.int32)
BATCH_WEIGHTS = (BATCH_TARGETS > 0).astype(np.float32)


def _token_losses():
  lp = BATCH_LOGITS - np.log(np.exp(BATCH_LOGITS.astype(np.float64)).sum(-1, keepdims=True))
  return -np.take_along_axis(lp, BATCH_TARGETS[..., None], -1)[..., 0]


def _batch_loss(factor, **kw):
  return _loss(BATCH_LOGITS, BATCH_TARGETS, BATCH_WEIGHTS, loss_normalizing_factor=factor,
               **kw)[0]


def test_normalization_none_is_the_weighted_sum():
  expected = (_token_losses() * BATCH_WEIGHTS).sum()
  assert _batch_loss(None) == pytest.approx(expected, rel=1e-5)
  assert _batch_loss('none') == pytest.approx(expected, rel=1e-5)


def test_normalization_fixed_factor():
  expected = (_token_losses() * BATCH_WEIGHTS).sum() / 8.0
  assert _batch_loss(8.0) == pytest.approx(expected, rel=1e-5)
  assert _batch_loss(8) == pytest.approx(expected, rel=1e-5)
  assert _batch_loss('8') == pytest.approx(expected, rel=1e-5)


def test_normalization_per_real_token_and_total_tokens():
  total = (_token_losses() * BATCH_WEIGHTS).sum()
  assert _batch_loss('NUM_REAL_TARGET_TOKENS') == pytest.approx(total / 4, rel=1e-5)
  assert _batch_loss('num_real_target_tokens') == pytest.approx(total / 4, rel=1e-5)
  assert _batch_loss('NUM_TOTAL_TARGET_TOKENS') == pytest.approx(total / 8, rel=1e-5)


def test_normalization_average_per_sequence():
  per_token = _token_losses()
  row_means = [per_token[0, :3].mean(), per_token[1, :1].mean()]
  assert _batch_loss('AVERAGE_PER_SEQUENCE') == pytest.approx(np.mean(row_means), rel=1e-5)


def test_normalization_average_per_sequence_packed():
  # Row 0 packs two sequences (tokens 0-1 and 2); row 1 holds one sequence of one token.
  segments = np.array([[1, 1, 2, 0], [1, 0, 0, 0]], np.int32)
  per_token = _token_losses()
  means = [per_token[0, :2].mean(), per_token[0, 2], per_token[1, 0]]
  got = _batch_loss('AVERAGE_PER_SEQUENCE', segment_ids=jnp.asarray(segments))
  assert got == pytest.approx(np.mean(means), rel=1e-5)


def test_special_normalization_without_weights_uses_nonzero_targets():
  total = (_token_losses() * BATCH_WEIGHTS).sum()
  got = _loss(BATCH_LOGITS, BATCH_TARGETS, None, loss_normalizing_factor='NUM_REAL_TARGET_TOKENS')
  assert got[0] == pytest.approx(total / 4, rel=1e-5)


def test_all_padding_gives_zero_not_nan():
  zeros = np.zeros_like(BATCH_WEIGHTS)
  for factor in ('NUM_REAL_TARGET_TOKENS', 'AVERAGE_PER_SEQUENCE'):
    loss, z = _loss(BATCH_LOGITS, BATCH_TARGETS, zeros, loss_normalizing_factor=factor)
    assert (loss, z) == (0.0, 0.0)


@pytest.mark.parametrize('factor', ['bogus', -1.0, 0, True])
def test_invalid_normalizing_factor(factor):
  with pytest.raises(ValueError, match='loss_normalizing_factor'):
    losses.normalize_weights(BATCH_WEIGHTS, factor)


def test_normalized_weights_make_microbatch_sums_exact():
  # What a trainer does with microbatches: normalise the whole batch's weights once, then sum
  # unnormalised losses of each half.
  weights = losses.normalize_weights(BATCH_WEIGHTS, 'NUM_REAL_TARGET_TOKENS')
  halves = sum(
      losses.cross_entropy_with_z_loss(BATCH_LOGITS[i:i + 1], BATCH_TARGETS[i:i + 1],
                                       weights[i:i + 1], loss_normalizing_factor=None)[0]
      for i in range(2))
  whole = losses.cross_entropy_with_z_loss(BATCH_LOGITS, BATCH_TARGETS, BATCH_WEIGHTS,
                                           loss_normalizing_factor='NUM_REAL_TARGET_TOKENS')[0]
  assert float(halves) == pytest.approx(float(whole), rel=1e-6)


# ----------------------------------------------------------------------------------------
# gradients
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize('label_smoothing', [0.0, 0.1])
def test_gradient_matches_naive_formula(label_smoothing):
  rng = np.random.default_rng(2)
  logits = jnp.asarray(rng.normal(size=(2, 3, 11)) * 20 + 15, jnp.float32)  # large log Z
  targets = jnp.asarray(rng.integers(0, 11, size=(2, 3)))
  weights = jnp.asarray([[1.0, 1.0, 0.0], [1.0, 0.5, 1.0]])
  z_loss = 1e-2

  def ours(x):
    return losses.cross_entropy_with_z_loss(x, targets, weights, label_smoothing=label_smoothing,
                                            z_loss=z_loss)[0]

  def naive(x):
    return jnp.sum(_naive_per_token(x, targets, label_smoothing, z_loss) * weights)

  assert float(ours(logits)) == pytest.approx(float(naive(logits)), rel=1e-5)
  np.testing.assert_allclose(jax.grad(ours)(logits), jax.grad(naive)(logits),
                             rtol=1e-4, atol=1e-6)
  # T5X's custom VJP: ((1 + 2 z log Z) softmax - soft targets) * weight.
  vocab = logits.shape[-1]
  low = label_smoothing / (vocab - 1)
  soft = jax.nn.one_hot(targets, vocab) * (1 - label_smoothing - low) + low
  log_z = jax.scipy.special.logsumexp(logits, axis=-1, keepdims=True)
  t5x = ((1 + 2 * z_loss * log_z) * jax.nn.softmax(logits) - soft) * weights[..., None]
  np.testing.assert_allclose(jax.grad(ours)(logits), t5x, rtol=1e-4, atol=1e-6)


def test_returned_z_loss_carries_no_gradient():
  grad = jax.grad(lambda x: losses.cross_entropy_with_z_loss(x, TARGETS, z_loss=1e-2)[1])(
      jnp.asarray(LOGITS))
  np.testing.assert_array_equal(np.asarray(grad), 0.0)


def test_bfloat16_logits_are_computed_in_float32():
  loss, _ = losses.cross_entropy_with_z_loss(jnp.asarray(LOGITS, jnp.bfloat16), TARGETS,
                                             z_loss=0.0)
  assert loss.dtype == jnp.float32
  assert float(loss) == pytest.approx(sum(TOKEN_LOSSES), rel=1e-6)


# ----------------------------------------------------------------------------------------
# metrics
# ----------------------------------------------------------------------------------------


def test_compute_metrics_accuracy_is_weighted():
  # argmax per position: 2 (hit), 0 (ties pick index 0: hit); row 2 misses then is padding.
  logits = np.array([[[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]],
                     [[5.0, 0.0, 0.0], [0.0, 9.0, 0.0]]], np.float32)
  targets = np.array([[2, 0], [1, 1]])
  weights = np.array([[1.0, 1.0], [1.0, 0.0]], np.float32)
  metrics = losses.compute_metrics(logits, targets, weights, jnp.float32(3.0),
                                   jnp.float32(0.5))
  assert set(metrics) == {'loss', 'z_loss', 'cross_ent_loss', 'accuracy', 'num_tokens'}
  assert float(metrics['accuracy']) == pytest.approx(2 / 3)
  assert float(metrics['num_tokens']) == 3
  assert float(metrics['cross_ent_loss']) == pytest.approx(2.5)
  half = losses.compute_metrics(logits, targets, weights * [[1.0, 0.5], [1.0, 1.0]],
                                jnp.float32(0.0), jnp.float32(0.0))
  assert float(half['accuracy']) == pytest.approx(1.5 / 2.5)


def test_metric_sums_add_over_microbatches():
  logits = jnp.asarray(BATCH_LOGITS)
  whole = losses.metric_sums(logits, BATCH_TARGETS, BATCH_WEIGHTS)
  parts = [losses.metric_sums(logits[i:i + 1], BATCH_TARGETS[i:i + 1], BATCH_WEIGHTS[i:i + 1])
           for i in range(2)]
  for key in whole:
    assert float(whole[key]) == pytest.approx(float(parts[0][key] + parts[1][key]))
  final = losses.finalize_metrics(dict(whole, loss=1.0, z_loss=0.25, extra=7))
  assert final['extra'] == 7 and float(final['cross_ent_loss']) == 0.75
  no_tokens = losses.finalize_metrics(
      losses.metric_sums(logits, BATCH_TARGETS, np.zeros_like(BATCH_WEIGHTS)) |
      {'loss': 0.0, 'z_loss': 0.0})
  assert float(no_tokens['accuracy']) == 0.0


def test_global_norm():
  tree = {'a': jnp.full((3, 4), 1.0), 'b': [jnp.arange(5.0)], 'c': jnp.ones(2, jnp.bfloat16)}
  expected = math.sqrt(12 + (0 + 1 + 4 + 9 + 16) + 2)
  assert float(losses.global_norm(tree)) == pytest.approx(expected, rel=1e-6)
  assert float(losses.global_norm(tree)) == pytest.approx(
      float(optax.tree.norm(jax.tree.map(lambda x: x.astype(jnp.float32), tree))), rel=1e-6)


# ----------------------------------------------------------------------------------------
# FLOPs and MFU
# ----------------------------------------------------------------------------------------


def test_flops_decoder_only_by_hand():
  config = models.ModelConfig(
      architecture='decoder_only', vocab_size=10, d_model=8, num_heads=2, num_kv_heads=1,
      head_dim=4, d_ff=16, num_decoder_layers=2, activations=('silu', 'linear'),
      position_embedding='rope')
  # Per layer: MLP 8*16*3 = 384, q 8*2*4 = 64, k+v 8*2*1*4 = 64, out 64 -> 576; two layers
  # 1152, plus logits 8*10 = 80 -> 1232 weights, x6 = 7392. Causal attention per token:
  # 3 (fwd+bwd) * 4 * S * H * D / 2 per layer = 6 * 2 layers * 6 * 2 * 4 = 576.
  assert losses.model_flops_per_token(config, 6) == 7392 + 576


def test_flops_decoder_only_weights_are_six_times_matmul_params():
  config = models.ModelConfig(
      architecture='decoder_only', vocab_size=50, d_model=16, num_heads=4, num_kv_heads=2,
      head_dim=4, d_ff=24, num_decoder_layers=3, activations=('silu', 'linear'),
      position_embedding='rope')
  shapes = models.param_shapes(config)
  kernels = sum(int(np.prod(x.shape)) for path, x in jax.tree_util.tree_leaves_with_path(shapes)
                if path[-1].key == 'kernel')  # untied logits kernel included, no embedding
  s = 32
  attention = 3 * config.num_decoder_layers * 4 * s * config.num_heads * config.head_dim / 2
  assert losses.model_flops_per_token(config, s) == pytest.approx(6 * kernels + attention)


def test_flops_encoder_decoder_by_hand():
  config = models.ModelConfig(
      vocab_size=10, d_model=8, num_heads=2, head_dim=4, d_ff=16, num_encoder_layers=1,
      num_decoder_layers=1, activations=('relu',))
  # Per layer: MLP 8*16*2 = 256, q 64, k+v 128, out 64 (512 in all). Inputs 6, targets 3.
  encoder = 6 * 512 * 6 + 3 * 4 * 2 * 4 * 6 * 6  # weights 18432, bidirectional attn 3456
  self_attn = 6 * 512 * 3 + 3 * 4 * 2 * 4 * 3 * 3 / 2  # 9216 + causal 432
  cross = 6 * (64 + 64) * 3 + 6 * 128 * 6 + 3 * 4 * 2 * 4 * 3 * 6  # 2304 + 4608 + 1728
  logits = 6 * 80 * 3  # 1440
  expected = (encoder + self_attn + cross + logits) / 3  # 41616 / 3
  assert expected == 13872
  assert losses.model_flops_per_token(config, 6, 3) == expected
  assert losses.model_flops_per_token(config, 6) == losses.model_flops_per_token(config, 6, 6)


def test_mfu():
  assert losses.mfu(1000.0, 1e9, 1e12, 2) == pytest.approx(0.5)
  assert losses.mfu(1000.0, 1e9, 0.0, 2) == 0.0
