"""Unit tests for t5x_lite.layers against hand-computed values and numpy references.

Params are drawn with numpy and modules run under `jax.jit` (one XLA compile per call site
instead of one per eager op) so the whole file stays fast on a small CPU.
"""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5x_lite import layers

RNG = np.random.default_rng(0)


def _np(x):
  return np.asarray(x, dtype=np.float64)


def _randn(*shape, scale=1.0):
  return (RNG.standard_normal(shape) * scale).astype(np.float32)


def _apply(module, params, *args):
  return jax.jit(module.apply)({'params': params}, *args)


def _init_shapes(module, *args):
  """The boxed param tree (shapes, dtypes, logical names) without running any init."""
  return jax.eval_shape(lambda key: module.init(key, *args), jax.random.key(0))['params']


# ----------------------------------------------------------------------------------------
# relative_position_bucket
# ----------------------------------------------------------------------------------------
# Worked by hand from T5's algorithm (num_buckets=32, max_distance=128), n = -offset:
#   bidirectional: 16 buckets per direction, max_exact = 8, keys after the query add 16;
#     n >= 8 -> 8 + floor(ln(n/8) / ln(16) * 8), capped at 15.
#       n=12: ln 1.5 / ln 16 * 8 = 0.4055/2.7726*8 = 1.17 -> 9
#       n=16: ln 2 / ln 16 * 8 = 2 exactly -> 10;  n=32: 4 -> 12;  n=64: 6 -> 14
#       n=127: ln 15.875 / ln 16 * 8 = 7.977 -> 15;  n=128: 16 -> capped 15
#   causal: keys after the query -> 0; max_exact = 16;
#     n >= 16 -> 16 + floor(ln(n/16) / ln(8) * 16), capped at 31.
#       n=17: 0.0606/2.0794*16 = 0.47 -> 16;   n=20: 0.2231/2.0794*16 = 1.72 -> 17
#       n=24: 0.4055/2.0794*16 = 3.12 -> 19;   n=31: 0.6614/2.0794*16 = 5.09 -> 21
#       n=32: 16/3 = 5.33 -> 21;               n=40: 0.9163/2.0794*16 = 7.05 -> 23
#       n=63: 1.3705/2.0794*16 = 10.55 -> 26;  n=64: 32/3 = 10.67 -> 26
#       n=100: 1.8326/2.0794*16 = 14.10 -> 30; n=127: 2.0716/2.0794*16 = 15.94 -> 31
#       n=128: 16 -> 32 -> capped 31
BIDIRECTIONAL_BUCKETS = {
    0: 0, -1: 1, -2: 2, -7: 7, -8: 8, -12: 9, -16: 10, -32: 12, -64: 14,
    -127: 15, -128: 15, -500: 15,
    1: 17, 2: 18, 7: 23, 8: 24, 12: 25, 16: 26, 32: 28, 64: 30, 127: 31, 128: 31, 500: 31,
}
CAUSAL_BUCKETS = {
    1: 0, 5: 0, 500: 0,
    0: 0, -1: 1, -8: 8, -15: 15, -16: 16, -17: 16, -20: 17, -24: 19, -31: 21, -32: 21,
    -40: 23, -63: 26, -64: 26, -100: 30, -127: 31, -128: 31, -500: 31,
}


def _buckets(offsets, bidirectional, num_buckets, max_distance):
  got = layers.relative_position_bucket(np.asarray(offsets, np.int32), bidirectional,
                                        num_buckets, max_distance)
  assert got.dtype == np.int32 and got.shape == np.shape(offsets)
  return np.asarray(got)


@pytest.mark.parametrize('bidirectional,expected', [
    (True, BIDIRECTIONAL_BUCKETS), (False, CAUSAL_BUCKETS)])
def test_relative_position_bucket_hand_values(bidirectional, expected):
  got = _buckets(list(expected), bidirectional, 32, 128)
  assert dict(zip(expected, got.tolist())) == expected


def test_relative_position_bucket_small_table_literal():
  # 8 buckets, max_distance 8, bidirectional: 4 per side, max_exact 2;
  # n >= 2 -> 2 + floor(ln(n/2) / ln(4) * 2): n=2 -> 2, n=3 -> 2 + floor(0.58) = 2.
  offsets = np.arange(4)[None, :] - np.arange(4)[:, None]  # key - query
  np.testing.assert_array_equal(_buckets(offsets, True, 8, 8), [[0, 5, 6, 6],
                                                               [1, 0, 5, 6],
                                                               [2, 1, 0, 5],
                                                               [2, 2, 1, 0]])


def test_relative_position_bias_uses_buckets_of_key_minus_query():
  module = layers.RelativePositionBias(num_heads=2, num_buckets=8, max_distance=8,
                                       bidirectional=False)
  boxed = _init_shapes(module, 3, 4)['rel_embedding']
  assert boxed.names == ('heads', 'relpos_buckets') and boxed.value.shape == (2, 8)
  table = _randn(2, 8)
  bias = jax.jit(module.apply, static_argnums=(1, 2))({'params': {'rel_embedding': table}},
                                                      3, 4)
  assert bias.shape == (1, 2, 3, 4)
  # causal, 8 buckets, max_exact 4: offsets -2..3 are exact (past) or bucket 0 (future).
  buckets = np.array([[0, 0, 0, 0],
                      [1, 0, 0, 0],
                      [2, 1, 0, 0]])
  np.testing.assert_array_equal(bias[0], table[:, buckets])


# ----------------------------------------------------------------------------------------
# attention_mask / mask_to_bias
# ----------------------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnames=('causal',))
def _jit_mask(*args, **kw):
  return layers.attention_mask(*args, **kw)


def _mask(*args, **kw):
  m = _jit_mask(*args, **kw)
  assert m.dtype == jnp.bool_
  return np.asarray(m).astype(int)


def test_attention_mask_causal():
  valid = jnp.ones((1, 3), bool)
  m = _mask(valid, valid, causal=True)
  assert m.shape == (1, 1, 3, 3)
  np.testing.assert_array_equal(m[0, 0], [[1, 0, 0],
                                          [1, 1, 0],
                                          [1, 1, 1]])


def test_attention_mask_padding_and_cross_shapes():
  q_valid = jnp.array([[True, True, False]])
  k_valid = jnp.array([[True, False, True, True]])
  np.testing.assert_array_equal(_mask(q_valid, q_valid)[0, 0], [[1, 1, 0],
                                                               [1, 1, 0],
                                                               [0, 0, 0]])
  np.testing.assert_array_equal(_mask(q_valid, k_valid)[0, 0], [[1, 0, 1, 1],
                                                               [1, 0, 1, 1],
                                                               [0, 0, 0, 0]])


def test_attention_mask_segments_block_diagonal():
  seg = jnp.array([[1, 1, 2, 2, 0]])
  m = _mask(seg > 0, seg > 0, seg, seg)
  np.testing.assert_array_equal(m[0, 0], [[1, 1, 0, 0, 0],
                                          [1, 1, 0, 0, 0],
                                          [0, 0, 1, 1, 0],
                                          [0, 0, 1, 1, 0],
                                          [0, 0, 0, 0, 0]])


def test_attention_mask_prefix_lm():
  valid = jnp.ones((1, 4), bool)
  prefix = jnp.array([[1, 1, 0, 0]])
  np.testing.assert_array_equal(
      _mask(valid, valid, causal=True, bidirectional_prefix=prefix)[0, 0],
      [[1, 1, 0, 0],
       [1, 1, 0, 0],
       [1, 1, 1, 0],
       [1, 1, 1, 1]])


def test_attention_mask_combined_batch():
  # Row 0: two packed prefix-LM examples then padding; row 1: plain causal with one pad.
  seg = jnp.array([[1, 1, 1, 2, 2, 0],
                   [1, 1, 1, 1, 1, 0]])
  prefix = jnp.array([[1, 1, 0, 1, 0, 0],
                      [0, 0, 0, 0, 0, 0]])
  m = _mask(seg > 0, seg > 0, seg, seg, causal=True, bidirectional_prefix=prefix)
  assert m.shape == (2, 1, 6, 6)
  np.testing.assert_array_equal(m[0, 0], [[1, 1, 0, 0, 0, 0],
                                          [1, 1, 0, 0, 0, 0],
                                          [1, 1, 1, 0, 0, 0],
                                          [0, 0, 0, 1, 0, 0],
                                          [0, 0, 0, 1, 1, 0],
                                          [0, 0, 0, 0, 0, 0]])
  np.testing.assert_array_equal(m[1, 0], [[1, 0, 0, 0, 0, 0],
                                          [1, 1, 0, 0, 0, 0],
                                          [1, 1, 1, 0, 0, 0],
                                          [1, 1, 1, 1, 0, 0],
                                          [1, 1, 1, 1, 1, 0],
                                          [0, 0, 0, 0, 0, 0]])


def test_mask_to_bias():
  bias = layers.mask_to_bias(jnp.array([[True, False], [False, False]]))
  assert bias.dtype == jnp.float32
  assert layers.NEG_INF <= -1e9
  np.testing.assert_array_equal(bias, [[0.0, layers.NEG_INF], [layers.NEG_INF, layers.NEG_INF]])
  # Masked logits get exactly zero softmax weight; a fully masked row gives no NaN.
  w = jax.nn.softmax(jnp.array([[3.0, -2.0], [1.0, 5.0]]) + bias, axis=-1)
  np.testing.assert_array_equal(w[0], [1.0, 0.0])
  assert np.all(np.isfinite(w))


# ----------------------------------------------------------------------------------------
# RMSNorm
# ----------------------------------------------------------------------------------------
def _np_rmsnorm(x, scale, eps):
  x = _np(x)
  return x / np.sqrt(np.mean(x ** 2, axis=-1, keepdims=True) + eps) * _np(scale)


def test_rmsnorm_param_and_formula():
  x = _randn(2, 3, 8, scale=3.0) + 0.5
  module = layers.RMSNorm(eps=1e-6)
  boxed = _init_shapes(module, x)['scale']
  assert boxed.names == ('embed',) and boxed.value.shape == (8,)
  np.testing.assert_array_equal(module.init(jax.random.key(0), x)['params']['scale'].value,
                                np.ones(8))
  scale = _randn(8)
  y = _apply(module, {'scale': scale}, x)
  assert y.dtype == jnp.float32
  np.testing.assert_allclose(y, _np_rmsnorm(x, scale, 1e-6), rtol=1e-5, atol=1e-6)


def test_rmsnorm_eps_matters_for_small_inputs():
  x = np.full((1, 4), 1e-3, np.float32)  # mean(x^2) = 1e-6 = eps -> 1e-3 / sqrt(2e-6)
  y = _apply(layers.RMSNorm(eps=1e-6), {'scale': np.ones(4, np.float32)}, x)
  np.testing.assert_allclose(y, np.full((1, 4), 1e-3 / math.sqrt(2e-6)), rtol=1e-5)


def test_rmsnorm_bfloat16():
  x = jnp.asarray(_randn(4, 32, scale=50.0), jnp.bfloat16)
  scale = RNG.uniform(0.5, 1.5, 32).astype(np.float32)
  y = _apply(layers.RMSNorm(eps=1e-6, dtype=jnp.bfloat16), {'scale': scale}, x)
  assert y.dtype == jnp.bfloat16
  ref = _np_rmsnorm(np.asarray(x.astype(jnp.float32)), scale, 1e-6)
  np.testing.assert_allclose(_np(y.astype(jnp.float32)), ref, rtol=1e-2, atol=1e-2)


# ----------------------------------------------------------------------------------------
# RoPE
# ----------------------------------------------------------------------------------------
def _np_rope(x, positions, theta):
  """Direct per-frequency HF-Llama half-split RoPE: pair (x_i, x_{i+d/2}) as a complex number
  and multiply by exp(i * position * theta^(-2i/d))."""
  x = _np(x)
  d = x.shape[-1]
  out = np.empty_like(x)
  for i in range(d // 2):
    angle = _np(positions)[:, :, None] * theta ** (-2.0 * i / d)  # [b, l, 1]
    z = (x[..., i] + 1j * x[..., i + d // 2]) * np.exp(1j * angle)
    out[..., i], out[..., i + d // 2] = z.real, z.imag
  return out


_rope = jax.jit(layers.apply_rope, static_argnums=2)


def test_rope_matches_numpy():
  x = _randn(2, 5, 3, 8)
  positions = np.array([[0, 1, 2, 3, 4], [7, 3, 0, 50, 1000]])
  y = _rope(x, positions, 10000.0)
  assert y.shape == x.shape and y.dtype == jnp.float32
  np.testing.assert_allclose(y, _np_rope(x, positions, 10000.0), rtol=1e-4, atol=1e-4)


def test_rope_literal_two_dims():
  # head_dim 2: a single frequency theta**0 = 1, so position m rotates (x1, x2) by m radians.
  x = np.array([1.0, 0.0, 0.0, 2.0], np.float32).reshape(1, 2, 1, 2)
  y = _rope(x, np.array([[1, 2]]), 10000.0)
  np.testing.assert_allclose(
      y.reshape(2, 2),
      [[math.cos(1.0), math.sin(1.0)], [-2 * math.sin(2.0), 2 * math.cos(2.0)]], atol=1e-6)


def test_rope_identity_at_zero_and_norm_preserving():
  x = _randn(1, 4, 2, 16)
  np.testing.assert_array_equal(_rope(x, np.zeros((1, 4), int), 10000.0), x)
  y = _rope(x, np.array([[3, 17, 99, 512]]), 10000.0)
  np.testing.assert_allclose(np.linalg.norm(y, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5)
  assert not np.allclose(y, x, atol=1e-2)


def test_rope_dot_product_depends_only_on_relative_position():
  q, k = _randn(1, 1, 1, 16), _randn(1, 1, 1, 16)
  m = np.array([5, 6, 12, 45, 5])  # (m, n) pairs: offset 3 four times, then offset 2.
  n = np.array([2, 3, 9, 42, 3])
  qm = _rope(np.broadcast_to(q, (1, 5, 1, 16)), m[None], 10000.0)
  kn = _rope(np.broadcast_to(k, (1, 5, 1, 16)), n[None], 10000.0)
  scores = np.asarray(jnp.sum(qm * kn, axis=-1)).ravel()
  np.testing.assert_allclose(scores[1:4], np.full(3, scores[0]), rtol=1e-4, atol=1e-4)
  assert abs(scores[4] - scores[0]) > 1e-2  # a different offset gives a different score


# ----------------------------------------------------------------------------------------
# Attention
# ----------------------------------------------------------------------------------------
def _np_softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _np_attention(params, xq, xkv, bias, num_heads, scale, rope_positions=None, theta=None):
  """Plain multi-head attention; kv heads are repeated so query head i reads kv head i//g."""
  q = np.einsum('ble,ehd->blhd', _np(xq), _np(params['query']['kernel']))
  k = np.einsum('ble,ehd->blhd', _np(xkv), _np(params['key']['kernel']))
  v = np.einsum('ble,ehd->blhd', _np(xkv), _np(params['value']['kernel']))
  groups = num_heads // k.shape[2]
  k, v = np.repeat(k, groups, axis=2), np.repeat(v, groups, axis=2)
  if rope_positions is not None:
    q, k = _np_rope(q, rope_positions, theta), _np_rope(k, rope_positions, theta)
  if scale:
    q = q / np.sqrt(q.shape[-1])
  w = _np_softmax(np.einsum('bqhd,bkhd->bhqk', q, k) + _np(bias))
  out = np.einsum('bhqk,bkhd->bqhd', w, v)
  return np.einsum('bqhd,hde->bqe', out, _np(params['out']['kernel']))


def _attention_params(embed, num_heads, num_kv_heads, head_dim):
  s = embed ** -0.5
  return {'query': {'kernel': _randn(embed, num_heads, head_dim, scale=s)},
          'key': {'kernel': _randn(embed, num_kv_heads, head_dim, scale=s)},
          'value': {'kernel': _randn(embed, num_kv_heads, head_dim, scale=s)},
          'out': {'kernel': _randn(num_heads, head_dim, embed, scale=(num_heads * head_dim) ** -.5)}}


XQ = _randn(2, 3, 16)
XKV = _randn(2, 5, 16)


def test_attention_param_names_and_shapes():
  module = layers.Attention(num_heads=4, num_kv_heads=2, head_dim=8)
  shapes = _init_shapes(module, XQ, XKV, np.zeros((1, 1, 3, 5), np.float32))
  got = {name: (box['kernel'].names, box['kernel'].value.shape) for name, box in shapes.items()}
  assert got == {'query': (('embed', 'heads', 'kv'), (16, 4, 8)),
                 'key': (('embed', 'kv_heads', 'kv'), (16, 2, 8)),
                 'value': (('embed', 'kv_heads', 'kv'), (16, 2, 8)),
                 'out': (('heads', 'kv', 'embed'), (4, 8, 16))}


@pytest.mark.parametrize('num_kv_heads', [4, 2, 1])
def test_attention_matches_numpy(num_kv_heads):
  bias = _randn(1, 4, 3, 5)
  module = layers.Attention(num_heads=4, num_kv_heads=num_kv_heads, head_dim=8,
                            scale_logits=True)
  params = _attention_params(16, 4, num_kv_heads, 8)
  out = _apply(module, params, XQ, XKV, bias)
  assert out.shape == (2, 3, 16)
  np.testing.assert_allclose(out, _np_attention(params, XQ, XKV, bias, 4, scale=True),
                             rtol=1e-4, atol=1e-5)


def test_attention_with_rope_matches_numpy():
  pos = np.array([[0, 1, 2, 3, 4], [4, 9, 0, 1, 2]])
  bias = np.zeros((1, 1, 5, 5), np.float32)
  module = layers.Attention(num_heads=4, num_kv_heads=2, head_dim=8, scale_logits=True,
                            rope_theta=100.0)
  params = _attention_params(16, 4, 2, 8)
  out = _apply(module, params, XKV, XKV, bias, pos, pos)
  ref = _np_attention(params, XKV, XKV, bias, 4, scale=True, rope_positions=pos, theta=100.0)
  np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('num_heads,num_kv_heads', [(4, 1), (4, 2)])
def test_gqa_equals_mha_with_repeated_kv_heads(num_heads, num_kv_heads):
  bias = np.zeros((1, 1, 3, 5), np.float32)
  gqa = layers.Attention(num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=8)
  mha = layers.Attention(num_heads=num_heads, num_kv_heads=num_heads, head_dim=8)
  p = _attention_params(16, num_heads, num_kv_heads, 8)
  groups = num_heads // num_kv_heads
  # Query head i reads kv head i // groups: repeat each kv head `groups` times in place.
  p_mha = {'query': p['query'], 'out': p['out'],
           'key': {'kernel': np.repeat(p['key']['kernel'], groups, axis=1)},
           'value': {'kernel': np.repeat(p['value']['kernel'], groups, axis=1)}}
  assert p_mha['key']['kernel'].shape == (16, num_heads, 8)
  np.testing.assert_allclose(_apply(gqa, p, XQ, XKV, bias), _apply(mha, p_mha, XQ, XKV, bias),
                             rtol=1e-5, atol=1e-6)


def test_attention_masked_keys_get_zero_weight():
  module = layers.Attention(num_heads=4, num_kv_heads=4, head_dim=8)
  key_valid = np.array([[True, False, True, True, False]] * 2)
  bias = layers.mask_to_bias(_jit_mask(np.ones((2, 3), bool), key_valid))
  params = _attention_params(16, 4, 4, 8)
  out = _apply(module, params, XQ, XKV, bias)
  perturbed = XKV.copy()
  perturbed[:, 1] += 100.0
  perturbed[:, 4] = -7.0
  np.testing.assert_allclose(_apply(module, params, XQ, perturbed, bias), out,
                             rtol=1e-6, atol=1e-6)
  changed = XKV.copy()
  changed[:, 2] += 1.0  # an unmasked key does matter
  assert np.abs(np.asarray(_apply(module, params, XQ, changed, bias) - out)).max() > 1e-3


def test_t5_unscaled_logits_equal_llama_with_prescaled_query():
  bias = np.zeros((1, 1, 3, 5), np.float32)
  t5 = layers.Attention(num_heads=4, num_kv_heads=4, head_dim=8, scale_logits=False)
  llama = layers.Attention(num_heads=4, num_kv_heads=4, head_dim=8, scale_logits=True)
  p = _attention_params(16, 4, 4, 8)
  p['query']['kernel'] *= 4.0  # larger logits so the scale visibly matters
  p_t5 = dict(p, query={'kernel': p['query']['kernel'] / math.sqrt(8)})
  llama_out = _apply(llama, p, XQ, XKV, bias)
  np.testing.assert_allclose(_apply(t5, p_t5, XQ, XKV, bias), llama_out, rtol=1e-5, atol=1e-6)
  # The T5 module really does not scale at run time: same kernel -> different output.
  assert not np.allclose(_apply(t5, p, XQ, XKV, bias), llama_out, atol=1e-3)


# ----------------------------------------------------------------------------------------
# MLP
# ----------------------------------------------------------------------------------------
NP_ACTIVATIONS = {
    'relu': lambda x: np.maximum(x, 0.0),
    'gelu': lambda x: 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3))),
    'gelu_exact': lambda x: 0.5 * x * (1 + np.vectorize(math.erf)(x / np.sqrt(2))),
    'silu': lambda x: x / (1 + np.exp(-x)),
    'linear': lambda x: x,
}


@pytest.mark.parametrize('activations,wi_names', [
    (('relu',), ['wi']),
    (('gelu', 'linear'), ['wi_0', 'wi_1']),
    (('silu', 'linear'), ['wi_0', 'wi_1']),
    (('gelu_exact',), ['wi']),
])
def test_mlp_matches_numpy(activations, wi_names):
  x = _randn(2, 3, 8, scale=2.0)
  module = layers.MLP(d_ff=16, activations=activations)
  shapes = _init_shapes(module, x)
  assert sorted(shapes) == sorted(wi_names + ['wo'])
  assert all(shapes[n]['kernel'].names == ('embed', 'mlp') for n in wi_names)
  assert shapes['wo']['kernel'].names == ('mlp', 'embed')
  params = {n: {'kernel': _randn(8, 16, scale=0.5)} for n in wi_names}
  params['wo'] = {'kernel': _randn(16, 8, scale=0.25)}
  hidden = 1.0
  for name, act in zip(wi_names, activations):
    hidden = hidden * NP_ACTIVATIONS[act](_np(x) @ _np(params[name]['kernel']))
  ref = hidden @ _np(params['wo']['kernel'])
  np.testing.assert_allclose(_apply(module, params, x), ref, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------------
# DenseGeneral
# ----------------------------------------------------------------------------------------
def test_dense_general_shape_names_and_value():
  x = _randn(2, 3, 4, 6)
  module = layers.DenseGeneral(5, ('heads', 'kv', 'embed'), num_in_axes=2)
  boxed = _init_shapes(module, x)['kernel']
  assert isinstance(boxed, nn.LogicallyPartitioned)
  assert boxed.names == ('heads', 'kv', 'embed')
  assert boxed.value.shape == (4, 6, 5) and boxed.value.dtype == jnp.float32
  kernel = _randn(4, 6, 5)
  y = _apply(module, {'kernel': kernel}, x)
  assert y.shape == (2, 3, 5)
  np.testing.assert_allclose(y, np.einsum('bqhd,hde->bqe', _np(x), _np(kernel)),
                             rtol=1e-5, atol=1e-5)


def test_dense_general_multi_output_features():
  x = _randn(1, 2, 8)
  module = layers.DenseGeneral((3, 4), ('embed', 'heads', 'kv'))
  boxed = _init_shapes(module, x)['kernel']
  assert boxed.names == ('embed', 'heads', 'kv') and boxed.value.shape == (8, 3, 4)
  kernel = _randn(8, 3, 4)
  np.testing.assert_allclose(_apply(module, {'kernel': kernel}, x),
                             np.einsum('ble,ehd->blhd', _np(x), _np(kernel)),
                             rtol=1e-5, atol=1e-5)


def test_dense_general_bfloat16_compute_keeps_float32_kernel():
  x = _randn(2, 8)
  module = layers.DenseGeneral(4, ('embed', 'mlp'), dtype=jnp.bfloat16)
  assert _init_shapes(module, x)['kernel'].value.dtype == jnp.float32
  kernel = _randn(8, 4)
  y = _apply(module, {'kernel': kernel}, x)
  assert y.dtype == jnp.bfloat16
  np.testing.assert_allclose(_np(y.astype(jnp.float32)), _np(x) @ _np(kernel),
                             rtol=3e-2, atol=3e-2)


def test_init_variances_use_full_fan_in():
  """Variance-scaling init (one jit for all draws: the truncated-normal compile is slow)."""
  out_proj = layers.DenseGeneral(512, ('heads', 'kv', 'embed'), num_in_axes=2)
  scaled = layers.DenseGeneral(512, ('heads', 'kv', 'embed'), num_in_axes=2, init_scale=0.25)
  t5_attention = layers.Attention(num_heads=8, num_kv_heads=8, head_dim=32, scale_logits=False)
  x_heads, x_embed = jnp.ones((1, 1, 4, 16)), jnp.ones((1, 1, 64))

  @jax.jit
  def draw(key):
    k1, k2, k3 = jax.random.split(key, 3)
    attn = nn.unbox(t5_attention.init(k3, x_embed, x_embed, jnp.zeros((1, 1, 1, 1))))['params']
    return (out_proj.init(k1, x_heads)['params']['kernel'].value,
            scaled.init(k2, x_heads)['params']['kernel'].value,
            attn['query']['kernel'], attn['key']['kernel'], attn['out']['kernel'])

  out_k, scaled_k, query_k, key_k, attn_out_k = draw(jax.random.key(0))
  # Out projection over (heads=4, kv=16): fan_in = 64 -> Var 1/64 (not 1/16 for kv alone).
  assert float(np.var(out_k)) == pytest.approx(1 / 64, rel=0.05)
  assert float(np.mean(out_k)) == pytest.approx(0.0, abs=0.01)
  assert float(np.var(scaled_k)) == pytest.approx(0.25 / 64, rel=0.05)
  # T5 folds 1/sqrt(head_dim) into the query: Var = 1 / (d_model * head_dim); key 1/d_model.
  assert float(np.var(query_k)) == pytest.approx(1 / (64 * 32), rel=0.05)
  assert float(np.var(key_k)) == pytest.approx(1 / 64, rel=0.05)
  assert float(np.var(attn_out_k)) == pytest.approx(1 / (8 * 32), rel=0.05)
