"""Tests for t5x_lite.data.pipeline, mostly on the bundled translate_en_de validation split.

Packed batches are checked row by row against the packing contract (segment ids 1, 2, ...
then 0 padding; positions restarting per segment; decoder inputs = targets shifted right
within each segment), and iterator states are checked to resume exactly, mid-epoch and
across an epoch boundary, with shuffling and packing on.
"""

import collections
import json
import logging

import numpy as np
import pytest

from t5x_lite.data import pipeline, sources, tasks

# What an unknown converter's error lists: every registered one.
KNOWN_CONVERTERS = r"known: \['causal_lm', 'enc_dec', 'lm', 'pairs_enc_dec', 'pairs_prefix_lm', 'prefix_lm'\]"

TASK = 'translate_en_de'
SPLIT = 'validation'
NUM_EXAMPLES = 593  # rows of translate_en_de/validation (corpora/README.md)
LENGTHS = {'inputs': 64, 'targets': 64}


def _dataset(**kwargs):
  options = dict(task=TASK, split=SPLIT, task_feature_lengths=LENGTHS, batch_size=8, seed=0)
  return pipeline.get_dataset(**{**options, **kwargs})


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def _assert_same(batches_a, batches_b):
  assert len(batches_a) == len(batches_b)
  for a, b in zip(batches_a, batches_b):
    assert sorted(a) == sorted(b)
    for k in a:
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def _segments(segment_ids):
  """{segment id: its index range}, checking ids run 1, 2, ... and then only padding."""
  ids = segment_ids[segment_ids > 0]
  num = int(segment_ids.max())
  assert np.all(segment_ids[:len(ids)] > 0) and np.all(np.diff(ids) >= 0)
  assert list(np.unique(ids)) == list(range(1, num + 1))
  return {s: np.flatnonzero(segment_ids == s) for s in range(1, num + 1)}


def _check_packed_row(batch, row):
  """The packing contract for one row of an enc_dec batch; returns its targets per segment."""
  get = lambda key: batch[key][row]
  encoder, decoder = _segments(get('encoder_segment_ids')), _segments(get('decoder_segment_ids'))
  assert encoder.keys() == decoder.keys()
  targets = []
  for name, segments in (('encoder', encoder), ('decoder', decoder)):
    for index in segments.values():
      np.testing.assert_array_equal(get(f'{name}_positions')[index], np.arange(len(index)))
  for index in decoder.values():
    segment_targets = get('decoder_target_tokens')[index]
    assert np.all(segment_targets > 0)
    np.testing.assert_array_equal(get('decoder_input_tokens')[index],
                                  np.concatenate([[0], segment_targets[:-1]]))
    assert np.all(get('decoder_loss_weights')[index] == 1)
    targets.append(segment_targets)
  padding = get('decoder_segment_ids') == 0
  assert not np.any(get('decoder_target_tokens')[padding])
  assert not np.any(get('decoder_loss_weights')[padding])
  assert not np.any(get('encoder_input_tokens')[get('encoder_segment_ids') == 0])
  return targets


def test_packed_batches_on_real_data_keep_the_contract():
  dataset = _dataset(log_every=5)
  batches = _take(iter(dataset), 12)
  features = ('encoder_input_tokens', 'encoder_segment_ids', 'encoder_positions',
              'decoder_input_tokens', 'decoder_target_tokens', 'decoder_loss_weights',
              'decoder_segment_ids', 'decoder_positions')
  vocabulary = tasks.get(TASK).output_features['targets'].vocabulary
  german = {row['de'] for row in sources.corpus_source('translate_en_de', SPLIT)}
  decoded = []
  for batch in batches:
    assert sorted(batch) == sorted(features)
    assert all(v.shape == (8, 64) and v.dtype == np.int32 for v in batch.values())
    for row in range(8):
      for targets in _check_packed_row(batch, row):
        if targets[-1] == vocabulary.eos_id:  # not truncated
          decoded.append(vocabulary.decode(targets))
  assert len(decoded) > 100 and sum(d in german for d in decoded) / len(decoded) > 0.9
  assert 0.7 < dataset.batch_stats.packing_efficiency()['all'] <= 1.0


def test_packing_efficiency_is_logged(caplog):
  with caplog.at_level(logging.INFO):
    _take(iter(_dataset(log_every=2, prefetch=0)), 4)
  logged = [r.getMessage() for r in caplog.records if 'packing efficiency' in r.getMessage()]
  assert len(logged) == 2 and logged[1].startswith('data: 4 batches')


def test_deterministic_for_a_seed():
  first = _take(iter(_dataset()), 4)
  _assert_same(first, _take(iter(_dataset()), 4))
  other = _take(iter(_dataset(seed=1)), 4)
  assert not np.array_equal(first[0]['encoder_input_tokens'], other[0]['encoder_input_tokens'])


@pytest.mark.parametrize('num_workers', [0, 2])
def test_resume_mid_epoch_and_across_the_epoch_boundary(num_workers):
  dataset = _dataset(num_workers=num_workers, prefetch=0)
  iterator = iter(dataset)
  _take(iterator, 15)
  state = json.loads(json.dumps(iterator.get_state()))  # checkpointable as plain JSON
  expected = _take(iterator, 30)  # ~15 examples per batch: the 593 of epoch 1 run out here
  if not num_workers:
    assert dataset.converter.stats.examples > NUM_EXAMPLES + 100
  restored = iter(_dataset(num_workers=num_workers, prefetch=0))
  restored.set_state(state)
  _assert_same(expected, _take(restored, 30))


def test_resume_with_background_prefetch():
  iterator = iter(_dataset(prefetch=3))
  _take(iterator, 5)
  state = iterator.get_state()
  expected = _take(iterator, 5)
  restored = iter(_dataset(prefetch=3))
  restored.set_state(state)
  _assert_same(expected, _take(restored, 5))


def test_one_epoch_yields_every_example_once():
  task = tasks.get(TASK)
  source = task.source(SPLIT)
  expected = collections.Counter(
      tuple(task.preprocess(source[i])['targets'][:64]) for i in range(len(source)))
  dataset = _dataset(num_epochs=1, drop_remainder=False)
  batches = list(dataset)
  packed = collections.Counter(
      tuple(targets) for b in batches for row in range(len(b['decoder_target_tokens']))
      for targets in _check_packed_row(b, row))
  assert packed == expected and sum(packed.values()) == NUM_EXAMPLES
  assert batches[-1]['decoder_target_tokens'].shape[0] <= 8
  assert dataset.converter.stats.examples == NUM_EXAMPLES
  assert 0 < dataset.converter.stats.truncated < 100  # the few long help paragraphs


def test_drop_mode_counts_and_drops_over_long_examples(caplog):
  with caplog.at_level(logging.WARNING):
    dataset = _dataset(num_epochs=1, drop_remainder=False, truncate=False)
    kept = sum(int(b['decoder_segment_ids'].max(axis=1).sum()) for b in dataset)
  stats = dataset.converter.stats
  assert stats.dropped > 0 and stats.truncated == 0 and kept + stats.dropped == NUM_EXAMPLES
  assert any(f'{10 ** (len(str(stats.dropped)) - 1)} of' in r.getMessage() and 'dropped' in
             r.getMessage() for r in caplog.records)


def _id_task(name, num_rows):
  rows = [{'id': f'{name}:{i}'} for i in range(num_rows)]
  return tasks.Task(name, lambda split: sources.InMemorySource(rows), (), {})


def _ids(dataset):
  return [example['id'] for example in dataset.to_iter_dataset()]


def test_shards_are_disjoint_and_cover_the_split():
  task = _id_task('shards', 100)
  shards = [_ids(pipeline.example_dataset(task, 'train', seed=3, shard_index=i, shard_count=3))
            for i in range(3)]
  assert sum(len(s) for s in shards) == 100
  assert set().union(*shards) == {f'shards:{i}' for i in range(100)}


def test_shards_of_real_data_split_the_packed_stream():
  shards = [_dataset(num_epochs=1, drop_remainder=False, shard_index=i, shard_count=2)
            for i in range(2)]
  counts = [sum(int(b['decoder_segment_ids'].max(axis=1).sum()) for b in s) for s in shards]
  assert counts == [297, 296]


def test_repeat_reshuffles_each_epoch():
  ids = _ids(pipeline.example_dataset(_id_task('epochs', 50), 'train', seed=0, num_epochs=2))
  assert sorted(ids[:50]) == sorted(ids[50:]) and len(set(ids[:50])) == 50
  assert ids[:50] != ids[50:]
  unshuffled = _ids(pipeline.example_dataset(_id_task('plain', 5), 'train', shuffle=False))
  assert unshuffled == [f'plain:{i}' for i in range(5)]


def test_mixture_interleaves_tasks_by_rate(monkeypatch):
  monkeypatch.setattr(tasks, '_REGISTRY', dict(tasks._REGISTRY))  # registers nothing for good
  for name, rows in (('mix_a', 40), ('mix_b', 30)):
    tasks.register(_id_task(name, rows))
  mixture = tasks.Mixture('mix', ['mix_a', 'mix_b'], rates=[3, 1])
  dataset = pipeline.example_dataset(mixture, 'train', seed=0, num_epochs=None)
  ids = [dataset[i]['id'] for i in range(400)]
  assert sum(i.startswith('mix_a') for i in ids) == 300
  assert ids == [dataset[i]['id'] for i in range(400)]


def test_registered_span_corruption_mixture_batches():
  dataset = pipeline.get_dataset('pretrain_span_corruption', SPLIT,
                                 {'inputs': 256, 'targets': 64}, 4, seed=0)
  for batch in _take(iter(dataset), 3):
    assert batch['encoder_input_tokens'].shape == (4, 256)
    assert batch['decoder_target_tokens'].shape == (4, 64)
    for row in range(4):
      _check_packed_row(batch, row)


def test_unpacked_rows_hold_one_example_each():
  [batch] = _take(iter(_dataset(pack=False)), 1)
  assert 'decoder_segment_ids' not in batch
  first_pad = np.argmin(batch['decoder_target_tokens'] > 0, axis=1)
  eos = batch['decoder_target_tokens'][np.arange(8), first_pad - 1]
  assert np.all(eos == 1)  # nothing packed after the example's EOS


def test_prefix_lm_batches():
  [batch] = _take(iter(_dataset(converter='prefix_lm')), 1)
  assert batch['decoder_target_tokens'].shape == (8, 128)
  for row in range(8):
    segments = _segments(batch['decoder_segment_ids'][row])
    for index in segments.values():
      causal = batch['decoder_causal_attention'][row][index]
      loss = batch['decoder_loss_weights'][row][index]
      num_inputs = int(causal.sum()) - 1
      np.testing.assert_array_equal(causal, np.arange(len(index)) <= num_inputs)
      np.testing.assert_array_equal(loss, np.arange(len(index)) >= num_inputs)


def test_measure_throughput():
  result = pipeline.measure_throughput(_dataset(), num_batches=5)
  assert result['tokens_per_s'] > 0 and 0.5 < result['packing_efficiency'] <= 1.0


@pytest.mark.parametrize('kwargs, error, message', [
    (dict(shard_index=2, shard_count=2), ValueError, 'shard_index < shard_count'),
    (dict(num_epochs=0), ValueError, 'num_epochs'),
    (dict(batch_size=0), ValueError, 'batch_size'),
    (dict(task='translate_en_xx'), KeyError, 'registered: .*translate_en_de'),
    (dict(converter='bert'), ValueError, KNOWN_CONVERTERS),
])
def test_bad_arguments_raise_clear_errors(kwargs, error, message):
  with pytest.raises(error, match=message):
    _dataset(**kwargs)
