"""Tests for t5x_lite.metrics against hand-computed scores."""

import pytest

from t5x_lite import metrics


def test_bleu_identical_is_100():
  text = ['The cat sat on the mat.', 'Hello world!']
  assert metrics.bleu(text, text) == {'bleu': pytest.approx(100.0)}


def test_bleu_hand_computed():
  # Tokens: the cat sat on the mat / the cat sat on a mat (same length, brevity penalty 1).
  # Clipped n-gram precisions 5/6, 3/5, 2/4, 1/3; BLEU = (product)^(1/4) = (1/12)^(1/4).
  score = metrics.bleu(['the cat sat on a mat'], ['the cat sat on the mat'])['bleu']
  assert score == pytest.approx(100 * (1 / 12) ** 0.25)


def test_bleu_chinese_tokenization():
  # 'zh' splits CJK characters: 9 tokens, the last one wrong -> precisions 8/9, 7/8, 6/7, 5/6
  # whose product is 5/9; 'intl' sees one token per side and no match at all.
  target, prediction = ['我们今天去公园散步'], ['我们今天去公园散心']
  assert metrics.bleu(target, prediction, tokenize='zh')['bleu'] == pytest.approx(
      100 * (5 / 9) ** 0.25)
  assert metrics.bleu(target, prediction)['bleu'] == pytest.approx(0.0)


def test_rouge_hand_computed():
  # rouge1: P 2/2, R 2/3 -> F 0.8; rouge2: P 1/1, R 1/2 -> F 2/3; LCS 2 -> F 0.8.
  scores = metrics.rouge(['the cat sat'], ['the cat'])
  assert scores == pytest.approx({'rouge1': 80.0, 'rouge2': 200 / 3, 'rougeLsum': 80.0})
  assert metrics.rouge(['a b c'], ['a b c']) == pytest.approx(
      {'rouge1': 100.0, 'rouge2': 100.0, 'rougeLsum': 100.0})


def test_rouge_lsum_scores_sentences_separately():
  # The sentences are swapped: one LCS over the whole text covers half the tokens, but
  # rougeLsum matches sentence by sentence (after T5's " . " -> newline split) and gets all.
  target, prediction = ['a b . c d'], ['c d . a b']
  assert metrics.rouge(target, prediction, score_keys=('rougeL',))['rougeL'] == pytest.approx(50)
  assert metrics.rouge(target, prediction)['rougeLsum'] == pytest.approx(100.0)


def test_accuracy():
  assert metrics.accuracy(['a', 'b', 'a', 'b'], ['a', 'b', 'b', 'b']) == {'accuracy': 75.0}


def test_macro_f1_two_classes():
  # pos: TP 2, FP 0, FN 1 -> F1 4/5; neg: TP 1, FP 1, FN 0 -> F1 2/3; mean 11/15.
  targets = ['pos', 'pos', 'pos', 'neg']
  predictions = ['pos', 'neg', 'pos', 'neg']
  assert metrics.macro_f1(targets, predictions)['macro_f1'] == pytest.approx(100 * 11 / 15)


def test_macro_f1_invalid_prediction_adds_no_class():
  # 'x' is a miss for class b (F1 0) but not a third class: (1 + 0) / 2.
  assert metrics.macro_f1(['a', 'b'], ['a', 'x'])['macro_f1'] == pytest.approx(50.0)


def test_squad_normalisation_and_f1():
  # Example 1: 'cat!' normalises to 'cat', matching the second of its answers exactly.
  # Example 2: 'big red apple' vs 'red apple pie': 2 common tokens, P = R = 2/3 -> F1 2/3.
  targets = [['The Dog', 'the cat'], 'The big red apple']
  scores = metrics.squad(targets, ['cat!', 'red apple pie'])
  assert scores == pytest.approx({'em': 50.0, 'f1': 100 * (1 + 2 / 3) / 2})
  assert metrics.normalize_squad('  The  Answer, is: an apple. ') == 'answer is apple'


@pytest.mark.parametrize('name', sorted(metrics.METRICS))
def test_length_mismatch_is_an_error(name):
  with pytest.raises(ValueError, match='2 targets but 1 predictions'):
    metrics.METRICS[name](['a', 'b'], ['a'])
