"""Inference and evaluation: decode predictions, score targets, rank candidates, run metrics.

The model side of decoding lives here: `make_tokens_to_logits` turns either model family
into the `tokens_to_logits(ids, cache)` function and KV cache that `decoding.decode`
searches over. On top of it:

  predict_batch / score_batch     jitted (once per shape) generation and teacher-forced
                                  target log-likelihoods of one batch of model features
  rank_classification             picks the best-scoring candidate answer per example
  few_shot_task                   a decoder-only task whose inputs are k-shot prompts
  Evaluator                       a task split -> predictions -> postprocessed metrics

`eval_commands.py` builds these from a run config and a workdir.

Examples are read unpacked and in order, and the last partial batch is padded (by
repeating its last example) and trimmed again afterwards, so every example counts once.
"""

import contextlib
import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging as absl_logging
from jax.experimental import multihost_utils

from t5x_lite import decoding, layers, models, partitioning
from t5x_lite.data import feature_converters, pipeline, preprocessors, tasks

Array = jax.Array
Batch = dict[str, np.ndarray]
Example = dict[str, Any]
Model = models.EncoderDecoder | models.DecoderOnly

# ----------------------------------------------------------------------------------------
# Model glue: tokens_to_logits, predict_batch, score_batch
# ----------------------------------------------------------------------------------------


def make_tokens_to_logits(model: Model, params: Any, batch: Mapping[str, Array], *,
                          max_decode_length: int, vocab_limit: int | None = None
                          ) -> tuple[Callable[[Array, Any], tuple[Array, Any]], Any]:
  """The one-step logits function and fresh KV cache that `decoding.decode` drives.

  Encoder-decoder: the inputs are encoded once and the cache holds the cross-attention
  keys/values; the encoder tokens ride along in the cache pytree, so when the search expands
  or reorders the cache's batch (beams), their cross-attention mask follows. Decoder-only:
  the cache spans the prompt (`batch['prompt']`, [b, P]) plus `max_decode_length` new
  tokens, and `decoding.decode` forces the prompt token by token.

  Args:
    model: an EncoderDecoder or DecoderOnly.
    params: its params.
    batch: 'encoder_input_tokens' [b, l] (encoder-decoder) or 'prompt' [b, P] (decoder-only),
      with 'decoder_causal_attention' [b, P] for a prefix-LM: those prompt positions are
      prefilled into the cache attending both ways, as in training.
    max_decode_length: tokens to generate.
    vocab_limit: ids at and past this get no probability: a model's vocabulary is often
      padded (T5's 32128 rows for 32100 pieces) and those ids cannot be detokenized.

  Returns:
    (tokens_to_logits, cache), where tokens_to_logits(ids [B, 1], cache) ->
    (float32 logits [B, vocab], cache).
  """
  variables = {'params': params}

  def limit(logits: Array) -> Array:
    if vocab_limit is None or vocab_limit >= logits.shape[-1]:
      return logits
    return jnp.where(jnp.arange(logits.shape[-1]) < vocab_limit, logits, layers.NEG_INF)

  if isinstance(model, models.EncoderDecoder):
    encoder_tokens = batch['encoder_input_tokens']
    encoded = model.apply(variables, encoder_tokens, method=model.encode)
    zeros = jnp.zeros((encoder_tokens.shape[0], max_decode_length), jnp.int32)
    _, state = model.apply(variables, encoded, encoder_tokens, zeros, decode=True,
                           max_decode_length=max_decode_length, mutable=['cache'],
                           method=model.decode)

    def tokens_to_logits(ids: Array, cache: Any) -> tuple[Array, Any]:
      logits, state = model.apply(
          {**variables, 'cache': cache['model']}, None, cache['encoder_input_tokens'], ids,
          decode=True, max_decode_length=max_decode_length, mutable=['cache'],
          method=model.decode)
      return limit(logits[:, 0]), {**cache, 'model': state['cache']}

    return tokens_to_logits, {'model': state['cache'], 'encoder_input_tokens': encoder_tokens}

  prompt = batch['prompt']
  length = prompt.shape[1] + max_decode_length
  to_length = lambda x: jnp.pad(x, ((0, 0), (0, max_decode_length)))
  prefix = batch.get('decoder_causal_attention')
  _, state = model.apply(variables, to_length(prompt), decode=True, max_decode_length=length,
                         decoder_causal_attention=None if prefix is None else to_length(prefix),
                         mutable=['cache'])

  def lm_tokens_to_logits(ids: Array, cache: Any) -> tuple[Array, Any]:
    logits, state = model.apply({**variables, 'cache': cache['model']}, ids, decode=True,
                                max_decode_length=length, mutable=['cache'])
    return limit(logits[:, 0]), {'model': state['cache']}

  return lm_tokens_to_logits, {'model': state['cache']}


def _predict(params: Any, batch: Mapping[str, Array], rng: Array, *, model: Model,
             decode_config: decoding.DecodeConfig, vocab_limit: int | None, layout: Any
             ) -> tuple[Array, Array]:
  del layout  # see _layout
  tokens_to_logits, cache = make_tokens_to_logits(
      model, params, batch, max_decode_length=decode_config.max_decode_length,
      vocab_limit=vocab_limit)
  tokens = batch.get('encoder_input_tokens', batch.get('prompt'))
  return decoding.decode(tokens_to_logits, cache, config=decode_config,
                         batch_size=tokens.shape[0], rng=rng, prompt=batch.get('prompt'),
                         start_id=model.config.decoder_start_token_id)


def _score(params: Any, batch: Mapping[str, Array], *, model: Model, layout: Any) -> Array:
  del layout  # see _layout
  inputs = {k: v for k, v in batch.items() if k != 'decoder_loss_weights'}
  logits = model.apply({'params': params}, **inputs)  # [b, l, vocab] float32
  log_probs = jax.nn.log_softmax(logits)
  targets = batch['decoder_target_tokens']
  token_scores = jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
  return jnp.sum(token_scores * (batch['decoder_loss_weights'] > 0), axis=-1)


# Module-level jits: each compiles once per (model, decode config, layout, batch shapes).
_predict_jit = jax.jit(
    _predict, static_argnames=('model', 'decode_config', 'vocab_limit', 'layout'))
_score_jit = jax.jit(_score, static_argnames=('model', 'layout'))


def _layout(partitioner: partitioning.Partitioner | None) -> Any:
  # The models' logical sharding constraints are resolved when jit traces, and the rules in
  # scope are not part of jit's cache key: this static argument is, so a trace made without
  # (or with other) rules is not reused.
  return None if partitioner is None else (partitioner.mesh, partitioner.rules)


def _global(batch: Mapping[str, np.ndarray],
            partitioner: partitioning.Partitioner | None) -> dict[str, Array]:
  """Every process holds the same whole batch; each device takes its data-parallel slice."""
  if partitioner is None:
    return {k: jnp.asarray(v) for k, v in batch.items()}
  return {k: jax.make_array_from_callback(
      v.shape, partitioner.batch_sharding(v.ndim), lambda index, v=v: v[index])
          for k, v in batch.items()}


def _fetch(x: Array) -> np.ndarray:
  # A batch sharded across processes is not addressable from one: gather it everywhere.
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def predict_batch(model: Model, params: Any, batch: Mapping[str, np.ndarray],
                  decode_config: decoding.DecodeConfig, rng: Array | None = None, *,
                  partitioner: partitioning.Partitioner | None = None,
                  vocab_limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Generates for one batch.

  Args:
    model, params: the model and its params (sharded or not).
    batch: 'encoder_input_tokens' [b, l] for an encoder-decoder, 'prompt' [b, P] for a
      decoder-only model (right-padded with 0, starting with the model's start token;
      a prefix-LM's with its 'decoder_causal_attention'; see
      `FeatureBuilder.predict_features`).
    decode_config: the search.
    rng: for sampling; default key(0).
    partitioner: shard the batch over its data axes (b must divide evenly).
    vocab_limit: see `make_tokens_to_logits`.

  Returns:
    sequences int32 [b, n, max_decode_length] (0 after EOS) and scores float32 [b, n].
  """
  rng = jax.random.key(0) if rng is None else rng
  if 'prompt' in batch:  # under jit decoding cannot check them
    decoding.check_prompts(batch['prompt'], None)
  with partitioner.activate() if partitioner else contextlib.nullcontext():
    sequences, scores = _predict_jit(params, _global(batch, partitioner), rng, model=model,
                                     decode_config=decode_config, vocab_limit=vocab_limit,
                                     layout=_layout(partitioner))
    return _fetch(sequences), _fetch(scores)


def score_batch(model: Model, params: Any, batch: Mapping[str, np.ndarray], *,
                partitioner: partitioning.Partitioner | None = None) -> np.ndarray:
  """Teacher-forced log-likelihood of each row's targets, float32 [b].

  The sum over positions with `decoder_loss_weights > 0` of log p(target token | inputs,
  earlier targets), from the model's full forward pass; `batch` holds unpacked model
  features as the feature converters make them.
  """
  with partitioner.activate() if partitioner else contextlib.nullcontext():
    return _fetch(_score_jit(params, _global(batch, partitioner), model=model,
                             layout=_layout(partitioner)))


# ----------------------------------------------------------------------------------------
# Examples and the features built from them
# ----------------------------------------------------------------------------------------


def _split_at_tokenize(task: tasks.Task) -> tuple[list, list]:
  """The task's text preprocessors and the rest (tokenize onwards), which must exist."""
  text_steps, rest = tasks.split_at_tokenize(task)
  if not rest:
    raise ValueError(f'task {task.name} has no tokenize preprocessor; evaluation needs one to '
                     'recover the input and target text')
  return text_steps, rest


def _with_pretokenized(task: tasks.Task) -> tasks.Task:
  """The task, also keeping `inputs_pretokenized` / `targets_pretokenized` text (as seqio):
  metrics compare with the raw target text, not a detokenized round trip."""
  text_steps, rest = _split_at_tokenize(task)
  tokenize = functools.partial(preprocessors.tokenize, copy_pretokenized=True)
  return dataclasses.replace(task, preprocessors=(*text_steps, tokenize, *rest[1:]))


def few_shot_task(task: tasks.Task, k: int, *, shots_split: str = 'train', seed: int = 0,
                  pool_size: int = 1000) -> tasks.Task:
  """The task with each input rewritten as a k-shot prompt (for decoder-only models).

  The shots are the first `pool_size` examples of `shots_split` after the task's text
  preprocessors (its prompt template); `preprocessors.few_shot` draws k of them with `seed`.
  """
  if k < 1:
    raise ValueError(f'few-shot k must be >= 1, got {k}')
  text_steps, rest = _split_at_tokenize(task)
  text_task = dataclasses.replace(task, preprocessors=tuple(text_steps))
  source = task.source(shots_split)
  shots = [shot for shot in (text_task.preprocess(source[i])
                             for i in range(min(pool_size, len(source)))) if shot]
  add_shots = functools.partial(preprocessors.few_shot, shots=shots, k=k, seed=seed)
  return dataclasses.replace(task, name=f'{task.name}_{k}shot',
                             preprocessors=(*text_steps, add_shots, *rest))


def load_examples(task: tasks.Task, split: str, num_examples: int = 0) -> list[Example]:
  """The split's preprocessed examples in order (the first `num_examples`; 0: all), with
  their `inputs_pretokenized` / `targets_pretokenized` text."""
  dataset = pipeline.example_dataset(_with_pretokenized(task), split, shuffle=False)
  examples = []
  for example in dataset:
    if example is None:  # dropped by a preprocessor
      continue
    examples.append(example)
    if num_examples and len(examples) == num_examples:
      break
  if not examples:
    raise ValueError(f'split {split!r} of task {task.name} has no examples to evaluate')
  return examples


@dataclasses.dataclass(frozen=True)
class FeatureBuilder:
  """Model features for one example at a time, per model family, unpacked and padded.

  Attributes:
    architecture: 'encoder_decoder' or 'decoder_only'.
    feature_lengths: {'inputs': n, 'targets': m}; over-long inputs and targets are cut.
    bidirectional_prefix: decoder-only scoring and generation let the inputs attend both
      ways (a prefix-LM, converter 'prefix_lm'); False reads them causally (converter
      'causal_lm').
    start_id: the decoder's first input, the model's `decoder_start_token_id` (T5's 0, or
      a tokenizer's BOS).
  """

  architecture: str
  feature_lengths: Mapping[str, int]
  bidirectional_prefix: bool = True
  start_id: int = 0

  @functools.cached_property
  def _converter(self) -> feature_converters.FeatureConverter:
    if self.architecture == 'encoder_decoder':
      name = 'enc_dec'
    else:
      name = 'prefix_lm' if self.bidirectional_prefix else 'causal_lm'
    return feature_converters.get_converter(name, dict(self.feature_lengths),
                                            start_id=self.start_id)

  def _fit_inputs(self, example: Mapping[str, Any]) -> Example:
    # A decoder-only prompt keeps its last tokens: a few-shot prompt ends with the query.
    if self.architecture == 'encoder_decoder':
      return dict(example)
    return {**example, 'inputs': np.asarray(example['inputs'])[-self.feature_lengths['inputs']:]}

  def score_features(self, example: Mapping[str, Any]) -> Batch:
    """Teacher-forcing features of {'inputs', 'targets'} token arrays."""
    return self._converter.convert(self._fit_inputs(
        {'inputs': example['inputs'], 'targets': example['targets']}))

  def predict_features(self, example: Mapping[str, Any]) -> Batch:
    """What generation conditions on, right-padded with 0: the encoder tokens, or a
    decoder-only prompt of the inputs after the start token (as in the shifted-right
    training inputs), one longer than the inputs' feature length; a prefix-LM's prompt
    comes with its `decoder_causal_attention` (1 on the prompt, as in training)."""
    length = self.feature_lengths['inputs']
    inputs = np.asarray(self._fit_inputs(example)['inputs'], np.int32)[:length]
    if self.architecture == 'encoder_decoder':
      return {'encoder_input_tokens': np.pad(inputs, (0, length - len(inputs)))}
    prompt = np.concatenate([[self.start_id], inputs]).astype(np.int32)
    features = {'prompt': np.pad(prompt, (0, length - len(inputs)))}
    if self.bidirectional_prefix:
      features['decoder_causal_attention'] = np.pad(np.ones_like(prompt),
                                                    (0, length - len(inputs)))
    return features


def _batches(features: Sequence[Batch], batch_size: int) -> Any:
  """Stacked batches of `batch_size` rows; the last is padded by repeating its last row.

  Yields (batch, number of real rows).
  """
  for start in range(0, len(features), batch_size):
    rows = list(features[start:start + batch_size])
    real = len(rows)
    rows += [rows[-1]] * (batch_size - real)
    yield {k: np.stack([row[k] for row in rows]) for k in rows[0]}, real


def _round_up(batch_size: int, partitioner: partitioning.Partitioner | None) -> int:
  """Batches split evenly over the data-parallel devices (extra rows are padding)."""
  ways = partitioner.data_parallel_size if partitioner else 1
  return -(-batch_size // ways) * ways


def score_examples(model: Model, params: Any, features: Sequence[Batch], *, batch_size: int,
                   partitioner: partitioning.Partitioner | None = None) -> np.ndarray:
  """`score_batch` over a list of per-example features, float32 [len(features)]."""
  size = _round_up(batch_size, partitioner)
  scores = [score_batch(model, params, batch, partitioner=partitioner)[:real]
            for batch, real in _batches(features, size)]
  return np.concatenate(scores)


def rank_classification(model: Model, params: Any, builder: FeatureBuilder,
                        examples: Sequence[Mapping[str, Any]],
                        candidates: Sequence[Sequence[np.ndarray]], *, batch_size: int = 32,
                        partitioner: partitioning.Partitioner | None = None
                        ) -> tuple[np.ndarray, np.ndarray]:
  """Chooses, per example, the candidate answer the model finds most likely (T5's rank
  classification).

  Args:
    model, params: the model.
    builder: makes the teacher-forcing features.
    examples: token dicts with 'inputs'.
    candidates: per example, its candidate target token arrays (EOS included), all examples
      with the same number of candidates.
    batch_size, partitioner: as `score_examples`.

  Returns:
    The chosen candidate's index per example, int [n], and every score, float32 [n, c].
  """
  counts = {len(c) for c in candidates}
  if len(candidates) != len(examples) or len(counts) != 1 or 0 in counts:
    raise ValueError(f'rank_classification needs the same non-zero number of candidates for '
                     f'each of the {len(examples)} examples, got counts {sorted(counts)} for '
                     f'{len(candidates)} examples')
  features = [builder.score_features({'inputs': example['inputs'], 'targets': target})
              for example, options in zip(examples, candidates) for target in options]
  scores = score_examples(model, params, features, batch_size=batch_size,
                          partitioner=partitioner).reshape(len(examples), -1)
  return scores.argmax(axis=1), scores


# ----------------------------------------------------------------------------------------
# The evaluator
# ----------------------------------------------------------------------------------------


def _warn_over_long(examples: Sequence[Example], length: int, architecture: str) -> None:
  """Says how many inputs the model will see cut (never silently)."""
  over = sum(len(e['inputs']) > length for e in examples)
  if over:
    kept = 'first' if architecture == 'encoder_decoder' else 'last'
    absl_logging.warning(
        '%d of %d inputs are longer than %d tokens and are cut to their %s %d; raise '
        '--config.data.feature_lengths.inputs to keep them whole.',
        over, len(examples), length, kept, length)


@dataclasses.dataclass
class EvalResult:
  """Task metrics and one (input, target, prediction) text row per example."""

  metrics: dict[str, float]
  rows: list[dict[str, str]]


class Evaluator:
  """Decodes (or rank-classifies) a task split and scores it with the task's metrics.

  The examples are read and tokenized once; `evaluate(params)` can then run every few
  training steps. Predictions are detokenized with the task's targets vocabulary and
  compared by `task.score` (which applies the task's postprocess_fn to both sides).
  """

  def __init__(self, task: tasks.Task, split: str, model: Model, *,
               feature_lengths: Mapping[str, int], batch_size: int,
               decode_config: decoding.DecodeConfig, num_examples: int = 0,
               bidirectional_prefix: bool = True, candidates: Sequence[str] = (),
               partitioner: partitioning.Partitioner | None = None, seed: int = 0):
    """Loads the examples.

    Args:
      task: the task (a few-shot variant for k-shot prompts: `few_shot_task`).
      split: which split, e.g. 'validation'.
      model: an EncoderDecoder or DecoderOnly.
      feature_lengths: {'inputs', 'targets'} lengths; inputs are cut to fit.
      batch_size: examples per batch.
      decode_config: how to generate.
      num_examples: the first this many examples (0: all).
      bidirectional_prefix: see `FeatureBuilder`.
      candidates: if given, predict by rank classification among these answers instead of
        decoding (e.g. a classification task's labels).
      partitioner: shards batches over the data axes.
      seed: sampling RNG seed (folded with the batch index).
    """
    self.task, self.split, self.model = task, split, model
    self.examples = load_examples(task, split, num_examples)
    self.vocabulary = task.output_features['targets'].vocabulary
    self.builder = FeatureBuilder(model.config.architecture, dict(feature_lengths),
                                  bidirectional_prefix, model.config.decoder_start_token_id)
    _warn_over_long(self.examples, feature_lengths['inputs'], model.config.architecture)
    self.batch_size = _round_up(batch_size, partitioner)
    self.decode_config = decode_config
    self.candidates = list(candidates)
    self.partitioner = partitioner
    self.seed = seed

  def _text(self, example: Example, key: str) -> str:
    if f'{key}_pretokenized' in example:
      return example[f'{key}_pretokenized']
    return self.task.output_features[key].vocabulary.decode(example[key])

  def predict(self, params: Any) -> list[str]:
    """One decoded (or chosen) prediction per example, as text."""
    if self.candidates:
      return self._rank(params)
    features = [self.builder.predict_features(e) for e in self.examples]
    predictions = []
    for index, (batch, real) in enumerate(_batches(features, self.batch_size)):
      rng = jax.random.fold_in(jax.random.key(self.seed), index)
      sequences, _ = predict_batch(self.model, params, batch, self.decode_config, rng,
                                   partitioner=self.partitioner,
                                   vocab_limit=self.vocabulary.vocab_size)
      predictions += self.vocabulary.decode_batch(sequences[:real, 0])
    return predictions

  def _rank(self, params: Any) -> list[str]:
    feature = self.task.output_features['targets']
    options = [np.asarray(feature.vocabulary.encode(c)
                          + ([feature.vocabulary.eos_id] if feature.add_eos else []), np.int32)
               for c in self.candidates]
    choices, _ = rank_classification(
        self.model, params, self.builder, self.examples, [options] * len(self.examples),
        batch_size=self.batch_size, partitioner=self.partitioner)
    return [self.candidates[i] for i in choices]

  def score(self, params: Any) -> np.ndarray:
    """Each example's target log-likelihood (targets cut to their feature length)."""
    features = [self.builder.score_features(e) for e in self.examples]
    return score_examples(self.model, params, features, batch_size=self.batch_size,
                          partitioner=self.partitioner)

  def rows(self, **columns: Sequence[Any]) -> list[dict[str, Any]]:
    """Per example: its 'input' and 'target' text, and its value in each of `columns`."""
    return [{'input': self._text(e, 'inputs'), 'target': self._text(e, 'targets'),
             **{name: values[i] for name, values in columns.items()}}
            for i, e in enumerate(self.examples)]

  def evaluate(self, params: Any) -> EvalResult:
    """Predictions, their rows and the task's metrics on them (none if it has no metrics)."""
    rows = self.rows(prediction=self.predict(params))
    metrics = {}
    if self.task.metric_fns:
      metrics = self.task.score([r['target'] for r in rows], [r['prediction'] for r in rows])
    return EvalResult({k: float(v) for k, v in metrics.items()}, rows)
