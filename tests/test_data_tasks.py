"""Tests for t5x_lite.data.tasks: the registry, the bundled tasks on real data, config tasks."""

import ml_collections
import numpy as np
import pytest

from t5x_lite import config as config_lib
from t5x_lite.data import preprocessors, sources, tasks, vocabularies

VOCAB = vocabularies.default_vocabulary()

# name -> (corpus field shown in the prompt, prompt prefix, target field)
SEQ2SEQ_TASKS = {
    'translate_en_de': ('en', 'translate English to German: ', 'de'),
    'translate_en_fr': ('en', 'translate English to French: ', 'fr'),
    'translate_en_zh': ('en', 'translate English to Chinese: ', 'zh'),
    'summarize_debian': ('description', 'summarize: ', 'synopsis'),
    'classify_debian_section': ('description', 'classify section: ', 'section'),
    'sentiment_rt': ('text', 'sentiment: ', 'label'),
}


@pytest.fixture
def registry(monkeypatch):
  """Lets a test register tasks without leaking them into other tests."""
  monkeypatch.setattr(tasks, '_REGISTRY', dict(tasks._REGISTRY))


def _rng():
  return np.random.default_rng(0)


# ----------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------


def test_bundled_names_are_registered():
  assert set(SEQ2SEQ_TASKS) | {'pretrain_span_corruption'} <= set(tasks.names())


def test_unknown_name_lists_the_registered_ones():
  with pytest.raises(KeyError) as error:
    tasks.get('translate_en_xx')
  assert str(error.value) == (
      "unknown task or mixture 'translate_en_xx'; registered: " + ', '.join(tasks.names())
      + '. To add your own TSV/CSV/JSONL files, set --config.data.files.train=FILE and the '
      'templates (README: Train on your own data)')


def test_register_refuses_duplicates(registry):
  task = tasks.get('sentiment_rt')
  with pytest.raises(ValueError, match="'sentiment_rt' is already registered"):
    tasks.register(task)
  assert tasks.register(task, overwrite=True) is task


# ----------------------------------------------------------------------------------------
# Bundled tasks on the shipped corpora
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize('name', sorted(SEQ2SEQ_TASKS))
def test_bundled_seq2seq_task(name):
  input_field, prompt, target_field = SEQ2SEQ_TASKS[name]
  task = tasks.get(name)
  row = task.source('validation')[0]
  example = task.preprocess(row)
  for key in ('inputs', 'targets'):
    assert example[key].dtype == np.int32 and example[key][-1] == VOCAB.eos_id
  inputs, targets = VOCAB.decode(example['inputs']), VOCAB.decode(example['targets'])
  assert inputs.startswith(prompt)
  # SentencePiece normalises (NFKC) and Chinese is byte-spelt, so compare through the vocab.
  assert inputs == VOCAB.decode(VOCAB.encode(prompt + row[input_field]))
  assert targets == VOCAB.decode(VOCAB.encode(row[target_field]))
  assert task.score([targets], [targets])  # every bundled task has metrics


def test_task_metrics_and_postprocessing():
  sentiment = tasks.get('sentiment_rt').score(
      ['positive', 'negative', 'negative'], [' Positive', 'positive', 'negative '])
  assert sentiment == pytest.approx({'accuracy': 200 / 3, 'macro_f1': 100 * (2 / 3 + 2 / 3) / 2})
  zh = tasks.get('translate_en_zh').score(['我们今天去公园散步'], ['我们今天去公园散心'])
  assert zh['bleu'] == pytest.approx(100 * (5 / 9) ** 0.25)  # per-character ('zh') BLEU
  assert set(tasks.get('summarize_debian').score(['a b'], ['a b'])) == {
      'rouge1', 'rouge2', 'rougeLsum'}


def test_span_corruption_task_is_seeded_and_fits_inputs_length():
  task = tasks.span_corruption_task('sc', 'pretrain_text', inputs_length=16)
  source = task.source('validation')
  with pytest.raises(ValueError, match='preprocessor select_random_chunk is random'):
    task.preprocess(source[0])
  for i in range(20):
    example = task.preprocess(source[i], rng=np.random.default_rng(i))
    again = task.preprocess(source[i], rng=np.random.default_rng(i))
    np.testing.assert_array_equal(example['inputs'], again['inputs'])
    assert len(example['inputs']) <= 16
    assert example['targets'][0] == VOCAB.sentinel_id(0)
    assert example['inputs'][-1] == example['targets'][-1] == VOCAB.eos_id


@pytest.mark.parametrize('name, objective', [('lm_pretrain_text', 'full_lm'),
                                             ('prefix_lm_pretrain_text', 'prefix_lm')])
def test_language_modeling_tasks_rebuild_a_chunk_of_the_text(name, objective):
  # Their chunk is one of the text's aligned max_length-token pieces (the whole text when
  # shorter); prefix_lm splits it in two, each part with its own EOS.
  task = tasks.get(name)
  short = tasks.language_modeling_task('x', 'pretrain_text', objective, max_length=16)
  source = task.source('validation')
  for i in range(10):
    tokens = np.asarray(VOCAB.encode(source[i]['text']), np.int32)
    for chunked, max_length in ((task, 512), (short, 16)):
      example = chunked.preprocess(source[i], rng=np.random.default_rng(i))
      chunks = [tokens[j:j + max_length] for j in range(0, len(tokens), max_length)]
      assert example['targets'][-1] == VOCAB.eos_id
      if objective == 'full_lm':
        assert set(example) == {'targets'}
        rebuilt = example['targets'][:-1]
      else:
        assert example['inputs'][-1] == VOCAB.eos_id
        assert len(example['inputs']) >= 2 and len(example['targets']) >= 2  # both non-empty
        rebuilt = np.concatenate([example['inputs'][:-1], example['targets'][:-1]])
      assert any(np.array_equal(rebuilt, chunk) for chunk in chunks)
      if len(tokens) <= max_length:
        np.testing.assert_array_equal(rebuilt, tokens)


def test_pretraining_mixture():
  mixture = tasks.get('pretrain_span_corruption')
  assert sum(mixture.rates) == pytest.approx(1.0)
  assert [t.name for t in mixture.tasks] == list(mixture.task_names)
  assert set(mixture.output_features) == {'inputs', 'targets'}
  example = mixture.tasks[1].preprocess(mixture.tasks[1].source('validation')[0], rng=_rng())
  assert VOCAB.sentinel_id(0) in example['inputs']


def test_mixture_validation(registry):
  assert tasks.Mixture('m', ['a', 'b'], rates=[1, 3]).rates == (0.25, 0.75)
  with pytest.raises(ValueError, match='2 tasks and 1 rates'):
    tasks.Mixture('m', ['a', 'b'], rates=[1])
  with pytest.raises(ValueError, match='rates positive'):
    tasks.Mixture('m', ['a', 'b'], rates=[1, 0])
  with pytest.raises(KeyError, match="unknown task or mixture 'a'"):
    tasks.Mixture('m', ['a']).tasks  # pylint: disable=expression-not-assigned
  tasks.register(tasks.Mixture('outer', ['pretrain_span_corruption']))
  with pytest.raises(TypeError, match='pretrain_span_corruption is a mixture'):
    tasks.get('outer').tasks  # pylint: disable=expression-not-assigned


def test_preprocess_stops_at_a_dropped_example():
  calls = []
  task = tasks.Task('t', lambda split: sources.InMemorySource([{'x': '1'}]),
                    (lambda ex: None, calls.append), {})
  assert task.preprocess(task.source('train')[0]) is None and not calls


# ----------------------------------------------------------------------------------------
# Tasks from config
# ----------------------------------------------------------------------------------------


def _qa_files(tmp_path):
  (tmp_path / 'train.tsv').write_text('2+2\t4\n3+3\t6\n', encoding='utf-8')
  (tmp_path / 'dev.tsv').write_text('1+1\t2\n', encoding='utf-8')
  return {'train': str(tmp_path / 'train*.tsv'), 'validation': str(tmp_path / 'dev.tsv')}


def test_register_tsv_task_from_config(tmp_path, registry):
  config = ml_collections.ConfigDict({
      'name': 'arith', 'paths': _qa_files(tmp_path), 'format': 'tsv', 'columns': ['q', 'a'],
      'inputs_template': 'compute: {q}', 'targets_template': '{a}', 'metrics': ['accuracy'],
      'vocabulary': str(vocabularies.DEFAULT_MODEL)})
  task = tasks.register_from_config(config)
  assert tasks.get('arith') is task
  examples = [task.preprocess(row) for row in task.source('train')]
  assert [VOCAB.decode(e['inputs']) for e in examples] == ['compute: 2+2', 'compute: 3+3']
  assert VOCAB.decode(task.preprocess(task.source('validation')[0])['targets']) == '2'
  assert task.score(['4', '6'], ['4', '5']) == {'accuracy': 50.0}
  with pytest.raises(ValueError, match="task arith has no split 'test'; its splits: train, "):
    task.source('test')


def test_register_jsonl_task_checks_template_fields_per_line(tmp_path, registry):
  path = tmp_path / 'qa.jsonl'
  path.write_text('{"q": "hi", "a": "hallo"}\n{"q": "bye"}\n', encoding='utf-8')
  task = tasks.register_from_config({'name': 'qa', 'paths': str(path),
                                     'inputs_template': '{q}', 'targets_template': '{a}'})
  with pytest.raises(ValueError, match=r'qa\.jsonl:2: missing key\(s\) a'):
    task.source('train')


@pytest.mark.parametrize('change, message', [
    ({'colums': ['q', 'a']}, r"unknown keys \['colums'\]"),
    ({'targets_template': ''}, r"missing keys \['targets_template'\]"),
    ({'columns': None, 'header': False}, 'a tsv file without a header line needs columns'),
    ({'targets_template': '{answer}'}, r"templates use \['answer'\]"),
    ({'format': 'xml'}, "unknown format 'xml'"),
    ({'inputs_template': '{q'}, "template '{q' is not a str.format template"),
    ({'bad_rows': 'ignore'}, 'bad_rows must be one of error, skip'),
    ({'metrics': ['bleu', 'f2']}, r"unknown metrics \['f2'\]; known: bleu, rouge"),
])
def test_bad_config_names_the_problem(tmp_path, registry, change, message):
  config = {'name': 'bad', 'paths': str(tmp_path / '*.tsv'), 'format': 'tsv',
            'columns': ['q', 'a'], 'inputs_template': '{q}', 'targets_template': '{a}'}
  with pytest.raises(ValueError, match=f'task config bad: {message}'):
    tasks.register_from_config({**config, **change})
  assert 'bad' not in tasks.names()


def test_config_task_uses_templates_like_preprocessors(tmp_path, registry):
  """A config task and the equivalent Python task give identical examples."""
  task = tasks.register_from_config({
      'name': 'qa_tsv', 'paths': _qa_files(tmp_path), 'format': 'tsv', 'columns': ['q', 'a'],
      'inputs_template': 'q: {q}', 'targets_template': '{a}'})
  python_task = tasks.Task('qa_py', task.source,
                           (preprocessors.classify('q', 'q', 'a'), preprocessors.tokenize,
                            preprocessors.append_eos), tasks.seq2seq_features())
  row = task.source('validation')[0]
  for key in ('inputs', 'targets'):
    np.testing.assert_array_equal(task.preprocess(row)[key], python_task.preprocess(row)[key])


# ----------------------------------------------------------------------------------------
# Tasks from a run config's data.files
# ----------------------------------------------------------------------------------------


def _data_config(**fields):
  """A run config's data section with `fields` set."""
  data = config_lib.base_config(config_lib.T5_1_1).data
  data.update(fields)
  return data


def _pairs(tmp_path, rows, name='pairs.tsv'):
  path = tmp_path / name
  path.write_text('en\tes\n' + ''.join(f'{en}\t{es}\n' for en, es in rows), encoding='utf-8')
  return str(path)


def _files_data(train, validation='', **fields):
  data = _data_config(**{'inputs_template': 'translate: {en}', 'targets_template': '{es}',
                         **fields})
  data.files.train, data.files.validation = train, validation
  return data


def test_from_config_builds_a_task_from_header_files(tmp_path, registry):
  _pairs(tmp_path, [('hello', 'hola'), ('thanks', 'gracias')], 'a_train.tsv')
  more = _pairs(tmp_path, [('good', 'bueno')], 'more.tsv')
  dev = _pairs(tmp_path, [('yes', 'sí')], 'dev.tsv')
  data = _files_data(f'{tmp_path / "*_train.tsv"},{more}', dev, metrics='bleu,accuracy')
  task = tasks.from_config(data)
  assert (task.name, list(task.splits)) == ('tsv', ['train', 'validation'])
  assert tasks.from_config(data) is task  # built once per process
  assert [VOCAB.decode(task.preprocess(row)['inputs']) for row in task.source('train')] == [
      'translate: hello', 'translate: thanks', 'translate: good']
  assert VOCAB.decode(task.preprocess(task.source('validation')[0])['targets']) == 'sí'
  assert set(task.score(['a b c d'], ['a b c d'])) == {'bleu', 'accuracy'}
  # eval.task names a registered task instead; data.task is the route without files.
  assert tasks.from_config(data, 'sentiment_rt').name == 'sentiment_rt'
  assert tasks.from_config(_data_config(task='translate_en_fr')).name == 'translate_en_fr'


@pytest.mark.parametrize('fields, files, message', [
    ({}, 'missing*.tsv', r'missing\*\.tsv: no such file'),
    ({'targets_template': '{de}'}, None, r'pairs\.tsv:1: the header has no column de .*; '
     r'columns found: en, es'),
    ({'header': False}, None, 'a tsv file without a header line needs columns'),
    ({'header': False, 'columns': 'en,de'}, None, r"templates use \['es'\]"),
    ({'format': 'xml'}, None, "unknown format 'xml'"),
    ({'metrics': 'blue'}, None, r"unknown metrics \['blue'\]"),
])
def test_from_config_bad_settings_name_the_problem(tmp_path, registry, fields, files, message):
  pairs = _pairs(tmp_path, [('hello', 'hola')])
  data = _files_data(str(tmp_path / files) if files else pairs, **fields)
  with pytest.raises((ValueError, FileNotFoundError), match=message):
    tasks.from_config(data)


def test_validation_carved_from_train_by_content_hash(tmp_path, registry):
  rows = [(f'sentence {i}', f'frase {i}') for i in range(200)]
  data = _files_data(_pairs(tmp_path, rows), validation_fraction=0.1)
  task = tasks.from_config(data)
  assert list(task.splits) == ['train', 'validation']
  train, validation = task.source('train'), task.source('validation')
  held_out = [row for row in (dict(en=en, es=es) for en, es in rows)
              if sources.content_bucket(f'translate: {row["en"]}', 10_000) < 1_000]
  assert [validation[i] for i in range(len(validation))] == held_out
  assert len(train) + len(validation) == 200 and 0 < len(validation) < 40
  with pytest.raises(ValueError, match="task tsv has no split 'test'"):
    task.source('test')


def test_mixture_splits_are_those_of_every_task():
  assert tasks.get('pretrain_span_corruption').splits == ['train', 'validation', 'test']
