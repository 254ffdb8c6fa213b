"""Inference and evaluation: decode predictions, score targets, rank candidates, run metrics.

The model side of decoding lives here: `make_tokens_to_logits` turns either model family
into the `tokens_to_logits(ids, cache)` function and KV cache that `decoding.decode`
searches over. On top of it:

  predict_batch / score_batch     jitted (once per shape) generation and teacher-forced
                                  target log-likelihoods of one batch of model features
  rank_classification             picks the best-scoring candidate answer per example
  few_shot_task                   a decoder-only task whose inputs are k-shot prompts
  Evaluator                       a task split -> predictions -> postprocessed metrics
  run_infer / run_score / run_eval  what `main.py`'s infer / score / eval commands do

Examples are read unpacked and in order, and the last partial batch is padded (by
repeating its last example) and trimmed again afterwards, so every example counts once.
"""

import contextlib
import dataclasses
import functools
import json
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging as absl_logging
from etils import epath
from jax.experimental import multihost_utils

from t5x_lite import checkpoints, decoding, layers, logging_utils, models, partitioning
from t5x_lite import config as config_lib
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
    batch: 'encoder_input_tokens' [b, l] (encoder-decoder) or 'prompt' [b, P] (decoder-only).
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
  zeros = jnp.zeros((prompt.shape[0], length), jnp.int32)
  _, state = model.apply(variables, zeros, decode=True, max_decode_length=length,
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
                         batch_size=tokens.shape[0], rng=rng, prompt=batch.get('prompt'))


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
      decoder-only model (right-padded with 0, starting with the model's start token 0;
      see `FeatureBuilder.predict_features`).
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


def _is_tokenize(fn: Callable) -> bool:
  return getattr(fn, 'func', fn) is preprocessors.tokenize


def _split_at_tokenize(task: tasks.Task) -> tuple[list, list]:
  """The task's text preprocessors and the rest (tokenize onwards)."""
  steps = list(task.preprocessors)
  index = next((i for i, fn in enumerate(steps) if _is_tokenize(fn)), None)
  if index is None:
    raise ValueError(f'task {task.name} has no tokenize preprocessor; evaluation needs one to '
                     'recover the input and target text')
  return steps[:index], steps[index:]


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
    bidirectional_prefix: decoder-only scoring lets the inputs attend both ways (a
      prefix-LM); False for a causal LM.
  """

  architecture: str
  feature_lengths: Mapping[str, int]
  bidirectional_prefix: bool = True

  @functools.cached_property
  def _converter(self) -> feature_converters.FeatureConverter:
    name = 'enc_dec' if self.architecture == 'encoder_decoder' else 'prefix_lm'
    return feature_converters.get_converter(name, dict(self.feature_lengths))

  def _fit_inputs(self, example: Mapping[str, Any]) -> Example:
    # A decoder-only prompt keeps its last tokens: a few-shot prompt ends with the query.
    if self.architecture == 'encoder_decoder':
      return dict(example)
    return {**example, 'inputs': np.asarray(example['inputs'])[-self.feature_lengths['inputs']:]}

  def score_features(self, example: Mapping[str, Any]) -> Batch:
    """Teacher-forcing features of {'inputs', 'targets'} token arrays."""
    features = self._converter.convert(self._fit_inputs(
        {'inputs': example['inputs'], 'targets': example['targets']}))
    if not self.bidirectional_prefix:
      features.pop('decoder_causal_attention', None)
    return features

  def predict_features(self, example: Mapping[str, Any]) -> Batch:
    """What generation conditions on, right-padded with 0: the encoder tokens, or a
    decoder-only prompt of the inputs after the start token 0 (as in the shifted-right
    training inputs), one longer than the inputs' feature length."""
    length = self.feature_lengths['inputs']
    inputs = np.asarray(self._fit_inputs(example)['inputs'], np.int32)[:length]
    if self.architecture == 'encoder_decoder':
      return {'encoder_input_tokens': np.pad(inputs, (0, length - len(inputs)))}
    return {'prompt': np.pad(np.concatenate([[0], inputs]).astype(np.int32),
                             (0, length - len(inputs)))}


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
                                  bidirectional_prefix)
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


# ----------------------------------------------------------------------------------------
# From a run config: decode settings, the evaluator, params from a workdir, the commands
# ----------------------------------------------------------------------------------------


def decode_config(config: ml_collections.ConfigDict, eos_id: int = 1
                  ) -> decoding.DecodeConfig:
  """The search described by a run config's `eval` section."""
  ev = config.eval
  return decoding.DecodeConfig(
      method=ev.method, max_decode_length=ev.max_decode_length, temperature=ev.temperature,
      top_k=ev.top_k, top_p=ev.top_p, num_beams=ev.num_beams, alpha=ev.alpha, eos_id=eos_id)


def eval_task(config: ml_collections.ConfigDict) -> tasks.Task:
  """`eval.task` (default `data.task`), as a k-shot variant when `eval.few_shot_k` > 0."""
  name = config.eval.task or config.data.task
  task = tasks.get(name)
  if isinstance(task, tasks.Mixture):
    raise ValueError(f'{name} is a mixture; evaluate one of its tasks with '
                     f'--config.eval.task=NAME (one of {", ".join(task.task_names)})')
  task = tasks.with_vocabulary(task, config.data.vocabulary)
  if config.eval.few_shot_k:
    task = few_shot_task(task, config.eval.few_shot_k, shots_split=config.eval.few_shot_split,
                         seed=config.eval.seed)
  return task


def make_partitioner(config: ml_collections.ConfigDict) -> partitioning.Partitioner:
  return partitioning.Partitioner(partitioning.make_mesh(config.mesh_shape),
                                  partitioning.logical_rules(config.axis_rules.to_dict()))


def evaluator_from_config(config: ml_collections.ConfigDict, model: Model | None = None,
                          partitioner: partitioning.Partitioner | None = None) -> Evaluator:
  """The Evaluator a run config's `eval` section describes."""
  task = eval_task(config)
  model = model or models.build_model(config_lib.model_config(config))
  candidates = [c.strip() for c in config.eval.candidates.split(',') if c.strip()]
  return Evaluator(
      task, config.eval.split, model, feature_lengths=config.data.feature_lengths.to_dict(),
      batch_size=config.eval.batch_size,
      decode_config=decode_config(config, task.output_features['targets'].vocabulary.eos_id),
      num_examples=config.eval.num_examples,
      bidirectional_prefix=config.data.converter == 'prefix_lm', candidates=candidates,
      partitioner=partitioner, seed=config.eval.seed)


def _checkpoint_param_shapes(path: str) -> dict[str, tuple[int, ...]]:
  """Param name -> shape in a saved state, read from its metadata (no arrays loaded)."""
  metadata = ocp.PyTreeCheckpointHandler().metadata(epath.Path(path))['params']
  return {_name(p): tuple(m.shape) for p, m in jax.tree_util.tree_leaves_with_path(metadata)}


def _name(key_path: Any) -> str:
  return jax.tree_util.keystr(key_path, simple=True, separator='/')


def _check_params_match(path: str, abstract_params: Any, workdir: str) -> None:
  """A clear error when the config's model does not match the checkpoint's params."""
  saved = _checkpoint_param_shapes(path)
  for key_path, leaf in jax.tree_util.tree_leaves_with_path(abstract_params):
    name = _name(key_path)
    if name not in saved:
      raise ValueError(f'config/checkpoint mismatch: param {name} is not in the checkpoint '
                       f'of {workdir!r}; use the config that run was trained with')
    if saved[name] != tuple(leaf.shape):
      raise ValueError(f'config/checkpoint mismatch: param {name} has shape {saved[name]} in '
                       f'the checkpoint of {workdir!r} but {tuple(leaf.shape)} in this '
                       'config; use the config that run was trained with')


def load_params(config: ml_collections.ConfigDict, workdir: str,
                partitioner: partitioning.Partitioner) -> tuple[Any, int]:
  """The newest checkpoint's params in `workdir`, sharded per the config, and its step.

  Raises:
    FileNotFoundError: `workdir` holds no checkpoint.
    ValueError: the config's model differs from the checkpoint's (names a param).
  """
  directory = os.path.join(workdir, 'checkpoints')
  step = checkpoints.latest_step(directory)
  if step is None:
    raise FileNotFoundError(f'no checkpoint in {directory!r}; pass the --workdir of a '
                            'train run')
  model = models.build_model(config_lib.model_config(config))
  boxed = jax.eval_shape(lambda: model.init(
      jax.random.key(0), **models.dummy_batch(model.config))['params'])
  abstract = checkpoints.abstract_with_shardings(nn.unbox(boxed),
                                                 partitioner.boxed_shardings(boxed))
  _check_params_match(os.path.join(os.path.abspath(directory), str(step), 'state'),
                      abstract, workdir)
  return checkpoints.restore_params(directory, abstract, step), step


def _setup(config: ml_collections.ConfigDict, workdir: str
           ) -> tuple[Evaluator, Any, int]:
  partitioner = make_partitioner(config)
  params, step = load_params(config, workdir, partitioner)
  return evaluator_from_config(config, partitioner=partitioner), params, step


def _write_jsonl(path: str, rows: Sequence[Mapping[str, Any]]) -> None:
  if jax.process_index() != 0:
    return
  with open(path + '.tmp', 'w', encoding='utf-8') as f:
    for row in rows:
      f.write(json.dumps(row, ensure_ascii=False) + '\n')
  os.replace(path + '.tmp', path)


def _output_path(workdir: str, kind: str, evaluator: Evaluator) -> str:
  return os.path.join(workdir, f'{kind}_{evaluator.task.name}_{evaluator.split}.jsonl')


def run_infer(config: ml_collections.ConfigDict, workdir: str) -> tuple[str, int]:
  """Decodes the eval split; writes `<workdir>/infer_<task>_<split>.jsonl` rows
  {"input", "target", "prediction"}; returns the path and the row count."""
  evaluator, params, _ = _setup(config, workdir)
  rows = evaluator.rows(prediction=evaluator.predict(params))
  path = _output_path(workdir, 'infer', evaluator)
  _write_jsonl(path, rows)
  return path, len(rows)


def run_score(config: ml_collections.ConfigDict, workdir: str) -> tuple[str, float]:
  """Writes each eval example's target log-likelihood to
  `<workdir>/score_<task>_<split>.jsonl` rows {"input", "target", "log_likelihood"};
  returns the path and the mean."""
  evaluator, params, _ = _setup(config, workdir)
  scores = evaluator.score(params)
  rows = evaluator.rows(log_likelihood=[float(s) for s in scores])
  path = _output_path(workdir, 'score', evaluator)
  _write_jsonl(path, rows)
  return path, float(np.mean(scores))


@dataclasses.dataclass
class EvalReport:
  """What the eval command prints: the model's metrics next to a copy-the-input baseline's,
  and a few example rows."""

  step: int
  num_examples: int
  metrics: dict[str, float]
  baseline: dict[str, float]
  samples: list[dict[str, str]]


def strip_task_prefix(text: str) -> str:
  """The input without its T5-style "task prefix: " ("translate English to German: x" -> x),
  which is what a copy-the-input baseline predicts."""
  prefix, separator, rest = text.partition(': ')
  return rest if separator and '\n' not in prefix else text


def copy_input_baseline(task: tasks.Task, rows: Sequence[Mapping[str, str]]) -> dict[str, float]:
  """The task's metrics when each prediction is its own input with the task prefix removed:
  the floor a trained model must clear (copying is not free in translation, whose text
  shares names, numbers and menu paths with its source)."""
  if not task.metric_fns:
    return {}
  scores = task.score([r['target'] for r in rows], [strip_task_prefix(r['input']) for r in rows])
  return {k: float(v) for k, v in scores.items()}


def run_eval(config: ml_collections.ConfigDict, workdir: str, num_samples: int = 5
             ) -> EvalReport:
  """The task metrics on the eval split, logged (prefix 'eval') to `metrics.jsonl` and
  TensorBoard at the checkpoint's step, with the predictions in
  `<workdir>/eval_<task>_<split>.jsonl`; returns them with the copy-input baseline and
  `num_samples` rows spread over the split."""
  evaluator, params, step = _setup(config, workdir)
  result = evaluator.evaluate(params)
  _write_jsonl(_output_path(workdir, 'eval', evaluator), result.rows)
  logger = logging_utils.MetricLogger(workdir, total_steps=step, initial_step=step,
                                      enabled=jax.process_index() == 0, prefix='eval')
  logger.write(step, result.metrics)
  logger.close()
  stride = max(1, len(result.rows) // max(1, num_samples))
  return EvalReport(step, len(result.rows), result.metrics,
                    copy_input_baseline(evaluator.task, result.rows),
                    result.rows[::stride][:num_samples])
