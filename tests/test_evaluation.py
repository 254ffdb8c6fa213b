"""Tests for t5x_lite.evaluation on tiny models with random params, and its CLI commands.

Scores are checked against a log-softmax of the model's full forward pass, rank
classification against a model made uniform (where the shortest answer must win) and against
direct scoring, and cached decoding against teacher-forced argmaxes of the same model. The
end-to-end test trains the tiny T5.1.1 for a few steps through the real CLI (evaluating during
training), then runs infer / score / eval and the bad-input cases on its workdir.
"""

import importlib.util
import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5x_lite import checkpoints, decoding, evaluation, models, partitioning
from t5x_lite import config as config_lib
from t5x_lite.data import tasks

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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
  # A causal prefix: cached decoding reads the prompt one token at a time.
  builder = evaluation.FeatureBuilder(builder.architecture, LENGTHS, bidirectional_prefix=False)
  examples = _examples(np.random.default_rng(4), 3)
  config = decoding.DecodeConfig(method='greedy', max_decode_length=6)
  batch = _stack([builder.predict_features(e) for e in examples])
  sequences, _ = evaluation.predict_batch(model, params, batch, config)
  assert sequences.shape == (3, 1, 6)
  sequences = sequences[:, 0]
  argmax = _teacher_forced_argmax(model, params, builder, examples, sequences)
  up_to_eos = np.cumsum(sequences == 1, axis=1) - (sequences == 1) == 0
  np.testing.assert_array_equal(np.where(up_to_eos, argmax, 0), sequences)


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


# ------------------------------------------------------------------------- loading params


def _config(**eval_fields):
  spec = importlib.util.spec_from_file_location(
      't5_1_1_tiny', os.path.join(REPO, 'configs', 't5_1_1_tiny.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.eval.update(eval_fields)
  return config


def test_copy_input_baseline_scores_the_input_without_its_task_prefix():
  assert evaluation.strip_task_prefix('translate English to German: 11: Division') == (
      '11: Division')
  assert evaluation.strip_task_prefix('no prefix here') == 'no prefix here'
  task = tasks.get('sentiment_rt')  # accuracy and macro-F1 over normalized labels
  rows = [{'input': 'sentiment: positive', 'target': 'positive'},
          {'input': 'sentiment: Negative ', 'target': 'negative'},
          {'input': 'sentiment: great film', 'target': 'positive'},
          {'input': 'sentiment: negative', 'target': 'positive'}]
  baseline = evaluation.copy_input_baseline(task, rows)
  assert baseline['accuracy'] == pytest.approx(50.0)


def test_load_params_errors(tmp_path):
  config = _config()
  partitioner = evaluation.make_partitioner(config)
  with pytest.raises(FileNotFoundError, match='no checkpoint in'):
    evaluation.load_params(config, str(tmp_path / 'missing'), partitioner)
  params = _init(config_lib.model_config(config), 0)
  checkpointer = checkpoints.Checkpointer(str(tmp_path / 'run' / 'checkpoints'),
                                          save_every=1, async_save=False)
  checkpointer.save(3, {'step': jnp.int32(3), 'params': params}, {}, force=True)
  checkpointer.close()
  restored, step = evaluation.load_params(config, str(tmp_path / 'run'), partitioner)
  assert step == 3
  jax.tree.map(np.testing.assert_array_equal, restored, params)
  config.model.d_ff = 96
  with pytest.raises(ValueError, match=r'param .*mlp.* has shape \(64, 128\) in the '
                                       r'checkpoint .* but \(64, 96\)'):
    evaluation.load_params(config, str(tmp_path / 'run'), partitioner)


# -------------------------------------------------------------------------------- the CLI

TINY = ['--config=configs/t5_1_1_tiny.py', '--config.data.feature_lengths.inputs=16',
        '--config.data.feature_lengths.targets=16', '--config.train.batch_size=8',
        '--config.eval.num_examples=3', '--config.eval.batch_size=2',
        '--config.eval.max_decode_length=6']


def _start(args, tmp_path, name):
  # A shared compilation cache: infer and eval reuse the decoder that training's eval built.
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='--xla_force_host_platform_device_count=2',
             JAX_COMPILATION_CACHE_DIR=str(tmp_path / 'xla_cache'),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0')
  out = open(tmp_path / f'{name}.out', 'wb')
  err = open(tmp_path / f'{name}.err', 'wb')
  return subprocess.Popen([sys.executable, '-m', 't5x_lite.main', *args], cwd=REPO, env=env,
                          stdout=out, stderr=err), name


def _finish(started, tmp_path):
  proc, name = started
  proc.wait(timeout=300)
  return (proc.returncode, (tmp_path / f'{name}.out').read_text(),
          (tmp_path / f'{name}.err').read_text())


def _one_error_line(result, *fragments):
  code, _, err = result
  lines = err.strip().splitlines()
  assert code == 2 and lines[-1].startswith('error: '), err[-3000:]
  assert 'Traceback' not in err and all(f in lines[-1] for f in fragments), lines[-1]


def test_cli_train_with_eval_then_infer_score_eval(tmp_path):
  workdir = tmp_path / 'run'
  missing = _start(['eval', *TINY, f'--workdir={tmp_path / "nothing"}'], tmp_path, 'missing')
  train = _start(['train', *TINY, '--config.train.num_steps=4', '--config.train.log_every=2',
                  '--config.train.checkpoint_every=4', '--config.eval.every_steps=2',
                  f'--workdir={workdir}'], tmp_path, 'train')
  _one_error_line(_finish(missing, tmp_path), 'no checkpoint in')
  assert not (tmp_path / 'nothing').exists()
  code, _, err = _finish(train, tmp_path)
  assert code == 0, err[-3000:]
  records = [json.loads(l) for l in (workdir / 'metrics.jsonl').read_text().splitlines()]
  assert [(r['step'], r['split']) for r in records if r['split'] == 'eval'] == [
      (2, 'eval'), (4, 'eval')]

  runs = [_start([command, *TINY, f'--workdir={workdir}'], tmp_path, command)
          for command in ('infer', 'score', 'eval')]
  runs.append(_start(['eval', *TINY, '--config.model.d_ff=96', f'--workdir={workdir}'],
                     tmp_path, 'mismatch'))
  infer, score, evaluate, mismatch = (_finish(r, tmp_path) for r in runs)
  for code, _, err in (infer, score, evaluate):
    assert code == 0, err[-3000:]
  rows = [json.loads(l) for l in
          (workdir / 'infer_translate_en_de_validation.jsonl').read_text().splitlines()]
  assert len(rows) == 3 and all(set(r) == {'input', 'target', 'prediction'} for r in rows)
  assert rows[0]['input'].startswith('translate English to German: ')
  scored = [json.loads(l) for l in
            (workdir / 'score_translate_en_de_validation.jsonl').read_text().splitlines()]
  assert len(scored) == 3 and all(r['log_likelihood'] < 0 for r in scored)
  assert 'bleu' in evaluate[1] and 'copy input' in evaluate[1]
  assert evaluate[1].count('prediction: ') == 3  # 5 samples asked, the split has 3
  evaluated = [json.loads(l) for l in
               (workdir / 'eval_translate_en_de_validation.jsonl').read_text().splitlines()]
  assert [r['target'] for r in evaluated] == [r['target'] for r in rows]
  records = [json.loads(l) for l in (workdir / 'metrics.jsonl').read_text().splitlines()]
  assert records[-1]['split'] == 'eval' and records[-1]['step'] == 4
  assert math.isfinite(records[-1]['bleu'])
  _one_error_line(mismatch, 'config/checkpoint mismatch', 'mlp', '(64, 128)', '(64, 96)')
