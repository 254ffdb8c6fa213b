"""Tests for t5x_lite.data.feature_converters on hand-written examples.

Expected rows are written out literally; the packed ones are the worked examples of seqio's
EncDecFeatureConverter / LMFeatureConverter / PrefixLMFeatureConverter docstrings (T5X's
conventions), so a drift from those conventions shows up as a literal mismatch.
"""

import logging

import numpy as np
import pytest

from t5x_lite.data import feature_converters as fc

# What an unknown converter's error lists: every registered one.
KNOWN_CONVERTERS = r"known: \['causal_lm', 'enc_dec', 'lm', 'pairs_enc_dec', 'pairs_prefix_lm', 'prefix_lm'\]"


def _ex(**features):
  return {k: np.array(v, np.int32) for k, v in features.items()}


def _assert_features(actual, expected):
  assert sorted(actual) == sorted(expected)
  for k, v in expected.items():
    assert actual[k].dtype == np.int32, k
    np.testing.assert_array_equal(actual[k], v, err_msg=k)


# Two examples that pack into one row (seqio's docstring examples).
PAIR = [_ex(inputs=[7, 8, 5, 1], targets=[3, 9, 1]), _ex(inputs=[8, 4, 9, 3, 1], targets=[4, 1])]


def test_enc_dec_unpacked_pads_and_shifts():
  converter = fc.get_converter('enc_dec', {'inputs': 6, 'targets': 5})
  features = converter.convert({**PAIR[0], 'inputs_pretokenized': 'ignored'})
  _assert_features(features, {
      'encoder_input_tokens': [7, 8, 5, 1, 0, 0],
      'decoder_target_tokens': [3, 9, 1, 0, 0],
      'decoder_input_tokens': [0, 3, 9, 1, 0],
      'decoder_loss_weights': [1, 1, 1, 0, 0],
  })


def test_enc_dec_packs_two_examples_into_one_row():
  converter = fc.get_converter('enc_dec', {'inputs': 10, 'targets': 7})
  [row] = converter.pack(PAIR)
  _assert_features(row, {
      'encoder_input_tokens': [7, 8, 5, 1, 8, 4, 9, 3, 1, 0],
      'encoder_segment_ids': [1, 1, 1, 1, 2, 2, 2, 2, 2, 0],
      'encoder_positions': [0, 1, 2, 3, 0, 1, 2, 3, 4, 0],
      'decoder_target_tokens': [3, 9, 1, 4, 1, 0, 0],
      'decoder_input_tokens': [0, 3, 9, 0, 4, 0, 0],
      'decoder_loss_weights': [1, 1, 1, 1, 1, 0, 0],
      'decoder_segment_ids': [1, 1, 1, 2, 2, 0, 0],
      'decoder_positions': [0, 1, 2, 0, 1, 0, 0],
  })


def test_start_token_begins_every_packed_example():
  """A BOS start id (Llama's 1) replaces T5's 0 at each example's start; padding stays 0."""
  converter = fc.get_converter('prefix_lm', {'inputs': 5, 'targets': 4}, start_id=1)
  [row] = converter.pack([_ex(inputs=[7, 8, 2], targets=[3, 2]),
                          _ex(inputs=[9, 2], targets=[4, 2])])
  np.testing.assert_array_equal(row['decoder_target_tokens'], [7, 8, 2, 3, 2, 9, 2, 4, 2])
  np.testing.assert_array_equal(row['decoder_input_tokens'], [1, 7, 8, 2, 3, 1, 9, 2, 4])
  padded = fc.get_converter('lm', {'targets': 5}, start_id=1).convert(_ex(targets=[3, 9, 2]))
  np.testing.assert_array_equal(padded['decoder_input_tokens'], [1, 3, 9, 2, 0])
  np.testing.assert_array_equal(
      fc.shift_right(np.array([[5, 2, 6, 2, 0, 0]]), np.array([[1, 1, 2, 2, 0, 0]]), 1),
      [[1, 5, 1, 6, 0, 0]])


def test_lm_packed_and_unpacked():
  converter = fc.get_converter('lm', {'targets': 6})
  [row] = converter.pack([_ex(targets=[3, 9, 1]), _ex(targets=[4, 1])])
  _assert_features(row, {
      'decoder_target_tokens': [3, 9, 1, 4, 1, 0],
      'decoder_input_tokens': [0, 3, 9, 0, 4, 0],
      'decoder_loss_weights': [1, 1, 1, 1, 1, 0],
      'decoder_positions': [0, 1, 2, 0, 1, 0],
      'decoder_segment_ids': [1, 1, 1, 2, 2, 0],
  })
  _assert_features(converter.convert(_ex(targets=[4, 1])), {
      'decoder_target_tokens': [4, 1, 0, 0, 0, 0],
      'decoder_input_tokens': [0, 4, 1, 0, 0, 0],
      'decoder_loss_weights': [1, 1, 0, 0, 0, 0],
  })


def test_first_fit_fills_earlier_rows_first():
  converter = fc.get_converter('lm', {'targets': 6})
  examples = [_ex(targets=[2, 3, 4, 1]), _ex(targets=[5, 6, 7, 1]), _ex(targets=[8, 1])]
  rows = converter.pack(examples, num_packing_bins=2)
  np.testing.assert_array_equal(
      np.stack([r['decoder_target_tokens'] for r in rows]),
      [[2, 3, 4, 1, 8, 1], [5, 6, 7, 1, 0, 0]])
  np.testing.assert_array_equal(
      np.stack([r['decoder_input_tokens'] for r in rows]),
      [[0, 2, 3, 4, 0, 8], [0, 5, 6, 7, 0, 0]])  # the padding segment starts with 0 too


def test_prefix_lm_unpacked_causal_attention_and_loss_on_targets():
  converter = fc.get_converter('prefix_lm', {'inputs': 4, 'targets': 5})
  features = converter.convert(_ex(inputs=[9, 4, 6, 1], targets=[3, 9, 1]))
  _assert_features(features, {
      'decoder_target_tokens': [9, 4, 6, 1, 3, 9, 1, 0, 0],
      'decoder_input_tokens': [0, 9, 4, 6, 1, 3, 9, 1, 0],
      'decoder_loss_weights': [0, 0, 0, 0, 1, 1, 1, 0, 0],
      'decoder_causal_attention': [1, 1, 1, 1, 1, 0, 0, 0, 0],
  })


@pytest.mark.parametrize('loss_on_targets_only, loss_weights', [
    (True, [0, 0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 0, 1, 1, 0]),
    (False, [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0]),
])
def test_prefix_lm_packed(loss_on_targets_only, loss_weights):
  converter = fc.get_converter('prefix_lm', {'inputs': 7, 'targets': 8},
                               loss_on_targets_only=loss_on_targets_only)
  [row] = converter.pack(PAIR)
  _assert_features(row, {
      'decoder_target_tokens': [7, 8, 5, 1, 3, 9, 1, 8, 4, 9, 3, 1, 4, 1, 0],
      'decoder_input_tokens': [0, 7, 8, 5, 1, 3, 9, 0, 8, 4, 9, 3, 1, 4, 0],
      'decoder_loss_weights': loss_weights,
      'decoder_positions': [0, 1, 2, 3, 4, 5, 6, 0, 1, 2, 3, 4, 5, 6, 0],
      'decoder_segment_ids': [1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 0],
      'decoder_causal_attention': [1, 1, 1, 1, 1, 0, 0, 1, 1, 1, 1, 1, 1, 0, 0],
  })


def test_causal_lm_is_prefix_lm_without_the_bidirectional_prefix():
  converter = fc.get_converter('causal_lm', {'inputs': 4, 'targets': 5})
  features = converter.convert(_ex(inputs=[9, 4, 6, 1], targets=[3, 9, 1]))
  _assert_features(features, {
      'decoder_target_tokens': [9, 4, 6, 1, 3, 9, 1, 0, 0],
      'decoder_input_tokens': [0, 9, 4, 6, 1, 3, 9, 1, 0],
      'decoder_loss_weights': [0, 0, 0, 0, 1, 1, 1, 0, 0],
  })
  [row] = fc.get_converter('causal_lm', {'inputs': 7, 'targets': 8}).pack(PAIR)
  _assert_features(row, {
      'decoder_target_tokens': [7, 8, 5, 1, 3, 9, 1, 8, 4, 9, 3, 1, 4, 1, 0],
      'decoder_input_tokens': [0, 7, 8, 5, 1, 3, 9, 0, 8, 4, 9, 3, 1, 4, 0],
      'decoder_loss_weights': [0, 0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 0, 1, 1, 0],
      'decoder_positions': [0, 1, 2, 3, 4, 5, 6, 0, 1, 2, 3, 4, 5, 6, 0],
      'decoder_segment_ids': [1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 0],
  })


def test_model_features_on_a_batch_match_each_row():
  converter = fc.get_converter('enc_dec', {'inputs': 5, 'targets': 4})
  examples = [_ex(inputs=[5, 6, 1], targets=[7, 1]), _ex(inputs=[8, 1], targets=[9, 9, 1])]
  padded = [converter.pad(converter.prepare(e)) for e in examples]
  batch = converter.model_features({k: np.stack([p[k] for p in padded]) for k in padded[0]})
  for i, example in enumerate(examples):
    _assert_features({k: v[i] for k, v in batch.items()}, converter.convert(example))


def test_truncation_keeps_the_first_tokens_and_warns_with_the_count(caplog):
  converter = fc.get_converter('enc_dec', {'inputs': 3, 'targets': 2})
  with caplog.at_level(logging.WARNING):
    features = [converter.convert(e) for e in PAIR + PAIR[:1]]
  np.testing.assert_array_equal(features[0]['encoder_input_tokens'], [7, 8, 5])
  np.testing.assert_array_equal(features[0]['decoder_target_tokens'], [3, 9])
  np.testing.assert_array_equal(features[1]['decoder_target_tokens'], [4, 1])
  assert converter.stats == fc.ConversionStats(examples=3, truncated=3, dropped=0)
  warnings = [r.getMessage() for r in caplog.records if 'converter' in r.getMessage()]
  assert len(warnings) == 1  # at the 1st occurrence, next at the 10th
  assert '1 of 1 examples' in warnings[0] and 'truncated' in warnings[0]


def test_drop_mode_drops_and_counts(caplog):
  converter = fc.get_converter('lm', {'targets': 3}, truncate=False)
  examples = [_ex(targets=[2, 1]), _ex(targets=[2, 3, 4, 1])] * 10
  with caplog.at_level(logging.WARNING):
    rows = converter.pack(examples, num_packing_bins=1)
  assert converter.stats == fc.ConversionStats(examples=20, truncated=0, dropped=10)
  assert len(rows) == 10 and all(r['decoder_target_tokens'][0] == 2 for r in rows)
  warnings = [r.getMessage() for r in caplog.records if 'dropped' in r.getMessage()]
  assert len(warnings) == 2 and '10 of 20 examples' in warnings[1]


def test_packing_efficiency():
  batch = {'encoder_input_tokens': np.array([[5, 1, 0, 0], [6, 7, 8, 1]]),
           'decoder_target_tokens': np.array([[3, 1], [4, 0]]),
           'decoder_loss_weights': np.array([[1, 1], [1, 0]])}
  assert fc.token_counts(batch) == {'encoder_input_tokens': (6, 8),
                                    'decoder_target_tokens': (3, 4)}
  assert fc.packing_efficiency(batch) == pytest.approx(9 / 12)


@pytest.mark.parametrize('name, lengths, example, message', [
    ('enc_dec', {'inputs': 4, 'targets': 4}, {'targets': [1]}, "'inputs' feature"),
    ('lm', {'targets': 4}, {'targets': np.array([1.5])}, '1-D integer array'),
    ('lm', {'targets': 4}, {'targets': [[3, 1]]}, '1-D integer array'),
    ('prefix_lm', {'inputs': 4, 'targets': 4}, {'inputs': [3, 1], 'targets': []},
     "empty 'targets'"),
])
def test_bad_examples_raise_a_clear_error(name, lengths, example, message):
  with pytest.raises(ValueError, match=message):
    fc.get_converter(name, lengths).convert(example)


@pytest.mark.parametrize('name, lengths, message', [
    ('enc_dec', {'targets': 4}, r"\['inputs', 'targets'\]"),
    ('lm', {'targets': 0}, 'positive ints'),
    ('encoder', {'targets': 4}, KNOWN_CONVERTERS),
])
def test_bad_converter_arguments_raise(name, lengths, message):
  with pytest.raises(ValueError, match=message):
    fc.get_converter(name, lengths)
