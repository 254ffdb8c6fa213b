"""Tasks, mixtures and their registry, with the bundled tasks registered at import.

A Task pairs a data source per split with the preprocessors that turn a raw row into model
examples, the output features (vocabularies) and the metrics for its decoded predictions.
A Mixture names registered tasks and their sampling rates; the pipeline does the sampling.
The registry is the one place names are looked up:

  task = tasks.get('translate_en_de')
  example = task.preprocess(task.source('train')[0])   # {'inputs': int32[...], 'targets': ...}

A TSV/JSONL/text task can be added without code with `register_from_config`.
"""

import dataclasses
import functools
import inspect
import string
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from t5x_lite import metrics
from t5x_lite.data import preprocessors, sources, vocabularies
from t5x_lite.data.vocabularies import Feature

Example = dict[str, Any]
Preprocessor = Callable[..., Example | None]


@dataclasses.dataclass(frozen=True)
class Task:
  """A dataset, how to preprocess it and how to score predictions on it.

  Attributes:
    name: the registry name.
    source: split name -> random-access source of raw rows (`len`, `[i] -> dict`).
    preprocessors: applied in order by `preprocess`; each maps an example to a new one or to
      None (dropped), and receives `rng` / `output_features` if its signature names them.
    output_features: the tokenized features ('inputs', 'targets') and their vocabularies.
    metric_fns: `fn(targets, predictions) -> dict[str, float]` on postprocessed text.
    postprocess_fn: maps decoded text (predictions and targets) to what metrics compare;
      None keeps it unchanged.
  """

  name: str
  source: Callable[[str], sources.DataSource]
  preprocessors: Sequence[Preprocessor]
  output_features: Mapping[str, Feature]
  metric_fns: Sequence[metrics.MetricFn] = ()
  postprocess_fn: Callable[[str], str] | None = None

  @functools.cached_property
  def _wants(self) -> list[tuple[Preprocessor, bool, bool]]:
    # Signatures are inspected once per task, not once per example.
    params = [inspect.signature(fn).parameters for fn in self.preprocessors]
    return [(fn, 'rng' in p, 'output_features' in p) for fn, p in zip(self.preprocessors, params)]

  def preprocess(self, example: Example,
                 rng: np.random.Generator | None = None) -> Example | None:
    """Runs the preprocessors on one raw example; None if one of them drops it.

    Args:
      example: a row of `self.source(split)`.
      rng: the generator for random preprocessors (the pipeline seeds one per example and
        epoch); required only if a preprocessor takes `rng`.
    """
    for fn, wants_rng, wants_features in self._wants:
      kwargs = {}
      if wants_rng:
        if rng is None:
          raise ValueError(f'task {self.name}: preprocessor {_name(fn)} is random; pass '
                           'rng=np.random.default_rng(seed) to preprocess')
        kwargs['rng'] = rng
      if wants_features:
        kwargs['output_features'] = self.output_features
      example = fn(example, **kwargs)
      if example is None:
        return None
    return example

  def score(self, targets: Sequence[str], predictions: Sequence[str]) -> dict[str, float]:
    """All metrics on the postprocessed targets and predictions, merged into one dict."""
    if self.postprocess_fn is not None:
      targets = [self.postprocess_fn(t) for t in targets]
      predictions = [self.postprocess_fn(p) for p in predictions]
    return {k: v for fn in self.metric_fns for k, v in fn(targets, predictions).items()}


def _name(fn: Callable) -> str:
  return getattr(getattr(fn, 'func', fn), '__name__', repr(fn))


class Mixture:
  """Registered tasks sampled with fixed rates, normalised to sum to 1."""

  def __init__(self, name: str, tasks: Sequence[str], rates: Sequence[float] | None = None):
    """Builds a mixture.

    Args:
      name: the registry name.
      tasks: names of registered tasks (looked up when `tasks` is read).
      rates: one positive sampling rate per task; default equal.
    """
    rates = [1.0] * len(tasks) if rates is None else [float(r) for r in rates]
    if not tasks or len(rates) != len(tasks):
      raise ValueError(f'mixture {name}: needs one rate per task, got {len(tasks)} tasks and '
                       f'{len(rates)} rates')
    if len(set(tasks)) != len(tasks) or not all(0 < r < float('inf') for r in rates):
      raise ValueError(f'mixture {name}: tasks must be distinct and rates positive and finite, '
                       f'got {list(tasks)} with rates {rates}')
    self.name = name
    self.task_names = tuple(tasks)
    self.rates = tuple(r / sum(rates) for r in rates)

  @property
  def tasks(self) -> list[Task]:
    """The tasks, looked up in the registry (in `task_names` order, matching `rates`)."""
    found = [get(name) for name in self.task_names]
    for task in found:
      if isinstance(task, Mixture):
        raise TypeError(f'mixture {self.name}: {task.name} is a mixture; list its tasks instead')
    return found

  @property
  def output_features(self) -> Mapping[str, Feature]:
    """The features all its tasks share (examples from any task must batch together)."""
    first, *rest = self.tasks
    for task in rest:
      if task.output_features != first.output_features:
        raise ValueError(f'mixture {self.name}: {task.name} and {first.name} have different '
                         'output_features; a mixture needs the same features in every task')
    return first.output_features

  def __repr__(self) -> str:
    return f'Mixture({self.name!r}, {list(self.task_names)}, rates={list(self.rates)})'


class _MixtureWithVocabulary(Mixture):
  """A mixture whose tasks all use one replacement vocabulary (see `with_vocabulary`)."""

  def __init__(self, mixture: Mixture, vocabulary: vocabularies.Vocabulary):
    super().__init__(mixture.name, mixture.task_names, mixture.rates)
    self.vocabulary = vocabulary

  @property
  def tasks(self) -> list[Task]:
    return [with_vocabulary(task, self.vocabulary) for task in super().tasks]


# config.data.vocabulary of a model that came without a tokenizer: never a substitute.
NO_VOCABULARY = 'none'


def with_vocabulary(task: Task | Mixture, vocabulary: str | vocabularies.Vocabulary
                    ) -> Task | Mixture:
  """The task (or mixture) with every feature in `vocabulary`, e.g. a converted model's.

  Args:
    task: a task or mixture.
    vocabulary: a Vocabulary or a SentencePiece .model path; '' returns `task` unchanged;
      NO_VOCABULARY (a model converted without a tokenizer) raises, asking for one.
  """
  if not vocabulary:
    return task
  if vocabulary == NO_VOCABULARY:
    raise ValueError(f"this model has no tokenizer (config.data.vocabulary='{NO_VOCABULARY}', "
                     'as convert writes for an HF directory without one); pass its tokenizer '
                     'with --config.data.vocabulary=PATH/TO/spiece.model')
  if isinstance(vocabulary, str):
    vocabulary = vocabularies.SentencePieceVocabulary(vocabulary)
  if isinstance(task, Mixture):
    return _MixtureWithVocabulary(task, vocabulary)
  return dataclasses.replace(task, output_features={
      name: dataclasses.replace(feature, vocabulary=vocabulary)
      for name, feature in task.output_features.items()})


# ----------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------

_REGISTRY: dict[str, Task | Mixture] = {}


class UnknownNameError(KeyError):
  """An unregistered task or mixture name; prints its message without KeyError's quotes."""

  def __str__(self) -> str:
    return str(self.args[0])


def register(item: Task | Mixture, overwrite: bool = False) -> Task | Mixture:
  """Adds a task or mixture under its name and returns it."""
  if item.name in _REGISTRY and not overwrite:
    raise ValueError(f'{item.name!r} is already registered; pass overwrite=True to replace it')
  _REGISTRY[item.name] = item
  return item


def get(name: str) -> Task | Mixture:
  """The registered task or mixture called `name`."""
  if name not in _REGISTRY:
    raise UnknownNameError(
        f'unknown task or mixture {name!r}; registered: {", ".join(names())}. To add your '
        'own TSV/JSONL data, call t5x_lite.data.tasks.register_from_config({...}) in your '
        'config file (see the README)')
  return _REGISTRY[name]


def names() -> list[str]:
  """Sorted names of every registered task and mixture."""
  return sorted(_REGISTRY)


# ----------------------------------------------------------------------------------------
# Tasks from plain config
# ----------------------------------------------------------------------------------------

_CONFIG_KEYS = ('name', 'paths', 'format', 'columns', 'inputs_template', 'targets_template',
                'vocabulary', 'metrics')
_REQUIRED_KEYS = ('name', 'paths', 'inputs_template', 'targets_template')


def _template_fields(template: str) -> set[str]:
  """Top-level field names of a str.format template ('{a.b[0]}' -> 'a')."""
  return {field.split('.')[0].split('[')[0]
          for _, field, _, _ in string.Formatter().parse(template) if field}


def _split_source(task: str, paths: Mapping[str, Any], format: str,
                  columns: Sequence[str], split: str) -> sources.FileSource:
  if split not in paths:
    raise ValueError(f'task {task} has no split {split!r}; its splits: {", ".join(paths)}')
  return sources.FileSource(paths[split], format, columns)


def _config_columns(config: Mapping[str, Any], where: str) -> tuple[str, tuple[str, ...]]:
  """The file format and columns of a task config, checked against its templates."""
  format = config.get('format', 'jsonl')
  if format not in sources.FORMATS:
    raise ValueError(f'{where}: unknown format {format!r}; use one of '
                     f'{", ".join(sources.FORMATS)}')
  fields = (_template_fields(config['inputs_template'])
            | _template_fields(config['targets_template']))
  columns = tuple(config.get('columns') or ())
  if format == 'tsv' and not columns:
    raise ValueError(f'{where}: a tsv task needs columns (its tab-separated field names, '
                     'in order)')
  # Listing the template fields as jsonl columns makes a line without one fail as file:line.
  columns = columns or (('text',) if format == 'text' else tuple(sorted(fields)))
  if not fields <= set(columns):
    raise ValueError(f'{where}: templates use {sorted(fields - set(columns))}, which are not '
                     f'among the columns {list(columns)}')
  return format, columns


def register_from_config(config: Any, overwrite: bool = False) -> Task:
  """Registers a seq2seq task over TSV/JSONL/text files described by a dict or ConfigDict.

  Keys:
    name: the task name.
    paths: a glob or list of globs (the 'train' split), or a dict split -> glob(s).
    format: 'tsv', 'jsonl' (default) or 'text' (one example per line, field 'text').
    columns: the TSV field names, in order (required for tsv); for jsonl, keys every line
      must have (default: the fields the templates use).
    inputs_template, targets_template: `str.format` templates over the columns, e.g.
      'question: {q}' and '{a}'.
    vocabulary: a SentencePiece .model path (default: vocabularies.default_vocabulary()).
    metrics: names from t5x_lite.metrics.METRICS, e.g. ['accuracy'].
  """
  config = config.to_dict() if hasattr(config, 'to_dict') else dict(config)
  where = f'task config {config.get("name", "(unnamed)")}'
  problems = [f'{kind} keys {keys}' for kind, keys in (
      ('unknown', sorted(set(config) - set(_CONFIG_KEYS))),
      ('missing', [key for key in _REQUIRED_KEYS if not config.get(key)])) if keys]
  if problems:
    raise ValueError(f'{where}: {", ".join(problems)}; allowed keys: {", ".join(_CONFIG_KEYS)} '
                     f'({", ".join(_REQUIRED_KEYS)} required)')
  format, columns = _config_columns(config, where)
  metric_names = list(config.get('metrics', ()))
  unknown = sorted(set(metric_names) - set(metrics.METRICS))
  if unknown:
    raise ValueError(f'{where}: unknown metrics {unknown}; known: {", ".join(metrics.METRICS)}')
  paths = config['paths'] if isinstance(config['paths'], dict) else {'train': config['paths']}
  vocabulary = (vocabularies.SentencePieceVocabulary(config['vocabulary'])
                if config.get('vocabulary') else None)
  task = Task(
      name=config['name'],
      source=functools.partial(_split_source, config['name'], paths, format, columns),
      preprocessors=(
          functools.partial(preprocessors.apply_template,
                            inputs_template=config['inputs_template'],
                            targets_template=config['targets_template']),
          preprocessors.tokenize, preprocessors.append_eos),
      output_features=seq2seq_features(vocabulary),
      metric_fns=tuple(metrics.METRICS[m] for m in metric_names))
  register(task, overwrite)
  return task


# ----------------------------------------------------------------------------------------
# The bundled tasks
# ----------------------------------------------------------------------------------------


def seq2seq_features(vocabulary: vocabularies.Vocabulary | None = None) -> dict[str, Feature]:
  """'inputs' and 'targets' in one vocabulary (default: the shipped one), both with EOS."""
  vocabulary = vocabulary or vocabularies.default_vocabulary()
  return {'inputs': Feature(vocabulary), 'targets': Feature(vocabulary)}


def normalize_label(text: str) -> str:
  """Class labels compare case- and whitespace-insensitively (the corpora's are lower case)."""
  return ' '.join(text.split()).lower()


def corpus_task(name: str, corpus: str, prompt: Preprocessor,
                metric_fns: Sequence[metrics.MetricFn],
                postprocess_fn: Callable[[str], str] | None = None) -> Task:
  """A seq2seq task over a bundled corpus: prompt template, tokenize, append EOS."""
  return Task(name, functools.partial(sources.corpus_source, corpus),
              (prompt, preprocessors.tokenize, preprocessors.append_eos),
              seq2seq_features(), tuple(metric_fns), postprocess_fn)


def span_corruption_task(name: str, corpus: str, text_key: str = 'text',
                         inputs_length: int = 512) -> Task:
  """T5's span-corruption objective over one text field of a bundled corpus.

  Texts longer than the token count that corrupts to `inputs_length` (568 for 512) are cut
  to one random chunk of it, as in T5. Its 'inputs' feature is not required: span
  corruption makes the inputs from the targets.
  """
  vocabulary = vocabularies.default_vocabulary()
  chunk_length, _ = preprocessors.random_spans_helper(inputs_length)
  return Task(
      name, functools.partial(sources.corpus_source, corpus),
      (functools.partial(preprocessors.rekey, key_map={'targets': text_key}),
       preprocessors.tokenize,
       functools.partial(preprocessors.select_random_chunk, max_length=chunk_length),
       preprocessors.span_corruption, preprocessors.append_eos),
      {'inputs': Feature(vocabulary, required=False), 'targets': Feature(vocabulary)})


def _register_bundled() -> None:
  for lang in ('de', 'fr', 'zh'):
    # sacrebleu's 'zh' tokenizer splits Chinese characters; 'intl' would see whole sentences.
    bleu = functools.partial(metrics.bleu, tokenize='zh') if lang == 'zh' else metrics.bleu
    register(corpus_task(f'translate_en_{lang}', f'translate_en_{lang}',
                         preprocessors.translate('en', lang), [bleu]))
  register(corpus_task('summarize_debian', 'summarize_debian',
                       preprocessors.summarize('description', 'synopsis'), [metrics.rouge]))
  classification = [metrics.accuracy, metrics.macro_f1]
  register(corpus_task('classify_debian_section', 'classify_debian_section',
                       preprocessors.classify('classify section', 'description', 'section'),
                       classification, normalize_label))
  register(corpus_task('sentiment_rt', 'sentiment_rt',
                       preprocessors.classify('sentiment', 'text', 'label'),
                       classification, normalize_label))
  # English paragraphs plus the German help text: the default vocabulary covers both, and
  # only each corpus's own split is read, so held-out translation targets are never seen.
  register(span_corruption_task('span_corruption_pretrain_text', 'pretrain_text'))
  register(span_corruption_task('span_corruption_de', 'translate_en_de', text_key='de'))
  register(Mixture('pretrain_span_corruption',
                   ['span_corruption_pretrain_text', 'span_corruption_de'], rates=[3, 1]))


_register_bundled()
