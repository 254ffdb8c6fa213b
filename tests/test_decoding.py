"""Tests of t5x_lite.decoding: HF `generate` parity, cached vs full forward passes, beam search
against brute-force enumeration, sampling filters, n-gram bans, sharding and bad input.

The model glue (encode once, create the KV cache, step one token) is a short test-only copy;
production glue lives in `evaluation.make_tokens_to_logits`.
"""

import functools
import itertools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from t5x_lite import decoding, hf, models, partitioning

torch.set_num_threads(1)

VOCAB = 64
DecodeConfig = decoding.DecodeConfig
T5_INPUTS = np.array([[5, 6, 7, 8, 9, 3, 0], [11, 12, 13, 0, 0, 0, 0]], np.int32)
LLAMA_PROMPTS = np.array([[5, 6, 7, 8, 9], [11, 12, 0, 0, 0], [3, 4, 20, 21, 0]], np.int32)


# ----------------------------------------------------------------------------------------------
# Models: tiny random HF models and ours with the same weights.


def _randomize(model: torch.nn.Module, pattern: str):
  """Adds noise to the parameters matching `pattern` (norm scales start at all ones)."""
  with torch.no_grad():
    for name, param in model.named_parameters():
      if re.search(pattern, name):
        param.add_(0.3 * torch.randn_like(param))


def _hf_t5():
  torch.manual_seed(0)
  config = transformers.T5Config(
      vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_heads=4, num_layers=2,
      relative_attention_num_buckets=16, relative_attention_max_distance=20, dropout_rate=0.0,
      feed_forward_proj='gated-gelu', tie_word_embeddings=False, decoder_start_token_id=0,
      pad_token_id=0, eos_token_id=1)
  model = transformers.T5ForConditionalGeneration(config).eval()
  _randomize(model, r'layer_norm|relative_attention_bias')
  # transformers 5 ties lm_head to `shared` even with tie_word_embeddings=False.
  model.lm_head.weight = torch.nn.Parameter(torch.randn(VOCAB, 32) * 32**-0.5)
  assert model.lm_head.weight.data_ptr() != model.shared.weight.data_ptr()
  return model


def _hf_llama():
  torch.manual_seed(0)
  config = transformers.LlamaConfig(
      vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
      rope_parameters={'rope_type': 'default', 'rope_theta': 500000.0}, rms_norm_eps=1e-5,
      initializer_range=0.2, tie_word_embeddings=False)
  model = transformers.LlamaForCausalLM(config).eval()
  _randomize(model, r'norm')
  return model


def _ours(hf_model, **overrides):
  config = hf.config_from_hf(hf_model.config.to_dict(), **overrides)
  state_dict = {k: v.detach().numpy() for k, v in hf_model.state_dict().items()}
  return models.build_model(config), hf.params_from_hf(state_dict, config)


@pytest.fixture(scope='module', name='t5')
def _t5_fixture():
  hf_model = _hf_t5()
  return (hf_model,) + _ours(hf_model)


@pytest.fixture(scope='module', name='llama')
def _llama_fixture():
  hf_model = _hf_llama()
  return (hf_model,) + _ours(hf_model)


# ----------------------------------------------------------------------------------------------
# Test glue: our models as a tokens_to_logits function and cache.


def _encoder_decoder_step(model, params, encoder_tokens, length):
  """Encodes once and creates the cache; the encoder tokens ride in the cache for the mask."""
  encoded = model.apply({'params': params}, encoder_tokens, method=model.encode)
  zeros = jnp.zeros((encoder_tokens.shape[0], length), jnp.int32)
  _, state = model.apply({'params': params}, encoded, encoder_tokens, zeros, decode=True,
                         mutable=['cache'], method=model.decode)

  def tokens_to_logits(ids, cache):
    logits, state = model.apply(
        {'params': params, 'cache': cache['model']}, None, cache['inputs'], ids, decode=True,
        max_decode_length=length, mutable=['cache'], method=model.decode)
    return logits[:, 0], {'model': state['cache'], 'inputs': cache['inputs']}

  return tokens_to_logits, {'model': state['cache'], 'inputs': encoder_tokens}


def _decoder_only_step(model, params, batch_size, length):
  zeros = jnp.zeros((batch_size, length), jnp.int32)
  _, state = model.apply({'params': params}, zeros, decode=True, mutable=['cache'])

  def tokens_to_logits(ids, cache):
    logits, state = model.apply({'params': params, 'cache': cache}, ids, decode=True,
                                max_decode_length=length, mutable=['cache'])
    return logits[:, 0], state['cache']

  return tokens_to_logits, state['cache']


def _generate_impl(params, inputs, rng, *, model, config):
  """Encoder-decoder: `inputs` are the encoder tokens; decoder-only: the prompts."""
  n, batch_size = config.max_decode_length, inputs.shape[0]
  if isinstance(model, models.EncoderDecoder):
    step, cache = _encoder_decoder_step(model, params, inputs, n)
    return decoding.decode(step, cache, config=config, batch_size=batch_size, rng=rng)
  step, cache = _decoder_only_step(model, params, batch_size, inputs.shape[1] + n)
  return decoding.decode(step, cache, config=config, batch_size=batch_size, rng=rng,
                         prompt=inputs)


_generate_jit = jax.jit(_generate_impl, static_argnames=('model', 'config'))


def _generate(model, params, inputs, config, rng=None):
  sequences, scores = _generate_jit(params, jnp.asarray(inputs), rng, model=model,
                                    config=config)
  return np.asarray(sequences), np.asarray(scores)


def _fixed_logits_step(logits):
  """A tokens_to_logits that ignores its input: the same logits [V] for every row and step."""
  logits = jnp.asarray(logits, jnp.float32)

  def tokens_to_logits(ids, cache):
    return jnp.broadcast_to(logits, (ids.shape[0], logits.shape[0])), cache

  return tokens_to_logits


def _decode_fixed(logits, config, batch_size, rng=None):
  cache = {'unused': jnp.zeros((batch_size, 1))}
  run = jax.jit(lambda rng: decoding.decode(_fixed_logits_step(logits), cache, config=config,
                                            batch_size=batch_size, rng=rng))
  return tuple(np.asarray(x) for x in run(jax.random.key(0) if rng is None else rng))


# ----------------------------------------------------------------------------------------------
# HF generate.


def _pad_to(tokens: np.ndarray, n: int) -> np.ndarray:
  return np.pad(tokens, ((0, 0), (0, n - tokens.shape[1])))


def _hf_t5_generate(hf_model, n, **kwargs):
  with torch.no_grad():
    out = hf_model.generate(
        input_ids=torch.tensor(T5_INPUTS), attention_mask=torch.tensor(T5_INPUTS > 0),
        max_new_tokens=n, pad_token_id=0, decoder_start_token_id=0, **kwargs)
  if kwargs.get('return_dict_in_generate'):
    return _pad_to(out.sequences.numpy()[:, 1:], n), out.sequences_scores.numpy()
  return _pad_to(out.numpy()[:, 1:], n)


def _hf_llama_generate(hf_model, prompt, n, **kwargs):
  """One row at a time: no left padding needed."""
  with torch.no_grad():
    out = hf_model.generate(input_ids=torch.tensor(prompt[None]), max_new_tokens=n,
                            pad_token_id=0, **kwargs)
  if kwargs.get('return_dict_in_generate'):
    return _pad_to(out.sequences.numpy()[:, len(prompt):], n), out.sequences_scores.numpy()
  return _pad_to(out.numpy()[:, len(prompt):], n)


def test_greedy_matches_hf_t5(t5):
  hf_model, model, params = t5
  n = 8
  theirs = _hf_t5_generate(hf_model, n, do_sample=False, num_beams=1, eos_token_id=1)
  ours, _ = _generate(model, params, T5_INPUTS, DecodeConfig(max_decode_length=n))
  np.testing.assert_array_equal(ours[:, 0], theirs)
  # Random weights rarely emit EOS: make a token of row 0's output the EOS (it then stops
  # there, 0s after) and check HF agrees on both rows.
  eos = int(theirs[0, 3])
  theirs = _hf_t5_generate(hf_model, n, do_sample=False, num_beams=1, eos_token_id=eos)
  ours, _ = _generate(model, params, T5_INPUTS, DecodeConfig(max_decode_length=n, eos_id=eos))
  np.testing.assert_array_equal(ours[:, 0], theirs)
  assert ours[0, 0, 3] == eos and not ours[0, 0, 4:].any()


def test_greedy_matches_hf_llama_prompts_of_different_lengths(llama):
  hf_model, model, params = llama
  n = 6
  ours, scores = _generate(model, params, LLAMA_PROMPTS, DecodeConfig(max_decode_length=n))
  for row, prompt in enumerate(LLAMA_PROMPTS):
    theirs = _hf_llama_generate(hf_model, prompt[prompt > 0], n, do_sample=False, num_beams=1,
                                eos_token_id=1)
    np.testing.assert_array_equal(ours[row, :, :], theirs)
  # The greedy score is the teacher-forced log-likelihood of the output.
  lengths = (LLAMA_PROMPTS > 0).sum(1)
  full = np.zeros((3, LLAMA_PROMPTS.shape[1] + n), np.int32)
  for row, length in enumerate(lengths):
    full[row, :length + n] = np.concatenate([LLAMA_PROMPTS[row, :length], ours[row, 0]])
  log_probs = jax.nn.log_softmax(model.apply({'params': params}, full))
  for row, length in enumerate(lengths):
    picked = [log_probs[row, length - 1 + j, ours[row, 0, j]] for j in range(n)]
    np.testing.assert_allclose(scores[row, 0], sum(picked), atol=1e-4)


def test_greedy_no_repeat_ngram_matches_hf_t5(t5):
  hf_model, model, params = t5
  n = 8
  theirs = _hf_t5_generate(hf_model, n, do_sample=False, num_beams=1, eos_token_id=1,
                           no_repeat_ngram_size=2)
  ours, _ = _generate(model, params, T5_INPUTS,
                      DecodeConfig(max_decode_length=n, no_repeat_ngram_size=2))
  np.testing.assert_array_equal(ours[:, 0], theirs)
  plain, _ = _generate(model, params, T5_INPUTS, DecodeConfig(max_decode_length=n))
  assert (plain != ours).any()  # the bans changed something


@pytest.mark.parametrize('family', ['t5', 'llama'])
def test_beam_matches_hf_without_eos(family, request):
  """alpha=0 vs length_penalty=0 (both the raw sum log-prob), with an EOS id outside the
  vocabulary: the conventions that differ (module docstring) then do not come into play."""
  hf_model, model, params = request.getfixturevalue(family)
  n, beams = 6, 4
  config = DecodeConfig(method='beam', max_decode_length=n, num_beams=beams, alpha=0.0,
                        num_return_sequences=beams, eos_id=VOCAB)
  hf_kwargs = dict(do_sample=False, num_beams=beams, num_return_sequences=beams,
                   length_penalty=0.0, eos_token_id=VOCAB, return_dict_in_generate=True,
                   output_scores=True)
  inputs = T5_INPUTS if family == 't5' else LLAMA_PROMPTS
  ours, scores = _generate(model, params, inputs, config)
  if family == 't5':
    theirs, their_scores = _hf_t5_generate(hf_model, n, **hf_kwargs)
  else:
    outs = [_hf_llama_generate(hf_model, p[p > 0], n, **hf_kwargs) for p in LLAMA_PROMPTS]
    theirs, their_scores = np.concatenate([o[0] for o in outs]), np.concatenate(
        [o[1] for o in outs])
  np.testing.assert_array_equal(ours.reshape(-1, n), theirs)
  np.testing.assert_allclose(scores.reshape(-1), their_scores, atol=1e-4)


def _hf_t5_log_prob(hf_model, row: int, tokens) -> float:
  """HF's teacher-forced log-prob of `tokens` (EOS included, no padding) for one input row."""
  tokens = [t for t in tokens if t]
  with torch.no_grad():
    logits = hf_model(input_ids=torch.tensor(T5_INPUTS[row:row + 1]),
                      attention_mask=torch.tensor(T5_INPUTS[row:row + 1] > 0),
                      decoder_input_ids=torch.tensor([[0] + tokens[:-1]])).logits[0]
  log_probs = torch.log_softmax(logits.double(), -1)
  return float(log_probs[torch.arange(len(tokens)), torch.tensor(tokens)].sum())


@pytest.mark.parametrize('eos, ours_wins', [(19, True), (27, False)])
def test_beam_differs_from_hf_only_by_t5x_eos_rules(t5, eos, ours_wins):
  """With EOS among a step's 2k best continuations, T5X's rules (which we follow) and HF's
  differ. EOS 19: our finished [19] beats HF's unfinished 6-token beam (HF admits an ending
  only from the top k). EOS 27: every finished hypothesis scores below HF's unfinished beam;
  we return the best finished one (T5X returns live beams only when nothing finished)."""
  hf_model, model, params = t5
  n, beams = 6, 4
  ours, scores = _generate(model, params, T5_INPUTS, DecodeConfig(
      method='beam', max_decode_length=n, num_beams=beams, alpha=0.0, eos_id=eos))
  theirs, their_scores = _hf_t5_generate(
      hf_model, n, do_sample=False, num_beams=beams, length_penalty=0.0, eos_token_id=eos,
      return_dict_in_generate=True, output_scores=True)
  ours, score, theirs, their_score = ours[0, 0], scores[0, 0], theirs[0], their_scores[0]
  print(f'EOS {eos}: ours {ours.tolist()} {score:.4f}, HF {theirs.tolist()} {their_score:.4f}')
  assert eos in ours.tolist() and eos not in theirs.tolist()  # finished vs unfinished
  # Both scores are the teacher-forced log-probs of the hypotheses (alpha 0, lp 0).
  assert score == pytest.approx(_hf_t5_log_prob(hf_model, 0, ours), abs=1e-4)
  assert their_score == pytest.approx(_hf_t5_log_prob(hf_model, 0, theirs), abs=1e-4)
  assert (score > their_score) == ours_wins


# ----------------------------------------------------------------------------------------------
# Beam search against brute force.

TINY_VOCAB = 6
BRUTE_INPUTS = np.array([[2, 3, 4, 5], [5, 4, 0, 0]], np.int32)
BRUTE_LENGTH = 3


@pytest.fixture(scope='module', name='tiny')
def _tiny_fixture():
  """A random encoder-decoder over 6 tokens and the log-probs of all 6**3 sequences."""
  config = models.ModelConfig(vocab_size=TINY_VOCAB, d_model=16, num_heads=2, head_dim=8,
                              d_ff=32, num_encoder_layers=2, num_decoder_layers=2)
  rng = np.random.default_rng(3)
  params = jax.tree.map(lambda s: (rng.standard_normal(s.shape) * 0.5).astype(np.float32),
                        models.param_shapes(config))
  model = models.build_model(config)
  everything = np.array(list(itertools.product(range(TINY_VOCAB), repeat=BRUTE_LENGTH)))
  decoder_inputs = np.pad(everything, ((0, 0), (1, 0)))[:, :-1]  # start id 0
  encoder = np.repeat(BRUTE_INPUTS, len(everything), axis=0)
  logits = jax.jit(model.apply)({'params': params}, encoder, np.tile(decoder_inputs, (2, 1)))
  log_probs = np.asarray(jax.nn.log_softmax(logits)).reshape(2, len(everything), BRUTE_LENGTH, -1)
  token_log_probs = np.take_along_axis(log_probs, everything[None, ..., None], -1)[..., 0]
  return model, params, everything, token_log_probs


def _brute_force(everything, token_log_probs, alpha, eos=1):
  """Every hypothesis ending at EOS, best first, then every full-length one without EOS (T5X's
  fallback), as (tokens padded with 0, score) pairs."""
  n = everything.shape[1]
  finished, truncated = {}, {}
  for seq, lp in zip(everything, token_log_probs):
    eos_at = np.flatnonzero(seq == eos)
    length = eos_at[0] + 1 if eos_at.size else n
    padded = tuple(seq[:length]) + (0,) * (n - length)
    (finished if eos_at.size else truncated)[padded] = lp[:length].sum() / (
        (5 + length) / 6) ** alpha
  ranked = lambda d: sorted(d.items(), key=lambda kv: -kv[1])
  return ranked(finished) + ranked(truncated)


@pytest.mark.parametrize('alpha', [0.0, 3.0])
def test_beam_matches_brute_force(tiny, alpha):
  model, params, everything, token_log_probs = tiny
  n = BRUTE_LENGTH
  # Enough beams that every hypothesis survives (2k >= (V - 1) ** (n - 1) * V): the search is
  # exhaustive, so its ranking must be the brute-force one.
  ours, scores = _generate(model, params, BRUTE_INPUTS, DecodeConfig(
      method='beam', max_decode_length=n, num_beams=75, alpha=alpha, num_return_sequences=40))
  four, four_scores = _generate(model, params, BRUTE_INPUTS, DecodeConfig(
      method='beam', max_decode_length=n, num_beams=4, alpha=alpha))
  for row in range(len(BRUTE_INPUTS)):
    expected = _brute_force(everything, token_log_probs[row], alpha)
    assert [tuple(s) for s in ours[row]] == [s for s, _ in expected[:40]]
    np.testing.assert_allclose(scores[row], [score for _, score in expected[:40]], atol=1e-4)
    # Four beams: the top one is the best finished hypothesis.
    assert tuple(four[row, 0]) == expected[0][0]
    np.testing.assert_allclose(four_scores[row, 0], expected[0][1], atol=1e-4)
  if alpha:  # the brevity penalty changed the winner of at least one row
    assert any(_brute_force(everything, lp, 0.0)[0][0] != tuple(four[row, 0])
               for row, lp in enumerate(token_log_probs))


def test_beam_stops_early_when_no_live_beam_can_win():
  """EOS is very likely: once k hypotheses have ended, the live ones cannot catch up."""
  calls = []

  def tokens_to_logits(ids, cache):
    jax.debug.callback(lambda: calls.append(1))
    return jnp.broadcast_to(jnp.array([0.0, 5.0, 1.0, 0.5, 0.2, 0.1]), (ids.shape[0], 6)), cache

  config = DecodeConfig(method='beam', max_decode_length=30, num_beams=2, alpha=0.0,
                        num_return_sequences=2)
  sequences, scores = jax.jit(lambda: decoding.decode(
      tokens_to_logits, {'x': jnp.zeros((1, 1))}, config=config, batch_size=1))()
  jax.block_until_ready(scores)
  np.testing.assert_array_equal(np.asarray(sequences)[0, :, :3], [[1, 0, 0], [2, 1, 0]])
  assert len(calls) == 2


# ----------------------------------------------------------------------------------------------
# Cached decoding equals full forward passes.


@pytest.mark.parametrize('scan_layers', [False, True])
@pytest.mark.parametrize('family', ['t5', 'llama'])
def test_cached_steps_match_full_forward(family, scan_layers, request):
  model, params = _ours(request.getfixturevalue(family)[0], scan_layers=scan_layers)
  tokens = np.random.default_rng(0).integers(2, VOCAB, size=(2, 7)).astype(np.int32)
  if family == 't5':
    tokens[:, 0] = 0  # the decoder start
    full = model.apply({'params': params}, T5_INPUTS, tokens)
    step, cache = _encoder_decoder_step(model, params, jnp.asarray(T5_INPUTS), tokens.shape[1])
  else:
    full = model.apply({'params': params}, tokens)
    step, cache = _decoder_only_step(model, params, 2, tokens.shape[1])
  step = jax.jit(step)
  cached = []
  for t in range(tokens.shape[1]):
    logits, cache = step(jnp.asarray(tokens[:, t:t + 1]), cache)
    cached.append(logits)
  diff = float(jnp.abs(jnp.stack(cached, 1) - full).max())
  print(f'max abs logits diff: {diff:.2e}')
  assert diff <= 1e-4


# ----------------------------------------------------------------------------------------------
# Sampling.


def _bigram_decode(config, rng=None, batch_size=2):
  """Decodes a random bigram model (logits depend on the input token): cheap to compile, and
  greedy is not one constant token."""
  table = jnp.asarray(np.random.default_rng(0).standard_normal((16, 16)), jnp.float32)

  def tokens_to_logits(ids, cache):
    return table[ids[:, 0]] * 3.0, cache

  cache = {'unused': jnp.zeros((batch_size, 1))}
  prompt = np.arange(batch_size)[:, None] + 2  # different first tokens
  run = jax.jit(lambda rng: decoding.decode(tokens_to_logits, cache, config=config,
                                            batch_size=batch_size, rng=rng, prompt=prompt))
  return tuple(np.asarray(x) for x in run(jax.random.key(0) if rng is None else rng))


def test_sampling_limits_equal_greedy():
  n = 8
  greedy, _ = _bigram_decode(DecodeConfig(max_decode_length=n))
  assert len(set(greedy.reshape(-1).tolist())) > 2
  for kwargs in (dict(temperature=1e-3), dict(temperature=0.0), dict(top_k=1),
                 dict(top_p=1e-6)):
    sampled, _ = _bigram_decode(DecodeConfig(method='sample', max_decode_length=n, **kwargs),
                                rng=jax.random.key(7))
    np.testing.assert_array_equal(sampled, greedy, err_msg=str(kwargs))


def test_sampling_reproducible_and_rng_dependent():
  config = DecodeConfig(method='sample', max_decode_length=8, temperature=2.0)
  first, scores = _bigram_decode(config, rng=jax.random.key(1))
  again, _ = _bigram_decode(config, rng=jax.random.key(1))
  other, _ = _bigram_decode(config, rng=jax.random.key(2))
  np.testing.assert_array_equal(first, again)
  assert (first != other).any()
  assert np.all(scores < 0)


def test_top_k_samples_only_the_top_k():
  logits = np.random.default_rng(0).standard_normal(20).astype(np.float32)
  config = DecodeConfig(method='sample', max_decode_length=4, top_k=5, eos_id=99)
  sequences, _ = _decode_fixed(logits, config, batch_size=500)
  drawn = set(np.unique(sequences))
  assert drawn == set(np.argsort(-logits)[:5].tolist())


@pytest.mark.parametrize('top_p, allowed', [(0.75, {0, 1}), (0.85, {0, 1, 2}), (1.0, None)])
def test_top_p_samples_the_nucleus(top_p, allowed):
  probs = np.array([0.5, 0.3, 0.1, 0.05, 0.03, 0.02])
  config = DecodeConfig(method='sample', max_decode_length=4, top_p=top_p, eos_id=99)
  sequences, _ = _decode_fixed(np.log(probs), config, batch_size=500)
  assert set(np.unique(sequences)) == (allowed or set(range(6)))


def test_sample_num_return_sequences():
  config = DecodeConfig(method='sample', max_decode_length=5, temperature=3.0,
                        num_return_sequences=3, eos_id=99)
  sequences, scores = _bigram_decode(config)
  assert sequences.shape == (2, 3, 5) and scores.shape == (2, 3)
  assert np.all(np.diff(scores, axis=1) <= 0)
  assert all(len({tuple(s) for s in row}) == 3 for row in sequences)


# ----------------------------------------------------------------------------------------------
# Beams, EOS, n-gram bans.


def test_beam_num_return_sequences(t5):
  _, model, params = t5
  config = DecodeConfig(method='beam', max_decode_length=5, num_beams=4, num_return_sequences=3)
  sequences, scores = _generate(model, params, T5_INPUTS, config)
  assert sequences.shape == (2, 3, 5) and scores.shape == (2, 3)
  assert sequences.dtype == np.int32 and scores.dtype == np.float32
  assert np.all(np.diff(scores, axis=1) <= 0)
  assert all(len({tuple(s) for s in row}) == 3 for row in sequences)


def _scripted_step(script):
  """tokens_to_logits emitting script[row, step] (peaked logits); the cache counts steps."""
  script = jnp.asarray(script)

  def tokens_to_logits(ids, cache):
    del ids
    row_script = cache['script']
    token = jnp.take_along_axis(row_script, cache['step'][:, None], axis=1)[:, 0]
    logits = 10.0 * jax.nn.one_hot(token, 8)
    return logits, {'script': row_script, 'step': cache['step'] + 1}

  return tokens_to_logits, {'script': script, 'step': jnp.zeros(script.shape[0], jnp.int32)}


@pytest.mark.parametrize('method', ['greedy', 'beam'])
def test_eos_stops_rows_and_loop(method):
  script = np.array([[5, 6, 1, 7, 7, 7, 7, 7, 7, 7],
                     [4, 1, 3, 3, 3, 3, 3, 3, 3, 3],
                     [2, 2, 2, 1, 2, 2, 2, 2, 2, 2]], np.int32)
  calls = []
  step, cache = _scripted_step(script)

  def counting_step(ids, cache):
    jax.debug.callback(lambda: calls.append(1))
    return step(ids, cache)

  # One beam: its hypothesis ending at EOS is final (with more, the runners-up continue).
  config = DecodeConfig(method=method, max_decode_length=10, num_beams=1)
  sequences, _ = jax.jit(lambda c: decoding.decode(counting_step, c, config=config,
                                                   batch_size=3))(cache)
  np.testing.assert_array_equal(np.asarray(sequences)[:, 0], [
      [5, 6, 1, 0, 0, 0, 0, 0, 0, 0], [4, 1, 0, 0, 0, 0, 0, 0, 0, 0],
      [2, 2, 2, 1, 0, 0, 0, 0, 0, 0]])
  assert len(calls) == 4  # the loop stops once every row has ended


def test_prompt_forcing_returns_tokens_after_each_prompt():
  """The scripted logits index by step = position: the prompt positions are overridden."""
  script = np.tile(np.arange(1, 9)[None] % 7 + 1, (2, 1))  # position p+1 -> token (p+1)%7+1
  step, cache = _scripted_step(script)
  prompt = np.array([[5, 5, 5], [6, 0, 0]], np.int32)
  config = DecodeConfig(max_decode_length=4, eos_id=99)
  sequences, _ = decoding.decode(step, cache, config=config, batch_size=2, prompt=prompt)
  np.testing.assert_array_equal(np.asarray(sequences)[:, 0], [script[0, 2:6], script[1, 0:4]])


def _has_repeated_ngram(seq, size):
  grams = [tuple(seq[i:i + size]) for i in range(len(seq) - size + 1)]
  return len(grams) != len(set(grams))


@pytest.mark.parametrize('method', ['greedy', 'beam'])
@pytest.mark.parametrize('size', [1, 2, 3])
def test_no_repeat_ngram(method, size):
  logits = np.array([0.0, -9.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0])  # always prefers 7, then 6, ...
  n = 6 if size == 1 else 12
  config = DecodeConfig(method=method, max_decode_length=n, no_repeat_ngram_size=size,
                        num_beams=3, num_return_sequences=1 if method == 'greedy' else 3)
  sequences, _ = _decode_fixed(logits, config, batch_size=2)
  for seq in sequences.reshape(-1, n):
    assert not _has_repeated_ngram([0] + seq.tolist(), size), seq  # with the start token
  plain, _ = _decode_fixed(logits, DecodeConfig(max_decode_length=n), batch_size=1)
  assert _has_repeated_ngram([0] + plain[0, 0].tolist(), size)


def test_expand_batch_repeats_rows():
  tree = {'a': jnp.arange(6).reshape(3, 2), 'index': jnp.array(4)}
  expanded = decoding.expand_batch(tree, 2)
  np.testing.assert_array_equal(expanded['a'][:, 0], [0, 0, 2, 2, 4, 4])
  assert expanded['index'] == 4


# ----------------------------------------------------------------------------------------------
# Sharding.


def test_sharded_decoding_matches_unsharded(t5):
  _, model, params = t5
  inputs = np.concatenate([T5_INPUTS, T5_INPUTS[::-1]], axis=0)
  partitioner = partitioning.Partitioner(partitioning.make_mesh((4, 1, 2)),
                                         partitioning.DEFAULT_RULES)
  # Beam search: expanding and reordering the cache are the parts sharding could break.
  for config in (DecodeConfig(method='beam', max_decode_length=5, num_beams=2),):
    expected = _generate(model, params, inputs, config)
    # A fresh jit: the logical rules are read at trace time and are not in jit's cache key.
    run = jax.jit(functools.partial(_generate_impl, model=model, config=config))
    with partitioner.activate():
      sharded_inputs = jax.device_put(inputs, partitioner.batch_sharding())
      sequences, scores = run(params, sharded_inputs, None)
    np.testing.assert_array_equal(np.asarray(sequences), expected[0])
    np.testing.assert_allclose(np.asarray(scores), expected[1], atol=1e-5)


def test_search_keeps_the_batch_sharded():
  """Under a data-parallel mesh the search itself adds no all-gather (XLA gathers the batch of
  a plain TopK): only the loop condition's all-reduce."""
  table = jnp.asarray(np.random.default_rng(0).standard_normal((16, 16)), jnp.float32)
  step = lambda ids, cache: (table[ids[:, 0]] + cache, cache)
  partitioner = partitioning.Partitioner(partitioning.make_mesh((8, 1, 1)))
  for config in (DecodeConfig(method='beam', max_decode_length=4, num_beams=2),
                 DecodeConfig(method='sample', max_decode_length=4, top_k=3, top_p=0.9,
                              num_return_sequences=2, no_repeat_ngram_size=2)):
    run = jax.jit(lambda cache, config=config: decoding.decode(step, cache, config=config,
                                                               batch_size=8))
    with partitioner.activate():
      cache = jax.device_put(jnp.zeros((8, 16)), partitioner.batch_sharding())
      hlo = run.lower(cache).compile().as_text()
      sequences, _ = run(cache)
    assert 'all-gather' not in hlo and 'all-to-all' not in hlo, config.method
    assert sequences.sharding.shard_shape(sequences.shape)[0] == 1  # 8 rows on 8 devices


# ----------------------------------------------------------------------------------------------
# Bad input.


def _one_line_error(fn, match):
  with pytest.raises(ValueError, match=match) as error:
    fn()
  assert '\n' not in str(error.value)


def test_check_prompts():
  prompt = np.array([[3, 4, 0], [0, 0, 0], [5, 0, 0]])
  _one_line_error(lambda: decoding.check_prompts(prompt, 10),
                  re.escape('Empty prompt in row(s) [1]'))
  _one_line_error(lambda: decoding.check_prompts(prompt[[0, 2]], 1),
                  re.escape('Prompt row(s) [0] have [2] tokens, more than max_length=1'))
  _one_line_error(lambda: decoding.check_prompts(np.zeros((2, 0), np.int32), 4),
                  'Empty prompt')
  _one_line_error(lambda: decoding.check_prompts(np.ones(3, np.int32), 4),
                  r'\[batch, length\] integer array; got shape \(3,\)')
  # A leading 0 (a model's start token) is part of the prompt; trailing 0s are padding.
  np.testing.assert_array_equal(decoding.check_prompts(np.array([[0, 7, 0], [4, 0, 0]]), 2),
                                [2, 1])


def test_decode_rejects_bad_prompts():
  step = _fixed_logits_step(np.zeros(8))
  cache = {'x': jnp.zeros((2, 1))}
  config = DecodeConfig(max_decode_length=2)
  _one_line_error(lambda: decoding.decode(step, cache, config=config, batch_size=2,
                                          prompt=np.array([[3, 0], [0, 0]])), 'Empty prompt')
  _one_line_error(lambda: decoding.decode(step, cache, config=config, batch_size=3,
                                          prompt=np.array([[3, 0], [4, 0]])),
                  r'batch_size=3')


@pytest.mark.parametrize('changes, match', [
    (dict(method='topk'), r"method='topk'; must be one of \('greedy', 'sample', 'beam'\)"),
    (dict(max_decode_length=0), 'max_decode_length=0; must be a positive integer'),
    (dict(max_decode_length=2.5), 'max_decode_length=2.5'),
    (dict(temperature=-1.0), 'temperature=-1.0'),
    (dict(top_k=-1), 'top_k=-1; must be a non-negative integer'),
    (dict(top_p=0.0), r'top_p=0.0; must be in \(0, 1\]'),
    (dict(top_p=1.5), 'top_p=1.5'),
    (dict(num_beams=0), 'num_beams=0'),
    (dict(alpha=-0.5), 'alpha=-0.5'),
    (dict(num_return_sequences=2), "num_return_sequences=2; must be 1 with method='greedy'"),
    (dict(method='beam', num_beams=2, num_return_sequences=3),
     'num_return_sequences=3; must be at most num_beams=2'),
    (dict(no_repeat_ngram_size=-2), 'no_repeat_ngram_size=-2'),
    (dict(eos_id=-1), 'eos_id=-1'),
])
def test_decode_config_rejects(changes, match):
  _one_line_error(lambda: DecodeConfig(**changes), 'Invalid decode config: ' + match)


def test_decode_config_is_hashable():
  assert hash(DecodeConfig(method='beam')) == hash(DecodeConfig(method='beam'))
