"""What a run's data looks like before training: the `data` report, train's one-line
truncation summary, and a SentencePiece vocabulary trained on a task's own text (`vocab`).

All figures come from the task's preprocessed examples under the configured vocabulary and
converter, over at most `max_examples` of a split (evenly spaced, so a sample is spread over
the whole file). Percentiles are nearest-rank: p95 is the smallest length that at least 95%
of the examples do not exceed.
"""

import dataclasses
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np

from t5x_lite.data import feature_converters, pipeline, tasks, vocabularies

PERCENTILES = (50, 90, 95, 99)
KEEP_WHOLE = 0.95  # the share of examples a suggested feature_lengths keeps whole
NUM_SHOWN = 3  # rendered examples per split
_SHOWN_IDS = 12  # ids printed per rendered feature


def nearest_rank(lengths: Sequence[int], q: float) -> int:
  """The smallest value that at least q% of `lengths` do not exceed."""
  ordered = sorted(lengths)
  return int(ordered[max(math.ceil(q / 100 * len(ordered)), 1) - 1])


def suggest_lengths(lengths: Mapping[str, Sequence[int]], keep: float = KEEP_WHOLE
                    ) -> dict[str, int]:
  """The smallest per-feature rank r (the same for every feature) whose lengths keep at
  least `keep` of the examples whole in all features at once."""
  arrays = {k: np.asarray(v) for k, v in lengths.items()}
  ordered = {k: np.sort(v) for k, v in arrays.items()}
  count = len(next(iter(arrays.values())))
  for rank in range(max(math.ceil(keep * count), 1), count + 1):
    suggestion = {k: int(v[rank - 1]) for k, v in ordered.items()}
    whole = np.all([arrays[k] <= n for k, n in suggestion.items()], axis=0)
    if whole.mean() >= keep:
      return suggestion
  return {k: int(v[-1]) for k, v in ordered.items()}


@dataclasses.dataclass
class SplitStats:
  """Token lengths (EOS included) of a split's examples, and what `feature_lengths` cut."""

  split: str
  num_examples: int  # in the split
  lengths: dict[str, np.ndarray]  # feature -> one length per (sampled) example
  feature_lengths: dict[str, int]
  samples: list[dict[str, Any]] = dataclasses.field(default_factory=list)
  packing_efficiency: float | None = None

  @property
  def num_measured(self) -> int:
    return len(next(iter(self.lengths.values())))

  def cut(self) -> dict[str, int]:
    """Examples longer than the feature length, per feature and 'any'."""
    over = {k: self.lengths[k] > n for k, n in self.feature_lengths.items()}
    return {**{k: int(v.sum()) for k, v in over.items()},
            'any': int(np.any(list(over.values()), axis=0).sum())}

  def percentiles(self, feature: str) -> dict[str, int]:
    values = self.lengths[feature].tolist()
    return {**{f'p{q}': nearest_rank(values, q) for q in PERCENTILES}, 'max': max(values)}

  def suggestion(self) -> dict[str, int]:
    return suggest_lengths(self.lengths)

  def summary(self) -> str:
    """One line: the share feature_lengths cut, and lengths that would keep 95% whole."""
    cut, total = self.cut(), self.num_measured
    per_feature = ', '.join(f'{k} {cut[k]:,}' for k in self.feature_lengths)
    current = ' '.join(f'{k}={n}' for k, n in self.feature_lengths.items())
    suggested = ' '.join(f'{k}={n}' for k, n in self.suggestion().items())
    sampled = '' if total == self.num_examples else f', {total:,} measured'
    return (f'data: {self.split} ({self.num_examples:,} examples{sampled}): feature_lengths '
            f'{current} cut {cut["any"]:,} ({cut["any"] / total:.1%}; {per_feature}); '
            f'{suggested} keeps {KEEP_WHOLE:.0%} whole')


def _converter(data: ml_collections.ConfigDict) -> feature_converters.FeatureConverter:
  features = feature_converters.CONVERTERS[data.converter].task_features
  lengths = {k: int(data.feature_lengths[k]) for k in features}
  return feature_converters.get_converter(data.converter, lengths, truncate=data.truncate)


def spread(count: int, max_count: int) -> list[int]:
  """`max_count` evenly spaced indices into `count` items (all of them if fewer; 0: all)."""
  if not max_count or count <= max_count:
    return list(range(count))
  return [i * count // max_count for i in range(max_count)]


def _examples(task: tasks.Task | tasks.Mixture, split: str, max_examples: int
              ) -> tuple[int, list[dict[str, Any]]]:
  """The split's size and its preprocessed examples (an evenly spaced sample)."""
  dataset = pipeline.example_dataset(task, split, shuffle=False)
  examples = [dataset[i] for i in spread(len(dataset), max_examples)]
  examples = [e for e in examples if e is not None]  # dropped by a preprocessor
  if not examples:
    raise ValueError(f'split {split!r} of task {task.name} has no examples')
  return len(dataset), examples


def split_stats(data: ml_collections.ConfigDict, split: str, *, batch_size: int = 0,
                max_examples: int = 10_000) -> SplitStats:
  """Token-length statistics of one split of the run config's task.

  Args:
    data: a run config's `data` section (task or files, vocabulary, converter, lengths).
    split: e.g. 'train'.
    batch_size: > 0: also pack (or pad, with data.pack False) the measured examples into
      rows as the pipeline would, with this many packing bins, for the packing efficiency.
    max_examples: measure at most this many examples (0: all).
  """
  task = tasks.from_config(data)
  converter = _converter(data)
  num_examples, examples = _examples(task, split, max_examples)
  lengths = {k: np.array([len(e[k]) for e in examples]) for k in converter.task_features}
  stats = SplitStats(split, num_examples, lengths, dict(converter.task_feature_lengths),
                     samples=examples[:NUM_SHOWN])
  if batch_size:
    # Cut (or drop) over-long examples here, as the converter would, so it does not warn
    # about what the report already counts.
    lengths = converter.task_feature_lengths
    fitted = [{k: e[k][:n] for k, n in lengths.items()} for e in examples
              if data.truncate or all(len(e[k]) <= n for k, n in lengths.items())]
    rows = converter.pack(fitted, batch_size) if data.pack else map(converter.convert, fitted)
    counts = [feature_converters.token_counts(row).values() for row in rows]
    used = sum(u for c in counts for u, _ in c)
    stats.packing_efficiency = used / max(sum(t for c in counts for _, t in c), 1)
  return stats


def truncation_summary(data: ml_collections.ConfigDict, max_examples: int = 2_000) -> str:
  """The line `train` prints at start-up: how much of `data.split` its lengths cut
  (measured on at most `max_examples`, so start-up stays quick)."""
  return split_stats(data, data.split, max_examples=max_examples).summary()


def _vocabulary(task: tasks.Task | tasks.Mixture) -> vocabularies.Vocabulary:
  return task.output_features['targets'].vocabulary


def _vocabulary_name(vocabulary: vocabularies.Vocabulary) -> str:
  """'ende_8k.model' for a SentencePiece model, the repr otherwise."""
  return os.path.basename(getattr(vocabulary, 'model_file', '')) or repr(vocabulary)


def _ids(ids: Sequence[int]) -> str:
  shown = ', '.join(str(i) for i in list(ids)[:_SHOWN_IDS])
  return f'[{shown}{", ..." if len(ids) > _SHOWN_IDS else ""}] ({len(ids)} ids)'


def format_split(stats: SplitStats, vocabulary: vocabularies.Vocabulary) -> list[str]:
  """The report's lines for one split."""
  lines = [f'{stats.split}: {stats.num_examples:,} examples'
           + ('' if stats.num_measured == stats.num_examples
              else f' (statistics over {stats.num_measured:,}, evenly spaced)')]
  for number, example in enumerate(stats.samples, start=1):
    lines.append(f'  example {number}')
    for key in stats.lengths:
      lines.append(f'    {key + ":":<9}{vocabulary.decode(example[key])}')
      lines.append(f'    {"":<9}{_ids(example[key])}')
  cut = stats.cut()
  lines.append(f'  {"tokens":<10}' + ''.join(f'{q:>7}' for q in (*stats.percentiles(
      next(iter(stats.lengths))), 'length')) + '  cut')
  for key, length in stats.feature_lengths.items():
    values = ''.join(f'{v:>7}' for v in stats.percentiles(key).values())
    lines.append(f'  {key:<10}{values}{length:>7}  {cut[key]:,} '
                 f'({cut[key] / stats.num_measured:.1%})')
  lines.append(f'  examples cut by feature_lengths: {cut["any"]:,} of {stats.num_measured:,} '
               f'({cut["any"] / stats.num_measured:.1%})')
  if stats.packing_efficiency is not None:
    lines.append(f'  packing efficiency: {stats.packing_efficiency:.3f}')
  suggestion = ' '.join(f'--config.data.feature_lengths.{k}={n}'
                        for k, n in stats.suggestion().items())
  lines.append(f'  keeps {KEEP_WHOLE:.0%} whole: {suggestion}')
  return lines


def data_report(config: ml_collections.ConfigDict, max_examples: int = 10_000) -> str:
  """The `data` command's report on every split of the run config's task."""
  task = tasks.from_config(config.data)
  vocabulary = _vocabulary(task)
  lengths = ' '.join(f'{k}={v}' for k, v in config.data.feature_lengths.items())
  lines = [f'task {task.name}: splits {", ".join(task.splits)}; vocabulary '
           f'{_vocabulary_name(vocabulary)} '
           f'({vocabulary.vocab_size:,} ids); converter {config.data.converter}, '
           f'feature_lengths {lengths}, {"packed" if config.data.pack else "padded"} in '
           f'batches of {config.train.batch_size}']
  for split in task.splits:
    stats = split_stats(config.data, split, batch_size=config.train.batch_size,
                        max_examples=max_examples)
    lines += format_split(stats, vocabulary)
  return '\n'.join(lines)


# ----------------------------------------------------------------------------------------
# A vocabulary for the task's own text
# ----------------------------------------------------------------------------------------


def task_texts(task: tasks.Task, split: str, max_examples: int = 0) -> dict[str, list[str]]:
  """The text of each feature ('inputs', 'targets') as the task renders it before
  tokenizing (its templates applied), over at most `max_examples` evenly spaced rows."""
  text_steps, _ = tasks.split_at_tokenize(task)
  text_task = dataclasses.replace(task, preprocessors=tuple(text_steps))
  source = task.source(split)
  texts: dict[str, list[str]] = {key: [] for key in task.output_features}
  rng = np.random.default_rng(0)
  for i in spread(len(source), max_examples):
    example = text_task.preprocess(source[i], rng)
    for key, values in texts.items():
      if example is not None and isinstance(example.get(key), str):
        values.append(example[key])
  return {key: values for key, values in texts.items() if values}


def coverage(vocabulary: vocabularies.Vocabulary, texts: Sequence[str]) -> dict[str, float]:
  """How a vocabulary spells `texts`: tokens per (whitespace) word, the share of unknown
  tokens and the share of byte-fallback tokens (characters it has no piece for)."""
  ids = [i for text in texts for i in vocabulary.encode(text)]
  words = sum(len(text.split()) for text in texts)
  piece = getattr(vocabulary, 'id_to_piece', None)
  byte_ids = sum(1 for i in ids if piece and i < vocabulary.base_vocab_size
                 and piece(i).startswith('<0x'))
  return {'tokens_per_word': len(ids) / max(words, 1),
          'unk_rate': sum(1 for i in ids if i == vocabulary.unk_id) / max(len(ids), 1),
          'byte_rate': byte_ids / max(len(ids), 1)}


def _coverage_lines(vocabularies_by_name: Mapping[str, vocabularies.Vocabulary],
                    texts: Mapping[str, list[str]]) -> list[str]:
  lines = [f'  {"vocabulary":<28}{"feature":<10}{"tokens/word":>12}{"unk rate":>10}'
           f'{"byte rate":>11}']
  for name, vocabulary in vocabularies_by_name.items():
    for key, values in texts.items():
      c = coverage(vocabulary, values)
      lines.append(f'  {name:<28}{key:<10}{c["tokens_per_word"]:>12.3f}'
                   f'{c["unk_rate"]:>10.4f}{c["byte_rate"]:>11.4f}')
  return lines


def train_vocabulary(config: ml_collections.ConfigDict, size: int, out: str,
                     max_texts: int = 100_000) -> str:
  """The `vocab` command: trains a T5-layout SentencePiece model (unigram, byte fallback,
  pad 0 / EOS 1 / unk 2, 100 sentinel ids on top) on the train split's rendered inputs and
  targets, writes it to `out`, and returns a report of its coverage beside the configured
  vocabulary's and the config line that uses it.

  Args:
    config: the run config (its `data` section names the task and current vocabulary).
    size: SentencePiece pieces (the model's vocabulary adds 100 sentinel ids).
    out: the new .model file; must not exist.
    max_texts: train on at most this many examples (evenly spaced).
  """
  if not out.endswith('.model'):
    raise ValueError(f'vocab.out must be a .model path, got {out!r}; e.g. --vocab.out=my.model')
  if os.path.exists(out):
    raise ValueError(f'{out} already exists; choose a new --vocab.out (nothing is overwritten)')
  if not os.path.isdir(os.path.dirname(os.path.abspath(out))):
    raise ValueError(f'the directory of --vocab.out={out} does not exist; create it first')
  task = tasks.from_config(config.data)
  if isinstance(task, tasks.Mixture):
    raise ValueError(f'{task.name} is a mixture; train a vocabulary on one of its tasks '
                     f'with --config.data.task=NAME ({", ".join(task.task_names)})')
  train = task_texts(task, config.data.split, max_texts)
  path = vocabularies.train_sentencepiece(
      (text for values in train.values() for text in values), out.removesuffix('.model'),
      size)
  vocabulary = vocabularies.SentencePieceVocabulary(path)
  held_out = 'validation' if 'validation' in task.splits else config.data.split
  texts = task_texts(task, held_out, max_texts)
  # Embedding tables in multiples of 128 map evenly onto TPU lanes (8,100 ids -> 8,192).
  vocab_size = math.ceil(vocabulary.vocab_size / 128) * 128
  return '\n'.join([
      f'wrote {path}: {vocabulary.base_vocab_size:,} pieces + {vocabulary.extra_ids} sentinel '
      f'ids = {vocabulary.vocab_size:,} ids, trained on '
      f'{sum(map(len, train.values())):,} texts of {task.name} {config.data.split}',
      f'coverage on {task.name} {held_out}:',
      *_coverage_lines({os.path.basename(path) + ' (new)': vocabulary,
                        _vocabulary_name(_vocabulary(task)) + ' (current)': _vocabulary(task)},
                       texts),
      'use it: --config.data.vocabulary=' + path + f' --config.model.vocab_size={vocab_size}'])
