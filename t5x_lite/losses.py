"""Training loss (T5X's cross-entropy with z-loss and label smoothing) and training metrics.

Losses follow `t5x.losses.compute_weighted_cross_entropy`: per token,

    loss = -sum_v q_v * log_softmax(logits)_v - H(q) + z_loss * log(Z)^2

with soft targets q (`1 - label_smoothing` on the target, `label_smoothing / (V - 1)` on every
other class) and H(q) their entropy, subtracted so a perfect prediction costs 0; Z is the softmax
normaliser. Per-token losses are multiplied by the weights (0 at padding) and summed, then
divided according to `loss_normalizing_factor`:

- None: no division, the plain sum (T5X's default);
- a number: divided by that fixed factor;
- 'NUM_REAL_TARGET_TOKENS': divided by the sum of weights (a per-token mean);
- 'NUM_TOTAL_TARGET_TOKENS': divided by batch * length, padding included;
- 'AVERAGE_PER_SEQUENCE': each sequence (each packed segment, given `segment_ids`) averaged
  over its weights, then averaged over sequences.

`normalize_weights` folds that division into the weights, so that a plain sum of
`cross_entropy_with_z_loss(..., loss_normalizing_factor=None)` over microbatches equals the
normalised loss of the whole batch.
"""

from collections.abc import Mapping
import math
import numbers
from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array

SPECIAL_NORMALIZING_FACTORS = (
    'NUM_REAL_TARGET_TOKENS', 'NUM_TOTAL_TARGET_TOKENS', 'AVERAGE_PER_SEQUENCE')


def _parse_normalizing_factor(factor: float | str | None) -> float | str | None:
  """None, a positive float, or one of `SPECIAL_NORMALIZING_FACTORS` (case-insensitive;
  'none' and numeric strings are accepted so command-line overrides can set them)."""
  if factor is None:
    return None
  if isinstance(factor, str):
    name = factor.strip().upper()
    if name in ('', 'NONE'):
      return None
    if name in SPECIAL_NORMALIZING_FACTORS:
      return name
    try:
      factor = float(name)
    except ValueError:
      raise ValueError(
          f'Invalid loss_normalizing_factor={factor!r}; must be None, a positive number or '
          f'one of {SPECIAL_NORMALIZING_FACTORS}.') from None
  if isinstance(factor, bool) or not isinstance(factor, numbers.Real) or not factor > 0:
    raise ValueError(f'Invalid loss_normalizing_factor={factor!r}; must be None, a positive '
                     f'number or one of {SPECIAL_NORMALIZING_FACTORS}.')
  return float(factor)


def _safe_divide(x: Array, denominator: Array) -> Array:
  """x / denominator, with 0 where the denominator is 0."""
  return jnp.where(denominator > 0, x / jnp.where(denominator > 0, denominator, 1.0), 0.0)


def _per_segment_sums(weights: Array, segment_ids: Array) -> Array:
  """[b, l]: for each position, the sum of `weights` over its row's segment."""
  batch, length = weights.shape
  ids = segment_ids.astype(jnp.int32) + jnp.arange(batch, dtype=jnp.int32)[:, None] * (
      length + 1)
  sums = jax.ops.segment_sum(weights.reshape(-1), ids.reshape(-1),
                             num_segments=batch * (length + 1))
  return sums[ids]


def normalize_weights(weights: Array, loss_normalizing_factor: float | str | None, *,
                      segment_ids: Array | None = None) -> Array:
  """Float32 weights whose weighted sum of per-token losses is the normalised loss.

  Args:
    weights: [batch, length] loss weights, 0 at padding.
    loss_normalizing_factor: see the module docstring.
    segment_ids: [batch, length] packed-example ids (0 at padding); with
      'AVERAGE_PER_SEQUENCE' each segment counts as one sequence. Ignored otherwise.

  Returns:
    [batch, length] float32 weights (all zero if `weights` are).
  """
  factor = _parse_normalizing_factor(loss_normalizing_factor)
  weights = jnp.asarray(weights, jnp.float32)
  if factor is None:
    return weights
  if isinstance(factor, float):
    return weights / factor
  if factor == 'NUM_REAL_TARGET_TOKENS':
    return _safe_divide(weights, jnp.sum(weights))
  if factor == 'NUM_TOTAL_TARGET_TOKENS':
    return weights / weights.size
  # AVERAGE_PER_SEQUENCE (T5X: fractional weights per sequence, then / their sum).
  if segment_ids is None:
    per_sequence = jnp.sum(weights, axis=-1, keepdims=True)
  else:
    per_sequence = _per_segment_sums(weights, segment_ids)
  fractional = _safe_divide(weights, per_sequence)
  return _safe_divide(fractional, jnp.sum(fractional))


def _label_smoothing_constants(label_smoothing: float, vocab_size: int
                               ) -> tuple[float, float, float]:
  """(confidence, low_confidence, entropy of the soft target distribution)."""
  if not 0.0 <= label_smoothing < 1.0:
    raise ValueError(f'Invalid label_smoothing={label_smoothing!r}; must be in [0, 1).')
  confidence = 1.0 - label_smoothing
  low_confidence = label_smoothing / (vocab_size - 1) if vocab_size > 1 else 0.0
  entropy = -confidence * math.log(confidence)
  if low_confidence > 0:
    entropy -= (vocab_size - 1) * low_confidence * math.log(low_confidence)
  return confidence, low_confidence, entropy


def per_token_cross_entropy(logits: Array, targets: Array, *, label_smoothing: float = 0.0,
                            z_loss: float = 1e-4) -> tuple[Array, Array]:
  """Unweighted per-token losses, float32 [batch, length] each: (total, z-loss part).

  `total` already includes the z-loss part, as in T5X's `cross_entropy_with_logits`.
  """
  confidence, low_confidence, entropy = _label_smoothing_constants(
      label_smoothing, logits.shape[-1])
  logits = logits.astype(jnp.float32)
  log_z = jax.nn.logsumexp(logits, axis=-1)
  log_probs = logits - log_z[..., None]
  target_log_prob = jnp.take_along_axis(log_probs, targets[..., None].astype(jnp.int32),
                                        axis=-1)[..., 0]
  # -sum_v q_v log p_v without materialising q: the target gets confidence, every class lc.
  cross_entropy = -(confidence - low_confidence) * target_log_prob
  if low_confidence > 0:
    cross_entropy = cross_entropy - low_confidence * jnp.sum(log_probs, axis=-1)
  z_part = z_loss * jnp.square(log_z)
  return cross_entropy - entropy + z_part, z_part


def cross_entropy_with_z_loss(logits: Array, targets: Array, weights: Array | None = None, *,
                              label_smoothing: float = 0.0, z_loss: float = 1e-4,
                              loss_normalizing_factor: float | str | None = None,
                              segment_ids: Array | None = None) -> tuple[Array, Array]:
  """Weighted, normalised cross-entropy plus z-loss (T5X's `compute_weighted_cross_entropy`).

  Args:
    logits: [batch, length, vocab] (computed in float32).
    targets: [batch, length] int target ids.
    weights: [batch, length] loss weights, 0 at padding. None weighs every position 1, as T5X
      does, except that a special (string) `loss_normalizing_factor` then uses
      `targets > 0`, as T5X's `get_loss_normalizing_factor_and_weights` does.
    label_smoothing: in [0, 1): probability mass moved from the target to the other V - 1
      classes (T5X's convention; torch's `label_smoothing=e` spreads e over all V classes,
      which is ours with `e * (V - 1) / V`, up to our subtracted entropy).
    z_loss: coefficient of log(Z)^2.
    loss_normalizing_factor: see the module docstring.
    segment_ids: packed-example ids for 'AVERAGE_PER_SEQUENCE'.

  Returns:
    (loss, z_loss): float32 scalars; `loss` includes the z-loss. The returned `z_loss` is for
    logging and carries no gradient (as T5X's custom VJP ignores it); differentiate `loss`.
    The weight sum is just `weights.sum()`.
  """
  if logits.ndim != targets.ndim + 1:
    raise ValueError(f'logits {logits.shape} must have one more dim than targets '
                     f'{targets.shape}.')
  total, z_part = per_token_cross_entropy(logits, targets, label_smoothing=label_smoothing,
                                          z_loss=z_loss)
  if weights is None:
    if isinstance(_parse_normalizing_factor(loss_normalizing_factor), str):
      weights = targets > 0
    else:
      weights = jnp.ones(targets.shape, jnp.float32)
  weights = normalize_weights(weights, loss_normalizing_factor, segment_ids=segment_ids)
  return jnp.sum(total * weights), jax.lax.stop_gradient(jnp.sum(z_part * weights))


def metric_sums(logits: Array, targets: Array, weights: Array) -> dict[str, Array]:
  """Additive (over microbatches) accuracy statistics, float32 scalars.

  Returns:
    `correct`: weighted count of argmax hits; `weight_sum`: sum of weights; `num_tokens`:
    number of positions with weight > 0.
  """
  weights = jnp.asarray(weights, jnp.float32)
  hits = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
  return {'correct': jnp.sum(hits * weights), 'weight_sum': jnp.sum(weights),
          'num_tokens': jnp.sum((weights > 0).astype(jnp.float32))}


def finalize_metrics(sums: Mapping[str, Array]) -> dict[str, Array]:
  """Per-step metrics from `metric_sums` plus the (already normalised) `loss` and `z_loss`.

  Returns:
    `loss` (includes the z-loss), `z_loss`, `cross_ent_loss` (loss - z_loss), `accuracy`
    (weighted fraction of argmax hits, 0 with no weights) and `num_tokens`; any other entries
    of `sums` pass through.
  """
  sums = dict(sums)
  correct, weight_sum = sums.pop('correct'), sums.pop('weight_sum')
  metrics = dict(sums, accuracy=_safe_divide(correct, weight_sum))
  metrics['cross_ent_loss'] = metrics['loss'] - metrics['z_loss']
  return metrics


def compute_metrics(logits: Array, targets: Array, weights: Array, loss: Array,
                    z_loss: Array) -> dict[str, Array]:
  """`loss`, `z_loss`, `cross_ent_loss`, `accuracy` (weighted) and `num_tokens` of one batch."""
  return finalize_metrics(dict(metric_sums(logits, targets, weights), loss=loss, z_loss=z_loss))


def global_norm(tree: Any) -> Array:
  """L2 norm of all leaves of a pytree together (grad or param norm), in float32."""
  leaves = jax.tree.leaves(tree)
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves))


def model_flops_per_token(config: Any, seq_len: int, target_len: int | None = None) -> float:
  """Training FLOPs (forward + backward) per target token, MaxText's accounting.

  As MaxText's `calculate_tflops_training_per_device`: every matmul with a weight costs
  2 FLOPs per multiply-add forward and 4 backward, so 6 * (weights used) per token: the MLP
  (`d_model * d_ff * (len(activations) + 1)`), the query/key/value projections
  (`d_model * (heads + 2 * kv_heads) * head_dim`), the output projection
  (`d_model * heads * head_dim`) and the logits (`d_model * vocab`; the input lookup is free).
  Attention scores and values cost `3 * 4 * q_len * k_len * heads * head_dim` per sequence
  (fwd + bwd), halved for causal self-attention as MaxText does; elementwise work, norms and
  the relative position bias are ignored.

  Decoder-only, per token of a length-S sequence (L layers, H heads of size D):

      6 * (L * (mlp + qkv + out) + d_model * vocab) + 6 * L * S * H * D

  Encoder-decoder, with S_in = `seq_len` input and S_out = `target_len` (default `seq_len`)
  target positions: the encoder (bidirectional, 12 * L_enc * S_in^2 * H * D attention), the
  decoder (causal self-attention, cross-attention whose queries and output projection act on
  S_out tokens and keys/values on S_in, 12 * L_dec * S_out * S_in * H * D for its scores) and
  the logits, all divided by S_out: the encoder's cost is charged to the target tokens.

  Args:
    config: a `models.ModelConfig`.
    seq_len: sequence length (decoder-only) or input length (encoder-decoder).
    target_len: encoder-decoder target length; defaults to `seq_len`.

  Returns:
    FLOPs per (padded) target position, a float.
  """
  d, heads, kv_heads, head_dim = (config.d_model, config.num_heads, config.num_kv_heads,
                                  config.head_dim)
  mlp = d * config.d_ff * (len(config.activations) + 1)
  out = d * heads * head_dim
  q = d * heads * head_dim
  kv = d * 2 * kv_heads * head_dim
  logits = d * config.vocab_size
  scores = 4 * heads * head_dim  # x q_len x k_len: QK^T and attention-weighted values

  if config.architecture == 'decoder_only':
    s = seq_len
    weights = config.num_decoder_layers * (mlp + q + kv + out) + logits
    attention = config.num_decoder_layers * scores * s * s / 2
    return float(6 * weights + 3 * attention / s)

  s_in = seq_len
  s_out = seq_len if target_len is None else target_len
  encoder_weights = config.num_encoder_layers * s_in * (mlp + q + kv + out)
  encoder_attention = config.num_encoder_layers * scores * s_in * s_in
  decoder_weights = config.num_decoder_layers * (
      s_out * (mlp + q + kv + out) + s_out * (q + out) + s_in * kv)
  decoder_attention = config.num_decoder_layers * scores * (s_out * s_out / 2 + s_out * s_in)
  total = (6 * (encoder_weights + decoder_weights + s_out * logits)
           + 3 * (encoder_attention + decoder_attention))
  return float(total / s_out)


def mfu(tokens_per_second: float, flops_per_token: float, peak_flops_per_device: float,
        num_devices: int) -> float:
  """Model FLOPs utilisation: achieved model FLOP/s over the devices' peak (0.0 when the peak
  is unknown, i.e. <= 0). Pass the tokens the model computed on (padding included) for the
  usual definition."""
  if peak_flops_per_device <= 0 or num_devices <= 0:
    return 0.0
  return float(tokens_per_second * flops_per_token / (peak_flops_per_device * num_devices))
