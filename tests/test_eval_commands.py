"""Tests for t5x_lite.eval_commands: the copy-input and majority-class baselines, few-shot
rank classification as a run config asks for it, loading a workdir's params, and the eval /
infer / score commands end to end.

The end-to-end test trains the tiny T5.1.1 for a few steps through the real CLI (evaluating
during training), then runs infer / score / eval and the bad-input cases on its workdir.
"""

import importlib.util
import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import sacrebleu

from t5x_lite import checkpoints, eval_commands, evaluation, metrics, models, presets
from t5x_lite import config as config_lib
from t5x_lite.data import preprocessors, sources, tasks

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(**eval_fields):
  spec = importlib.util.spec_from_file_location(
      't5_1_1_tiny', os.path.join(REPO, 'configs', 't5_1_1_tiny.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.eval.update(eval_fields)
  return config


def test_copy_input_baseline_scores_the_input_without_its_task_prefix():
  assert eval_commands.strip_task_prefix('translate English to German: 11: Division') == (
      '11: Division')
  assert eval_commands.strip_task_prefix('no prefix here') == 'no prefix here'
  task = tasks.get('sentiment_rt')  # accuracy and macro-F1 over normalized labels
  rows = [{'input': 'sentiment: positive', 'target': 'positive'},
          {'input': 'sentiment: Negative ', 'target': 'negative'},
          {'input': 'sentiment: great film', 'target': 'positive'},
          {'input': 'sentiment: negative', 'target': 'positive'}]
  baseline = eval_commands.copy_input_baseline(task, rows)
  assert baseline['accuracy'] == pytest.approx(50.0)


def test_copy_input_bleu_is_sacrebleu_of_the_inputs_without_their_prefix():
  rows = [{'input': 'translate English to German: Click OK.', 'target': 'Klicken Sie OK.'},
          {'input': 'translate English to German: Writer', 'target': 'Writer'}]
  expected = sacrebleu.corpus_bleu(['Click OK.', 'Writer'], [['Klicken Sie OK.', 'Writer']],
                                  tokenize='intl')  # T5's setting
  baseline = eval_commands.copy_input_baseline(tasks.get('translate_en_de'), rows)
  assert baseline['bleu'] == pytest.approx(expected.score)


def _label_task(train_labels):
  """A classification task over in-memory rows whose labels normalise as sentiment_rt's."""
  rows = {'train': [{'text': f'review {i}', 'label': label}
                    for i, label in enumerate(train_labels)]}
  return tasks.Task(
      'toy_labels', lambda split: sources.InMemorySource(rows[split]),
      (preprocessors.classify('toy', 'text', 'label'), preprocessors.tokenize,
       preprocessors.append_eos),
      tasks.seq2seq_features(), (metrics.accuracy, metrics.macro_f1), tasks.normalize_label)


def test_majority_class_baseline_predicts_the_commonest_training_label():
  # 'b' and 'c' occur twice each after normalisation ('B', 'b ', ...): the tie goes to 'b'.
  task = _label_task(['B', 'a', 'b ', 'c', 'C'])
  assert eval_commands.majority_label(task) == 'b'
  assert eval_commands.majority_label(_label_task(['a', 'c', 'c'])) == 'c'
  rows = [{'target': 'b'}, {'target': 'a'}, {'target': 'b'}, {'target': 'c'}]
  baseline = eval_commands.majority_class_baseline(task, rows, 'b')
  assert baseline['accuracy'] == pytest.approx(50.0)
  # Per class F1 over the targets' classes: b 2*2/(2*2+2+0) = 2/3, a 0, c 0.
  assert baseline['macro_f1'] == pytest.approx(100 * (2 / 3) / 3)


def test_few_shot_rank_classification_from_config_scores_labels_causally():
  """eval.few_shot_k + eval.candidates on a causal LM (converter 'lm'): each input is
  few_shot_prompt's k-shot prompt, and each label's score is the summed log-prob of its
  tokens and EOS from one causal forward pass over [start, prompt, label, EOS]."""
  config = presets.get('decoder_tiny')
  config.model.update(vocab_size=8192, d_model=32, num_heads=2, num_kv_heads=2, d_ff=64)
  config.data.update(task='sentiment_rt', converter='lm')
  config.data.feature_lengths = ml_collections.ConfigDict({'inputs': 400, 'targets': 4})
  config.eval.update(split='validation', num_examples=3, batch_size=4, few_shot_k=2, seed=3,
                     candidates='positive, negative')
  model = models.build_model(config_lib.model_config(config))
  params = models.init_params(model.config, jax.random.key(5))
  evaluator = eval_commands.evaluator_from_config(config, model)

  task = tasks.get('sentiment_rt')
  train, validation = task.source('train'), task.source('validation')
  shots = [{'inputs': f'sentiment: {train[i]["text"]}', 'targets': train[i]['label']}
           for i in range(1000)]
  vocabulary = task.output_features['targets'].vocabulary
  options = [np.array(vocabulary.encode(label) + [vocabulary.eos_id], np.int32)
             for label in ('positive', 'negative')]
  forward = jax.jit(lambda x, y: model.apply({'params': params}, x, y))
  expected = np.zeros((3, 2))
  for i, example in enumerate(evaluator.examples):
    prompt = preprocessors.few_shot_prompt(f'sentiment: {validation[i]["text"]}', shots, k=2,
                                           seed=3)
    assert example['inputs_pretokenized'] == prompt and len(example['inputs']) <= 400
    for j, option in enumerate(options):
      tokens = np.concatenate([example['inputs'], option])
      # Right-padded to one length (one compilation); causal, so padding changes nothing.
      targets = np.pad(tokens, (0, 404 - len(tokens)))
      logits = np.asarray(forward(np.concatenate([[0], targets[:-1]])[None], targets[None]),
                          np.float64)[0]
      log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
      start = len(example['inputs'])
      expected[i, j] = sum(log_probs[start + t, token] for t, token in enumerate(option))

  _, scores = evaluation.rank_classification(model, params, evaluator.builder,
                                             evaluator.examples, [options] * 3)
  np.testing.assert_allclose(scores, expected, rtol=1e-4)
  assert evaluator.predict(params) == [('positive', 'negative')[j] for j in expected.argmax(1)]


def test_load_params_errors(tmp_path):
  config = _config()
  partitioner = eval_commands.make_partitioner(config)
  with pytest.raises(FileNotFoundError, match='no checkpoint in'):
    eval_commands.load_params(config, str(tmp_path / 'missing'), partitioner)
  params = models.init_params(config_lib.model_config(config), jax.random.key(0))
  checkpointer = checkpoints.Checkpointer(str(tmp_path / 'run' / 'checkpoints'),
                                          save_every=1, async_save=False)
  checkpointer.save(3, {'step': jnp.int32(3), 'params': params}, {}, force=True)
  checkpointer.close()
  restored, step = eval_commands.load_params(config, str(tmp_path / 'run'), partitioner)
  assert step == 3
  jax.tree.map(np.testing.assert_array_equal, restored, params)
  config.model.d_ff = 96
  with pytest.raises(ValueError, match=r'param .*mlp.* has shape \(64, 128\) in the '
                                       r'checkpoint .* but \(64, 96\)'):
    eval_commands.load_params(config, str(tmp_path / 'run'), partitioner)


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
