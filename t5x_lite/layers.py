"""Transformer building blocks whose parameters and activations carry logical axis names.

Logical names used here: `vocab`, `embed`, `heads`, `kv_heads`, `kv`, `mlp`, `relpos_buckets`
for parameters (plus `layers` added by `nn.scan`), and `batch`, `length`, `embed`, `heads`,
`kv`, `mlp` for activations. Only `partitioning.py` maps them onto mesh axes; without rules in
scope the constraints are no-ops, so these modules also run unsharded.
"""

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

# Additive bias for masked attention logits; finite so fully masked rows give no NaN.
NEG_INF = -1e10

ACTIVATIONS = {
    'relu': nn.relu,
    'gelu': nn.gelu,  # tanh approximation, as T5X and HF's "gelu_new"
    'gelu_exact': lambda x: nn.gelu(x, approximate=False),
    'silu': nn.silu,
    'linear': lambda x: x,
}


def constrain(x: Array, axes: tuple[str | None, ...]) -> Array:
  """Shards an activation by logical axis names (a no-op outside partitioning rules)."""
  return nn.with_logical_constraint(x, axes)


class DenseGeneral(nn.Module):
  """A dense layer contracting the last `num_in_axes` input dims into `features`.

  The kernel has shape `input_dims + features` and logical names `kernel_axes`; its fan-in
  counts every contracted input dim, so the variance-scaling init matches a flat dense layer.
  """

  features: int | tuple[int, ...]
  kernel_axes: tuple[str, ...]
  num_in_axes: int = 1
  init_scale: float = 1.0
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    features = self.features if isinstance(self.features, tuple) else (self.features,)
    in_shape = x.shape[x.ndim - self.num_in_axes:]
    n_in, n_all = len(in_shape), len(in_shape) + len(features)
    init = nn.initializers.variance_scaling(
        self.init_scale, 'fan_in', 'truncated_normal',
        in_axis=tuple(range(n_in)), out_axis=tuple(range(n_in, n_all)))
    kernel = self.param(
        'kernel', nn.with_logical_partitioning(init, self.kernel_axes),
        in_shape + features, jnp.float32)
    contract = (tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in)))
    return jax.lax.dot_general(
        x.astype(self.dtype), kernel.astype(self.dtype), (contract, ((), ())))


class Embed(nn.Module):
  """Token embedding table, also usable as the (tied) output projection."""

  num_embeddings: int
  features: int
  init_stddev: float = 1.0
  dtype: jnp.dtype = jnp.float32

  def setup(self):
    init = nn.initializers.normal(stddev=self.init_stddev)
    self.embedding = self.param(
        'embedding', nn.with_logical_partitioning(init, ('vocab', 'embed')),
        (self.num_embeddings, self.features), jnp.float32)

  def __call__(self, tokens: Array) -> Array:
    """[batch, length] int -> [batch, length, embed]."""
    return jnp.take(self.embedding, tokens, axis=0).astype(self.dtype)

  def attend(self, x: Array) -> Array:
    """[batch, length, embed] -> [batch, length, vocab] logits against the table."""
    return jnp.einsum('ble,ve->blv', x.astype(self.dtype), self.embedding.astype(self.dtype))


class RMSNorm(nn.Module):
  """Root-mean-square layer norm with a learned scale only (T5, Llama), computed in float32."""

  eps: float = 1e-6
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    scale = self.param(
        'scale', nn.with_logical_partitioning(nn.initializers.ones, ('embed',)),
        (x.shape[-1],), jnp.float32)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
    return (y * scale).astype(self.dtype)


def relative_position_bucket(relative_position: np.ndarray, bidirectional: bool,
                             num_buckets: int, max_distance: int) -> np.ndarray:
  """Maps key-minus-query offsets to T5's buckets (exact for small, log-spaced up to max).

  Computed in numpy float32 on static shapes: XLA's CPU division by a broadcast scalar goes
  through a reciprocal and can land exact log boundaries in the bucket below.

  Args:
    relative_position: int array of `memory_position - query_position`.
    bidirectional: whether future keys get buckets of their own (encoder) or share
      bucket 0 with the present (causal decoder).
    num_buckets: total number of buckets.
    max_distance: offsets at or beyond this share the last bucket.

  Returns:
    int32 bucket ids with the shape of `relative_position`.
  """
  n = -np.asarray(relative_position, np.int64)
  bucket = np.zeros_like(n)
  if bidirectional:
    num_buckets //= 2
    bucket += (n < 0) * num_buckets
    n = np.abs(n)
  else:
    n = np.maximum(n, 0)
  max_exact = num_buckets // 2
  log_ratio = np.log(n.astype(np.float32) / np.float32(max_exact) + np.finfo(np.float32).eps)
  scaled = log_ratio / np.float32(np.log(max_distance / max_exact)) * np.float32(
      num_buckets - max_exact)
  large = np.minimum(max_exact + scaled.astype(np.int64), num_buckets - 1)
  return (bucket + np.where(n < max_exact, n, large)).astype(np.int32)


class RelativePositionBias(nn.Module):
  """T5's learned per-head attention bias over bucketed relative positions."""

  num_heads: int
  num_buckets: int = 32
  max_distance: int = 128
  bidirectional: bool = True

  @nn.compact
  def __call__(self, query_length: int, key_length: int) -> Array:
    """Returns the bias, [1, heads, query_length, key_length] float32."""
    offsets = np.arange(key_length)[None, :] - np.arange(query_length)[:, None]
    buckets = relative_position_bucket(
        offsets, self.bidirectional, self.num_buckets, self.max_distance)
    init = nn.initializers.variance_scaling(1.0, 'fan_avg', 'uniform')
    table = self.param(
        'rel_embedding', nn.with_logical_partitioning(init, ('heads', 'relpos_buckets')),
        (self.num_heads, self.num_buckets), jnp.float32)
    return jnp.take(table, buckets, axis=1)[None]


def apply_rope(x: Array, positions: Array, theta: float) -> Array:
  """Rotary position embedding in the half-split layout used by HF Llama.

  Args:
    x: [batch, length, heads, head_dim].
    positions: [batch, length] integer positions.
    theta: the RoPE base frequency.

  Returns:
    x rotated by position, same shape and dtype.
  """
  half = x.shape[-1] // 2
  inv_freq = 1.0 / theta ** (jnp.arange(half, dtype=jnp.float32) * 2 / x.shape[-1])
  angles = positions.astype(jnp.float32)[:, :, None, None] * inv_freq  # [b, l, 1, half]
  sin, cos = jnp.sin(angles), jnp.cos(angles)
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def attention_mask(query_valid: Array, key_valid: Array,
                   query_segments: Array | None = None, key_segments: Array | None = None,
                   causal: bool = False, bidirectional_prefix: Array | None = None) -> Array:
  """Builds a boolean attention mask, [batch, 1, query_length, key_length].

  Args:
    query_valid, key_valid: [batch, length] bool, False at padding.
    query_segments, key_segments: [batch, length] packed-example ids; tokens attend only
      within their own example.
    causal: each query sees keys at or before its own index.
    bidirectional_prefix: [batch, length] bool marking a prefix-LM's input positions, which
      see each other in both directions even under `causal`.
  """
  mask = query_valid[:, None, :, None] & key_valid[:, None, None, :]
  if query_segments is not None:
    mask &= query_segments[:, None, :, None] == key_segments[:, None, None, :]
  if causal:
    q_idx = jnp.arange(query_valid.shape[1])[:, None]
    k_idx = jnp.arange(key_valid.shape[1])[None, :]
    allowed = (k_idx <= q_idx)[None, None]
    if bidirectional_prefix is not None:
      prefix = bidirectional_prefix.astype(bool)
      allowed = allowed | (prefix[:, None, :, None] & prefix[:, None, None, :])
    mask &= allowed
  return mask


def mask_to_bias(mask: Array) -> Array:
  """Boolean mask -> additive float32 bias (0 where allowed, NEG_INF where masked)."""
  return jnp.where(mask, 0.0, NEG_INF).astype(jnp.float32)


class Attention(nn.Module):
  """Multi-head attention with grouped-query heads, optional RoPE, float32 softmax.

  T5 leaves out the 1/sqrt(head_dim) logit scale and folds it into the query init instead
  (`scale_logits=False`); Llama scales at run time (`scale_logits=True`).

  With `decode=True` keys and values live in the 'cache' collection, every leaf with the
  batch first: a first call on the full-length input creates the cache (and, for
  cross-attention, stores the projected encoder keys/values once); each later call takes
  one token, writes its key/value at the cache index, and reads row `index` of the full
  [length, length] `bias`. A first call given `prefill` ([b, length] bool, a prefix-LM's
  prompt positions) also stores the keys/values it computed there, where the prompt
  attended both ways; the later calls keep those instead of writing their own.
  """

  num_heads: int
  num_kv_heads: int
  head_dim: int
  scale_logits: bool = False
  rope_theta: float | None = None
  dropout_rate: float = 0.0
  deterministic: bool = True
  dtype: jnp.dtype = jnp.float32
  is_cross: bool = False
  decode: bool = False

  @nn.compact
  def __call__(self, inputs_q: Array, inputs_kv: Array | None, bias: Array,
               query_positions: Array | None = None,
               key_positions: Array | None = None, prefill: Array | None = None) -> Array:
    """Attends `inputs_q` [b, q, embed] to `inputs_kv` [b, k, embed] with an additive
    `bias` broadcastable to [b, heads, q, k]; returns [b, q, embed]."""
    dense = lambda feats, axes, name, **kw: DenseGeneral(
        feats, axes, dtype=self.dtype, name=name, **kw)
    query_scale = 1.0 if self.scale_logits else 1.0 / self.head_dim
    q = dense((self.num_heads, self.head_dim), ('embed', 'heads', 'kv'), 'query',
              init_scale=query_scale)(inputs_q)
    step = self.decode and self.has_variable('cache', 'cache_index')
    cached_cross = step and self.is_cross  # keys and values of the encoder, in the cache
    if step and not self.is_cross:
      query_positions = key_positions = self.get_variable('cache', 'cache_index')[:, None]
    if self.rope_theta is not None:
      q = apply_rope(q, query_positions, self.rope_theta)
    if self.scale_logits:
      q = q * jnp.asarray(self.head_dim ** -0.5, q.dtype)
    q = constrain(q, ('batch', 'length', 'heads', 'kv'))
    k = v = None
    if not cached_cross:
      kv_shape = (self.num_kv_heads, self.head_dim)
      k = dense(kv_shape, ('embed', 'kv_heads', 'kv'), 'key')(inputs_kv)
      v = dense(kv_shape, ('embed', 'kv_heads', 'kv'), 'value')(inputs_kv)
      if self.rope_theta is not None:
        k = apply_rope(k, key_positions, self.rope_theta)
      k = constrain(k, ('batch', 'length', 'kv_heads', 'kv'))
      v = constrain(v, ('batch', 'length', 'kv_heads', 'kv'))
    key_layout = value_layout = 'bkhd'
    if self.decode:
      # The cache holds keys as [b, kv_heads, kv, length] and values as [b, kv_heads, length,
      # kv], the layouts the products below read: else XLA transposes the whole cache of
      # every layer at every step.
      if not cached_cross:
        k, v = k.transpose(0, 2, 3, 1), v.transpose(0, 2, 1, 3)
      k, v, bias = self._use_cache(k, v, bias, step, prefill)
      key_layout, value_layout = 'bhdk', 'bhkd'

    batch, q_len, _, _ = q.shape
    groups = self.num_heads // self.num_kv_heads  # query head i reads kv head i // groups
    q = q.reshape(batch, q_len, self.num_kv_heads, groups, self.head_dim)
    logits = jnp.einsum(f'bqhgd,{key_layout}->bhgqk', q, k, preferred_element_type=jnp.float32)
    logits = logits.reshape(batch, self.num_heads, q_len, -1) + bias
    weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    weights = nn.Dropout(self.dropout_rate)(weights, deterministic=self.deterministic)
    weights = weights.reshape(batch, self.num_kv_heads, groups, q_len, -1)
    out = jnp.einsum(f'bhgqk,{value_layout}->bqhgd', weights, v)
    out = constrain(out.reshape(batch, q_len, self.num_heads, self.head_dim),
                    ('batch', 'length', 'heads', 'kv'))
    return dense(inputs_q.shape[-1], ('heads', 'kv', 'embed'), 'out', num_in_axes=2)(out)

  def _use_cache(self, k: Array, v: Array, bias: Array, step: bool,
                 prefill: Array | None = None) -> tuple[Array, Array, Array]:
    """Creates (and maybe prefills) the cache on the first call or writes one step into it;
    returns the keys [b, kv_heads, kv, length], values [b, kv_heads, length, kv] and bias to
    attend with."""
    if self.is_cross:
      if step:
        return self.get_variable('cache', 'cross_key'), self.get_variable(
            'cache', 'cross_value'), bias
      self.put_variable('cache', 'cross_key', k)
      self.put_variable('cache', 'cross_value', v)
      self.put_variable('cache', 'cache_index', jnp.zeros(k.shape[:1], jnp.int32))
      return k, v, bias
    cached_k = self.variable('cache', 'cached_key', jnp.zeros, k.shape, k.dtype)
    cached_v = self.variable('cache', 'cached_value', jnp.zeros, v.shape, v.dtype)
    index = self.variable('cache', 'cache_index', jnp.zeros, k.shape[:1], jnp.int32)
    if not step:
      if prefill is not None:
        cached_k.value, cached_v.value = k, v
        self.put_variable('cache', 'prefilled', prefill.astype(bool))  # [b, length]
      return k, v, bias
    i = index.value[0]  # every row decodes in lockstep
    if self.has_variable('cache', 'prefilled'):
      # A prompt token forced at a prefilled position keeps the prefill's key/value: its
      # own saw only the tokens before it, the prefill's the whole bidirectional prompt.
      keep = self.get_variable('cache', 'prefilled')[:, i, None, None, None]
      k = jnp.where(keep, jax.lax.dynamic_slice_in_dim(cached_k.value, i, 1, axis=3), k)
      v = jnp.where(keep, jax.lax.dynamic_slice_in_dim(cached_v.value, i, 1, axis=2), v)
    cached_k.value = jax.lax.dynamic_update_slice(cached_k.value, k, (0, 0, 0, i))
    cached_v.value = jax.lax.dynamic_update_slice(cached_v.value, v, (0, 0, i, 0))
    index.value = index.value + 1
    length = cached_k.value.shape[-1]
    row = jax.lax.dynamic_slice_in_dim(
        jnp.broadcast_to(bias, bias.shape[:-2] + (length, length)), i, 1, axis=-2)
    visible = jnp.arange(length) <= i  # keys written so far
    return cached_k.value, cached_v.value, row + jnp.where(visible, 0.0, NEG_INF)


class MLP(nn.Module):
  """Feed-forward block: one activation (T5 1.0 ReLU) or a gated product (GeGLU, SwiGLU)."""

  d_ff: int
  activations: Sequence[str] = ('gelu', 'linear')
  dropout_rate: float = 0.0
  deterministic: bool = True
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """[b, l, embed] -> [b, l, embed]."""
    hidden = None
    for i, name in enumerate(self.activations):
      suffix = '' if len(self.activations) == 1 else f'_{i}'
      h = ACTIVATIONS[name](
          DenseGeneral(self.d_ff, ('embed', 'mlp'), dtype=self.dtype, name=f'wi{suffix}')(x))
      hidden = h if hidden is None else hidden * h
    hidden = constrain(hidden, ('batch', 'length', 'mlp'))
    hidden = nn.Dropout(self.dropout_rate)(hidden, deterministic=self.deterministic)
    return DenseGeneral(x.shape[-1], ('mlp', 'embed'), dtype=self.dtype, name='wo')(hidden)
