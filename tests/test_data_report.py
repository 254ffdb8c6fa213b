"""Tests for t5x_lite.data.report: length statistics against hand computations."""

import math

import numpy as np
import pytest

from t5x_lite import config as config_lib
from t5x_lite.data import report, vocabularies

VOCAB = vocabularies.default_vocabulary()
ROWS = [('hello', 'hallo'), ('the red house is very old', 'das rote Haus ist sehr alt'),
        ('thanks', 'danke'), ('open the file menu and choose save as', 'wählen Sie Datei'),
        ('yes', 'ja'), ('a much longer sentence about the toolbar and its many icons',
                        'ein viel längerer Satz über die Symbolleiste und ihre Symbole')]


def test_nearest_rank_by_hand():
  values = [5, 1, 3, 2, 4]
  assert [report.nearest_rank(values, q) for q in (20, 50, 90, 100)] == [1, 3, 5, 5]


def test_suggested_lengths_keep_the_share_whole_jointly():
  inputs, targets = list(range(1, 21)), list(range(20, 0, -1))
  # Each feature's p95 is 19, but (19, 19) keeps only 18 of 20 examples whole (90%).
  assert report.suggest_lengths({'inputs': inputs, 'targets': targets}) == {
      'inputs': 20, 'targets': 20}
  assert report.suggest_lengths({'targets': targets}) == {'targets': 19}


def _data(tmp_path, lengths=(6, 5), **fields):
  path = tmp_path / 'pairs.tsv'
  path.write_text('en\tde\n' + ''.join(f'{en}\t{de}\n' for en, de in ROWS), encoding='utf-8')
  data = config_lib.base_config(config_lib.T5_1_1).data
  data.update({'inputs_template': 'translate: {en}', 'targets_template': '{de}', **fields})
  data.files.train = str(path)
  data.feature_lengths.inputs, data.feature_lengths.targets = lengths
  return data


def _hand_lengths():
  return {'inputs': [len(VOCAB.encode(f'translate: {en}')) + 1 for en, _ in ROWS],
          'targets': [len(VOCAB.encode(de)) + 1 for _, de in ROWS]}  # + EOS


def test_split_stats_match_a_hand_computation(tmp_path):
  data = _data(tmp_path, pack=False)
  stats = report.split_stats(data, 'train', batch_size=4)
  lengths = _hand_lengths()
  assert stats.num_examples == stats.num_measured == len(ROWS)
  for key, values in lengths.items():
    np.testing.assert_array_equal(stats.lengths[key], values)
    ordered = sorted(values)
    assert stats.percentiles(key) == {
        **{f'p{q}': ordered[math.ceil(q / 100 * len(values)) - 1] for q in (50, 90, 95, 99)},
        'max': max(values)}
  limits = {'inputs': 6, 'targets': 5}
  over = {k: [n > limits[k] for n in v] for k, v in lengths.items()}
  assert stats.cut() == {'inputs': sum(over['inputs']), 'targets': sum(over['targets']),
                         'any': sum(a or b for a, b in zip(*over.values()))}
  # Padded one example per row: real tokens over slots, cut to the lengths.
  used = sum(min(n, limits[k]) for k, v in lengths.items() for n in v)
  assert stats.packing_efficiency == pytest.approx(used / (len(ROWS) * 11))
  # With room for several examples per row, first-fit packing beats padding.
  padded, packed = (report.split_stats(_data(tmp_path, (24, 24), pack=pack), 'train',
                                       batch_size=4) for pack in (False, True))
  assert padded.packing_efficiency == pytest.approx(
      sum(map(sum, lengths.values())) / (len(ROWS) * 48))
  assert padded.packing_efficiency < packed.packing_efficiency <= 1
  summary = report.truncation_summary(data)
  assert summary.startswith(f'data: train ({len(ROWS)} examples): feature_lengths inputs=6 '
                            f'targets=5 cut {stats.cut()["any"]} ')
  assert ' '.join(f'{k}={n}' for k, n in report.suggest_lengths(lengths).items()) in summary


def test_sampled_stats_are_evenly_spaced(tmp_path):
  stats = report.split_stats(_data(tmp_path), 'train', max_examples=3)
  assert (stats.num_examples, stats.num_measured) == (6, 3)
  np.testing.assert_array_equal(stats.lengths['targets'], _hand_lengths()['targets'][::2])


def test_coverage_by_hand():
  texts = ['hello world', 'das Haus']
  ids = [i for text in texts for i in VOCAB.encode(text)]
  assert report.coverage(VOCAB, texts) == {
      'tokens_per_word': len(ids) / 4, 'unk_rate': 0.0,
      'byte_rate': sum(VOCAB.id_to_piece(i).startswith('<0x') for i in ids) / len(ids)}
  assert report.coverage(VOCAB, ['中文'])['byte_rate'] > 0.5  # no Chinese pieces: bytes


def test_vocabulary_output_is_checked_before_training(tmp_path):
  config = config_lib.base_config(config_lib.T5_1_1)
  config.data = _data(tmp_path)
  (tmp_path / 'taken.model').write_bytes(b'keep me')
  with pytest.raises(ValueError, match='taken.model already exists'):
    report.train_vocabulary(config, 300, str(tmp_path / 'taken.model'))
  assert (tmp_path / 'taken.model').read_bytes() == b'keep me'
  with pytest.raises(ValueError, match='vocab.out must be a .model path'):
    report.train_vocabulary(config, 300, str(tmp_path / 'new.spm'))
  with pytest.raises(ValueError, match='the directory of --vocab.out'):
    report.train_vocabulary(config, 300, str(tmp_path / 'no' / 'new.model'))


def test_spread_by_hand():
  assert report.spread(10, 4) == [0, 2, 5, 7]
  assert report.spread(3, 4) == report.spread(3, 0) == [0, 1, 2]
