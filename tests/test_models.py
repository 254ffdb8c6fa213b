"""Unit tests for t5x_lite.models: masking invariances, layer stacking, dtypes, param counts.

Params are drawn with numpy into the shapes from `jax.eval_shape` (no init compile), and
most inputs share one shape ([2, 7]) so eagerly dispatched ops are compiled only once.
"""

import dataclasses
import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5x_lite import models

ModelConfig = models.ModelConfig
TINY = dict(vocab_size=32, d_model=16, num_heads=2, head_dim=8, d_ff=32, num_encoder_layers=2,
            num_decoder_layers=2)
ED = ModelConfig(**TINY)  # T5.1.1-style: relative bias, GeGLU, untied logits
DO_ROPE = ModelConfig(**dict(TINY, architecture='decoder_only', num_kv_heads=1,
                             position_embedding='rope', activations=('silu', 'linear'),
                             scale_attention_logits=True))
DO_REL = ModelConfig(**dict(TINY, architecture='decoder_only'))
LOGICAL_NAMES = {'vocab', 'embed', 'heads', 'kv_heads', 'kv', 'mlp', 'relpos_buckets', 'layers'}


def _key_name(entry):
  return getattr(entry, 'key', getattr(entry, 'name', None))


def make_params(cfg, seed=0):
  """Random float32 params of the model's shapes (scales chosen to keep activations O(1))."""
  rng = np.random.default_rng(seed)

  def fill(path, s):
    name = _key_name(path[-1])
    if name == 'scale':
      return (1.0 + 0.1 * rng.standard_normal(s.shape)).astype(np.float32)
    std = 1.0 if name == 'embedding' else 0.5 if name == 'rel_embedding' else (
        1.0 / math.sqrt(math.prod(s.shape[:-1])))
    return (std * rng.standard_normal(s.shape)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(fill, models.param_shapes(cfg))


_PARAMS = {}


def params_for(cfg):
  if cfg not in _PARAMS:
    _PARAMS[cfg] = make_params(cfg)
  return _PARAMS[cfg]


def run(cfg, params=None, method=None, **batch):
  model = models.build_model(cfg)
  params = params_for(cfg) if params is None else params
  return model.apply({'params': params}, **batch,
                     **({'method': getattr(model, method)} if method else {}))


def _max_diff(a, b):
  return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


# ----------------------------------------------------------------------------------------
# Logical axis names
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize('cfg', [ED, DO_ROPE, DO_REL, dataclasses.replace(ED, scan_layers=True),
                                 dataclasses.replace(DO_ROPE, scan_layers=True,
                                                     logits_via_embedding=True)],
                         ids=['ed', 'do_rope', 'do_rel', 'ed_scan', 'do_scan_tied'])
def test_every_param_has_logical_names(cfg):
  model = models.build_model(cfg)
  boxed = jax.eval_shape(lambda k: model.init(k, **models.dummy_batch(cfg)),
                         jax.random.key(0))['params']
  leaves = jax.tree_util.tree_leaves_with_path(
      boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert len(leaves) > 10
  for path, leaf in leaves:
    where = jax.tree_util.keystr(path)
    assert isinstance(leaf, nn.LogicallyPartitioned), where
    assert leaf.value.dtype == jnp.float32, where
    assert len(leaf.names) == leaf.value.ndim, where
    assert set(leaf.names) <= LOGICAL_NAMES, where
    in_scanned_stack = any(_key_name(p) == 'layers' for p in path)
    if cfg.scan_layers and in_scanned_stack:
      assert leaf.names[0] == 'layers', where
      assert leaf.value.shape[0] == 2, where
      assert 'layers' not in leaf.names[1:], where
    else:
      assert 'layers' not in leaf.names, where
  if cfg.scan_layers:
    assert any(_key_name(p) == 'layers' for path, _ in leaves for p in path)


# ----------------------------------------------------------------------------------------
# Packing: two examples in one row behave exactly as if run alone
# ----------------------------------------------------------------------------------------
# Row 0 packs A then B, row 1 packs B then A; two pad positions at the end.
ENC_A, ENC_B = [5, 6, 7], [11, 12]
DEC_A, DEC_B = [0, 8, 9], [0, 13]  # decoder inputs start with id 0 (BOS), as in T5
TGT_A, TGT_B = [8, 9, 10], [13, 14]
LEN = 7


def _pad(x):
  return x + [0] * (LEN - len(x))


def _packed(a, b):
  return np.array([_pad(a + b), _pad(b + a)], np.int32)


PACKED_SEG = np.array([_pad([1] * 3 + [2] * 2), _pad([1] * 2 + [2] * 3)], np.int32)
PACKED_POS = np.array([_pad([0, 1, 2, 0, 1]), _pad([0, 1, 0, 1, 2])], np.int32)
# (row in packed batch, slice in packed row, row in the alone batch (0: A, 1: B))
PACKED_SLOTS = [(0, slice(0, 3), 0), (0, slice(3, 5), 1), (1, slice(0, 2), 1), (1, slice(2, 5), 0)]


def _alone(a, b):
  return np.array([_pad(a), _pad(b)], np.int32)


def _check_packing(packed_logits, alone_logits, unpacked_logits):
  for row, where, alone_row in PACKED_SLOTS:
    n = where.stop - where.start
    assert _max_diff(packed_logits[row, where], alone_logits[alone_row, :n]) <= 1e-5
  # Teeth: without segment ids the second example of each row sees the first one.
  for row, where in ((0, slice(3, 5)), (1, slice(2, 5))):
    alone_row = 1 - row
    n = where.stop - where.start
    assert _max_diff(unpacked_logits[row, where], alone_logits[alone_row, :n]) > 1e-3


@pytest.mark.parametrize('position_embedding', ['relative', 'rope'])
def test_packing_isolation_encoder_decoder(position_embedding):
  cfg = dataclasses.replace(ED, position_embedding=position_embedding)
  packed = dict(encoder_input_tokens=_packed(ENC_A, ENC_B),
                decoder_input_tokens=_packed(DEC_A, DEC_B),
                decoder_target_tokens=_packed(TGT_A, TGT_B))
  packed_logits = run(cfg, **packed, encoder_segment_ids=PACKED_SEG,
                      decoder_segment_ids=PACKED_SEG, encoder_positions=PACKED_POS,
                      decoder_positions=PACKED_POS)
  alone_logits = run(cfg, encoder_input_tokens=_alone(ENC_A, ENC_B),
                     decoder_input_tokens=_alone(DEC_A, DEC_B),
                     decoder_target_tokens=_alone(TGT_A, TGT_B))
  assert packed_logits.shape == (2, LEN, cfg.vocab_size)
  _check_packing(packed_logits, alone_logits, run(cfg, **packed))


@pytest.mark.parametrize('cfg', [DO_ROPE, DO_REL], ids=['rope', 'relative'])
def test_packing_isolation_decoder_only(cfg):
  toks_a, toks_b = [5, 6, 7], [11, 12]
  tgts_a, tgts_b = [6, 7, 8], [12, 13]
  packed = dict(decoder_input_tokens=_packed(toks_a, toks_b),
                decoder_target_tokens=_packed(tgts_a, tgts_b))
  packed_logits = run(cfg, **packed, decoder_segment_ids=PACKED_SEG,
                      decoder_positions=PACKED_POS)
  alone_logits = run(cfg, decoder_input_tokens=_alone(toks_a, toks_b),
                     decoder_target_tokens=_alone(tgts_a, tgts_b))
  _check_packing(packed_logits, alone_logits, run(cfg, **packed))


# ----------------------------------------------------------------------------------------
# Causality, prefix-LM, encoder padding
# ----------------------------------------------------------------------------------------
TOKENS = np.array([[3, 9, 4, 17, 5, 26, 2],
                   [8, 1, 30, 7, 7, 12, 6]], np.int32)


@pytest.mark.parametrize('cfg', [ED, DO_ROPE, DO_REL], ids=['ed', 'do_rope', 'do_rel'])
def test_future_decoder_tokens_do_not_change_earlier_logits(cfg):
  changed = TOKENS.copy()
  changed[:, 4] = [20, 21]
  batch = lambda dec: dict(decoder_input_tokens=dec, decoder_target_tokens=TOKENS,
                           **({'encoder_input_tokens': TOKENS[:, ::-1].copy()}
                              if cfg.architecture == 'encoder_decoder' else {}))
  base, other = run(cfg, **batch(TOKENS)), run(cfg, **batch(changed))
  assert _max_diff(base[:, :4], other[:, :4]) <= 1e-6
  assert _max_diff(base[:, 4:], other[:, 4:]) > 1e-3


def test_prefix_lm_prefix_is_bidirectional():
  prefix = np.array([[1, 1, 1, 1, 0, 0, 0]] * 2, np.int32)
  changed = TOKENS.copy()
  changed[:, 2] = [20, 21]  # inside the prefix
  for cfg in (DO_ROPE, DO_REL):
    with_prefix = lambda t: run(cfg, decoder_input_tokens=t, decoder_causal_attention=prefix)
    base, other = with_prefix(TOKENS), with_prefix(changed)
    # An earlier prefix position sees a later prefix token...
    assert _max_diff(base[:, 0], other[:, 0]) > 1e-3
    # ...but not without the prefix marking.
    assert _max_diff(run(cfg, decoder_input_tokens=TOKENS)[:, :2],
                     run(cfg, decoder_input_tokens=changed)[:, :2]) <= 1e-6
    # After the prefix attention stays causal: changing token 5 leaves position 4 alone.
    later = TOKENS.copy()
    later[:, 5] = [20, 21]
    assert _max_diff(base[:, :5], with_prefix(later)[:, :5]) <= 1e-6


def test_encoder_padding_does_not_change_decoder_logits():
  enc = TOKENS[:, :5]
  enc_padded = np.concatenate([enc, np.zeros((2, 2), np.int32)], axis=1)
  dec = dict(decoder_input_tokens=TOKENS, decoder_target_tokens=TOKENS)
  base = run(ED, encoder_input_tokens=enc, **dec)
  padded = run(ED, encoder_input_tokens=enc_padded, **dec)
  assert _max_diff(base, padded) <= 1e-5
  # Teeth: a real token in place of the padding does change the logits.
  enc_longer = enc_padded.copy()
  enc_longer[:, 5:] = 9
  assert _max_diff(base, run(ED, encoder_input_tokens=enc_longer, **dec)) > 1e-3


# ----------------------------------------------------------------------------------------
# Full forward pass against a numpy re-implementation (pre-norm T5.1.1 / Llama blocks)
# ----------------------------------------------------------------------------------------
def _f64(x):
  return np.asarray(x, np.float64)


def _np_rms(x, p, eps):
  return x / np.sqrt(np.mean(x ** 2, -1, keepdims=True) + eps) * _f64(p['scale'])


def _np_rope(x, theta):
  """HF Llama rotate-half RoPE at positions 0..L-1; x: [b, l, h, d]."""
  d = x.shape[-1]
  angles = np.arange(x.shape[1])[:, None] * theta ** (-np.arange(0, d, 2) / d)  # [l, d/2]
  cos, sin = np.cos(angles)[None, :, None], np.sin(angles)[None, :, None]
  x1, x2 = x[..., :d // 2], x[..., d // 2:]
  return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


def _np_attention(p, xq, xkv, bias, cfg, rope):
  q = np.einsum('ble,ehd->blhd', xq, _f64(p['query']['kernel']))
  k = np.einsum('ble,ehd->blhd', xkv, _f64(p['key']['kernel']))
  v = np.einsum('ble,ehd->blhd', xkv, _f64(p['value']['kernel']))
  groups = cfg.num_heads // cfg.num_kv_heads
  k, v = np.repeat(k, groups, axis=2), np.repeat(v, groups, axis=2)
  if rope:
    q, k = _np_rope(q, cfg.rope_theta), _np_rope(k, cfg.rope_theta)
  if cfg.scale_attention_logits:
    q = q / np.sqrt(cfg.head_dim)
  logits = np.einsum('bqhd,bkhd->bhqk', q, k) + bias
  w = np.exp(logits - logits.max(-1, keepdims=True))
  w /= w.sum(-1, keepdims=True)
  return np.einsum('bhqk,bkhd,hde->bqe', w, v, _f64(p['out']['kernel']))


_NP_ACT = {'gelu': lambda x: 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3))),
           'silu': lambda x: x / (1 + np.exp(-x)), 'linear': lambda x: x}


def _np_block(p, x, cfg, self_bias, rope, encoded=None):
  h = _np_rms(x, p['pre_self_attention_norm'], cfg.norm_eps)
  x = x + _np_attention(p['self_attention'], h, h, self_bias, cfg, rope)
  if encoded is not None:
    h = _np_rms(x, p['pre_cross_attention_norm'], cfg.norm_eps)
    x = x + _np_attention(p['cross_attention'], h, encoded, 0.0, cfg, False)
  h = _np_rms(x, p['pre_mlp_norm'], cfg.norm_eps)
  gate = _NP_ACT[cfg.activations[0]](h @ _f64(p['mlp']['wi_0']['kernel']))
  lin = _NP_ACT[cfg.activations[1]](h @ _f64(p['mlp']['wi_1']['kernel']))
  return x + (gate * lin) @ _f64(p['mlp']['wo']['kernel'])


def _np_stack(p, x, cfg, num_layers, self_bias, rope, encoded=None):
  for i in range(num_layers):
    x = _np_block(p[f'layers_{i}'], x, cfg, self_bias, rope, encoded)
  return _np_rms(x, p['final_norm'], cfg.norm_eps)


def _np_relpos_bias(p, length, bidirectional):
  """T5 bias for short sequences (|offset| < max_exact: exact buckets), [1, h, q, k]."""
  q, k = np.arange(length)[:, None], np.arange(length)[None, :]
  if bidirectional:  # 16 buckets a side: past offset n -> n, future offset n -> 16 + n
    buckets = np.where(k > q, 16 + (k - q), q - k)
  else:  # future keys share bucket 0 with the present
    buckets = np.maximum(q - k, 0)
  return _f64(p['rel_embedding'])[:, buckets][None]


def _np_causal_bias(length):
  return np.where(np.arange(length)[None, :] <= np.arange(length)[:, None], 0.0, -1e10)


def test_decoder_only_matches_numpy_reference():
  for cfg in (DO_ROPE, DO_REL):
    p = params_for(cfg)
    rope = cfg.position_embedding == 'rope'
    bias = _np_causal_bias(LEN) + (0.0 if rope else _np_relpos_bias(p['relpos'], LEN, False))
    x = _f64(p['token_embedder']['embedding'])[TOKENS]
    y = _np_stack(p['decoder'], x, cfg, cfg.num_decoder_layers, bias, rope)
    ref = y @ _f64(p['logits_dense']['kernel'])
    np.testing.assert_allclose(run(cfg, decoder_input_tokens=TOKENS), ref, rtol=1e-4,
                               atol=1e-4 * np.abs(ref).max(), err_msg=cfg.position_embedding)


def test_encoder_decoder_matches_numpy_reference():
  p = params_for(ED)
  enc_tokens = TOKENS[:, ::-1].copy()
  emb = _f64(p['token_embedder']['embedding'])
  encoded = _np_stack(p['encoder'], emb[enc_tokens], ED, ED.num_encoder_layers,
                      _np_relpos_bias(p['encoder_relpos'], LEN, True), False)
  dec_bias = _np_causal_bias(LEN) + _np_relpos_bias(p['decoder_relpos'], LEN, False)
  y = _np_stack(p['decoder'], emb[TOKENS], ED, ED.num_decoder_layers, dec_bias, False,
                encoded)
  ref = y @ _f64(p['logits_dense']['kernel'])
  got = run(ED, encoder_input_tokens=enc_tokens, decoder_input_tokens=TOKENS)
  np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_relative_bias_is_the_decoders_only_position_signal():
  """In a one-layer causal decoder without RoPE, position 3 sees keys 0..3 through content
  and the relative bias only: swapping tokens 0 and 1 matters only because of the bias."""
  cfg = dataclasses.replace(DO_REL, num_decoder_layers=1)
  swapped = TOKENS.copy()
  swapped[:, [0, 1]] = TOKENS[:, [1, 0]]
  params = params_for(cfg)
  base, other = (run(cfg, decoder_input_tokens=t)[:, 3:] for t in (TOKENS, swapped))
  assert _max_diff(base, other) > 1e-3  # keys at different distances get different biases
  no_bias = jax.tree.map(lambda x: x, params)
  no_bias['relpos'] = {'rel_embedding': np.zeros_like(params['relpos']['rel_embedding'])}
  base, other = (run(cfg, no_bias, decoder_input_tokens=t)[:, 3:] for t in (TOKENS, swapped))
  assert _max_diff(base, other) <= 1e-5  # ...and a bag of words without it


# ----------------------------------------------------------------------------------------
# scan_layers and remat
# ----------------------------------------------------------------------------------------
def _stack_layers(tree):
  """Turns {'layers_0': t0, 'layers_1': t1, ...} subtrees into {'layers': stacked}."""
  if not isinstance(tree, dict):
    return tree
  layer_keys = sorted((k for k in tree if k.startswith('layers_')),
                      key=lambda k: int(k.split('_')[1]))
  out = {k: _stack_layers(v) for k, v in tree.items() if k not in layer_keys}
  if layer_keys:
    out['layers'] = jax.tree.map(lambda *xs: np.stack(xs), *(tree[k] for k in layer_keys))
  return out


@pytest.mark.parametrize('cfg', [ED, DO_ROPE], ids=['ed', 'do_rope'])
def test_scan_layers_matches_unrolled(cfg):
  scan_cfg = dataclasses.replace(cfg, scan_layers=True)
  stacked = _stack_layers(params_for(cfg))
  shapes = models.param_shapes(scan_cfg)
  assert jax.tree.structure(stacked) == jax.tree.structure(shapes)
  assert jax.tree.map(np.shape, stacked) == jax.tree.map(lambda s: s.shape, shapes)
  batch = dict(decoder_input_tokens=TOKENS, decoder_target_tokens=TOKENS)
  if cfg.architecture == 'encoder_decoder':
    batch['encoder_input_tokens'] = TOKENS[:, ::-1].copy()
  assert _max_diff(run(cfg, **batch), run(scan_cfg, stacked, **batch)) <= 1e-5


def _loss_fn(cfg, batch):
  model = models.build_model(cfg)
  weights = np.random.default_rng(1).standard_normal((2, LEN, cfg.vocab_size)).astype(np.float32)

  def loss(p):
    logits = model.apply({'params': p}, **batch)
    return jnp.sum(logits * weights), logits

  return loss


def _has_remat(fn, *args):
  """Whether the traced program contains a remat (jax.checkpoint) primitive."""
  return re.search(r'\b(remat\w*|checkpoint)\[', str(jax.make_jaxpr(fn)(*args))) is not None


def test_remat_policies_match_no_remat():
  batch = dict(encoder_input_tokens=TOKENS[:, ::-1].copy(), decoder_input_tokens=TOKENS,
               decoder_target_tokens=TOKENS)
  params = params_for(ED)
  # Eager (not jitted): the forward ops are already compiled by the other tests.
  (_, ref_logits), ref_grads = jax.value_and_grad(_loss_fn(ED, batch), has_aux=True)(params)
  assert not _has_remat(_loss_fn(ED, batch), params)
  assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(ref_grads)) > 0
  for policy in ('full', 'dots'):
    loss = _loss_fn(dataclasses.replace(ED, remat_policy=policy), batch)
    assert _has_remat(loss, params), policy  # remat is really applied
    (_, logits), grads = jax.value_and_grad(loss, has_aux=True)(params)
    assert _max_diff(logits, ref_logits) <= 1e-6, policy
    assert jax.tree.structure(grads) == jax.tree.structure(ref_grads)
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
      # Same math; recomputation may reorder float32 ops, so allow rounding-level noise.
      np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5 * float(np.abs(r).max()),
                                 err_msg=policy)


# ----------------------------------------------------------------------------------------
# dtype
# ----------------------------------------------------------------------------------------
def test_bfloat16_activations_float32_params_and_logits():
  cfg16 = dataclasses.replace(ED, dtype='bfloat16')
  assert all(s.dtype == jnp.float32 for s in jax.tree.leaves(models.param_shapes(cfg16)))
  assert all(s.dtype == jnp.float32 for s in jax.tree.leaves(models.param_shapes(ED)))
  params = params_for(ED)  # the same float32 params for both
  batch = dict(encoder_input_tokens=TOKENS[:, ::-1].copy(), decoder_input_tokens=TOKENS,
               decoder_target_tokens=TOKENS)
  model16 = models.build_model(cfg16)
  logits16, state = model16.apply({'params': params}, **batch, capture_intermediates=True,
                                  mutable=['intermediates'])
  logits32 = run(ED, **batch)
  assert logits16.dtype == jnp.float32 and logits32.dtype == jnp.float32
  inter = state['intermediates']
  block = inter['decoder']['layers_0']
  assert inter['token_embedder']['__call__'][0].dtype == jnp.bfloat16
  assert block['__call__'][0][0].dtype == jnp.bfloat16  # the residual stream
  assert block['mlp']['wi_0']['__call__'][0].dtype == jnp.bfloat16
  assert block['self_attention']['query']['__call__'][0].dtype == jnp.bfloat16
  assert inter['encoder']['__call__'][0].dtype == jnp.bfloat16
  # The real computation ran in bf16: close to float32 within bf16 error, but not equal.
  diff = _max_diff(logits16, logits32)
  assert 1e-4 < diff < 0.1 * float(np.abs(logits32).max())
  emb16 = run(cfg16, params, method='embed', encoder_input_tokens=TOKENS)
  emb32 = run(ED, method='embed', encoder_input_tokens=TOKENS)
  assert emb16.dtype == jnp.float32
  np.testing.assert_allclose(emb16, emb32, rtol=5e-2, atol=5e-2)
  assert _max_diff(emb16, emb32) > 1e-5


def test_float32_is_default():
  assert ModelConfig().dtype == 'float32'
  logits, state = models.build_model(DO_REL).apply(
      {'params': params_for(DO_REL)}, decoder_input_tokens=TOKENS, capture_intermediates=True,
      mutable=['intermediates'])
  assert logits.dtype == jnp.float32
  assert state['intermediates']['decoder']['__call__'][0].dtype == jnp.float32


# ----------------------------------------------------------------------------------------
# Dropout
# ----------------------------------------------------------------------------------------
def test_dropout_deterministic_and_stochastic():
  cfg = dataclasses.replace(DO_ROPE, dropout_rate=0.3)
  model, params = models.build_model(cfg), params_for(DO_ROPE)
  batch = dict(decoder_input_tokens=TOKENS, decoder_target_tokens=TOKENS)
  det1 = model.apply({'params': params}, **batch)
  det2 = model.apply({'params': params}, **batch, deterministic=True)
  np.testing.assert_array_equal(det1, det2)
  # deterministic=True is exactly the dropout-free model.
  np.testing.assert_array_equal(det1, run(DO_ROPE, **batch))
  stoch = lambda seed: model.apply({'params': params}, **batch, deterministic=False,
                                   rngs={'dropout': jax.random.key(seed)})
  a, a_again, b = stoch(1), stoch(1), stoch(2)
  np.testing.assert_array_equal(a, a_again)
  assert _max_diff(a, b) > 1e-3
  assert _max_diff(a, det1) > 1e-3


# ----------------------------------------------------------------------------------------
# embed()
# ----------------------------------------------------------------------------------------
def test_embed_encoder_decoder_ignores_padding():
  enc = TOKENS[:, :5]
  padded = np.concatenate([enc, np.zeros((2, 2), np.int32)], axis=1)
  e = run(ED, method='embed', encoder_input_tokens=enc)
  assert e.shape == (2, ED.d_model) and e.dtype == jnp.float32
  assert _max_diff(e, run(ED, method='embed', encoder_input_tokens=padded)) <= 1e-5
  assert _max_diff(e[0], e[1]) > 1e-3


def test_embed_decoder_only_ignores_padding():
  toks = TOKENS[:, :5]
  padded = np.concatenate([toks, np.zeros((2, 2), np.int32)], axis=1)
  e = run(DO_ROPE, method='embed', decoder_input_tokens=toks)
  assert e.shape == (2, DO_ROPE.d_model) and e.dtype == jnp.float32
  assert _max_diff(e, run(DO_ROPE, method='embed', decoder_input_tokens=padded)) <= 1e-5


def test_embed_decoder_only_shape_and_segment_padding():
  # With segment ids marking the padding, the pooled vector ignores it.
  toks = TOKENS[:, :5]
  padded = np.concatenate([toks, np.zeros((2, 2), np.int32)], axis=1)
  e = run(DO_ROPE, method='embed', decoder_input_tokens=toks)
  assert e.shape == (2, DO_ROPE.d_model) and e.dtype == jnp.float32
  e_seg = run(DO_ROPE, method='embed', decoder_input_tokens=padded,
              decoder_segment_ids=(padded > 0).astype(np.int32))
  assert _max_diff(e, e_seg) <= 1e-5


# ----------------------------------------------------------------------------------------
# Tied logits
# ----------------------------------------------------------------------------------------
def test_tied_logits_scaled_by_inverse_sqrt_d_model():
  tied = dataclasses.replace(DO_REL, logits_via_embedding=True, scale_tied_logits=True)
  unscaled = dataclasses.replace(tied, scale_tied_logits=False)
  shapes = models.param_shapes(tied)
  assert 'logits_dense' not in shapes and 'logits_dense' in models.param_shapes(DO_REL)
  assert jax.tree.structure(shapes) == jax.tree.structure(models.param_shapes(unscaled))
  params = make_params(tied)
  logits = run(tied, params, decoder_input_tokens=TOKENS)
  logits_unscaled = run(unscaled, params, decoder_input_tokens=TOKENS)
  # d_model = 16: dividing by sqrt(16) = 4 is exact in floating point.
  np.testing.assert_array_equal(logits, logits_unscaled / 4.0)
  hidden, _ = run(tied, params, method='hidden_states', decoder_input_tokens=TOKENS)
  embedding = np.asarray(params['token_embedder']['embedding'], np.float64)
  np.testing.assert_allclose(logits, np.asarray(hidden, np.float64) @ embedding.T / 4.0,
                             rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------
# Param counts
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize('overrides,expected', [
    ({}, 76_961_152),  # T5.1.1 small
    (dict(d_model=768, num_heads=12, d_ff=2048, num_encoder_layers=12, num_decoder_layers=12),
     247_577_856),  # T5.1.1 base
    (dict(d_model=1024, num_heads=16, d_ff=2816, num_encoder_layers=24, num_decoder_layers=24),
     783_150_080),  # T5.1.1 large
    (dict(d_model=2048, num_heads=32, d_ff=5120, num_encoder_layers=24, num_decoder_layers=24),
     2_849_757_184),  # T5.1.1 xl
    (dict(architecture='decoder_only', vocab_size=32000, d_model=4096, num_heads=32, head_dim=0,
          d_ff=11008, num_decoder_layers=32, activations=('silu', 'linear'),
          position_embedding='rope', scale_attention_logits=True, norm_eps=1e-5),
     6_738_415_616),  # Llama-2-7B
], ids=['t5_small', 't5_base', 't5_large', 't5_xl', 'llama2_7b'])
def test_published_param_counts(overrides, expected):
  assert models.count_params(models.param_shapes(ModelConfig(**overrides))) == expected


def test_tiny_param_counts_by_formula():
  # ED: V=32, d=16, 2 heads x 8, d_ff=32, gated (2 wi), 2+2 layers, 32 buckets, untied.
  V, d, hd, f, B = 32, 16, 2 * 8, 32, 32
  enc_layer = 4 * d * hd + 3 * d * f + 2 * d
  dec_layer = 8 * d * hd + 3 * d * f + 3 * d
  expected = V * d + d * V + 2 * enc_layer + 2 * dec_layer + 2 * d + 2 * (2 * B)
  assert expected == 13_632
  assert models.count_params(models.param_shapes(ED)) == expected
  # DO_ROPE: GQA with 1 kv head of 8, no relative bias, untied.
  do_layer = d * hd + 2 * d * 8 + hd * d + 3 * d * f + 2 * d
  assert models.count_params(models.param_shapes(DO_ROPE)) == 2 * V * d + 2 * do_layer + d
  # Tied + relative: no output projection, one bias table.
  tied = dataclasses.replace(DO_REL, logits_via_embedding=True)
  dense_layer = 4 * d * hd + 3 * d * f + 2 * d
  assert models.count_params(models.param_shapes(tied)) == V * d + 2 * dense_layer + d + 2 * B


# ----------------------------------------------------------------------------------------
# Config validation
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize('overrides,field,value', [
    (dict(d_model=10, num_heads=3, head_dim=0), 'num_heads', '3'),
    (dict(activations=('gelu', 'swish')), 'activations', 'swish'),
    (dict(num_heads=6, num_kv_heads=4), 'num_kv_heads', '4'),
    (dict(d_model=-8), 'd_model', '-8'),
    (dict(vocab_size=-1), 'vocab_size', '-1'),
    (dict(num_encoder_layers=-2), 'num_encoder_layers', '-2'),
    (dict(num_decoder_layers=-1), 'num_decoder_layers', '-1'),
    (dict(num_decoder_layers=0, architecture='decoder_only'), 'num_decoder_layers', '0'),
    (dict(architecture='encoder_only'), 'architecture', 'encoder_only'),
    (dict(dtype='float16'), 'dtype', 'float16'),
    (dict(remat_policy='sometimes'), 'remat_policy', 'sometimes'),
    (dict(position_embedding='rope', head_dim=7), 'head_dim', '7'),
    (dict(position_embedding='alibi'), 'position_embedding', 'alibi'),
    (dict(dropout_rate=1.0), 'dropout_rate', '1.0'),
])
def test_bad_config_raises_naming_field_and_value(overrides, field, value):
  with pytest.raises(ValueError) as info:
    ModelConfig(**overrides)
  message = str(info.value)
  assert field in message and value in message, message


def test_from_dict_rejects_unknown_keys_and_round_trips():
  with pytest.raises(ValueError, match='num_layers'):
    ModelConfig.from_dict({'d_model': 16, 'num_layers': 2})
  cfg = ModelConfig.from_dict({**TINY, 'activations': ['silu', 'linear']})
  assert cfg.activations == ('silu', 'linear') and cfg.d_model == 16
  assert ModelConfig.from_dict(dataclasses.asdict(DO_ROPE)) == DO_ROPE


def test_config_defaults_resolve_heads():
  cfg = ModelConfig(d_model=32, num_heads=4, head_dim=0)
  assert cfg.head_dim == 8 and cfg.num_kv_heads == 4
  assert ModelConfig(num_heads=6, num_kv_heads=2).num_kv_heads == 2
