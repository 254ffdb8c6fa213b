"""Tasks, mixtures and their registry, with the bundled tasks registered at import.

A Task pairs a data source per split with the preprocessors that turn a raw row into model
examples, the output features (vocabularies) and the metrics for its decoded predictions.
A Mixture names registered tasks and their sampling rates; the pipeline does the sampling.
The registry is the one place names are looked up:

  task = tasks.get('translate_en_de')
  example = task.preprocess(task.source('train')[0])   # {'inputs': int32[...], 'targets': ...}

Tasks over your own TSV/CSV/JSONL/text files need no code: `register_from_config` in Python,
or a run config's `data.files.*` fields, which `from_config` turns into a task (the one
function the commands call to find theirs).
"""

import dataclasses
import functools
import inspect
import json
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
    splits: the split names `source` accepts.
  """

  name: str
  source: Callable[[str], sources.DataSource]
  preprocessors: Sequence[Preprocessor]
  output_features: Mapping[str, Feature]
  metric_fns: Sequence[metrics.MetricFn] = ()
  postprocess_fn: Callable[[str], str] | None = None
  splits: Sequence[str] = sources.SPLITS

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

  @property
  def splits(self) -> list[str]:
    """The splits every one of its tasks has."""
    first, *rest = self.tasks
    return [split for split in first.splits if all(split in task.splits for task in rest)]

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


def split_at_tokenize(task: Task) -> tuple[list, list]:
  """The task's text preprocessors (templates and the like) and the rest, from
  `preprocessors.tokenize` on (empty when the task has no tokenize step)."""
  steps = list(task.preprocessors)
  index = next((i for i, fn in enumerate(steps)
                if getattr(fn, 'func', fn) is preprocessors.tokenize), len(steps))
  return steps[:index], steps[index:]


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
        'own TSV/CSV/JSONL files, set --config.data.files.train=FILE and the templates '
        '(README: Train on your own data)')
  return _REGISTRY[name]


def names() -> list[str]:
  """Sorted names of every registered task and mixture."""
  return sorted(_REGISTRY)


# ----------------------------------------------------------------------------------------
# Tasks from plain config
# ----------------------------------------------------------------------------------------

_CONFIG_KEYS = ('name', 'paths', 'format', 'header', 'columns', 'inputs_template',
                'targets_template', 'vocabulary', 'metrics', 'bad_rows', 'validation_fraction')
_REQUIRED_KEYS = ('name', 'paths', 'inputs_template', 'targets_template')
# Buckets of the content hash that carves a validation split out of train.
_CARVE_BUCKETS = 10_000


def _template_fields(template: str, where: str) -> set[str]:
  """Top-level field names of a str.format template ('{a.b[0]}' -> 'a')."""
  try:
    parsed = list(string.Formatter().parse(template))
  except ValueError as e:
    raise ValueError(f'{where}: template {template!r} is not a str.format template ({e}); '
                     'write fields as {name} and a literal brace as {{ or }}') from None
  return {field.split('.')[0].split('[')[0] for _, field, _, _ in parsed if field}


@dataclasses.dataclass(eq=False)
class _FileSplits:
  """A config task's `source`: split -> rows, each split read once; without a validation
  file, `validation_fraction` of train (by a hash of each rendered input) is validation."""

  task: str
  paths: Mapping[str, list[str]]
  options: Mapping[str, Any]  # FileSource's format, columns, header, required, bad_rows
  inputs_template: str
  validation_fraction: float = 0.0
  _cache: dict[str, sources.DataSource] = dataclasses.field(default_factory=dict)

  @property
  def splits(self) -> tuple[str, ...]:
    carved = ('validation',) if self._carves else ()
    return tuple(self.paths) + carved

  @property
  def _carves(self) -> bool:
    return self.validation_fraction > 0 and 'validation' not in self.paths

  def __call__(self, split: str) -> sources.DataSource:
    if split not in self.splits:
      raise ValueError(f'task {self.task} has no split {split!r}; its splits: '
                       f'{", ".join(self.splits)}')
    if split not in self._cache:
      if self._carves and split in ('train', 'validation'):
        self._cache.update(self._carve())
      else:
        self._cache[split] = sources.FileSource(self.paths[split], **self.options)
    return self._cache[split]

  def _carve(self) -> dict[str, sources.DataSource]:
    train = sources.FileSource(self.paths['train'], **self.options)
    held_out = self.validation_fraction * _CARVE_BUCKETS
    rows = {'train': [], 'validation': []}
    for row in (train[i] for i in range(len(train))):
      bucket = sources.content_bucket(self.inputs_template.format_map(row), _CARVE_BUCKETS)
      rows['validation' if bucket < held_out else 'train'].append(row)
    for split, split_rows in rows.items():
      if not split_rows:
        raise ValueError(f'task {self.task}: validation_fraction={self.validation_fraction} '
                         f'leaves the {split} split of its {len(train)} rows empty')
    return {split: sources.InMemorySource(split_rows) for split, split_rows in rows.items()}


def _as_list(value: Any) -> list[str]:
  """A list of strings from a list or a comma-separated string ('' -> [])."""
  if isinstance(value, str):
    return [part.strip() for part in value.split(',') if part.strip()]
  return [str(part) for part in value or ()]


def _file_options(config: Mapping[str, Any], paths: Mapping[str, list[str]], where: str
                  ) -> dict[str, Any]:
  """FileSource's options for a task config, checked against its templates and files."""
  format = config.get('format') or sources.format_of(sources.expand(paths['train'])[0])
  if format not in sources.FORMATS:
    raise ValueError(f'{where}: unknown format {format!r}; use one of '
                     f'{", ".join(sources.FORMATS)}')
  fields = (_template_fields(config['inputs_template'], where)
            | _template_fields(config['targets_template'], where))
  columns = tuple(_as_list(config.get('columns')))
  tabular = format in ('tsv', 'csv')
  header = config.get('header')
  header = tabular and (not columns if header is None else header)
  if tabular and not header and not columns:
    raise ValueError(f'{where}: a {format} file without a header line needs columns (its '
                     'field names, in order)')
  known = ('text',) if format == 'text' else columns
  if not header and format != 'jsonl' and not fields <= set(known):
    raise ValueError(f'{where}: templates use {sorted(fields - set(known))}, which are not '
                     f'among the columns {list(known)}')
  bad_rows = config.get('bad_rows', 'error')
  if bad_rows not in sources.BAD_ROWS:
    raise ValueError(f'{where}: bad_rows must be one of {", ".join(sources.BAD_ROWS)}, got '
                     f'{bad_rows!r}')
  # A missing file or a header without a template field fails now, not when first read.
  for split_paths in paths.values():
    for path in sources.expand(split_paths):
      if header:
        sources.header_columns(path, format, sorted(fields | set(columns)))
  # Listing the template fields as jsonl columns makes a line without one fail as file:line.
  columns = columns or (tuple(sorted(fields)) if format == 'jsonl' else known)
  return dict(format=format, columns=None if header else columns, header=header,
              required=tuple(sorted(fields)), bad_rows=bad_rows)


def register_from_config(config: Any, overwrite: bool = False) -> Task:
  """Registers a seq2seq task over TSV/CSV/JSONL/text files described by a dict or ConfigDict.

  Keys:
    name: the task name.
    paths: a glob or list of globs (the 'train' split), or a dict split -> glob(s); several
      globs may also be one comma-separated string.
    format: 'tsv', 'csv', 'jsonl' or 'text' (one example per line, field 'text'); default:
      from the first train file's name (.tsv, .csv, .jsonl/.json, .txt, each maybe .gz).
    header: tsv/csv: the first line of each file names the columns (default: True unless
      `columns` are given).
    columns: field names of headerless tsv/csv files, in order; for jsonl, keys every line
      must have (default: the fields the templates use). A list or a comma-separated string.
    inputs_template, targets_template: `str.format` templates over the columns, e.g.
      'question: {q}' and '{a}'; the fields they use must be non-empty in every row.
    vocabulary: a SentencePiece .model path (default: vocabularies.default_vocabulary()).
    metrics: names from t5x_lite.metrics.METRICS, e.g. ['accuracy'] or 'bleu'.
    bad_rows: 'error' (default: stop at the first bad row, naming file:line) or 'skip' (skip
      and count them, with a warning naming the first).
    validation_fraction: without a 'validation' path, hold out this share of train as the
      validation split, by a hash of each rendered input (deterministic; 0 = none).
  """
  config = config.to_dict() if hasattr(config, 'to_dict') else dict(config)
  where = f'task config {config.get("name", "(unnamed)")}'
  problems = [f'{kind} keys {keys}' for kind, keys in (
      ('unknown', sorted(set(config) - set(_CONFIG_KEYS))),
      ('missing', [key for key in _REQUIRED_KEYS if not config.get(key)])) if keys]
  if problems:
    raise ValueError(f'{where}: {", ".join(problems)}; allowed keys: {", ".join(_CONFIG_KEYS)} '
                     f'({", ".join(_REQUIRED_KEYS)} required)')
  metric_names = _as_list(config.get('metrics'))
  unknown = sorted(set(metric_names) - set(metrics.METRICS))
  if unknown:
    raise ValueError(f'{where}: unknown metrics {unknown}; known: {", ".join(metrics.METRICS)}')
  paths = config['paths'] if isinstance(config['paths'], dict) else {'train': config['paths']}
  paths = {split: _as_list(patterns) for split, patterns in paths.items() if patterns}
  fraction = float(config.get('validation_fraction') or 0.0)
  if 'train' not in paths or not 0 <= fraction < 1:
    raise ValueError(f'{where}: needs a train path and 0 <= validation_fraction < 1, got '
                     f'splits {sorted(paths)} and validation_fraction={fraction}')
  vocabulary = (vocabularies.SentencePieceVocabulary(config['vocabulary'])
                if config.get('vocabulary') else None)
  splits = _FileSplits(config['name'], paths, _file_options(config, paths, where),
                       config['inputs_template'], fraction)
  task = Task(
      name=config['name'], source=splits,
      preprocessors=(
          functools.partial(preprocessors.apply_template,
                            inputs_template=config['inputs_template'],
                            targets_template=config['targets_template']),
          preprocessors.tokenize, preprocessors.append_eos),
      output_features=seq2seq_features(vocabulary),
      metric_fns=tuple(metrics.METRICS[m] for m in metric_names), splits=splits.splits)
  register(task, overwrite)
  return task


# Config tasks built by `from_config`, by their settings: one task (and one read of each
# file) per process however many commands look it up.
_FILE_TASKS: dict[str, Task] = {}


def from_config(data: Any, name: str = '') -> Task | Mixture:
  """The task or mixture a run config's `data` section describes, in its vocabulary.

  With any `data.files.<split>` set, a task over those files (named after its format,
  e.g. 'tsv', and registered under that name) from `data.format`, `header`, `columns`,
  `inputs_template`, `targets_template`, `metrics`, `bad_rows` and `validation_fraction`;
  otherwise the registered `data.task`.

  Args:
    data: a run config's `data` ConfigDict (see config.base_config).
    name: a registered task or mixture to use instead (e.g. `eval.task`); '' = as above.
  """
  if name:
    task = get(name)
  elif data.format in posttrain_data.FORMATS:
    task = posttrain_data.file_task(data)
  elif any(data.files.values()):
    settings = {
        'paths': data.files.to_dict(), 'format': data.format, 'header': data.header,
        'columns': data.columns, 'inputs_template': data.inputs_template,
        'targets_template': data.targets_template, 'metrics': data.metrics,
        'bad_rows': data.bad_rows, 'validation_fraction': data.validation_fraction}
    key = json.dumps(settings, sort_keys=True)
    if key not in _FILE_TASKS:
      train = _as_list(data.files.get('train', ''))
      task_name = data.format or (sources.format_of(sources.expand(train)[0]) if train
                                  else 'files')
      _FILE_TASKS[key] = register_from_config({'name': task_name, **settings}, overwrite=True)
    task = _FILE_TASKS[key]
  else:
    task = get(data.task)
  return with_vocabulary(task, data.vocabulary)


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


def language_modeling_task(name: str, corpus: str, objective: str, text_key: str = 'text',
                           max_length: int = 512) -> Task:
  """A language-modelling objective over one text field of a bundled corpus.

  Each text is cut to one random `max_length`-token chunk (as span corruption is), then
  `objective` 'full_lm' makes the whole chunk the target (converter 'lm'), and 'prefix_lm'
  splits it at a uniform random point into inputs and targets (T5's prefix-LM objective:
  predict the rest from the start; converters 'enc_dec', 'prefix_lm' or 'causal_lm').
  """
  objectives = {'full_lm': preprocessors.full_lm, 'prefix_lm': preprocessors.prefix_lm}
  if objective not in objectives:
    raise ValueError(f'unknown language-modelling objective {objective!r}; '
                     f'use one of {sorted(objectives)}')
  vocabulary = vocabularies.default_vocabulary()
  return Task(
      name, functools.partial(sources.corpus_source, corpus),
      (functools.partial(preprocessors.rekey, key_map={'targets': text_key}),
       preprocessors.tokenize,
       functools.partial(preprocessors.select_random_chunk, max_length=max_length),
       objectives[objective], preprocessors.append_eos),
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
  register(language_modeling_task('lm_pretrain_text', 'pretrain_text', 'full_lm'))
  register(language_modeling_task('prefix_lm_pretrain_text', 'pretrain_text', 'prefix_lm'))
  register(Mixture('pretrain_span_corruption',
                   ['span_corruption_pretrain_text', 'span_corruption_de'], rates=[3, 1]))


_register_bundled()
# Last: it registers the post-training tasks through this module's registry.
from t5x_lite.data import posttrain_data  # noqa: E402  pylint: disable=g-import-not-at-top
