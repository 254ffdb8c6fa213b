"""Tests for the experiment files experiments/tasks.py and experiments/few_shot.py, without
training: every trial resolves to a valid run config, and the report puts each task's
trivial baseline (recomputed here from the raw corpus rows) beside a trial's metrics."""

import importlib.util
import json
import os

import pytest
import sacrebleu

from t5x_lite import sweeps, validation
from t5x_lite.data import tasks

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASKS_FILE = os.path.join(REPO, 'experiments', 'tasks.py')


def _load(name):
  spec = importlib.util.spec_from_file_location(
      f'experiments_{name}', os.path.join(REPO, 'experiments', f'{name}.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_tasks_sweep_has_every_bundled_task_and_three_decoder_only_trials():
  experiment = _load('tasks')
  trials = sweeps.make_trials(TASKS_FILE)
  bundled = {'translate_en_de', 'translate_en_fr', 'translate_en_zh', 'summarize_debian',
             'classify_debian_section', 'sentiment_rt'}
  pairs = [(t.config.data.task, t.config.model.architecture) for t in trials]
  assert sorted(pairs) == sorted([(task, 'encoder_decoder') for task in bundled]
                                 + [(task, 'decoder_only') for task in experiment.DECODER_TASKS])
  assert len(set(experiment.DECODER_TASKS)) == 3
  for trial in trials:
    validation.check_config(trial.config)  # what `train` checks before it starts
    config = trial.config
    assert config.data.converter == {'encoder_decoder': 'enc_dec',
                                     'decoder_only': 'prefix_lm'}[config.model.architecture]
    spec = experiment.TASKS[config.data.task]
    assert config.eval.max_decode_length == config.data.feature_lengths.targets
    task = tasks.get(config.data.task)
    assert set(spec.metrics) <= set(task.score(['a b c d'], ['a b c d'])), config.data.task
  commands = []
  assert sweeps.run_sweep(TASKS_FILE, 'runs/tasks', dry_run=True, log=commands.append) == 0
  assert len(commands) == 2 * len(trials)


def test_tasks_report_puts_baselines_beside_the_trials(tmp_path, monkeypatch):
  experiment = _load('tasks')
  monkeypatch.setattr(experiment, 'RESULTS', str(tmp_path / 'results'))
  trials = [t for t in sweeps.make_trials(TASKS_FILE)
            if t.config.model.architecture == 'encoder_decoder'
            and t.config.data.task in ('sentiment_rt', 'translate_en_de')]
  sentiment = next(t for t in trials if t.config.data.task == 'sentiment_rt')
  trial_dir = tmp_path / sentiment.name
  trial_dir.mkdir()
  (trial_dir / 'trial.json').write_text(json.dumps({'status': 'done', 'wall_time': 12.5}))
  records = [{'step': 300, 'split': 'train', 'loss': 0.5, 'tokens_per_second': 1000.0},
             {'step': 300, 'split': 'eval', 'accuracy': 70.0, 'macro_f1': 65.0}]
  (trial_dir / 'metrics.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in records))
  (trial_dir / 'eval_sentiment_rt_test.jsonl').write_text('{}\n' * 500)

  metrics, runs = experiment.table_rows(str(tmp_path), trials)
  rows = {(r['task'], r['metric']): r for r in metrics}
  # Independent references from the raw rows: the training majority label's share of the
  # first 500 test labels, and sacrebleu of the first 200 English inputs as translations.
  source = tasks.get('sentiment_rt').source
  train_labels = [source('train')[i]['label'] for i in range(len(source('train')))]
  majority = max(set(train_labels), key=train_labels.count)
  test = [source('test')[i]['label'] for i in range(500)]
  accuracy = rows['sentiment_rt', 'accuracy']
  assert accuracy['encoder_decoder'] == 70.0 and accuracy['decoder_only'] is None
  assert accuracy['baseline'] == pytest.approx(100 * test.count(majority) / 500)
  assert accuracy['examples'] == 500 and accuracy['baseline_kind'] == 'majority'
  pairs = tasks.get('translate_en_de').source('test')
  bleu = sacrebleu.corpus_bleu([pairs[i]['en'] for i in range(200)],
                               [[pairs[i]['de'] for i in range(200)]],
                              tokenize='intl').score
  assert rows['translate_en_de', 'bleu']['baseline'] == pytest.approx(bleu)
  assert rows['translate_en_de', 'bleu']['encoder_decoder'] is None
  assert [(r['task'], r['status'], r['steps']) for r in runs] == [
      ('translate_en_de', 'not started', 0), ('sentiment_rt', 'done', 300)]

  text = experiment.write_report(str(tmp_path), trials)
  assert '| sentiment_rt | accuracy | 70.00 |  |' in text
  assert (tmp_path / 'results' / 'results.csv').read_text().count('\n') == 1 + len(metrics)
  (trial_dir / 'eval_sentiment_rt_test.jsonl').write_text('{}\n' * 499)
  with pytest.raises(ValueError, match='evaluated 499 examples, the baseline 500'):
    experiment.table_rows(str(tmp_path), trials)


def test_few_shot_configs():
  experiment = _load('few_shot')
  config = experiment.pretrain_config()
  validation.check_config(config)
  assert (config.data.task, config.data.converter) == ('lm_pretrain_text', 'lm')
  for k in experiment.SHOTS:
    run = experiment.eval_config(config, k, seed=2)
    validation.check_config(run)
    assert (run.eval.few_shot_k, run.eval.seed, run.eval.candidates) == (
        k, 2, 'negative,positive')
    assert run.data.converter == 'lm'  # scored causally, as pre-trained
    lengths = run.data.feature_lengths
    assert lengths.inputs + lengths.targets <= experiment.LENGTH
