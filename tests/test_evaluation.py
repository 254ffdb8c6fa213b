"""Tests for t5x_lite.evaluation on tiny models with random params.

Scores are checked against a log-softmax of the model's full forward pass, rank
classification against a model made uniform (where the shortest answer must win) and against
direct scoring, and cached decoding against teacher-forced argmaxes of the same model.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5x_lite import decoding, evaluation, models, partitioning
from t5x_lite.data import tasks

LENGTHS = {'inputs': 12, 'targets': 8}


def _forward(model, params, features):
  """The model's full teacher-forced logits (jitted: eager flax dispatch is slow)."""
  inputs = {k: v for k, v in features.items() if k != 'decoder_loss_weights'}
  return np.asarray(jax.jit(lambda p, x: model.apply({'params': p}, **x))(params, inputs))


def _init(model_config, seed):
  return models.init_params(model_config, jax.random.key(seed))


def tiny(architecture: str, **fields) -> models.ModelConfig:
  base = dict(vocab_size=8192, d_model=32, num_heads=4, head_dim=8, d_ff=64,
              num_encoder_layers=2, num_decoder_layers=2)
  if architecture == 'decoder_only':
    base.update(architecture='decoder_only', position_embedding='rope', num_kv_heads=2,
                scale_attention_logits=True)
  return models.ModelConfig(**{**base, **fields})


@pytest.fixture(scope='module', params=['encoder_decoder', 'decoder_only'])
def family(request):
  model_config = tiny(request.param)
  model = models.build_model(model_config)
  params = _init(model_config, 1)
  builder = evaluation.FeatureBuilder(request.param, LENGTHS)
  return model, params, builder


def _examples(rng, n, vocab=50):
  """Token examples of varying lengths, EOS (1) ending the targets."""
  return [{'inputs': rng.integers(3, vocab, rng.integers(2, 10)).astype(np.int32),
           'targets': np.append(rng.integers(3, vocab, rng.integers(1, 6)), 1).astype(np.int32)}
          for _ in range(n)]


def _stack(features):
  return {k: np.stack([f[k] for f in features]) for k in features[0]}


# ------------------------------------------------------------------------------ scoring


def test_score_batch_is_the_sum_of_target_log_probs(family):
  model, params, builder = family
  examples = _examples(np.random.default_rng(0), 3)
  batch = _stack([builder.score_features(e) for e in examples])
  scores = evaluation.score_batch(model, params, batch)

  logits = _forward(model, params, batch).astype(np.float64)
  log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  for row, example in enumerate(examples):
    # The targets sit after the inputs in a prefix-LM row; each is predicted one step early.
    offset = 0 if builder.architecture == 'encoder_decoder' else len(example['inputs'])
    expected = sum(log_probs[row, offset + i, token]
                   for i, token in enumerate(example['targets']))
    np.testing.assert_allclose(scores[row], expected, rtol=1e-5)


def test_rank_classification_of_a_uniform_model_prefers_the_shortest_answer(family):
  model, params, builder = family
  # Zero output projection: every token has probability 1/vocab, so a candidate of n tokens
  # scores exactly -n log(vocab).
  uniform = dict(params, logits_dense={'kernel': jnp.zeros_like(params['logits_dense']['kernel'])})
  examples = _examples(np.random.default_rng(1), 3)
  candidates = [[np.array([5, 6, 1]), np.array([7, 1]), np.array([4, 4, 4, 1])],
                [np.array([9, 9, 9, 9, 1]), np.array([3, 3, 1]), np.array([8, 1])],
                [np.array([1]), np.array([3, 1]), np.array([3, 3, 1])]]
  choices, scores = evaluation.rank_classification(model, uniform, builder, examples,
                                                   candidates, batch_size=4)
  np.testing.assert_array_equal(choices, [1, 2, 0])
  lengths = np.array([[len(c) for c in row] for row in candidates])
  np.testing.assert_allclose(scores, -lengths * math.log(8192), rtol=1e-5)


def test_rank_classification_matches_direct_scores(family):
  model, params, builder = family
  examples = _examples(np.random.default_rng(2), 5)
  labels = [np.array([11, 1]), np.array([12, 13, 1]), np.array([14, 1])]
  choices, scores = evaluation.rank_classification(
      model, params, builder, examples, [labels] * len(examples), batch_size=4)
  for row, example in enumerate(examples):
    direct = evaluation.score_batch(model, params, _stack(
        [builder.score_features({'inputs': example['inputs'], 'targets': t}) for t in labels]))
    np.testing.assert_allclose(scores[row], direct, rtol=1e-5)
  np.testing.assert_array_equal(choices, scores.argmax(1))


def test_rank_classification_rejects_ragged_candidates(family):
  model, params, builder = family
  examples = _examples(np.random.default_rng(3), 2)
  with pytest.raises(ValueError, match='same non-zero number of candidates'):
    evaluation.rank_classification(model, params, builder, examples,
                                   [[np.array([1])], [np.array([1]), np.array([2, 1])]])


# ----------------------------------------------------------------------------- decoding


def _teacher_forced_argmax(model, params, builder, examples, sequences):
  """The model's argmax at each generated position, from one full forward pass."""
  logits = _forward(model, params, _stack([
      builder.score_features({'inputs': e['inputs'], 'targets': s})
      for e, s in zip(examples, sequences)]))
  offsets = [0 if builder.architecture == 'encoder_decoder' else len(e['inputs'])
             for e in examples]
  return np.stack([logits[i, o:o + sequences.shape[1]].argmax(-1)
                   for i, o in enumerate(offsets)])


def test_greedy_decoding_matches_teacher_forced_argmax(family):
  model, params, builder = family
  # Decoder-only: the prefix-LM's prompt is prefilled bidirectionally, as scored.
  examples = _examples(np.random.default_rng(4), 3)
  config = decoding.DecodeConfig(method='greedy', max_decode_length=6)
  batch = _stack([builder.predict_features(e) for e in examples])
  sequences, _ = evaluation.predict_batch(model, params, batch, config)
  assert sequences.shape == (3, 1, 6)
  sequences = sequences[:, 0]
  argmax = _teacher_forced_argmax(model, params, builder, examples, sequences)
  up_to_eos = np.cumsum(sequences == 1, axis=1) - (sequences == 1) == 0
  np.testing.assert_array_equal(np.where(up_to_eos, argmax, 0), sequences)


@pytest.mark.parametrize('bidirectional_prefix, position_embedding, scan_layers', [
    (True, 'rope', False), (True, 'relative', True), (False, 'relative', False)])
def test_decoder_only_decoding_equals_a_forward_pass_of_prompt_plus_output(
    bidirectional_prefix, position_embedding, scan_layers):
  # Built by hand, not by the converters: [start, inputs..., output[:-1]] in one forward pass,
  # the start and inputs attending both ways (prefix-LM) or causally (causal LM).
  model_config = tiny('decoder_only', position_embedding=position_embedding,
                      scan_layers=scan_layers)
  model, params = models.build_model(model_config), _init(model_config, 5)
  builder = evaluation.FeatureBuilder('decoder_only', LENGTHS, bidirectional_prefix)
  examples = _examples(np.random.default_rng(7), 3)
  batch = _stack([builder.predict_features(e) for e in examples])
  sequences, scores = evaluation.predict_batch(
      model, params, batch, decoding.DecodeConfig(method='greedy', max_decode_length=5))
  forward = jax.jit(lambda tokens, prefix: model.apply(
      {'params': params}, tokens, decoder_causal_attention=prefix))
  for example, output, score in zip(examples, sequences[:, 0], scores[:, 0]):
    output = output[:np.argmax(output == 1) + 1] if 1 in output else output
    tokens = np.concatenate([[0], example['inputs'], output[:-1]])[None]
    prompt_length = len(example['inputs']) + 1
    prefix = (np.arange(tokens.shape[1]) < prompt_length)[None].astype(np.int32)
    log_probs = jax.nn.log_softmax(forward(tokens, prefix if bidirectional_prefix else None))
    predicted = np.asarray(log_probs[0, prompt_length - 1:])
    np.testing.assert_array_equal(predicted.argmax(-1), output)
    np.testing.assert_allclose(score, predicted[np.arange(len(output)), output].sum(),
                               rtol=1e-4)
    if bidirectional_prefix:  # the prefill matters: a causal prompt scores otherwise
      causal = jax.nn.log_softmax(forward(tokens, None))[0, prompt_length - 1]
      assert abs(float(causal[output[0]]) - float(predicted[0, output[0]])) > 1e-3


def test_vocab_limit_keeps_padded_ids_out():
  model_config = tiny('encoder_decoder')
  model = models.build_model(model_config)
  params = _init(model_config, 1)
  builder = evaluation.FeatureBuilder('encoder_decoder', LENGTHS)
  # Make the padded ids (>= 8100, the shipped vocabulary's size) the likeliest.
  kernel = params['logits_dense']['kernel']
  skewed = dict(params, logits_dense={'kernel': kernel.at[:, 8100:].add(50.0 * jnp.sign(
      kernel[:, 8100:]))})
  batch = _stack([builder.predict_features(e)
                  for e in _examples(np.random.default_rng(5), 2)])
  config = decoding.DecodeConfig(method='greedy', max_decode_length=4)
  unlimited, _ = evaluation.predict_batch(model, skewed, batch, config)
  limited, _ = evaluation.predict_batch(model, skewed, batch, config, vocab_limit=8100)
  assert (unlimited >= 8100).any() and (limited < 8100).all()


def test_sharded_beam_search_matches_unsharded():
  # Beam search reorders the cache, including the encoder tokens that ride in it.
  model_config = tiny('encoder_decoder')
  model = models.build_model(model_config)
  params = _init(model_config, 1)
  builder = evaluation.FeatureBuilder('encoder_decoder', LENGTHS)
  partitioner = partitioning.Partitioner(partitioning.make_mesh((4, 2, 1)))
  batch = _stack([builder.predict_features(e)
                  for e in _examples(np.random.default_rng(6), 8)])
  config = decoding.DecodeConfig(method='beam', max_decode_length=5, num_beams=2)
  single = evaluation.predict_batch(model, params, batch, config)
  sharded = evaluation.predict_batch(model, params, batch, config, partitioner=partitioner)
  np.testing.assert_array_equal(sharded[0], single[0])
  np.testing.assert_allclose(sharded[1], single[1], rtol=1e-4)


# ---------------------------------------------------------------------------- evaluator


def test_evaluator_on_translate_en_de():
  model_config = tiny('encoder_decoder')
  model = models.build_model(model_config)
  params = _init(model_config, 2)
  evaluator = evaluation.Evaluator(
      tasks.get('translate_en_de'), 'validation', model, feature_lengths=LENGTHS,
      batch_size=4, num_examples=5,
      decode_config=decoding.DecodeConfig(method='greedy', max_decode_length=6))
  result = evaluator.evaluate(params)
  assert set(result.metrics) == {'bleu'} and math.isfinite(result.metrics['bleu'])
  assert len(result.rows) == 5  # the padded last batch counts its real example once
  source = tasks.get('translate_en_de').source('validation')
  for i, row in enumerate(result.rows):
    assert row['input'] == f"translate English to German: {source[i]['en']}"
    assert row['target'] == source[i]['de']
    assert isinstance(row['prediction'], str) and row['prediction']
  scores = evaluator.score(params)
  assert scores.shape == (5,) and np.all(np.isfinite(scores)) and np.all(scores < 0)


def test_evaluator_counts_inputs_it_cuts(caplog):
  model = models.build_model(tiny('encoder_decoder'))
  examples = evaluation.load_examples(tasks.get('translate_en_de'), 'validation', 5)
  over = sum(len(e['inputs']) > 12 for e in examples)
  assert 0 < over < 5
  with caplog.at_level('WARNING'):
    evaluation.Evaluator(
        tasks.get('translate_en_de'), 'validation', model, batch_size=4, num_examples=5,
        feature_lengths={'inputs': 12, 'targets': 8},
        decode_config=decoding.DecodeConfig(method='greedy', max_decode_length=6))
  assert f'{over} of 5 inputs are longer than 12 tokens' in caplog.text


def test_evaluator_rank_classifies_with_candidates():
  model_config = tiny('encoder_decoder')
  model = models.build_model(model_config)
  params = _init(model_config, 3)
  evaluator = evaluation.Evaluator(
      tasks.get('sentiment_rt'), 'validation', model, feature_lengths=LENGTHS, batch_size=8,
      num_examples=6, decode_config=decoding.DecodeConfig(),
      candidates=['positive', 'negative'])
  result = evaluator.evaluate(params)
  assert set(result.metrics) == {'accuracy', 'macro_f1'}
  assert {r['prediction'] for r in result.rows} <= {'positive', 'negative'}


def test_few_shot_prompts_for_a_decoder_only_model():
  task = evaluation.few_shot_task(tasks.get('sentiment_rt'), 2, pool_size=50)
  model_config = tiny('decoder_only')
  model = models.build_model(model_config)
  params = _init(model_config, 4)
  evaluator = evaluation.Evaluator(
      task, 'validation', model, feature_lengths={'inputs': 256, 'targets': 8}, batch_size=2,
      num_examples=2, decode_config=decoding.DecodeConfig(max_decode_length=3))
  source = tasks.get('sentiment_rt').source('validation')
  for i, row in enumerate(evaluator.evaluate(params).rows):
    shots = row['input'].split('\n\n')
    assert len(shots) == 3 and shots[-1] == f"sentiment: {source[i]['text']}\n"
    assert all(shot.startswith('sentiment: ') for shot in shots)
  with pytest.raises(ValueError, match='k must be >= 1'):
    evaluation.few_shot_task(tasks.get('sentiment_rt'), 0)
