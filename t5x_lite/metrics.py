"""Evaluation metrics on decoded text, following T5's `t5.evaluation.metrics`.

Every metric is `fn(targets, predictions) -> dict[str, float]` over parallel lists of strings
(squad also takes a list of reference answers per example) and reports scores in 0..100, as T5
does. `METRICS` maps the names a config may use to the functions.
"""

import collections
from collections.abc import Callable, Sequence
import re
import string

import sacrebleu

MetricFn = Callable[[Sequence, Sequence[str]], dict[str, float]]


def _check_lengths(targets: Sequence, predictions: Sequence[str]) -> None:
  if len(targets) != len(predictions):
    raise ValueError(f'{len(targets)} targets but {len(predictions)} predictions; '
                     'pass one prediction per target')
  if not targets:
    raise ValueError('no targets to score; pass at least one example')


def bleu(targets: Sequence[str], predictions: Sequence[str], *,
         tokenize: str = 'intl') -> dict[str, float]:
  """Corpus BLEU with T5's sacrebleu settings ('intl' tokenization; use 'zh' for Chinese)."""
  _check_lengths(targets, predictions)
  score = sacrebleu.corpus_bleu(
      list(predictions), [list(targets)], smooth_method='exp', smooth_value=0.0,
      lowercase=False, tokenize=tokenize, use_effective_order=False)
  return {'bleu': score.score}


def _sentence_lines(text: str) -> str:
  # rougeLsum scores the union LCS per sentence, and sentences are the lines of the text;
  # T5 breaks lines after " . " the same way.
  return text.replace(' . ', ' .\n')


def rouge(targets: Sequence[str], predictions: Sequence[str], *,
          score_keys: Sequence[str] = ('rouge1', 'rouge2', 'rougeLsum'),
          use_stemmer: bool = False) -> dict[str, float]:
  """Mean ROUGE F-measures (T5 reports the bootstrap median, which approaches this mean)."""
  # Imported here: rouge_score pulls in nltk and scipy (over a second), and importing the
  # task registry, which references this module, should stay fast.
  from rouge_score import rouge_scorer  # pylint: disable=g-import-not-at-top
  _check_lengths(targets, predictions)
  scorer = rouge_scorer.RougeScorer(list(score_keys), use_stemmer=use_stemmer)
  totals = collections.Counter()
  for target, prediction in zip(targets, predictions):
    scores = scorer.score(target=_sentence_lines(target), prediction=_sentence_lines(prediction))
    totals.update({key: scores[key].fmeasure for key in score_keys})
  return {key: 100 * totals[key] / len(targets) for key in score_keys}


def accuracy(targets: Sequence[str], predictions: Sequence[str]) -> dict[str, float]:
  """Percentage of predictions equal to their target."""
  _check_lengths(targets, predictions)
  correct = sum(t == p for t, p in zip(targets, predictions))
  return {'accuracy': 100 * correct / len(targets)}


def macro_f1(targets: Sequence[str], predictions: Sequence[str]) -> dict[str, float]:
  """Unweighted mean of per-class F1 over the classes that occur in `targets`.

  A prediction outside those classes counts as a miss for its target's class but adds no
  class of its own (T5's `mean_multiclass_f1` with the task's labels).
  """
  _check_lengths(targets, predictions)
  true_pos, false_pos, false_neg = (collections.Counter() for _ in range(3))
  for target, prediction in zip(targets, predictions):
    if target == prediction:
      true_pos[target] += 1
    else:
      false_pos[prediction] += 1
      false_neg[target] += 1
  classes = set(targets)
  f1s = [2 * true_pos[c] / (2 * true_pos[c] + false_pos[c] + false_neg[c]) for c in classes]
  return {'macro_f1': 100 * sum(f1s) / len(classes)}


def normalize_squad(text: str) -> str:
  """SQuAD v1.1 answer normalisation: lower case, drop punctuation, articles, extra spaces."""
  text = ''.join(ch for ch in text.lower() if ch not in string.punctuation)
  return ' '.join(re.sub(r'\b(a|an|the)\b', ' ', text).split())


def _token_f1(target: str, prediction: str) -> float:
  target_tokens, prediction_tokens = target.split(), prediction.split()
  common = sum((collections.Counter(target_tokens) & collections.Counter(prediction_tokens))
               .values())
  if common == 0:
    return 0.0
  precision, recall = common / len(prediction_tokens), common / len(target_tokens)
  return 2 * precision * recall / (precision + recall)


def squad(targets: Sequence[str | Sequence[str]],
          predictions: Sequence[str]) -> dict[str, float]:
  """SQuAD exact match and token F1, each the max over an example's reference answers."""
  _check_lengths(targets, predictions)
  em = f1 = 0.0
  for answers, prediction in zip(targets, predictions):
    answers = [normalize_squad(a) for a in ([answers] if isinstance(answers, str) else answers)]
    prediction = normalize_squad(prediction)
    em += max(float(a == prediction) for a in answers)
    f1 += max(_token_f1(a, prediction) for a in answers)
  return {'em': 100 * em / len(targets), 'f1': 100 * f1 / len(targets)}


METRICS: dict[str, MetricFn] = {
    'bleu': bleu,
    'rouge': rouge,
    'accuracy': accuracy,
    'macro_f1': macro_f1,
    'squad': squad,
}
