"""Feature converters: tokenized task examples -> model features with T5X's names.

A task yields examples of 1-D int32 token arrays (`{"inputs", "targets"}` or `{"targets"}`,
EOS already appended). A converter fits them to `task_feature_lengths` and maps them to what
the models consume (see t5x_lite/models.py):

  enc_dec:   encoder_input_tokens, decoder_target_tokens, decoder_input_tokens (targets
             shifted right after the start token: T5's 0, or a tokenizer's BOS),
             decoder_loss_weights
  lm:        decoder_target_tokens, decoder_input_tokens, decoder_loss_weights
  prefix_lm: lm's features of inputs + targets concatenated, plus decoder_causal_attention
             (1 on the inputs and on the one position that reads the last input token,
             T5X's PrefixLMFeatureConverter convention); loss on the targets only by default.
  causal_lm: prefix_lm's features without decoder_causal_attention: inputs + targets read
             causally throughout (the "language model" architecture of the T5 paper's
             Table 2); loss on the targets only by default.

Packed rows also carry `*_segment_ids` (1, 2, ... per example, 0 = padding) and
`*_positions` (restarting at 0 per example); the shift-right restarts per example too.

Conversion runs in three steps so the pipeline can pack in between: `prepare` (validate,
truncate or drop over-long examples, counting them, and lay every feature out token-aligned),
then padding (`pad`) or first-fit packing (`pack_dataset`) to `packed_lengths`, then
`model_features`, which works on one row or a batch ([..., length] arrays).
"""

import abc
import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

import grain
import numpy as np
from absl import logging

Features = dict[str, np.ndarray]
# Token features of model batches whose non-zero share is the packing efficiency.
TOKEN_FEATURES = ('encoder_input_tokens', 'decoder_target_tokens')


@dataclasses.dataclass
class ConversionStats:
  """What a converter has seen, so over-long examples are never silent."""

  examples: int = 0
  truncated: int = 0
  dropped: int = 0


def shift_right(targets: np.ndarray, segment_ids: np.ndarray | None = None,
                start_id: int = 0) -> np.ndarray:
  """Teacher-forcing inputs: targets moved one step right along the last axis, `start_id`
  first (T5's 0; a decoder-only model whose tokenizer has a BOS, e.g. Llama's 1, uses that).

  With `segment_ids` every packed example starts again with `start_id` instead of the
  previous example's last token (its EOS); padding (segment 0) stays 0.
  """
  shifted = np.zeros_like(targets)
  shifted[..., 0] = start_id
  shifted[..., 1:] = targets[..., :-1]
  if segment_ids is not None:
    starts = np.ones_like(segment_ids, bool)
    starts[..., 1:] = segment_ids[..., 1:] != segment_ids[..., :-1]
    shifted = np.where(starts, np.where(segment_ids != 0, start_id, 0), shifted)
  return shifted


def token_counts(batch: Mapping[str, np.ndarray]) -> dict[str, tuple[int, int]]:
  """(non-padding, total) token slots of each token feature of a model batch."""
  return {k: (int(np.count_nonzero(batch[k])), int(batch[k].size))
          for k in TOKEN_FEATURES if k in batch}


def packing_efficiency(batch: Mapping[str, np.ndarray]) -> float:
  """Share of a batch's token slots holding real tokens (1.0 = no padding at all)."""
  counts = token_counts(batch).values()
  return sum(used for used, _ in counts) / max(sum(total for _, total in counts), 1)


def _token_array(example: Mapping[str, Any], key: str, converter: str) -> np.ndarray:
  if key not in example:
    raise ValueError(
        f'The {converter} converter needs a tokenized {key!r} feature but the example has '
        f'only {sorted(example)}; add the tokenize preprocessor to the task (or use '
        f"converter='lm' for targets-only tasks).")
  tokens = np.asarray(example[key])
  if tokens.size == 0:
    tokens = tokens.astype(np.int32)
  if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
    raise ValueError(
        f'Feature {key!r} must be a 1-D integer array of token ids, got dtype {tokens.dtype} '
        f'and shape {tokens.shape}; tokenize it first (preprocessors.tokenize).')
  return tokens.astype(np.int32, copy=False)


class FeatureConverter(abc.ABC):
  """Fits tokenized examples to fixed lengths and maps them to model features.

  Over-long examples are truncated to their first `length` tokens (`truncate=True`) or
  dropped; either way `stats` counts them and a warning with the count is logged at the
  1st, 10th, 100th, ... occurrence. `start_id` is the decoder's first input (`shift_right`).
  """

  name: str
  task_features: tuple[str, ...]

  def __init__(self, task_feature_lengths: Mapping[str, int], *, truncate: bool = True,
               start_id: int = 0):
    lengths = dict(task_feature_lengths)
    if (sorted(lengths) != sorted(self.task_features)
        or not all(isinstance(v, int) and v > 0 for v in lengths.values())):
      raise ValueError(
          f'task_feature_lengths for the {self.name} converter must map exactly '
          f'{list(self.task_features)} to positive ints, got {lengths}.')
    self.task_feature_lengths = lengths
    self.truncate = truncate
    self.start_id = start_id
    self.stats = ConversionStats()

  @property
  def packed_lengths(self) -> dict[str, int]:
    """Lengths of the token-aligned features `prepare` returns (what padding/packing fill)."""
    return dict(self.task_feature_lengths)

  def prepare(self, example: Mapping[str, Any]) -> Features | None:
    """Validates one example, trims (or drops: None) it and lays it out token-aligned."""
    tokens = {k: _token_array(example, k, self.name) for k in self.task_features}
    if tokens['targets'].size == 0:
      raise ValueError(
          f"Example has empty 'targets' (keys {sorted(example)}); the {self.name} converter "
          'needs at least one target token: give the targets Feature add_eos=True or drop '
          'empty examples in a preprocessor.')
    self.stats.examples += 1
    over = {k: len(v) for k, v in tokens.items() if len(v) > self.task_feature_lengths[k]}
    if over:
      self._count_overlong(over)
      if not self.truncate:
        return None
      tokens = {k: v[:self.task_feature_lengths[k]] for k, v in tokens.items()}
    return self._token_aligned(tokens)

  def _count_overlong(self, over: Mapping[str, int]):
    if self.truncate:
      self.stats.truncated += 1
      count, action = self.stats.truncated, 'truncated to their first tokens'
    else:
      self.stats.dropped += 1
      count, action = self.stats.dropped, 'dropped'
    if count == 10 ** (len(str(count)) - 1):  # 1, 10, 100, ...: bounded log noise
      logging.warning(
          '%s converter: %d of %d examples so far were longer than %s and were %s '
          '(latest: lengths %s). Raise task_feature_lengths to keep them whole.',
          self.name, count, self.stats.examples, self.task_feature_lengths, action, over)

  def _token_aligned(self, tokens: Features) -> Features:
    """The per-token features padding and packing fill (the prefix-LM adds its masks)."""
    return tokens

  def pad(self, features: Mapping[str, np.ndarray]) -> Features:
    """Right-pads each token-aligned feature with 0 to its packed length."""
    return {k: np.pad(features[k], (0, n - len(features[k])))
            for k, n in self.packed_lengths.items()}

  def pack_dataset(self, dataset: grain.IterDataset, num_packing_bins: int
                   ) -> grain.IterDataset:
    """First-fit packs prepared examples into rows with `*_segment_ids`, `*_positions`.

    Examples fill `num_packing_bins` rows in order, each going to the first row with room
    for all its features; the rows are emitted when an example fits in none of them.
    """
    return grain.experimental.FirstFitPackIterDataset(
        dataset, length_struct=self.packed_lengths, num_packing_bins=num_packing_bins,
        shuffle_bins=False)

  def convert(self, example: Mapping[str, Any]) -> Features | None:
    """One example -> padded (unpacked) model features, or None if dropped as over-long."""
    prepared = self.prepare(example)
    return None if prepared is None else self.model_features(self.pad(prepared))

  def pack(self, examples: Iterable[Mapping[str, Any]], num_packing_bins: int = 1
           ) -> list[Features]:
    """Packs examples in order into rows of model features (for tests and offline use)."""
    prepared = grain.MapDataset.source(list(examples)).map(self.prepare).to_iter_dataset()
    return [self.model_features(row)
            for row in self.pack_dataset(prepared, num_packing_bins)]

  @abc.abstractmethod
  def model_features(self, rows: Mapping[str, np.ndarray]) -> Features:
    """Padded or packed token-aligned features ([..., length]) -> int32 model features."""


def _decoder_features(rows: Mapping[str, np.ndarray], loss_weights: np.ndarray,
                      start_id: int) -> Features:
  """The decoder's features from packed or padded `targets` (+ segment ids / positions)."""
  targets = rows['targets']
  segment_ids = rows.get('targets_segment_ids')
  features = {
      'decoder_target_tokens': targets,
      'decoder_input_tokens': shift_right(targets, segment_ids, start_id),
      'decoder_loss_weights': loss_weights,
  }
  if segment_ids is not None:
    features['decoder_segment_ids'] = segment_ids
    features['decoder_positions'] = rows['targets_positions']
  return features


def _int32(features: Features) -> Features:
  return {k: np.asarray(v, np.int32) for k, v in features.items()}


class EncDecFeatureConverter(FeatureConverter):
  """Encoder-decoder (T5): inputs feed the encoder, targets the decoder; loss on targets."""

  name = 'enc_dec'
  task_features = ('inputs', 'targets')

  def model_features(self, rows: Mapping[str, np.ndarray]) -> Features:
    features = {'encoder_input_tokens': rows['inputs'],
                **_decoder_features(rows, rows['targets'] != 0, self.start_id)}
    if 'inputs_segment_ids' in rows:
      features['encoder_segment_ids'] = rows['inputs_segment_ids']
      features['encoder_positions'] = rows['inputs_positions']
    return _int32(features)


class LMFeatureConverter(FeatureConverter):
  """Decoder-only language model on `targets`; loss on every real token."""

  name = 'lm'
  task_features = ('targets',)

  def model_features(self, rows: Mapping[str, np.ndarray]) -> Features:
    return _int32(_decoder_features(rows, rows['targets'] != 0, self.start_id))


class PrefixLMFeatureConverter(FeatureConverter):
  """Decoder-only prefix-LM on inputs + targets; the inputs attend bidirectionally.

  Inputs and targets are trimmed to their own lengths, then concatenated into one sequence
  of up to inputs + targets length. `decoder_causal_attention` is 1 on the inputs and on
  the next position (where the last input token is read and the first target predicted).
  """

  name = 'prefix_lm'
  task_features = ('inputs', 'targets')
  bidirectional_inputs = True  # False: no decoder_causal_attention, causal throughout

  def __init__(self, task_feature_lengths: Mapping[str, int], *, truncate: bool = True,
               start_id: int = 0, loss_on_targets_only: bool = True):
    super().__init__(task_feature_lengths, truncate=truncate, start_id=start_id)
    self.loss_on_targets_only = loss_on_targets_only

  @property
  def _aligned(self) -> tuple[str, ...]:
    return ('targets', 'loss_weights') + (('causal_attention',) if self.bidirectional_inputs
                                          else ())

  @property
  def packed_lengths(self) -> dict[str, int]:
    length = sum(self.task_feature_lengths.values())
    return {k: length for k in self._aligned}

  def _token_aligned(self, tokens: Features) -> Features:
    num_inputs = len(tokens['inputs'])
    sequence = np.concatenate([tokens['inputs'], tokens['targets']])
    index = np.arange(len(sequence))
    loss = index >= num_inputs if self.loss_on_targets_only else np.ones(len(sequence), bool)
    features = {'targets': sequence, 'loss_weights': loss.astype(np.int32),
                'causal_attention': (index <= num_inputs).astype(np.int32)}
    return {k: features[k] for k in self._aligned}

  def model_features(self, rows: Mapping[str, np.ndarray]) -> Features:
    features = _decoder_features(rows, rows['loss_weights'], self.start_id)
    if self.bidirectional_inputs:
      features['decoder_causal_attention'] = rows['causal_attention']
    return _int32(features)


class CausalLMFeatureConverter(PrefixLMFeatureConverter):
  """Decoder-only LM on inputs + targets read causally throughout (no bidirectional prefix):
  the T5 paper's "language model" architecture when fine-tuned on inputs -> targets."""

  name = 'causal_lm'
  bidirectional_inputs = False


CONVERTERS: dict[str, type[FeatureConverter]] = {
    c.name: c for c in (EncDecFeatureConverter, LMFeatureConverter, PrefixLMFeatureConverter,
                        CausalLMFeatureConverter)}


def get_converter(name: str, task_feature_lengths: Mapping[str, int], **kwargs
                  ) -> FeatureConverter:
  """The converter called `name` ("enc_dec", "lm", "prefix_lm" or "causal_lm")."""
  if name not in CONVERTERS:
    raise ValueError(f'Unknown feature converter {name!r}; known: {sorted(CONVERTERS)}.')
  return CONVERTERS[name](task_feature_lengths, **kwargs)
