"""T5-style encoder-decoder and Llama/GPT-style decoder-only (incl. prefix-LM) models.

Both are pure functions of a params pytree: `model.apply({'params': params}, **batch)`.
Batches use T5X's feature names: `encoder_input_tokens`, `decoder_input_tokens`,
`decoder_target_tokens`, and for packed examples `*_segment_ids` / `*_positions`
(segment id 0 marks padding). A prefix-LM passes `decoder_causal_attention`, 1 on the input
prefix, which then attends bidirectionally (T5X's `inputs_bidirectional_attention`).
"""

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from t5x_lite import layers

Array = jax.Array

ARCHITECTURES = ('encoder_decoder', 'decoder_only')
POSITION_EMBEDDINGS = ('relative', 'rope')
DTYPES = ('float32', 'bfloat16')
REMAT_POLICIES = {
    'none': None,
    'full': jax.checkpoint_policies.nothing_saveable,
    'dots': jax.checkpoint_policies.checkpoint_dots,
    'dots_with_no_batch_dims': jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Hyperparameters of either model family (defaults: T5.1.1 small)."""

  architecture: str = 'encoder_decoder'  # or 'decoder_only'
  vocab_size: int = 32128
  d_model: int = 512
  num_heads: int = 6
  num_kv_heads: int = 0  # 0: same as num_heads; fewer gives grouped-query attention
  head_dim: int = 64  # 0: d_model // num_heads
  d_ff: int = 1024
  num_encoder_layers: int = 8  # ignored by decoder_only
  num_decoder_layers: int = 8
  activations: tuple[str, ...] = ('gelu', 'linear')  # >1 entries: gated product
  dropout_rate: float = 0.0
  logits_via_embedding: bool = False  # tie the output projection to the token embedding
  scale_tied_logits: bool = True  # T5 1.0 scales tied logits by d_model**-0.5; Llama does not
  position_embedding: str = 'relative'  # T5 relative bias, or 'rope'
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  rope_theta: float = 10000.0
  scale_attention_logits: bool = False  # T5 folds 1/sqrt(head_dim) into the query init
  norm_eps: float = 1e-6
  embedding_init_stddev: float = 1.0
  dtype: str = 'float32'  # activations; params are always float32
  scan_layers: bool = False
  remat_policy: str = 'none'
  # The first decoder input (teacher forcing, prompts, decoding): T5's 0, or the BOS id of a
  # tokenizer that has one (Llama's 1).
  decoder_start_token_id: int = 0
  reward_head: bool = False  # a scalar head on the decoder's final states (reward models)

  def __post_init__(self):
    if self.head_dim == 0:
      _check(self.d_model > 0, 'd_model', self.d_model, 'a positive integer')
      _check(self.num_heads > 0 and self.d_model % self.num_heads == 0,
             'num_heads', self.num_heads,
             f'a positive divisor of d_model={self.d_model} when head_dim=0')
      object.__setattr__(self, 'head_dim', self.d_model // self.num_heads)
    if self.num_kv_heads == 0:
      object.__setattr__(self, 'num_kv_heads', self.num_heads)
    object.__setattr__(self, 'activations', tuple(self.activations))
    self._validate()

  def _validate(self):
    _check(self.architecture in ARCHITECTURES, 'architecture', self.architecture,
           f'one of {ARCHITECTURES}')
    for name in ('vocab_size', 'd_model', 'num_heads', 'num_kv_heads', 'head_dim', 'd_ff',
                 'num_decoder_layers', 'relative_attention_num_buckets',
                 'relative_attention_max_distance'):
      _check(getattr(self, name) > 0, name, getattr(self, name), 'a positive integer')
    if self.architecture == 'encoder_decoder':
      _check(self.num_encoder_layers > 0, 'num_encoder_layers', self.num_encoder_layers,
             'a positive integer for an encoder_decoder')
    _check(self.num_heads % self.num_kv_heads == 0, 'num_kv_heads', self.num_kv_heads,
           f'a divisor of num_heads={self.num_heads}')
    _check(len(self.activations) > 0 and all(a in layers.ACTIVATIONS for a in self.activations),
           'activations', self.activations, f'a non-empty tuple of {tuple(layers.ACTIVATIONS)}')
    _check(self.position_embedding in POSITION_EMBEDDINGS, 'position_embedding',
           self.position_embedding, f'one of {POSITION_EMBEDDINGS}')
    if self.position_embedding == 'rope':
      _check(self.head_dim % 2 == 0, 'head_dim', self.head_dim, 'an even number with RoPE')
    _check(0 <= self.decoder_start_token_id < self.vocab_size, 'decoder_start_token_id',
           self.decoder_start_token_id, f'an id in [0, vocab_size={self.vocab_size})')
    _check(0.0 <= self.dropout_rate < 1.0, 'dropout_rate', self.dropout_rate, 'in [0, 1)')
    _check(self.dtype in DTYPES, 'dtype', self.dtype, f'one of {DTYPES}')
    _check(self.remat_policy in REMAT_POLICIES, 'remat_policy', self.remat_policy,
           f'one of {tuple(REMAT_POLICIES)}')

  @classmethod
  def from_dict(cls, values: Mapping[str, Any]) -> 'ModelConfig':
    """Builds a config from a mapping (e.g. a ConfigDict's `model`), rejecting unknown keys."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
      raise ValueError(f'Unknown model config field(s) {unknown}; allowed: {sorted(known)}')
    return cls(**dict(values))

  @property
  def activation_dtype(self) -> jnp.dtype:
    return jnp.dtype(self.dtype)


def backbone(params: Mapping[str, Any]) -> dict[str, Any]:
  """The params without the reward head: what `train.init_from` restores, so a reward model
  starts from any language model's checkpoint."""
  return {name: value for name, value in params.items() if name != 'reward_head'}


def _check(ok: bool, field: str, value: Any, allowed: str):
  if not ok:
    raise ValueError(f'Invalid model config: {field}={value!r}; must be {allowed}.')


class TransformerBlock(nn.Module):
  """Pre-norm block: self-attention, optional cross-attention, then the MLP."""

  config: ModelConfig
  cross_attention: bool = False
  deterministic: bool = True
  decode: bool = False

  @nn.compact
  def __call__(self, x: Array, self_bias: Array, positions: Array | None,
               encoded: Array | None = None, cross_bias: Array | None = None,
               prefill: Array | None = None):
    """x: [b, l, embed]; returns (x, None) so the block can be scanned over layers.
    `prefill`: see `layers.Attention`."""
    cfg = self.config
    dtype = cfg.activation_dtype
    dropout = lambda y: nn.Dropout(cfg.dropout_rate)(y, deterministic=self.deterministic)
    attention = lambda name, theta, is_cross: layers.Attention(
        cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.scale_attention_logits, theta,
        cfg.dropout_rate, self.deterministic, dtype, is_cross, self.decode, name=name)
    norm = lambda name: layers.RMSNorm(cfg.norm_eps, dtype, name=name)
    rope_theta = cfg.rope_theta if cfg.position_embedding == 'rope' else None

    h = norm('pre_self_attention_norm')(x)
    x = x + dropout(attention('self_attention', rope_theta, False)(
        h, h, self_bias, positions, positions, prefill))
    if self.cross_attention:
      h = norm('pre_cross_attention_norm')(x)
      x = x + dropout(attention('cross_attention', None, True)(h, encoded, cross_bias))
    h = norm('pre_mlp_norm')(x)
    mlp = layers.MLP(cfg.d_ff, cfg.activations, cfg.dropout_rate, self.deterministic, dtype,
                     name='mlp')
    x = x + dropout(mlp(h))
    return layers.constrain(x, ('batch', 'length', 'embed')), None


class Stack(nn.Module):
  """Embedding dropout, `num_layers` blocks (looped or scanned, optionally remat), final norm."""

  config: ModelConfig
  num_layers: int
  cross_attention: bool = False

  @nn.compact
  def __call__(self, x: Array, self_bias: Array, positions: Array | None,
               encoded: Array | None = None, cross_bias: Array | None = None,
               deterministic: bool = True, decode: bool = False,
               prefill: Array | None = None) -> Array:
    cfg = self.config
    dropout = nn.Dropout(cfg.dropout_rate)
    x = dropout(x, deterministic=deterministic)
    block = TransformerBlock
    if cfg.remat_policy != 'none':
      block = nn.remat(block, policy=REMAT_POLICIES[cfg.remat_policy],
                       prevent_cse=not cfg.scan_layers)
    args = (self_bias, positions, encoded, cross_bias, prefill)
    if cfg.scan_layers:
      scanned = nn.scan(
          # The cache stacks layers on axis 1 so that every cache leaf keeps the batch first.
          block, variable_axes={'params': 0, 'cache': 1},
          split_rngs={'params': True, 'dropout': True},
          in_axes=(nn.broadcast,) * len(args), length=self.num_layers,
          metadata_params={nn.PARTITION_NAME: 'layers'})
      x, _ = scanned(cfg, self.cross_attention, deterministic, decode, name='layers')(x, *args)
    else:
      for i in range(self.num_layers):
        x, _ = block(cfg, self.cross_attention, deterministic, decode,
                     name=f'layers_{i}')(x, *args)
    x = layers.RMSNorm(cfg.norm_eps, cfg.activation_dtype, name='final_norm')(x)
    return dropout(x, deterministic=deterministic)


def _valid(target_tokens: Array | None, segment_ids: Array | None, shape) -> Array:
  """Positions that are not padding: nonzero targets, else nonzero segments, else all."""
  if target_tokens is not None:
    return target_tokens > 0
  if segment_ids is not None:
    return segment_ids > 0
  return jnp.ones(shape, bool)


def _default_positions(positions: Array | None, tokens: Array) -> Array:
  if positions is not None:
    return positions
  return jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)


def _mean_pool(hidden: Array, valid: Array) -> Array:
  """[b, l, embed] averaged over valid positions -> [b, embed] float32."""
  weights = valid.astype(jnp.float32)[..., None]
  return (hidden.astype(jnp.float32) * weights).sum(1) / jnp.maximum(weights.sum(1), 1.0)


class _Transformer(nn.Module):
  """What both families share: the token embedding, position bias and output projection."""

  config: ModelConfig

  def _setup_shared(self):
    cfg = self.config
    self.token_embedder = layers.Embed(
        cfg.vocab_size, cfg.d_model, cfg.embedding_init_stddev, cfg.activation_dtype)
    if not cfg.logits_via_embedding:
      self.logits_dense = layers.DenseGeneral(
          cfg.vocab_size, ('embed', 'vocab'), dtype=cfg.activation_dtype)
    if cfg.reward_head:
      self.reward_dense = layers.DenseGeneral(1, ('embed', None), name='reward_head')

  def _relative_bias(self, name: str, bidirectional: bool):
    cfg = self.config
    if cfg.position_embedding != 'relative':
      return None
    return layers.RelativePositionBias(
        cfg.num_heads, cfg.relative_attention_num_buckets,
        cfg.relative_attention_max_distance, bidirectional, name=name)

  def _self_bias(self, relpos, mask: Array) -> Array:
    bias = layers.mask_to_bias(mask)
    if relpos is not None:
      bias = bias + relpos(mask.shape[2], mask.shape[3])
    return bias

  @staticmethod
  def _decoder_valid(tokens: Array, target_tokens: Array | None, segment_ids: Array | None,
                     decode: bool, max_decode_length: int | None) -> tuple[Array, Array]:
    """Non-padding masks for the self-attention keys [b, length] and this call's queries.

    While decoding, every position of the cache is a real token: the keys span the whole
    `max_decode_length` and the causal mask hides the ones not yet written.
    """
    if not decode:
      valid = _valid(target_tokens, segment_ids, tokens.shape)
      return valid, valid
    length = max_decode_length or tokens.shape[1]
    return jnp.ones((tokens.shape[0], length), bool), jnp.ones(tokens.shape, bool)

  def _embed_tokens(self, tokens: Array) -> Array:
    return layers.constrain(self.token_embedder(tokens), ('batch', 'length', 'embed'))

  def _head_outputs(self, hidden: Array) -> Array:
    """The logits of `hidden`; at init also the reward head's, so its params exist."""
    if self.config.reward_head and self.is_initializing():
      self.reward_dense(hidden)
    return self._logits(hidden)

  def _rewards(self, hidden: Array, valid: Array) -> Array:
    """float32 [b]: the reward head at each row's last non-padding position, whose state has
    read the whole sequence (the position that predicts EOS)."""
    last = jnp.maximum(jnp.sum(valid.astype(jnp.int32), axis=1) - 1, 0)  # [b]
    final = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]  # [b, embed]
    return self.reward_dense(final.astype(jnp.float32))[:, 0]

  def _logits(self, hidden: Array) -> Array:
    """[b, l, embed] -> float32 [b, l, vocab]."""
    cfg = self.config
    if cfg.logits_via_embedding:
      logits = self.token_embedder.attend(hidden)
      if cfg.scale_tied_logits:
        logits = logits / jnp.sqrt(jnp.asarray(cfg.d_model, logits.dtype))
    else:
      logits = self.logits_dense(hidden)
    return layers.constrain(logits.astype(jnp.float32), ('batch', 'length', 'vocab'))


class EncoderDecoder(_Transformer):
  """T5 (1.0 and 1.1): bidirectional encoder, causal decoder with cross-attention."""

  def setup(self):
    cfg = self.config
    self._setup_shared()
    self.encoder_relpos = self._relative_bias('encoder_relpos', bidirectional=True)
    self.decoder_relpos = self._relative_bias('decoder_relpos', bidirectional=False)
    self.encoder = Stack(cfg, cfg.num_encoder_layers, cross_attention=False)
    self.decoder = Stack(cfg, cfg.num_decoder_layers, cross_attention=True)

  def encode(self, encoder_input_tokens: Array, encoder_segment_ids: Array | None = None,
             encoder_positions: Array | None = None, *, deterministic: bool = True) -> Array:
    """[b, l_in] tokens -> [b, l_in, embed] encoder outputs."""
    valid = encoder_input_tokens > 0
    mask = layers.attention_mask(valid, valid, encoder_segment_ids, encoder_segment_ids)
    bias = self._self_bias(self.encoder_relpos, mask)
    positions = _default_positions(encoder_positions, encoder_input_tokens)
    x = self._embed_tokens(encoder_input_tokens)
    return self.encoder(x, bias, positions, deterministic=deterministic)

  def decode(self, encoded: Array | None, encoder_input_tokens: Array,
             decoder_input_tokens: Array, decoder_target_tokens: Array | None = None,
             encoder_segment_ids: Array | None = None,
             decoder_segment_ids: Array | None = None,
             decoder_positions: Array | None = None, *, deterministic: bool = True,
             decode: bool = False, max_decode_length: int | None = None) -> Array:
    """Decoder logits, float32 [b, l_out, vocab], attending to `encoded`.

    With `decode=True` (a mutable 'cache'), a first call on a full-length
    [b, max_decode_length] input creates the cache, storing the cross-attention keys and
    values of `encoded`; each later call takes one token [b, 1] (and `encoded=None`).
    """
    y = self.decoder_hidden(encoded, encoder_input_tokens, decoder_input_tokens,
                            decoder_target_tokens, encoder_segment_ids, decoder_segment_ids,
                            decoder_positions, deterministic=deterministic, decode=decode,
                            max_decode_length=max_decode_length)
    return self._head_outputs(y)

  def decoder_hidden(self, encoded: Array | None, encoder_input_tokens: Array,
                     decoder_input_tokens: Array, decoder_target_tokens: Array | None = None,
                     encoder_segment_ids: Array | None = None,
                     decoder_segment_ids: Array | None = None,
                     decoder_positions: Array | None = None, *, deterministic: bool = True,
                     decode: bool = False, max_decode_length: int | None = None) -> Array:
    """The decoder's final-norm states [b, l_out, embed] (`decode`'s before the logits)."""
    self_valid, query_valid = self._decoder_valid(
        decoder_input_tokens, decoder_target_tokens, decoder_segment_ids, decode,
        max_decode_length)
    self_mask = layers.attention_mask(self_valid, self_valid, decoder_segment_ids,
                                      decoder_segment_ids, causal=True)
    cross_mask = layers.attention_mask(query_valid, encoder_input_tokens > 0,
                                       decoder_segment_ids, encoder_segment_ids)
    positions = _default_positions(decoder_positions, decoder_input_tokens)
    y = self.decoder(self._embed_tokens(decoder_input_tokens),
                     self._self_bias(self.decoder_relpos, self_mask), positions,
                     encoded, layers.mask_to_bias(cross_mask), deterministic=deterministic,
                     decode=decode)
    return y

  def __call__(self, encoder_input_tokens: Array, decoder_input_tokens: Array,
               decoder_target_tokens: Array | None = None,
               encoder_segment_ids: Array | None = None,
               decoder_segment_ids: Array | None = None,
               encoder_positions: Array | None = None,
               decoder_positions: Array | None = None, *, deterministic: bool = True) -> Array:
    """Teacher-forced logits, float32 [b, l_out, vocab]."""
    encoded = self.encode(encoder_input_tokens, encoder_segment_ids, encoder_positions,
                          deterministic=deterministic)
    return self.decode(encoded, encoder_input_tokens, decoder_input_tokens,
                       decoder_target_tokens, encoder_segment_ids, decoder_segment_ids,
                       decoder_positions, deterministic=deterministic)

  def reward(self, encoder_input_tokens: Array, decoder_input_tokens: Array,
             decoder_target_tokens: Array, *, deterministic: bool = True) -> Array:
    """float32 [b] rewards (needs `reward_head`): the head on the decoder's final state
    after the response, for unpacked rows whose `decoder_target_tokens` are 0-padded."""
    encoded = self.encode(encoder_input_tokens, deterministic=deterministic)
    y = self.decoder_hidden(encoded, encoder_input_tokens, decoder_input_tokens,
                            decoder_target_tokens, deterministic=deterministic)
    return self._rewards(y, decoder_target_tokens > 0)

  def embed(self, encoder_input_tokens: Array, encoder_segment_ids: Array | None = None
            ) -> Array:
    """Mean-pooled encoder outputs over non-padding tokens, float32 [b, embed]."""
    encoded = self.encode(encoder_input_tokens, encoder_segment_ids)
    return _mean_pool(encoded, encoder_input_tokens > 0)


class DecoderOnly(_Transformer):
  """A causal language model (Llama or T5X decoder-only layout), optionally a prefix-LM."""

  def setup(self):
    self._setup_shared()
    self.relpos = self._relative_bias('relpos', bidirectional=False)
    self.decoder = Stack(self.config, self.config.num_decoder_layers, cross_attention=False)

  def hidden_states(self, decoder_input_tokens: Array,
                    decoder_target_tokens: Array | None = None,
                    decoder_segment_ids: Array | None = None,
                    decoder_positions: Array | None = None,
                    decoder_causal_attention: Array | None = None, *,
                    deterministic: bool = True, decode: bool = False,
                    max_decode_length: int | None = None) -> tuple[Array, Array]:
    """Final-norm hidden states [b, l, embed] and the non-padding mask [b, l]."""
    valid, query_valid = self._decoder_valid(
        decoder_input_tokens, decoder_target_tokens, decoder_segment_ids, decode,
        max_decode_length)
    mask = layers.attention_mask(valid, valid, decoder_segment_ids, decoder_segment_ids,
                                 causal=True, bidirectional_prefix=decoder_causal_attention)
    positions = _default_positions(decoder_positions, decoder_input_tokens)
    # The cache-creating decode call of a prefix-LM prefills its prompt's keys and values.
    prefill = decoder_causal_attention if decode else None
    y = self.decoder(self._embed_tokens(decoder_input_tokens),
                     self._self_bias(self.relpos, mask), positions, deterministic=deterministic,
                     decode=decode, prefill=prefill)
    return y, query_valid

  def __call__(self, decoder_input_tokens: Array, decoder_target_tokens: Array | None = None,
               decoder_segment_ids: Array | None = None,
               decoder_positions: Array | None = None,
               decoder_causal_attention: Array | None = None, *,
               deterministic: bool = True, decode: bool = False,
               max_decode_length: int | None = None) -> Array:
    """Next-token logits, float32 [b, l, vocab]; `decode` works as in
    `EncoderDecoder.decode` (the cache's first call takes the full-length input; given
    `decoder_causal_attention` it also prefills the cache with that prompt, whose positions
    then attend both ways as in training, see `layers.Attention`)."""
    y, _ = self.hidden_states(decoder_input_tokens, decoder_target_tokens,
                              decoder_segment_ids, decoder_positions,
                              decoder_causal_attention, deterministic=deterministic,
                              decode=decode, max_decode_length=max_decode_length)
    return self._head_outputs(y)

  def reward(self, decoder_input_tokens: Array, decoder_target_tokens: Array,
             decoder_causal_attention: Array | None = None, *,
             deterministic: bool = True) -> Array:
    """float32 [b] rewards (needs `reward_head`): the head on the final state after the
    response, for unpacked rows whose `decoder_target_tokens` are 0-padded."""
    y, valid = self.hidden_states(decoder_input_tokens, decoder_target_tokens,
                                  decoder_causal_attention=decoder_causal_attention,
                                  deterministic=deterministic)
    return self._rewards(y, valid)

  def embed(self, decoder_input_tokens: Array, decoder_segment_ids: Array | None = None
            ) -> Array:
    """Mean-pooled final hidden states over non-padding tokens, float32 [b, embed].

    Without segment ids, token id 0 marks padding (one segment of the nonzero tokens).
    """
    if decoder_segment_ids is None:
      decoder_segment_ids = (decoder_input_tokens > 0).astype(jnp.int32)
    y, valid = self.hidden_states(decoder_input_tokens, decoder_segment_ids=decoder_segment_ids)
    return _mean_pool(y, valid)


def build_model(config: ModelConfig) -> EncoderDecoder | DecoderOnly:
  """The model for `config.architecture`."""
  cls = EncoderDecoder if config.architecture == 'encoder_decoder' else DecoderOnly
  return cls(config)


def dummy_batch(config: ModelConfig, batch_size: int = 1, length: int = 1) -> dict[str, Array]:
  """An all-ones batch with the feature names the model expects (for init and shapes)."""
  tokens = jnp.ones((batch_size, length), jnp.int32)
  batch = {'decoder_input_tokens': tokens, 'decoder_target_tokens': tokens}
  if config.architecture == 'encoder_decoder':
    batch['encoder_input_tokens'] = tokens
  return batch


def init_params(config: ModelConfig, rng: Array) -> Any:
  """Freshly initialised float32 params, with logical-axis metadata boxes removed."""
  variables = build_model(config).init(rng, **dummy_batch(config))
  return nn.unbox(variables['params'])


def param_shapes(config: ModelConfig) -> Any:
  """Param shapes and dtypes via `jax.eval_shape`: nothing is allocated."""
  return nn.unbox(boxed_param_shapes(config))


def boxed_param_shapes(config: ModelConfig) -> Any:
  """`param_shapes` with each leaf still in its `nn.LogicallyPartitioned` box (its logical
  axis names), which a partitioner turns into shardings."""
  return jax.eval_shape(
      lambda: build_model(config).init(jax.random.key(0), **dummy_batch(config))['params'])


def count_params(tree: Any) -> int:
  """Total number of parameters in a params (or shapes) pytree."""
  return sum(int(x.size) for x in jax.tree.leaves(tree))
