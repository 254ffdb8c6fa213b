"""Example preprocessors: prompt templates, tokenization, EOS and T5's pretraining objectives.

A preprocessor maps one example dict to a new dict, or to None to drop the example. One that
names a keyword `rng` receives a `np.random.Generator` (deterministic per example and epoch);
one that names `output_features` receives the task's `dict[str, Feature]`. Text fields are
`str`; after `tokenize` the output features are 1-D np.int32 arrays.

A T5 span-corruption task runs, in order: rekey (text -> "targets"), tokenize,
select_random_chunk (max_length = random_spans_helper(...)[0], 568 for 512 input tokens),
span_corruption, append_eos. The numpy ports of T5's `random_spans_noise_mask`,
`noise_span_to_unique_sentinel`, `nonnoise_span_to_unique_sentinel` and
`random_spans_helper` keep T5's semantics (t5/data/preprocessors.py); only the random numbers
come from numpy instead of TensorFlow, and densities above 0.5, where T5 fails on short
sequences, get fewer spans.
"""

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from t5x_lite.data.vocabularies import Feature, Vocabulary

Example = dict[str, Any]
Preprocessor = Callable[..., Example | None]

LANGUAGES = {'en': 'English', 'de': 'German', 'fr': 'French', 'zh': 'Chinese'}


def _field(example: Mapping[str, Any], key: str, purpose: str) -> Any:
  """example[key], or a KeyError naming the missing key and the fields present."""
  if key not in example:
    raise KeyError(f'{purpose}: field {key!r} not in example with fields {sorted(example)}')
  return example[key]


def rekey(example: Mapping[str, Any], *, key_map: Mapping[str, str]) -> Example:
  """Keeps only the fields in `key_map` ({new_name: old_name}), renamed."""
  return {new: _field(example, old, 'rekey') for new, old in key_map.items()}


def apply_template(example: Mapping[str, Any], *, inputs_template: str,
                   targets_template: str) -> Example:
  """{"inputs", "targets"} from `str.format` templates over the example's fields."""
  def render(template: str) -> str:
    try:
      return template.format_map(example)
    except KeyError as e:
      raise KeyError(f'template {template!r}: field {e.args[0]!r} not in example with '
                     f'fields {sorted(example)}') from None
  return {'inputs': render(inputs_template), 'targets': render(targets_template)}


def translate(source: str = 'en', target: str = 'de') -> Preprocessor:
  """T5's prompt, e.g. "translate English to German: {en}" -> "{de}"."""
  for code in (source, target):
    if code not in LANGUAGES:
      raise ValueError(f'unknown language {code!r}; known: {sorted(LANGUAGES)}')
  return functools.partial(
      apply_template, targets_template=f'{{{target}}}',
      inputs_template=f'translate {LANGUAGES[source]} to {LANGUAGES[target]}: {{{source}}}')


def summarize(text_key: str = 'description', summary_key: str = 'synopsis') -> Preprocessor:
  """T5's prompt "summarize: {text}" -> "{summary}"."""
  return functools.partial(apply_template, inputs_template=f'summarize: {{{text_key}}}',
                           targets_template=f'{{{summary_key}}}')


def classify(prefix: str, text_key: str = 'text', label_key: str = 'label') -> Preprocessor:
  """GLUE-style prompt as in T5 ("sst2 sentence: {text}"): "{prefix}: {text}" -> "{label}"."""
  return functools.partial(apply_template, inputs_template=f'{prefix}: {{{text_key}}}',
                           targets_template=f'{{{label_key}}}')


def few_shot_prompt(inputs: str, shots: Sequence[Mapping[str, str]], *, k: int, seed: int = 0,
                    shot_separator: str = '\n\n', target_separator: str = '\n') -> str:
  """Prepends k solved examples, drawn from `shots` with `seed`, to `inputs`.

  The draw is a seeded permutation of `shots` (dicts with "inputs" and "targets") whose
  first k entries with inputs other than the query are used, so the same (shots, k, seed)
  always gives the same prompt and a query never sees its own answer.
  """
  order = np.random.default_rng(seed).permutation(len(shots))
  chosen = [shots[i] for i in order if shots[i]['inputs'] != inputs][:k]
  if len(chosen) < k:
    raise ValueError(f'few-shot prompt needs k={k} shots other than the query, '
                     f'only {len(chosen)} of {len(shots)} available')
  blocks = [f"{shot['inputs']}{target_separator}{shot['targets']}" for shot in chosen]
  return shot_separator.join(blocks + [inputs + target_separator])


def few_shot(example: Mapping[str, Any], *, shots: Sequence[Mapping[str, str]], k: int,
             seed: int = 0) -> Example:
  """Rewrites example["inputs"] as a k-shot prompt (see few_shot_prompt)."""
  prompt = few_shot_prompt(_field(example, 'inputs', 'few_shot'), shots, k=k, seed=seed)
  return {**example, 'inputs': prompt}


def tokenize(example: Mapping[str, Any], *, output_features: Mapping[str, Feature],
             copy_pretokenized: bool = False) -> Example:
  """Encodes each text field named in output_features into a 1-D int32 array (no EOS).

  Features absent from the example are skipped (span corruption makes "inputs" later; as in
  seqio, Feature.required is checked on the final example). Other fields pass through.
  With copy_pretokenized, the text of each feature is also kept as `<name>_pretokenized`
  (seqio's convention, e.g. for metrics on raw targets).
  """
  out = dict(example)
  for key, feature in output_features.items():
    if key not in example:
      continue
    value = example[key]
    if isinstance(value, str):
      out[key] = np.asarray(feature.vocabulary.encode(value), np.int32)
      if copy_pretokenized:
        out[f'{key}_pretokenized'] = value
    else:
      out[key] = np.asarray(value, np.int32)
  return out


def append_eos(example: Mapping[str, Any], *,
               output_features: Mapping[str, Feature]) -> Example:
  """Appends EOS to every present feature whose Feature has add_eos."""
  out = dict(example)
  for key, feature in output_features.items():
    if feature.add_eos and key in example:
      out[key] = np.append(example[key], feature.vocabulary.eos_id).astype(np.int32)
  return out


def full_lm(example: Mapping[str, Any]) -> Example:
  """Full language modeling: the whole token sequence is the target (decoder-only)."""
  return {'targets': _field(example, 'targets', 'full_lm')}


def prefix_lm(example: Mapping[str, Any], *, rng: np.random.Generator) -> Example | None:
  """Splits "targets" at a uniform point in [1, length - 1] into inputs and targets.

  T5's prefix_lm objective (random_prefix_noise_mask). Sequences of fewer than 2 tokens
  cannot be split and are dropped (None).
  """
  tokens = _field(example, 'targets', 'prefix_lm')
  if len(tokens) < 2:
    return None
  split = int(rng.integers(1, len(tokens)))
  return {'inputs': tokens[:split], 'targets': tokens[split:]}


def select_random_chunk(example: Mapping[str, Any], *, rng: np.random.Generator,
                        max_length: int, feature_key: str = 'targets') -> Example | None:
  """Keeps one random max_length-aligned chunk of a token field (T5's select_random_chunk).

  The chunk is chosen among ceil(length / max_length) aligned chunks, so every token is
  equally likely to be kept. Empty sequences are dropped (None), as in T5.
  """
  tokens = _field(example, feature_key, 'select_random_chunk')
  if len(tokens) == 0:
    return None
  start = max_length * int(rng.integers(math.ceil(len(tokens) / max_length)))
  return {**example, feature_key: tokens[start:start + max_length]}


def _random_segmentation(num_items: int, num_segments: int,
                         rng: np.random.Generator) -> np.ndarray:
  """Splits num_items into num_segments positive lengths, all splits equally likely."""
  # Shuffle num_segments - 1 "a segment starts here" flags over the num_items - 1 gaps.
  starts = rng.permutation(np.arange(num_items - 1) < num_segments - 1)
  segment_ids = np.concatenate([[0], np.cumsum(starts)])
  return np.bincount(segment_ids, minlength=num_segments)


def random_spans_noise_mask(length: int, noise_density: float, mean_noise_span_length: float,
                            rng: np.random.Generator) -> np.ndarray:
  """A [length] bool mask of random noise spans, T5's `random_spans_noise_mask`.

  num_noise_tokens = round(length * noise_density) clipped to [1, length - 1];
  num_noise_spans = max(1, round(num_noise_tokens / mean_noise_span_length)); the noise and
  the non-noise tokens are each cut into that many non-empty spans uniformly at random, and
  spans alternate starting with non-noise, so the mask always ends in noise. As in T5, a
  length below 2 is treated as 2 and the mask cut back (length 1 -> [False]).
  """
  if not 0 < noise_density < 1 or mean_noise_span_length < 1:
    raise ValueError(f'need 0 < noise_density < 1 and mean_noise_span_length >= 1, got '
                     f'{noise_density} and {mean_noise_span_length}')
  orig_length, length = length, max(length, 2)
  # float32 and round-half-to-even reproduce T5's tf.round on float32 tensors.
  num_noise = int(np.round(np.float32(length) * np.float32(noise_density)))
  num_noise = min(max(num_noise, 1), length - 1)
  num_spans = int(np.round(np.float32(num_noise) / np.float32(mean_noise_span_length)))
  # T5 fails if there are fewer non-noise tokens than spans (densities > 0.5); cap instead.
  num_spans = min(max(num_spans, 1), length - num_noise)
  noise_lengths = _random_segmentation(num_noise, num_spans, rng)
  nonnoise_lengths = _random_segmentation(length - num_noise, num_spans, rng)
  span_lengths = np.stack([nonnoise_lengths, noise_lengths], axis=1).reshape(-1)
  mask = np.repeat(np.tile([False, True], num_spans), span_lengths)
  return mask[:orig_length]


def noise_span_to_unique_sentinel(tokens: np.ndarray, noise_mask: np.ndarray,
                                  vocabulary: Vocabulary) -> np.ndarray:
  """Replaces the i-th run of noise tokens with vocabulary.sentinel_id(i) (T5's inputs)."""
  tokens, noise_mask = np.asarray(tokens), np.asarray(noise_mask, bool)
  prev_is_noise = np.concatenate([[False], noise_mask[:-1]])
  first_noise = noise_mask & ~prev_is_noise
  num_spans = int(first_noise.sum())
  if num_spans > vocabulary.extra_ids:
    raise ValueError(f'{num_spans} noise spans need as many sentinels but {vocabulary!r} has '
                     f'{vocabulary.extra_ids} extra ids; use shorter sequences')
  # Span i (0-based) has cumsum i + 1 at its first token -> id vocab_size - 1 - i.
  sentinels = vocabulary.vocab_size - np.cumsum(first_noise)
  out = np.where(first_noise, sentinels, tokens)
  return out[~(noise_mask & prev_is_noise)].astype(np.int32)


def nonnoise_span_to_unique_sentinel(tokens: np.ndarray, noise_mask: np.ndarray,
                                     vocabulary: Vocabulary) -> np.ndarray:
  """Replaces the runs of non-noise tokens with sentinels (T5's targets)."""
  return noise_span_to_unique_sentinel(tokens, ~np.asarray(noise_mask, bool), vocabulary)


def span_corruption(example: Mapping[str, Any], *, output_features: Mapping[str, Feature],
                    rng: np.random.Generator, noise_density: float = 0.15,
                    mean_noise_span_length: float = 3.0) -> Example | None:
  """T5's span corruption of the tokenized "targets" into {"inputs", "targets"}.

  "We hold these truths to be self evident" with noise "these truths" and "evident" ->
  inputs "We hold <X> to be self <Y>" and targets "<X> these truths <Y> evident", where
  <X> = sentinel_id(0) (the last id) and <Y> = sentinel_id(1). EOS is not added (append_eos
  comes next, as in T5). Sequences of fewer than 2 tokens have no noise span and non-noise
  span to swap and are dropped (None).
  """
  tokens = np.asarray(_field(example, 'targets', 'span_corruption'))
  vocabulary = output_features['targets'].vocabulary
  if 'inputs' in output_features and output_features['inputs'].vocabulary != vocabulary:
    raise ValueError('span_corruption builds inputs from the targets, so the "inputs" and '
                     '"targets" features need the same vocabulary')
  if len(tokens) < 2:
    return None
  mask = random_spans_noise_mask(len(tokens), noise_density, mean_noise_span_length, rng)
  return {'inputs': noise_span_to_unique_sentinel(tokens, mask, vocabulary),
          'targets': nonnoise_span_to_unique_sentinel(tokens, mask, vocabulary)}


def random_spans_helper(inputs_length: int = 512, noise_density: float = 0.15,
                        mean_noise_span_length: float = 3.0,
                        extra_tokens_per_span_inputs: int = 1,
                        extra_tokens_per_span_targets: int = 1) -> tuple[int, int]:
  """(tokens_length, targets_length) so span corruption fills inputs_length exactly.

  tokens_length is the longest raw token count whose corrupted inputs, EOS included, fit
  in inputs_length; targets_length is the length of its targets with EOS. T5's function:
  (568, 114) for the defaults.
  """
  def corrupted_lengths(tokens_length: int) -> tuple[int, int]:
    num_noise = int(round(tokens_length * noise_density))
    num_spans = int(round(num_noise / mean_noise_span_length))
    return (tokens_length - num_noise + num_spans * extra_tokens_per_span_inputs + 1,
            num_noise + num_spans * extra_tokens_per_span_targets + 1)

  tokens_length = inputs_length - 1
  while corrupted_lengths(tokens_length + 1)[0] <= inputs_length:
    tokens_length += 1
  inputs_length, targets_length = corrupted_lengths(tokens_length)
  # T5's adjustment: with density 0.5 make targets no longer than the (round) inputs length.
  if noise_density == 0.5 and targets_length > inputs_length:
    tokens_length -= 1
    targets_length -= 1
  return tokens_length, targets_length
