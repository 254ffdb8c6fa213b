"""Parity of `t5x_lite.hf` imports with HF PyTorch T5 and Llama on the same random weights.

The tiny HF models and logit checks here are shared with tests/test_hf_convert.py.
"""

import dataclasses
import re

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from transformers.models.t5.modeling_t5 import T5Attention

from t5x_lite import hf, hf_io, layers, models

torch.set_num_threads(1)

VOCAB = 128
TOLERANCE = 1e-4


def _randomize(model: torch.nn.Module, pattern: str):
  """Adds noise to the parameters matching `pattern` (norm scales start at all ones)."""
  with torch.no_grad():
    for name, param in model.named_parameters():
      if re.search(pattern, name):
        param.add_(0.3 * torch.randn_like(param))


def hf_t5(feed_forward_proj: str, tied: bool, seed: int = 0, vocab_size: int = VOCAB):
  """A tiny random HF T5: 1.0 is ('relu', tied=True), 1.1 ('gated-gelu', tied=False)."""
  torch.manual_seed(seed)
  config = transformers.T5Config(
      vocab_size=vocab_size, d_model=32, d_kv=8, d_ff=64, num_heads=4, num_layers=2,
      num_decoder_layers=3, relative_attention_num_buckets=16,
      relative_attention_max_distance=20, dropout_rate=0.0, feed_forward_proj=feed_forward_proj,
      tie_word_embeddings=tied, decoder_start_token_id=0, pad_token_id=0)
  model = transformers.T5ForConditionalGeneration(config).eval()
  _randomize(model, r'layer_norm|relative_attention_bias')
  if not tied:
    # transformers 5 ties lm_head to `shared` even with tie_word_embeddings=False.
    model.lm_head.weight = torch.nn.Parameter(torch.randn(vocab_size, 32) * 32**-0.5)
    assert model.lm_head.weight.data_ptr() != model.shared.weight.data_ptr()
  return model


def hf_llama(tied: bool, seed: int = 0, num_heads: int = 4, num_kv_heads: int = 2,
             vocab_size: int = VOCAB):
  """A tiny random HF Llama with grouped-query attention and RoPE theta 5e5."""
  torch.manual_seed(seed)
  config = transformers.LlamaConfig(
      vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
      num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
      max_position_embeddings=64,
      rope_parameters={'rope_type': 'default', 'rope_theta': 500000.0}, rms_norm_eps=1e-5,
      initializer_range=0.2, tie_word_embeddings=tied)
  model = transformers.LlamaForCausalLM(config).eval()
  _randomize(model, r'norm')
  return model


def right_padded(lengths: list[int], seed: int) -> np.ndarray:
  """Random nonzero tokens [len(lengths), max(lengths)], right-padded with 0."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(1, VOCAB, size=(len(lengths), max(lengths)))
  return np.where(np.arange(max(lengths)) < np.array(lengths)[:, None], tokens, 0)


def state_dict(model: torch.nn.Module) -> dict[str, np.ndarray]:
  return {name: t.detach().numpy() for name, t in model.state_dict().items()}


def _assert_close(ours, theirs: torch.Tensor, valid: np.ndarray):
  diff = np.abs(np.asarray(ours) - theirs.detach().numpy())[valid].max()
  print(f'max abs logits diff: {diff:.2e}')
  assert diff <= TOLERANCE


def _check_t5(model, config: models.ModelConfig, params):
  inputs = right_padded([40, 23], seed=1)  # 40 > max_distance: log and clipped buckets
  labels = right_padded([12, 7], seed=2)
  decoder_inputs = np.pad(labels, ((0, 0), (1, 0)))[:, :-1]  # shifted right, start id 0
  with torch.no_grad():
    theirs = model(input_ids=torch.tensor(inputs), attention_mask=torch.tensor(inputs > 0),
                   decoder_input_ids=torch.tensor(decoder_inputs)).logits
  ours = models.build_model(config).apply(
      {'params': params}, encoder_input_tokens=inputs, decoder_input_tokens=decoder_inputs,
      decoder_target_tokens=labels)
  _assert_close(ours, theirs, labels > 0)


def _check_llama(model, config: models.ModelConfig, params):
  tokens = right_padded([20, 13, 5], seed=3)
  mask = (tokens > 0).astype(np.int32)
  with torch.no_grad():
    theirs = model(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask)).logits
  ours = models.build_model(config).apply(
      {'params': params}, decoder_input_tokens=tokens, decoder_segment_ids=mask)
  _assert_close(ours, theirs, mask > 0)


def check_logits(model, config: models.ModelConfig, params):
  """Our logits with `params` equal the HF model's on padded batches (<= TOLERANCE)."""
  check = _check_t5 if config.architecture == 'encoder_decoder' else _check_llama
  check(model, config, params)


HF_MODELS = {
    't5_1_1': lambda: hf_t5('gated-gelu', tied=False),
    't5_1_0': lambda: hf_t5('relu', tied=True),
    'llama': lambda: hf_llama(tied=False),
    'llama_tied': lambda: hf_llama(tied=True),
}


@pytest.mark.parametrize('name', sorted(HF_MODELS))
def test_logits_match_hf(name):
  model = HF_MODELS[name]()
  config = hf.config_from_hf(model.config.to_dict())
  check_logits(model, config, hf.params_from_hf(state_dict(model), config))


def test_config_from_hf_fields():
  t5 = hf.config_from_hf(hf_t5('gated-gelu', tied=False).config.to_dict())
  assert (t5.num_encoder_layers, t5.num_decoder_layers, t5.head_dim) == (2, 3, 8)
  assert t5.activations == ('gelu', 'linear') and not t5.logits_via_embedding
  llama = hf.config_from_hf(hf_llama(tied=True).config.to_dict(), dtype='bfloat16')
  assert (llama.num_heads, llama.num_kv_heads, llama.head_dim) == (4, 2, 8)
  assert llama.rope_theta == 500000.0 and llama.logits_via_embedding
  assert not llama.scale_tied_logits and llama.dtype == 'bfloat16'


def test_config_from_legacy_hf_dicts():
  """Configs written by transformers 4: top-level rope_theta, T5 tie flag."""
  llama = hf.config_from_hf({
      'model_type': 'llama', 'vocab_size': 10, 'hidden_size': 16, 'intermediate_size': 32,
      'num_hidden_layers': 1, 'num_attention_heads': 2, 'rms_norm_eps': 1e-6,
      'rope_theta': 1234.0, 'rope_scaling': None})
  assert (llama.rope_theta, llama.head_dim, llama.num_kv_heads) == (1234.0, 8, 2)
  t5_fields = {
      'model_type': 't5', 'vocab_size': 10, 'd_model': 16, 'd_kv': 4, 'd_ff': 32,
      'num_heads': 4, 'num_layers': 2, 'relative_attention_num_buckets': 32,
      'relative_attention_max_distance': 128, 'layer_norm_epsilon': 1e-6,
      'feed_forward_proj': 'relu'}
  assert hf.config_from_hf(t5_fields).logits_via_embedding  # T5's default: tied
  assert not hf.config_from_hf({**t5_fields, 'tie_word_embeddings': False}).logits_via_embedding


def test_scan_layers_logits_match_hf():
  model = hf_llama(tied=False)
  config = hf.config_from_hf(model.config.to_dict(), scan_layers=True)
  params = hf.params_from_hf(state_dict(model), config)
  assert params['decoder']['layers']['mlp']['wo']['kernel'].shape == (2, 64, 32)
  check_logits(model, config, params)


def test_scan_layers_encoder_decoder_tree():
  model = hf_t5('gated-gelu', tied=False)
  config = hf.config_from_hf(model.config.to_dict(), scan_layers=True)
  params = hf.params_from_hf(state_dict(model), config)
  unscanned = hf.params_from_hf(state_dict(model), dataclasses.replace(config, scan_layers=False))
  np.testing.assert_array_equal(
      params['decoder']['layers']['cross_attention']['out']['kernel'][2],
      unscanned['decoder']['layers_2']['cross_attention']['out']['kernel'])


@pytest.mark.parametrize('name, max_shard_size', [
    ('t5_1_1', None), ('llama_tied', None), ('t5_1_0', '40KB'), ('llama', '40KB')])
def test_load_hf_checkpoint(tmp_path, name, max_shard_size):
  model = HF_MODELS[name]()
  kwargs = {'max_shard_size': max_shard_size} if max_shard_size else {}
  model.save_pretrained(tmp_path, **kwargs)
  assert (tmp_path / 'model.safetensors.index.json').exists() == bool(max_shard_size)
  config, params = hf_io.load_hf_checkpoint(str(tmp_path))
  check_logits(model, config, params)


@pytest.mark.parametrize('bidirectional', [True, False])
@pytest.mark.parametrize('num_buckets, max_distance', [(32, 128), (16, 20)])
def test_relative_position_bucket_matches_hf(bidirectional, num_buckets, max_distance):
  offsets = np.arange(-300, 300)
  theirs = T5Attention._relative_position_bucket(  # pylint: disable=protected-access
      torch.tensor(offsets), bidirectional, num_buckets, max_distance).numpy()
  ours = layers.relative_position_bucket(
      jnp.asarray(offsets), bidirectional, num_buckets, max_distance)
  np.testing.assert_array_equal(np.asarray(ours), theirs)


@pytest.mark.parametrize('field, value, match', [
    ('model_type', 'bert', r"model_type 'bert'.*\['llama', 't5'\]"),
    ('hidden_act', 'gelu', 'hidden_act'),
    ('attention_bias', True, 'attention_bias'),
    ('rope_parameters', {'rope_type': 'llama3', 'rope_theta': 1.0, 'factor': 8.0}, 'llama3'),
    ('vocab_size', None, 'vocab_size'),
])
def test_config_from_hf_rejects(field, value, match):
  hf_config = {**hf_llama(tied=False).config.to_dict(), field: value}
  with pytest.raises(ValueError, match=match):
    hf.config_from_hf(hf_config)


def test_config_from_hf_rejects_t5_feed_forward():
  hf_config = {**hf_t5('relu', tied=True).config.to_dict(), 'feed_forward_proj': 'gated-silu'}
  with pytest.raises(ValueError, match='feed_forward_proj'):
    hf.config_from_hf(hf_config)


@pytest.fixture(name='llama')
def _llama_fixture():
  model = hf_llama(tied=False)
  return state_dict(model), hf.config_from_hf(model.config.to_dict())


def test_params_from_hf_missing_tensor(llama):
  state_dict, config = llama
  del state_dict['model.layers.1.mlp.up_proj.weight']
  with pytest.raises(ValueError, match=re.escape(
      "Missing HF tensor(s) 'model.layers.1.mlp.up_proj.weight' (shape (64, 32))")):
    hf.params_from_hf(state_dict, config)


def test_params_from_hf_wrong_dtype(llama):
  state_dict, config = llama
  state_dict['model.norm.weight'] = np.ones(32, np.int64)
  with pytest.raises(ValueError, match=re.escape(
      "'model.norm.weight' has dtype int64; expected floats (float16/bfloat16/float32/float64) "
      "of shape (32,)")):
    hf.params_from_hf(state_dict, config)


def test_params_from_hf_reads_bfloat16(llama):
  state_dict, config = llama
  bf16 = {name: value.astype(jnp.bfloat16) for name, value in state_dict.items()}
  params = hf.params_from_hf(bf16, config)
  np.testing.assert_array_equal(params['decoder']['final_norm']['scale'],
                                bf16['model.norm.weight'].astype(np.float32))


def test_params_from_hf_wrong_shape(llama):
  state_dict, config = llama
  state_dict['model.layers.0.self_attn.k_proj.weight'] = np.zeros((32, 32), np.float32)
  with pytest.raises(ValueError, match=re.escape(
      "'model.layers.0.self_attn.k_proj.weight' has shape (32, 32); expected (16, 32)")):
    hf.params_from_hf(state_dict, config)


def test_params_from_hf_unused_tensor(llama):
  state_dict, config = llama
  state_dict['model.layers.2.mlp.up_proj.weight'] = state_dict['model.layers.1.mlp.up_proj.weight']
  with pytest.raises(ValueError, match=re.escape("Unused HF tensor(s) ['model.layers.2.mlp")):
    hf.params_from_hf(state_dict, config)


def test_params_from_hf_untied_lm_head_with_tied_config(llama):
  state_dict, config = llama
  with pytest.raises(ValueError, match="'lm_head.weight' differs from 'model.embed_tokens"):
    hf.params_from_hf(state_dict, dataclasses.replace(config, logits_via_embedding=True))
