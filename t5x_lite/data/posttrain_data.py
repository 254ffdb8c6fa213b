"""Post-training data: the chat template, instruction (SFT) and preference tasks, and the
paired feature layout that puts a chosen and a rejected response in one batch.

The chat template (one, documented): every turn is a line `Role: content` (roles `System`,
`User`, `Assistant`), and the prompt ends with `Assistant:`; the response is the final
assistant turn's content. So `{"prompt": "Hi", "response": "Hello"}` trains

    inputs  = "User: Hi\nAssistant:"      (prompt and template: no loss)
    targets = "Hello" + EOS              (the loss is on these tokens only)

and `{"messages": [{"role": "user", ...}, {"role": "assistant", ...}, ...]}` renders all
turns before the last assistant turn into the prompt. (The shipped SentencePiece vocabulary
normalises the newlines to spaces.) The prefix-LM converter puts the loss
on the targets only, the enc_dec converter feeds the prompt to the encoder; packing keeps
examples apart with segment ids.

Tasks registered here (over the bundled corpora, no labels invented): `sft_<task>` for
translate_en_de, summarize_debian, classify_debian_section and sentiment_rt, each phrasing
its corpus as natural instructions with several templates (one per example, by a hash of
its id), and the mixture `sft_mix` of all four. Your own JSONL files: `data.format='sft'`
(`{"prompt", "response"}` or `{"messages"}` lines) or `data.format='preference'`
(`{"prompt", "chosen", "rejected"}` lines, optionally with precomputed
`reference_chosen_logp` / `reference_rejected_logp`).

Preference rows become one pair each: `PairFeatureConverter` converts (prompt, chosen) and
(prompt, rejected) with the model's converter, unpacked, and interleaves them, so row 2i of
a batch is pair i's chosen and row 2i + 1 its rejected response; microbatches and
data-parallel shards of an even number of rows keep every pair together.
"""

import functools
import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from t5x_lite import metrics
from t5x_lite.data import feature_converters, preprocessors, sources, tasks
from t5x_lite.data.vocabularies import Feature

Example = dict[str, Any]
ROLES = {'system': 'System', 'user': 'User', 'assistant': 'Assistant'}
FORMATS = ('sft', 'preference')
REFERENCE_FIELDS = ('reference_chosen_logp', 'reference_rejected_logp')

# Several natural phrasings per bundled task; {x} is the corpus's input field.
INSTRUCTIONS = {
    'translate_en_de': ('en', 'de', (
        'Translate to German: {x}',
        'How would you say this in German?\n{x}',
        'Give the German version of this LibreOffice help text: {x}')),
    'summarize_debian': ('description', 'synopsis', (
        'Summarise: {x}',
        'Write a one-line synopsis of this Debian package: {x}',
        'Describe this package in one short line.\n{x}')),
    'classify_debian_section': ('description', 'section', (
        'Which Debian section does this package belong to? {x}',
        'Name the Debian archive section of this package: {x}',
        'Here is a package description. In which section of the archive is it?\n{x}')),
    'sentiment_rt': ('text', 'label', (
        'Is this movie review positive or negative? {x}',
        'What is the sentiment of this review snippet (positive or negative)? {x}',
        'Review: {x}\nWas the critic positive or negative?')),
}


def render_chat(messages: Sequence[Mapping[str, str]], where: str = 'messages'
                ) -> tuple[str, str]:
  """(prompt, response) of a conversation under the chat template (module docstring).

  Raises:
    ValueError: an unknown role, a non-string or empty content, or a conversation that does
      not end with a non-empty assistant turn (named by `where`).
  """
  if not isinstance(messages, (list, tuple)) or not messages:
    raise ValueError(f'{where}: "messages" must be a non-empty list of {{"role", "content"}}')
  lines = []
  for i, turn in enumerate(messages):
    role = turn.get('role') if isinstance(turn, Mapping) else None
    content = turn.get('content') if isinstance(turn, Mapping) else None
    if role not in ROLES or not isinstance(content, str) or not content.strip():
      raise ValueError(f'{where}: message {i} needs a role in {sorted(ROLES)} and non-empty '
                       f'string content, got {turn!r}')
    lines.append(f'{ROLES[role]}: {content}')
  if messages[-1]['role'] != 'assistant':
    raise ValueError(f'{where}: the last message must be the assistant\'s response (the '
                     f'tokens trained on), got role {messages[-1]["role"]!r}')
  return '\n'.join(lines[:-1] + ['Assistant:']), messages[-1]['content']


def chat_prompt(prompt: str) -> str:
  """A single-turn user prompt rendered as the template's model input."""
  return render_chat([{'role': 'user', 'content': prompt},
                      {'role': 'assistant', 'content': '-'}])[0]


def _chat_text(example: Mapping[str, Any]) -> Example:
  """{"prompt", "response"} -> {"inputs", "targets"} text under the chat template."""
  return {'inputs': chat_prompt(example['prompt']), 'targets': example['response']}


def _pair_text(example: Mapping[str, Any]) -> Example:
  """{"prompt", "chosen", "rejected"} -> template inputs and the two responses (+ the
  precomputed reference log-probs, when the row has them)."""
  # 'targets' (the chosen text again) is what the data report measures.
  out = {'inputs': chat_prompt(example['prompt']), 'targets': example['chosen'],
         'chosen': example['chosen'], 'rejected': example['rejected']}
  if all(key in example for key in REFERENCE_FIELDS):
    out['reference_logps'] = np.asarray([example[k] for k in REFERENCE_FIELDS], np.float32)
  return out


def _digest(text: str) -> int:
  return int.from_bytes(hashlib.sha256(text.encode('utf-8')).digest()[:8], 'little')


def instruction_rows(task: str, split: str) -> list[Example]:
  """A bundled corpus as {"id", "task", "prompt", "response"} rows: the corpus's own answer,
  under one of the task's instruction templates (picked by a hash of the row's id)."""
  source_key, answer_key, templates = INSTRUCTIONS[task]
  rows = sources.corpus_source(task, split)
  out = []
  for i in range(len(rows)):
    row = rows[i]
    template = templates[_digest(row['id']) % len(templates)]
    out.append({'id': row['id'], 'task': task, 'prompt': template.format(x=row[source_key]),
                'response': row[answer_key]})
  return out


def other_prompt_pairs(rows: Sequence[Mapping[str, str]], seed: int = 0) -> list[Example]:
  """(a)-type preference pairs: each row's real response is chosen; rejected is the real
  response of another row, drawn uniformly with `seed` and redrawn while it equals the
  chosen one up to surrounding whitespace (two prompts with the same class label give no
  pair of each other's answers; a different label is a wrong answer, a well-defined pair)."""
  if len({row['response'].strip() for row in rows}) < 2:
    raise ValueError('other_prompt_pairs needs rows with at least two different responses')
  rng = np.random.default_rng(seed)
  pairs = []
  for i, row in enumerate(rows):
    while True:
      j = int(rng.integers(len(rows)))
      if j != i and rows[j]['response'].strip() != row['response'].strip():
        break
    pairs.append({'prompt': row['prompt'], 'chosen': row['response'],
                  'rejected': rows[j]['response'], 'kind': 'other_prompt'})
  return pairs


def check_pairs(rows: Sequence[Mapping[str, str]], where: str) -> None:
  """Raises ValueError naming the first row whose chosen and rejected texts are equal."""
  for i, row in enumerate(rows):
    if row['chosen'].strip() == row['rejected'].strip():
      raise ValueError(f'{where}: row {i + 1} has chosen == rejected ({row["chosen"][:40]!r}); '
                       'a preference pair needs two different responses')


_PARTS = {'inputs': 'prompt', 'targets': 'response', 'chosen': 'chosen response',
          'rejected': 'rejected response'}


def check_lengths(task: tasks.Task, feature_lengths: Mapping[str, int]) -> None:
  """Raises ValueError naming the first row of any split whose prompt or response is longer
  than `feature_lengths` (tokens, EOS included), for `data.truncate=False` runs, which would
  otherwise drop those rows; a pair's chosen and rejected responses count as 'targets'."""
  for split in task.splits:
    rows = task.source(split)
    for i in range(len(rows)):
      example = task.preprocess(rows[i])
      for key, part in _PARTS.items():
        field = 'inputs' if key == 'inputs' else 'targets'
        length = feature_lengths.get(field)
        if key in example and length and len(example[key]) > length:
          raise ValueError(
              f'data.files.{split} row {i + 1}: the {part} is {len(example[key])} tokens, '
              f'longer than data.feature_lengths.{field}={length}, and data.truncate=False '
              f'would drop the row; raise data.feature_lengths.{field}, or set '
              'data.truncate=True to cut over-long rows (with a counted warning)')


def pair_features(vocabulary=None) -> dict[str, Feature]:
  """'inputs', 'chosen' and 'rejected' (and 'targets') in one vocabulary, responses with EOS."""
  base = tasks.seq2seq_features(vocabulary)
  # 'targets' names the vocabulary that reports and decoding look up.
  return {**base, 'chosen': base['targets'], 'rejected': base['targets']}


def _instruction_task(name: str, source, metric_fns, postprocess_fn=None,
                      splits: Sequence[str] = sources.SPLITS) -> tasks.Task:
  return tasks.Task(name, source, (_chat_text, preprocessors.tokenize, preprocessors.append_eos),
                    tasks.seq2seq_features(), tuple(metric_fns), postprocess_fn, splits)


def preference_task(name: str, source, splits: Sequence[str] = sources.SPLITS) -> tasks.Task:
  """A task of {"prompt", "chosen", "rejected"} rows for the paired converters."""
  return tasks.Task(name, source, (_pair_text, preprocessors.tokenize, preprocessors.append_eos),
                    pair_features(), splits=splits)


_BUNDLED_METRICS = {
    'translate_en_de': ([metrics.bleu], None),
    'summarize_debian': ([metrics.rouge], None),
    'classify_debian_section': ([metrics.accuracy, metrics.macro_f1], tasks.normalize_label),
    'sentiment_rt': ([metrics.accuracy, metrics.macro_f1], tasks.normalize_label),
}


def same_answer(task: str, a: str, b: str) -> bool:
  """Whether two answers to a bundled task's prompt are the same as its metric sees them:
  class labels case- and whitespace-insensitively (`tasks.normalize_label`), other answers
  up to surrounding whitespace. A preference pair of two same answers is no preference."""
  postprocess = _BUNDLED_METRICS[task][1] or str.strip
  return postprocess(a) == postprocess(b)


def _register_bundled() -> None:
  for task, (metric_fns, postprocess) in _BUNDLED_METRICS.items():
    source = functools.lru_cache(maxsize=None)(
        lambda split, task=task: sources.InMemorySource(instruction_rows(task, split)))
    tasks.register(_instruction_task(f'sft_{task}', source, metric_fns, postprocess))
  # Rates by size would make the mix 90% Debian descriptions: equal rates instead.
  tasks.register(tasks.Mixture('sft_mix', [f'sft_{task}' for task in _BUNDLED_METRICS]))


def _conversation(row: Mapping[str, Any], where: str) -> Example:
  if 'messages' in row:
    prompt_text, response = render_chat(row['messages'], where)
    return {'inputs': prompt_text, 'targets': response}
  missing = [k for k in ('prompt', 'response') if not str(row.get(k, '')).strip()]
  if missing:
    raise ValueError(f'{where}: missing or empty {", ".join(missing)}; an sft line is '
                     '{"prompt", "response"} or {"messages": [...]}')
  return {'inputs': chat_prompt(row['prompt']), 'targets': row['response']}


def _file_rows(paths: Sequence[str], format: str, bad_rows: str) -> sources.DataSource:
  """Rows of sft or preference JSONL files, checked when read (naming file:line or row)."""
  if format == 'preference':
    rows = sources.FileSource(paths, 'jsonl', ('prompt', 'chosen', 'rejected'),
                              required=('prompt', 'chosen', 'rejected'), bad_rows=bad_rows)
    check_pairs(rows, ','.join(paths))
    return rows
  rows = sources.FileSource(paths, 'jsonl', bad_rows=bad_rows)
  where = ','.join(paths)
  return sources.InMemorySource(
      [_conversation(rows[i], f'{where}: row {i + 1}') for i in range(len(rows))])


def file_task(data: Any) -> tasks.Task:
  """The task a run config's `data` describes with `format` 'sft' or 'preference' over its
  `files.*` (JSONL): named after the format, metrics from `data.metrics`."""
  paths = {split: [p.strip() for p in value.split(',') if p.strip()]
           for split, value in data.files.to_dict().items() if value}
  if 'train' not in paths:
    raise ValueError(f'data.format={data.format!r} needs --config.data.files.train=FILE.jsonl')
  cache = {}

  def source(split: str) -> sources.DataSource:
    if split not in paths:
      raise ValueError(f'task {data.format} has no split {split!r}; its splits: '
                       f'{", ".join(paths)}')
    if split not in cache:
      cache[split] = _file_rows(paths[split], data.format, data.bad_rows)
    return cache[split]

  for split in paths:  # bad lines fail now, before anything is written
    source(split)
  if data.format == 'preference':
    return preference_task('preference', source, tuple(paths))
  names = [m.strip() for m in data.metrics.split(',') if m.strip()]
  return tasks.Task('sft', source, (preprocessors.tokenize, preprocessors.append_eos),
                    tasks.seq2seq_features(), tuple(metrics.METRICS[m] for m in names),
                    splits=tuple(paths))


class PairFeatureConverter(feature_converters.FeatureConverter):
  """(prompt, chosen) and (prompt, rejected) through the `inner` converter, padded (never
  packed), interleaved as rows 2i and 2i + 1; precomputed reference log-probs of a pair
  become the float32 feature `reference_logps` [2 * pairs]."""

  task_features = ('inputs', 'targets')

  def __init__(self, inner: str, task_feature_lengths: Mapping[str, int], **kwargs):
    self.inner = feature_converters.get_converter(inner, task_feature_lengths, **kwargs)
    self.name = f'pairs_{inner}'
    super().__init__(task_feature_lengths, **kwargs)
    self.stats = self.inner.stats

  @property
  def packed_lengths(self) -> dict[str, int]:
    return self.inner.packed_lengths

  def prepare(self, example: Mapping[str, Any]) -> feature_converters.Features | None:
    sides = [self.inner.prepare({'inputs': example['inputs'], 'targets': example[key]})
             for key in ('chosen', 'rejected')]
    if any(side is None for side in sides):
      return None
    padded = [self.inner.pad(side) for side in sides]
    out = {k: np.stack([padded[0][k], padded[1][k]]) for k in padded[0]}  # [2, length]
    if 'reference_logps' in example:
      out['reference_logps'] = np.asarray(example['reference_logps'], np.float32)
    return out

  def pad(self, features: Mapping[str, np.ndarray]) -> feature_converters.Features:
    return dict(features)  # `prepare` pads each side

  def pack_dataset(self, dataset, num_packing_bins: int):
    del num_packing_bins  # one pair per two rows: a reward needs its row to itself
    return dataset

  def model_features(self, rows: Mapping[str, np.ndarray]) -> feature_converters.Features:
    tokens = {k: v for k, v in rows.items() if k != 'reference_logps'}
    features = self.inner.model_features(tokens)  # [..., 2, length]
    out = {k: v.reshape((-1, v.shape[-1])) for k, v in features.items()}
    if 'reference_logps' in rows:
      out['reference_logps'] = np.asarray(rows['reference_logps'], np.float32).reshape(-1)
    return out


for _inner in ('prefix_lm', 'enc_dec'):
  feature_converters.CONVERTERS[f'pairs_{_inner}'] = functools.partial(
      PairFeatureConverter, _inner)
_register_bundled()
