"""Imports Hugging Face T5 and Llama checkpoints: their config and weights to ours.

HF names each weight in a flat state dict; a table of `_Tensor` rules, built per model family
from the config, says where each one goes in our params tree and how its layout changes. A
torch `Linear` weight is `[out, in]`; our `DenseGeneral` kernels are `[in..., out...]`, so it
is transposed and its flat dims split into heads where needed.
"""

import dataclasses
import json
import math
import os
import re
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple, NoReturn

import jax
import numpy as np
from flax import traverse_util
from safetensors.numpy import load_file

from t5x_lite import models

Params = dict[str, Any]

# T5's `feed_forward_proj` -> our MLP activations (HF's 'gated-gelu' is the tanh gelu).
_T5_FEED_FORWARD = {'relu': ('relu',), 'gated-gelu': ('gelu', 'linear')}

# HF submodule names -> ours. T5's MLP names ('wi', 'wi_0', 'wi_1', 'wo') already are ours.
_T5_ATTENTION = {'q': 'query', 'k': 'key', 'v': 'value', 'o': 'out'}
_LLAMA_ATTENTION = {'q_proj': 'query', 'k_proj': 'key', 'v_proj': 'value', 'o_proj': 'out'}
_LLAMA_MLP = {'gate_proj': 'wi_0', 'up_proj': 'wi_1', 'down_proj': 'wo'}

# Our kernels that contract more than one input axis: attention's output [heads, kv, embed].
_KERNEL_IN_AXES = {'out': 2}


class _Tensor(NamedTuple):
  """Where one HF tensor goes: a '/'-joined path into our params.

  `linear_in_axes` > 0 marks a torch Linear weight [out, in], whose `in` becomes that many
  leading axes of our kernel and `out` the rest; 0 copies the tensor as it is.
  """

  hf_name: str
  path: str
  linear_in_axes: int = 0


class _Family(NamedTuple):
  """How one HF model family's state dict maps onto our params."""

  embedding: str  # the HF token embedding
  tensors: Callable[[models.ModelConfig], list[_Tensor]]
  tied_copies: tuple[str, ...]  # HF tensors that must equal `embedding`; not loaded
  ignored: str  # regex of HF buffers that we recompute or never use


# ----------------------------------------------------------------------------------------------
# Config.


def config_from_hf(hf_config: Mapping[str, Any], **overrides: Any) -> models.ModelConfig:
  """Translates an HF `config.json` dict (T5 or Llama) into our model config.

  Args:
    hf_config: the dict of an HF config, as `PretrainedConfig.to_dict()` gives.
    **overrides: our config fields to set on top, e.g. `dtype` or `scan_layers`.

  Returns:
    The matching `models.ModelConfig`.

  Raises:
    ValueError: for an unsupported `model_type`, a missing field or a feature we lack.
  """
  model_type = hf_config.get('model_type')
  if model_type not in _CONFIG_FIELDS:
    raise ValueError(f'Unsupported HF model_type {model_type!r}; supported: '
                     f'{sorted(_CONFIG_FIELDS)}.')
  fields = _CONFIG_FIELDS[model_type](hf_config)
  return models.ModelConfig.from_dict({**fields, **overrides})


def _field(hf_config: Mapping[str, Any], name: str) -> Any:
  """A required HF config field."""
  if hf_config.get(name) is None:
    raise ValueError(f'HF {hf_config["model_type"]} config has no {name!r}.')
  return hf_config[name]


def _unsupported(hf_config: Mapping[str, Any], name: str, value: Any, allowed: str) -> NoReturn:
  raise ValueError(f'Unsupported HF {hf_config["model_type"]} config: {name}={value!r}; '
                   f'must be {allowed}.')


def _t5_config(hf: Mapping[str, Any]) -> dict[str, Any]:
  feed_forward = _field(hf, 'feed_forward_proj')
  if feed_forward not in _T5_FEED_FORWARD:
    _unsupported(hf, 'feed_forward_proj', feed_forward, f'one of {sorted(_T5_FEED_FORWARD)}')
  # T5 1.0 ties the output layer to the embedding and scales its input by d_model**-0.5;
  # T5 1.1 does neither. transformers >= 5 always writes tie_word_embeddings=True for T5 and
  # keeps the original flag as `scale_decoder_outputs`.
  tied = hf.get('scale_decoder_outputs', hf.get('tie_word_embeddings', True))
  num_layers = _field(hf, 'num_layers')
  return dict(
      architecture='encoder_decoder', vocab_size=_field(hf, 'vocab_size'),
      d_model=_field(hf, 'd_model'), num_heads=_field(hf, 'num_heads'),
      head_dim=_field(hf, 'd_kv'), d_ff=_field(hf, 'd_ff'), num_encoder_layers=num_layers,
      num_decoder_layers=hf.get('num_decoder_layers') or num_layers,
      activations=_T5_FEED_FORWARD[feed_forward], dropout_rate=hf.get('dropout_rate', 0.0),
      logits_via_embedding=bool(tied), scale_tied_logits=True,
      position_embedding='relative',
      relative_attention_num_buckets=_field(hf, 'relative_attention_num_buckets'),
      relative_attention_max_distance=_field(hf, 'relative_attention_max_distance'),
      scale_attention_logits=False, norm_eps=_field(hf, 'layer_norm_epsilon'))


def _llama_rope_theta(hf: Mapping[str, Any]) -> float:
  """RoPE base from `rope_parameters` (transformers >= 5) or older `rope_theta`/`rope_scaling`."""
  rope = hf.get('rope_parameters') or hf.get('rope_scaling') or {}
  rope_type = rope.get('rope_type', rope.get('type', 'default'))
  if rope_type != 'default':
    _unsupported(hf, 'rope_type', rope_type, "'default' (RoPE scaling is not implemented)")
  if rope.get('partial_rotary_factor', 1.0) != 1.0:
    _unsupported(hf, 'partial_rotary_factor', rope['partial_rotary_factor'], '1.0')
  return float(rope.get('rope_theta', hf.get('rope_theta', 10000.0)))


def _llama_config(hf: Mapping[str, Any]) -> dict[str, Any]:
  for name, allowed in (('hidden_act', 'silu'), ('attention_bias', False), ('mlp_bias', False)):
    if hf.get(name, allowed) != allowed:
      _unsupported(hf, name, hf[name], repr(allowed))
  num_heads = _field(hf, 'num_attention_heads')
  d_model = _field(hf, 'hidden_size')
  return dict(
      architecture='decoder_only', vocab_size=_field(hf, 'vocab_size'), d_model=d_model,
      num_heads=num_heads, num_kv_heads=hf.get('num_key_value_heads') or num_heads,
      head_dim=hf.get('head_dim') or d_model // num_heads,
      d_ff=_field(hf, 'intermediate_size'), num_decoder_layers=_field(hf, 'num_hidden_layers'),
      activations=('silu', 'linear'), dropout_rate=0.0,
      logits_via_embedding=bool(hf.get('tie_word_embeddings', False)),
      scale_tied_logits=False, position_embedding='rope', rope_theta=_llama_rope_theta(hf),
      scale_attention_logits=True, norm_eps=_field(hf, 'rms_norm_eps'))


_CONFIG_FIELDS = {'t5': _t5_config, 'llama': _llama_config}


# ----------------------------------------------------------------------------------------------
# Weights.


def _linears(hf_prefix: str, path: str, names: Mapping[str, str]) -> list[_Tensor]:
  """Rules for the torch Linear weights `{hf_prefix}.{name}.weight` of one submodule."""
  return [
      _Tensor(f'{hf_prefix}.{hf}.weight', f'{path}/{ours}/kernel', _KERNEL_IN_AXES.get(ours, 1))
      for hf, ours in names.items()]


def _norm(hf_prefix: str, path: str) -> _Tensor:
  return _Tensor(f'{hf_prefix}.weight', f'{path}/scale')


def _output_layer(config: models.ModelConfig) -> list[_Tensor]:
  return [] if config.logits_via_embedding else [
      _Tensor('lm_head.weight', 'logits_dense/kernel', 1)]


def _t5_tensors(config: models.ModelConfig) -> list[_Tensor]:
  mlp_names = ('wi',) if len(config.activations) == 1 else tuple(
      f'wi_{i}' for i in range(len(config.activations)))
  mlp = {name: name for name in mlp_names + ('wo',)}
  # Per stack: its sublayers in HF's order, as (HF module, our module, names, our norm).
  stacks = {
      'encoder': (config.num_encoder_layers,
                  [('SelfAttention', 'self_attention', _T5_ATTENTION, 'pre_self_attention_norm'),
                   ('DenseReluDense', 'mlp', mlp, 'pre_mlp_norm')]),
      'decoder': (config.num_decoder_layers,
                  [('SelfAttention', 'self_attention', _T5_ATTENTION, 'pre_self_attention_norm'),
                   ('EncDecAttention', 'cross_attention', _T5_ATTENTION,
                    'pre_cross_attention_norm'),
                   ('DenseReluDense', 'mlp', mlp, 'pre_mlp_norm')]),
  }
  tensors = [_Tensor('shared.weight', 'token_embedder/embedding')] + _output_layer(config)
  for stack, (num_layers, sublayers) in stacks.items():
    tensors += [
        _Tensor(f'{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight',
                f'{stack}_relpos/rel_embedding', 1),
        _norm(f'{stack}.final_layer_norm', f'{stack}/final_norm')]
    for i in range(num_layers):
      for j, (hf_module, module, names, norm) in enumerate(sublayers):
        hf_prefix, path = f'{stack}.block.{i}.layer.{j}', f'{stack}/layers_{i}'
        tensors += _linears(f'{hf_prefix}.{hf_module}', f'{path}/{module}', names)
        tensors.append(_norm(f'{hf_prefix}.layer_norm', f'{path}/{norm}'))
  return tensors


def _llama_tensors(config: models.ModelConfig) -> list[_Tensor]:
  tensors = [_Tensor('model.embed_tokens.weight', 'token_embedder/embedding'),
             _norm('model.norm', 'decoder/final_norm')] + _output_layer(config)
  for i in range(config.num_decoder_layers):
    hf_prefix, path = f'model.layers.{i}', f'decoder/layers_{i}'
    tensors += _linears(f'{hf_prefix}.self_attn', f'{path}/self_attention', _LLAMA_ATTENTION)
    tensors += _linears(f'{hf_prefix}.mlp', f'{path}/mlp', _LLAMA_MLP)
    tensors += [_norm(f'{hf_prefix}.input_layernorm', f'{path}/pre_self_attention_norm'),
                _norm(f'{hf_prefix}.post_attention_layernorm', f'{path}/pre_mlp_norm')]
  return tensors


_T5 = _Family('shared.weight', _t5_tensors,
              ('encoder.embed_tokens.weight', 'decoder.embed_tokens.weight'),
              r'decoder\.block\.0\.layer\.1\.EncDecAttention\.relative_attention_bias\.weight')
_LLAMA = _Family('model.embed_tokens.weight', _llama_tensors, (),
                 r'model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq')


def _family(config: models.ModelConfig) -> _Family:
  """T5 for encoder-decoders with relative bias, Llama for decoder-only with RoPE."""
  layout = (config.architecture, config.position_embedding)
  families = {('encoder_decoder', 'relative'): _T5, ('decoder_only', 'rope'): _LLAMA}
  if layout not in families:
    raise ValueError(f'No HF layout for architecture={layout[0]!r} with '
                     f'position_embedding={layout[1]!r}; supported: {sorted(families)}.')
  return families[layout]


def _hf_shape(tensor: _Tensor, shape: tuple[int, ...]) -> tuple[int, ...]:
  """The HF shape of a tensor whose shape in our params is `shape`."""
  n = tensor.linear_in_axes
  return (math.prod(shape[n:]), math.prod(shape[:n])) if n else shape


def _convert(tensor: _Tensor, value: Any, shape: tuple[int, ...]) -> np.ndarray:
  """One HF tensor, checked against its expected shape, in our float32 layout."""
  array = np.asarray(value, dtype=np.float32)
  expected = _hf_shape(tensor, shape)
  if array.shape != expected:
    raise ValueError(f'HF tensor {tensor.hf_name!r} has shape {array.shape}; expected '
                     f'{expected} (for {tensor.path} of shape {shape}).')
  return array.T.reshape(shape) if tensor.linear_in_axes else array


def _check_tied_copies(state_dict: Mapping[str, Any], family: _Family,
                       config: models.ModelConfig) -> set[str]:
  """The tied copies of the embedding present in `state_dict`, checked to equal it."""
  names = family.tied_copies + (('lm_head.weight',) if config.logits_via_embedding else ())
  present = {name for name in names if name in state_dict}
  for name in sorted(present):
    if not np.array_equal(np.asarray(state_dict[name]), np.asarray(state_dict[family.embedding])):
      raise ValueError(f'HF tensor {name!r} differs from {family.embedding!r}, of which it '
                       f'should be a tied copy (logits_via_embedding='
                       f'{config.logits_via_embedding}).')
  return present


def _stack_layers(stack: Params) -> Params:
  """Replaces `layers_0..N-1` by one `layers` subtree stacked on a new axis 0 (nn.scan)."""
  per_layer = [stack[f'layers_{i}'] for i in range(sum(k.startswith('layers_') for k in stack))]
  rest = {k: v for k, v in stack.items() if not k.startswith('layers_')}
  return {**rest, 'layers': jax.tree.map(lambda *xs: np.stack(xs), *per_layer)}


def _check_tree(params: Params, config: models.ModelConfig):
  """Raises unless `params` has exactly the paths and shapes of `models.param_shapes`."""
  got = {k: v.shape for k, v in traverse_util.flatten_dict(params, sep='/').items()}
  want = {k: v.shape for k, v in
          traverse_util.flatten_dict(models.param_shapes(config), sep='/').items()}
  if got != want:
    diff = sorted(k for k in got.keys() | want.keys() if got.get(k) != want.get(k))
    raise ValueError(f'Converted params do not match the model at {diff}: got '
                     f'{[got.get(k) for k in diff]}, expected {[want.get(k) for k in diff]}.')


def params_from_hf(state_dict: Mapping[str, Any], config: models.ModelConfig) -> Params:
  """Converts an HF T5 or Llama state dict into our params for `config`.

  Args:
    state_dict: HF tensor name -> array (numpy, any float dtype).
    config: our model config, e.g. from `config_from_hf`.

  Returns:
    Nested dicts of float32 numpy arrays with the tree of `models.init_params(config, ...)`.

  Raises:
    ValueError: naming any missing tensor, a tensor of the wrong shape, a tied copy that
      differs from the embedding, or unused tensors.
  """
  family = _family(config)
  tensors = family.tensors(config)
  missing = [t.hf_name for t in tensors if t.hf_name not in state_dict]
  if missing:
    raise ValueError(f'Missing HF tensor(s) {missing}.')
  used = {t.hf_name for t in tensors} | _check_tied_copies(state_dict, family, config)
  unused = sorted(name for name in set(state_dict) - used if not re.fullmatch(family.ignored, name))
  if unused:
    raise ValueError(f'Unused HF tensor(s) {unused}.')

  unscanned = dataclasses.replace(config, scan_layers=False)
  shapes = traverse_util.flatten_dict(models.param_shapes(unscanned), sep='/')
  params = traverse_util.unflatten_dict(
      {t.path: _convert(t, state_dict[t.hf_name], shapes[t.path].shape) for t in tensors},
      sep='/')
  if config.scan_layers:
    params = {k: _stack_layers(v) if k in ('encoder', 'decoder') else v
              for k, v in params.items()}
  _check_tree(params, config)
  return params


# ----------------------------------------------------------------------------------------------
# Files.


def load_hf_state_dict(path: str) -> dict[str, np.ndarray]:
  """Reads the safetensors weights of an HF checkpoint directory (single file or sharded).

  Args:
    path: a directory with `model.safetensors` or `model.safetensors.index.json` + shards.

  Returns:
    HF tensor name -> numpy array, in the stored dtype.
  """
  single = os.path.join(path, 'model.safetensors')
  if os.path.exists(single):
    return load_file(single)
  index = os.path.join(path, 'model.safetensors.index.json')
  if not os.path.exists(index):
    raise FileNotFoundError(f'No model.safetensors or model.safetensors.index.json in {path}.')
  with open(index) as f:
    shards = sorted(set(json.load(f)['weight_map'].values()))
  return {name: array for shard in shards
          for name, array in load_file(os.path.join(path, shard)).items()}


def load_hf_checkpoint(path: str, **overrides: Any) -> tuple[models.ModelConfig, Params]:
  """Our config and params from an HF checkpoint directory (`config.json` + safetensors).

  Args:
    path: the checkpoint directory, as written by `save_pretrained`.
    **overrides: our config fields to set, as in `config_from_hf`.
  """
  with open(os.path.join(path, 'config.json')) as f:
    config = config_from_hf(json.load(f), **overrides)
  return config, params_from_hf(load_hf_state_dict(path), config)
