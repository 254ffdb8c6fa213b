"""Hugging Face T5 and Llama checkpoints to ours and back: configs and weights.

HF names each weight in a flat state dict; a table of `_Tensor` rules, built per model family
from the config, says where each one goes in our params tree and how its layout changes. A
torch `Linear` weight is `[out, in]`; our `DenseGeneral` kernels are `[in..., out...]`, so it
is transposed and its flat dims split into heads where needed. The same rules run both ways:
`params_from_source` reads any slice of our params from HF tensors (so each device of a mesh
reads only its shard), `params_to_hf` writes our params as an HF state dict.
"""

import dataclasses
import math
import re
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple, NoReturn

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from t5x_lite import models

Params = dict[str, Any]
Index = tuple[slice, ...]

# T5's `feed_forward_proj` -> our MLP activations (HF's 'gated-gelu' is the tanh gelu).
_T5_FEED_FORWARD = {'relu': ('relu',), 'gated-gelu': ('gelu', 'linear')}

# HF submodule names -> ours. T5's MLP names ('wi', 'wi_0', 'wi_1', 'wo') already are ours.
_T5_ATTENTION = {'q': 'query', 'k': 'key', 'v': 'value', 'o': 'out'}
_LLAMA_ATTENTION = {'q_proj': 'query', 'k_proj': 'key', 'v_proj': 'value', 'o_proj': 'out'}
_LLAMA_MLP = {'gate_proj': 'wi_0', 'up_proj': 'wi_1', 'down_proj': 'wo'}

# Our kernels that contract more than one input axis: attention's output [heads, kv, embed].
_KERNEL_IN_AXES = {'out': 2}

_FLOAT_DTYPES = ('float16', 'bfloat16', 'float32', 'float64')

# Fields that change no weight and no logit, carried over as they are on export.
_RUN_FIELDS = ('dropout_rate', 'embedding_init_stddev', 'dtype', 'scan_layers', 'remat_policy')


class _Tensor(NamedTuple):
  """Where one HF tensor goes: a '/'-joined path into our (unscanned) params.

  `linear_in_axes` > 0 marks a torch Linear weight [out, in], whose `in` becomes that many
  leading axes of our kernel and `out` the rest; 0 copies the tensor as it is.
  """

  hf_name: str
  path: str
  linear_in_axes: int = 0


class _Family(NamedTuple):
  """How one HF model family maps onto our configs and params."""

  model_type: str
  # (HF config, output_layer) -> our config fields; see `config_from_hf`.
  from_hf: Callable[[Mapping[str, Any], bool | None], dict[str, Any]]
  to_hf: Callable[[models.ModelConfig], dict[str, Any]]  # and back
  embedding: str  # the HF token embedding
  tensors: Callable[[models.ModelConfig], list[_Tensor]]
  tied_copies: tuple[str, ...]  # HF tensors that must equal `embedding`; not loaded
  ignored: str  # regex of HF buffers that we recompute or never use
  tokenizer_file: str  # the SentencePiece model's name in an HF directory


class TensorSource:
  """Named arrays read by slice: an in-memory state dict here, files in `hf_io`."""

  def __init__(self, state_dict: Mapping[str, Any]):
    self._arrays = {name: np.asarray(value) for name, value in state_dict.items()}

  def names(self) -> set[str]:
    return set(self._arrays)

  def shape(self, name: str) -> tuple[int, ...]:
    return self._arrays[name].shape

  def dtype(self, name: str) -> str:
    """The dtype's name, e.g. 'bfloat16' or 'int64'."""
    return str(self._arrays[name].dtype)

  def read(self, name: str, index: Index) -> np.ndarray:
    """The slice `index` of tensor `name`, in its stored dtype."""
    return self._arrays[name][index]


# ----------------------------------------------------------------------------------------------
# Config.


def config_from_hf(hf_config: Mapping[str, Any], output_layer: bool | None = None,
                   **overrides: Any) -> models.ModelConfig:
  """Translates an HF `config.json` dict (T5 or Llama) into our model config.

  Args:
    hf_config: the dict of an HF config, as `PretrainedConfig.to_dict()` gives.
    output_layer: whether the checkpoint holds an `lm_head.weight` (`has_output_layer`).
      transformers >= 5 writes `tie_word_embeddings: true` for every T5 and ties its head
      unless the checkpoint has its own, so for T5 the tensors decide; None guesses from the
      config alone (for Llama the config is exact).
    **overrides: our config fields to set on top, e.g. `dtype` or `scan_layers`.

  Returns:
    The matching `models.ModelConfig`.

  Raises:
    ValueError: for an unsupported `model_type`, a missing field or a feature we lack.
  """
  model_type = hf_config.get('model_type')
  if model_type not in _FAMILIES:
    raise ValueError(f'Unsupported HF model_type {model_type!r}; supported: '
                     f'{sorted(_FAMILIES)}.')
  fields = _FAMILIES[model_type].from_hf(hf_config, output_layer)
  return models.ModelConfig.from_dict({**fields, **overrides})


def config_to_hf(config: models.ModelConfig) -> dict[str, Any]:
  """Our model config as an HF `config.json` dict that `from_pretrained` reads.

  Raises:
    ValueError: naming each of our fields that the HF family cannot express (e.g. T5 with
      RoPE, or Llama with T5's scaled tied logits).
  """
  family = _family(config)
  hf_config = family.to_hf(config)
  # Reading the HF config back must give our config: any field it changes is lost in HF.
  unused = {name: getattr(config, name) for name in _unused_fields(config)}
  back = config_from_hf(hf_config, not config.logits_via_embedding, **unused)
  lost = [f.name for f in dataclasses.fields(config)
          if getattr(back, f.name) != getattr(config, f.name)]
  if lost:
    raise ValueError(f'Cannot export to HF {family.model_type}: ' + ', '.join(
        f'{name}={getattr(config, name)!r} (HF {family.model_type} has '
        f'{getattr(back, name)!r})' for name in lost) + '.')
  return hf_config


def _unused_fields(config: models.ModelConfig) -> list[str]:
  """Fields with no effect on this config's weights or logits."""
  unused = list(_RUN_FIELDS)
  if config.architecture == 'decoder_only':
    unused.append('num_encoder_layers')
  if config.position_embedding == 'rope':
    unused += ['relative_attention_num_buckets', 'relative_attention_max_distance']
  else:
    unused.append('rope_theta')
  if not config.logits_via_embedding:
    unused.append('scale_tied_logits')
  return unused


def _field(hf_config: Mapping[str, Any], name: str) -> Any:
  """A required HF config field."""
  if hf_config.get(name) is None:
    raise ValueError(f'HF {hf_config["model_type"]} config has no {name!r}.')
  return hf_config[name]


def _unsupported(hf_config: Mapping[str, Any], name: str, value: Any, allowed: str) -> NoReturn:
  raise ValueError(f'Unsupported HF {hf_config["model_type"]} config: {name}={value!r}; '
                   f'must be {allowed}.')


def _t5_config(hf: Mapping[str, Any], output_layer: bool | None) -> dict[str, Any]:
  feed_forward = _field(hf, 'feed_forward_proj')
  if feed_forward not in _T5_FEED_FORWARD:
    _unsupported(hf, 'feed_forward_proj', feed_forward, f'one of {sorted(_T5_FEED_FORWARD)}')
  # T5 1.0 ties the output layer to the embedding and scales its input by d_model**-0.5;
  # T5 1.1 does neither. transformers 4 did both exactly when `tie_word_embeddings` (default
  # True) was set. transformers 5 scales by `scale_decoder_outputs` and always writes
  # tie_word_embeddings=True: it ties the head unless the checkpoint has its own lm_head, so
  # a T5.1.1 built and saved by it is tied but unscaled. An lm_head.weight beside a scaled
  # (T5 1.0) head must be a tied copy (`_check_tied_copies` verifies it); beside an unscaled
  # head it is used as it is, which gives the same logits when it is a copy.
  scaled = bool(hf.get('scale_decoder_outputs', hf.get('tie_word_embeddings', True)))
  tied = scaled if output_layer is None else scaled or not output_layer
  num_layers = _field(hf, 'num_layers')
  return dict(
      architecture='encoder_decoder', vocab_size=_field(hf, 'vocab_size'),
      d_model=_field(hf, 'd_model'), num_heads=_field(hf, 'num_heads'),
      head_dim=_field(hf, 'd_kv'), d_ff=_field(hf, 'd_ff'), num_encoder_layers=num_layers,
      num_decoder_layers=hf.get('num_decoder_layers') or num_layers,
      activations=_T5_FEED_FORWARD[feed_forward], dropout_rate=hf.get('dropout_rate', 0.0),
      logits_via_embedding=tied, scale_tied_logits=scaled,
      position_embedding='relative',
      relative_attention_num_buckets=_field(hf, 'relative_attention_num_buckets'),
      relative_attention_max_distance=_field(hf, 'relative_attention_max_distance'),
      scale_attention_logits=False, norm_eps=_field(hf, 'layer_norm_epsilon'),
      decoder_start_token_id=hf.get('decoder_start_token_id') or 0)


def _t5_to_hf(config: models.ModelConfig) -> dict[str, Any]:
  feed_forward = {acts: name for name, acts in _T5_FEED_FORWARD.items()}.get(config.activations)
  if feed_forward is None:
    raise ValueError(f'Cannot export to HF t5: activations={config.activations!r}; must be '
                     f'one of {sorted(_T5_FEED_FORWARD.values())}.')
  tied = config.logits_via_embedding
  scaled = tied and config.scale_tied_logits
  return dict(
      architectures=['T5ForConditionalGeneration'], model_type='t5',
      vocab_size=config.vocab_size, d_model=config.d_model, d_kv=config.head_dim,
      d_ff=config.d_ff, num_heads=config.num_heads, num_layers=config.num_encoder_layers,
      num_decoder_layers=config.num_decoder_layers, feed_forward_proj=feed_forward,
      relative_attention_num_buckets=config.relative_attention_num_buckets,
      relative_attention_max_distance=config.relative_attention_max_distance,
      dropout_rate=config.dropout_rate, layer_norm_epsilon=config.norm_eps,
      # transformers < 5 unties the head on tie_word_embeddings=False and scales exactly when
      # tied (so it misreads a tied, unscaled head); >= 5 always ties T5's config, scales by
      # `scale_decoder_outputs` and keeps an lm_head.weight that differs from shared untied.
      tie_word_embeddings=tied, scale_decoder_outputs=scaled, is_encoder_decoder=True,
      decoder_start_token_id=config.decoder_start_token_id, pad_token_id=0, eos_token_id=1)


def _llama_rope_theta(hf: Mapping[str, Any]) -> float:
  """RoPE base from `rope_parameters` (transformers >= 5) or older `rope_theta`/`rope_scaling`."""
  rope = hf.get('rope_parameters') or hf.get('rope_scaling') or {}
  rope_type = rope.get('rope_type', rope.get('type', 'default'))
  if rope_type != 'default':
    _unsupported(hf, 'rope_type', rope_type, "'default' (RoPE scaling is not implemented)")
  if rope.get('partial_rotary_factor', 1.0) != 1.0:
    _unsupported(hf, 'partial_rotary_factor', rope['partial_rotary_factor'], '1.0')
  return float(rope.get('rope_theta', hf.get('rope_theta', 10000.0)))


def _llama_config(hf: Mapping[str, Any], output_layer: bool | None) -> dict[str, Any]:
  del output_layer  # transformers honours Llama's tie_word_embeddings as written
  for name, allowed in (('hidden_act', 'silu'), ('attention_bias', False), ('mlp_bias', False)):
    if hf.get(name, allowed) != allowed:
      _unsupported(hf, name, hf[name], repr(allowed))
  num_heads = _field(hf, 'num_attention_heads')
  d_model = _field(hf, 'hidden_size')
  return dict(
      architecture='decoder_only', vocab_size=_field(hf, 'vocab_size'), d_model=d_model,
      num_heads=num_heads, num_kv_heads=hf.get('num_key_value_heads') or num_heads,
      head_dim=hf.get('head_dim') or d_model // num_heads,
      d_ff=_field(hf, 'intermediate_size'), num_encoder_layers=0,
      num_decoder_layers=_field(hf, 'num_hidden_layers'), activations=('silu', 'linear'),
      dropout_rate=0.0,
      logits_via_embedding=bool(hf.get('tie_word_embeddings', False)),
      scale_tied_logits=False, position_embedding='rope', rope_theta=_llama_rope_theta(hf),
      scale_attention_logits=True, norm_eps=_field(hf, 'rms_norm_eps'),
      # HF prepends BOS to every sequence; we feed it as the start token. No BOS: 0, as T5.
      decoder_start_token_id=hf.get('bos_token_id', 1) or 0)


def _llama_to_hf(config: models.ModelConfig) -> dict[str, Any]:
  return dict(
      architectures=['LlamaForCausalLM'], model_type='llama', vocab_size=config.vocab_size,
      hidden_size=config.d_model, intermediate_size=config.d_ff,
      num_hidden_layers=config.num_decoder_layers, num_attention_heads=config.num_heads,
      num_key_value_heads=config.num_kv_heads, head_dim=config.head_dim, hidden_act='silu',
      rms_norm_eps=config.norm_eps, tie_word_embeddings=config.logits_via_embedding,
      rope_parameters={'rope_type': 'default', 'rope_theta': config.rope_theta},
      rope_theta=config.rope_theta,  # where transformers < 5 reads it
      attention_bias=False, mlp_bias=False, bos_token_id=config.decoder_start_token_id,
      eos_token_id=2,
      # RoPE has no length limit; HF wants one (generation defaults read it).
      max_position_embeddings=4096)


# ----------------------------------------------------------------------------------------------
# Weight rules.


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


_T5 = _Family('t5', _t5_config, _t5_to_hf, 'shared.weight', _t5_tensors,
              ('encoder.embed_tokens.weight', 'decoder.embed_tokens.weight'),
              r'decoder\.block\.0\.layer\.1\.EncDecAttention\.relative_attention_bias\.weight',
              'spiece.model')
_LLAMA = _Family('llama', _llama_config, _llama_to_hf, 'model.embed_tokens.weight',
                 _llama_tensors, (), r'model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq',
                 'tokenizer.model')
_FAMILIES = {family.model_type: family for family in (_T5, _LLAMA)}


def _family(config: models.ModelConfig) -> _Family:
  """T5 for encoder-decoders with relative bias, Llama for decoder-only with RoPE."""
  layout = (config.architecture, config.position_embedding)
  families = {('encoder_decoder', 'relative'): _T5, ('decoder_only', 'rope'): _LLAMA}
  if layout not in families:
    raise ValueError(f'No HF layout for architecture={layout[0]!r} with '
                     f'position_embedding={layout[1]!r}; supported: {sorted(families)}.')
  return families[layout]


def tokenizer_file(config: models.ModelConfig) -> str:
  """The name HF gives the SentencePiece model of this config's family."""
  return _family(config).tokenizer_file


_LAYER = re.compile(r'/layers_(\d+)/')


def _leaf_rules(config: models.ModelConfig) -> dict[str, list[_Tensor]]:
  """Our param path -> its HF tensors: one, or one per layer (in order) for scanned layers."""
  rules = {}
  for tensor in _family(config).tensors(config):
    path = _LAYER.sub('/layers/', tensor.path) if config.scan_layers else tensor.path
    rules.setdefault(path, []).append(tensor)
  return rules


def _is_scanned(config: models.ModelConfig, path: str) -> bool:
  return config.scan_layers and '/layers/' in path


def _hf_shape(tensor: _Tensor, shape: tuple[int, ...]) -> tuple[int, ...]:
  """The HF shape of a tensor whose (per-layer) shape in our params is `shape`."""
  n = tensor.linear_in_axes
  return (math.prod(shape[n:]), math.prod(shape[:n])) if n else shape


def _flat_shapes(config: models.ModelConfig,
                 rules: Mapping[str, list[_Tensor]]) -> dict[str, tuple[int, ...]]:
  """Our param path -> shape, checked to cover exactly the paths the rules fill."""
  shapes = {path: leaf.shape for path, leaf in
            traverse_util.flatten_dict(models.param_shapes(config), sep='/').items()}
  if shapes.keys() != rules.keys():
    raise ValueError(f'HF rules and model params differ at '
                     f'{sorted(shapes.keys() ^ rules.keys())}.')
  return shapes


# ----------------------------------------------------------------------------------------------
# HF -> ours.


def _check_source(source: TensorSource, config: models.ModelConfig,
                  rules: Mapping[str, list[_Tensor]], shapes: Mapping[str, tuple[int, ...]]):
  """Raises, naming the tensor and its expected HF shape, unless `source` holds every tensor
  the rules need, as floats of the right shape, and nothing else but tied copies and buffers."""
  family = _family(config)
  expected = {}
  for path, tensors in rules.items():
    shape = shapes[path][1:] if _is_scanned(config, path) else shapes[path]
    expected.update({t.hf_name: (_hf_shape(t, shape), t.path, shape) for t in tensors})
  names = source.names()
  missing = [name for name in expected if name not in names]
  if missing:
    listed = ', '.join(f'{name!r} (shape {expected[name][0]})' for name in missing[:3])
    more = f' and {len(missing) - 3} more' if len(missing) > 3 else ''
    raise ValueError(f'Missing HF tensor(s) {listed}{more}.')
  for name, (hf_shape, path, shape) in expected.items():
    if source.shape(name) != hf_shape:
      raise ValueError(f'HF tensor {name!r} has shape {source.shape(name)}; expected {hf_shape} '
                       f'(for {path} of shape {shape}).')
    if source.dtype(name) not in _FLOAT_DTYPES:
      raise ValueError(f'HF tensor {name!r} has dtype {source.dtype(name)}; expected floats '
                       f'({"/".join(_FLOAT_DTYPES)}) of shape {hf_shape}.')
  used = set(expected) | _check_tied_copies(source, family, config)
  unused = sorted(name for name in names - used if not re.fullmatch(family.ignored, name))
  if unused:
    raise ValueError(f'Unused HF tensor(s) {unused}.')


def _check_tied_copies(source: TensorSource, family: _Family,
                       config: models.ModelConfig) -> set[str]:
  """The tied copies of the embedding in `source`, checked to equal it."""
  names = family.tied_copies + (('lm_head.weight',) if config.logits_via_embedding else ())
  present = {name for name in names if name in source.names()}
  for name in sorted(present):
    if not _equal(source, name, family.embedding):
      raise ValueError(f'HF tensor {name!r} differs from {family.embedding!r}, of which it '
                       f'should be a tied copy (logits_via_embedding='
                       f'{config.logits_via_embedding}).')
  return present


def _equal(source: TensorSource, name: str, other: str) -> bool:
  """Whether two tensors are equal, compared a block of rows at a time: no host holds a whole
  embedding."""
  if source.shape(name) != source.shape(other):
    return False
  rows, block = source.shape(name)[0], 4096
  return all(np.array_equal(source.read(name, (slice(i, min(i + block, rows)),)),
                            source.read(other, (slice(i, min(i + block, rows)),)))
             for i in range(0, rows, block))


def has_output_layer(source: TensorSource) -> bool:
  """Whether an HF checkpoint holds an `lm_head.weight` (see `config_from_hf`)."""
  return 'lm_head.weight' in source.names()


def _read(source: TensorSource, tensor: _Tensor, shape: tuple[int, ...],
          index: Index) -> np.ndarray:
  """The slice `index` of our array of shape `shape` made from one HF tensor, in float32.

  A Linear weight is read as the block of rows (our output axes) and columns (input axes)
  that covers the slice: exactly the slice when only the first axis of each group is cut.
  """
  n = tensor.linear_in_axes
  if not n:
    return np.asarray(source.read(tensor.hf_name, index), np.float32)
  ranges, kept_shape, inner = [], [], []
  for dims, slices in ((shape[:n], index[:n]), (shape[n:], index[n:])):  # in, out
    start, stop, _ = slices[0].indices(dims[0])
    size = math.prod(dims[1:])
    ranges.append(slice(start * size, stop * size))
    kept_shape += [stop - start, *dims[1:]]
    inner += [slice(None), *slices[1:]]
  block = source.read(tensor.hf_name, (ranges[1], ranges[0])).T  # [in, out]
  return np.asarray(block.reshape(kept_shape)[tuple(inner)], np.float32)


def _leaf_reader(source: TensorSource, tensors: list[_Tensor], shape: tuple[int, ...],
                 scanned: bool) -> Callable[[Index], np.ndarray]:
  """index -> that slice of one of our params; a scanned param stacks one tensor per layer."""

  def read(index: Index) -> np.ndarray:
    index = tuple(index) + (slice(None),) * (len(shape) - len(index))
    if not scanned:
      return _read(source, tensors[0], shape, index)
    layers = range(*index[0].indices(shape[0]))
    return np.stack([_read(source, tensors[i], shape[1:], index[1:]) for i in layers])

  cache = {}

  def read_once(index: Index) -> np.ndarray:
    # Devices holding the same shard (replicated axes) share one read.
    key = tuple(s.indices(n) for s, n in zip(index, shape))
    if key not in cache:
      cache[key] = read(index)
    return cache[key]

  return read_once


def params_from_source(source: TensorSource, config: models.ModelConfig,
                       shardings: Any = None) -> Params:
  """Our params for `config` from the HF tensors of `source`.

  Args:
    source: the HF tensors (a `TensorSource`, or `hf_io.SafetensorsSource` for files).
    config: our model config, e.g. from `config_from_hf`.
    shardings: a tree of `jax.sharding.Sharding`s like the params. Given, each param is a
      `jax.Array` whose devices each read only their own slice of the HF tensors; None
      reads everything into float32 numpy arrays.

  Raises:
    ValueError: naming a missing tensor, one of the wrong shape or dtype (with the expected
      shape), a tied copy that differs from the embedding, or unused tensors.
  """
  rules = _leaf_rules(config)
  shapes = _flat_shapes(config, rules)
  _check_source(source, config, rules, shapes)
  flat_shardings = traverse_util.flatten_dict(shardings, sep='/') if shardings else None
  leaves = {}
  for path, tensors in rules.items():
    read = _leaf_reader(source, tensors, shapes[path], _is_scanned(config, path))
    if flat_shardings is None:
      leaves[path] = read(())
    else:
      leaves[path] = jax.make_array_from_callback(shapes[path], flat_shardings[path], read,
                                                  dtype=jnp.float32)
  return traverse_util.unflatten_dict(leaves, sep='/')


def params_from_hf(state_dict: Mapping[str, Any], config: models.ModelConfig) -> Params:
  """Converts an in-memory HF T5 or Llama state dict into our params for `config`.

  Args:
    state_dict: HF tensor name -> array (numpy, any float dtype).
    config: our model config, e.g. from `config_from_hf`.

  Returns:
    Nested dicts of float32 numpy arrays with the tree of `models.init_params(config, ...)`.

  Raises:
    ValueError: as `params_from_source`.
  """
  return params_from_source(TensorSource(state_dict), config)


# ----------------------------------------------------------------------------------------------
# Ours -> HF.


def params_to_hf(params: Params, config: models.ModelConfig) -> dict[str, np.ndarray]:
  """Our params as the HF state dict that `save_pretrained` would write (no tied copies).

  Args:
    params: our params for `config` (numpy or fully addressable jax arrays).
    config: their model config.

  Returns:
    HF tensor name -> contiguous numpy array in the params' dtype.
  """
  rules = _leaf_rules(config)
  shapes = _flat_shapes(config, rules)
  flat = traverse_util.flatten_dict(params, sep='/')
  got = {path: tuple(value.shape) for path, value in flat.items()}
  if got != shapes:
    diff = sorted(k for k in got.keys() | shapes.keys() if got.get(k) != shapes.get(k))
    raise ValueError(f'Params do not match the model config at {diff}: got '
                     f'{[got.get(k) for k in diff]}, expected {[shapes.get(k) for k in diff]}.')
  state_dict = {}
  for path, tensors in rules.items():
    value = np.asarray(flat[path])
    for tensor, array in zip(tensors, value if _is_scanned(config, path) else [value]):
      n = tensor.linear_in_axes
      if n:
        array = array.reshape(math.prod(array.shape[:n]), -1).T
      state_dict[tensor.hf_name] = np.ascontiguousarray(array)
  return state_dict
