"""Will a config fit, and how fast will it train? Bytes and FLOPs per device, without training.

`plan(config, accelerator)` gives, per device of the config's mesh: parameter, optimizer-state,
gradient and activation bytes, the FLOPs of one train step and the step time they take at a
stated MFU on a named accelerator (`hardware.CHIPS`: published peak and HBM), or on this
machine's devices when none is named. Bytes come from XLA (`memory_analysis()` of the compiled
train step) when this process has the mesh's devices, else from formulas:

- params: each float32 leaf's shard under the config's axis rules (exact);
- optimizer state: `tx.init`'s leaves, sharded like the params they mirror (exact);
- gradients: float32, sharded like the params;
- activations (no remat), per token of a microbatch and per layer, what the backward pass
  keeps: per attention (self, and cross in the decoder) its norm's input and output (2 d),
  queries, keys, values and output ((2 H + 2 H_kv) D_h) and four float32 [H, S_k] rows
  (scores, masked scores, probabilities, the backward's workspace); per layer the MLP's
  norm input and output and the residual sums (6 d) and its pre-activations, activations and
  product (2 n_act d_ff); once per token, three float32 copies of the logits (logits,
  softmax, their gradient). Remat keeps only each layer's input (d); the logits stay.
"""

import dataclasses
import functools
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import AbstractMesh, AxisType

from t5x_lite import config as config_lib
from t5x_lite import hardware, losses, models, optimizers, partitioning, trainer

DEFAULT_MFU = 0.4  # a typical well-tuned MFU on TPU/GPU (MaxText reports 40-60% dense)
CPU_MFU = 0.7  # the benchmark train steps reach 64-76% of a 2048³ matmul (benchmarks.md)


@dataclasses.dataclass(frozen=True)
class Memory:
  """Bytes per device of one train step; `source` says whether XLA or formulas gave them."""

  params: float
  optimizer: float
  gradients: float
  activations: float
  source: str

  @property
  def total(self) -> float:
    return self.params + self.optimizer + self.gradients + self.activations


@dataclasses.dataclass(frozen=True)
class Plan:
  """Memory and speed of one config on one accelerator."""

  memory: Memory
  mesh: dict[str, int]
  accelerator: str
  device_bytes: float  # memory of one device
  peak_flops: float  # per device
  mfu: float
  flops_per_step: float  # model FLOPs of one global batch, forward + backward
  tokens_per_step: int  # target positions of one global batch (padding included)

  @property
  def step_seconds(self) -> float:
    devices = math.prod(self.mesh.values())
    return self.flops_per_step / (self.peak_flops * devices * self.mfu)

  @property
  def fits(self) -> bool:
    return self.memory.total <= self.device_bytes


def sequence_lengths(config: ml_collections.ConfigDict) -> tuple[int, int]:
  """(encoder length, decoder length) of a training batch; the encoder's is 0 for a
  decoder-only model (whose prefix-LM rows hold inputs and targets)."""
  lengths = config.data.feature_lengths
  if config.model.architecture == 'encoder_decoder':
    return lengths.inputs, lengths.targets
  if config.data.converter == 'prefix_lm':
    return 0, sum(lengths.values())
  return 0, lengths.targets


def step_flops(config: ml_collections.ConfigDict) -> tuple[float, int]:
  """(model FLOPs of one train step, target positions it trains on): MaxText's accounting
  (`losses.model_flops_per_token`) times the global batch's decoder positions."""
  model_config = config_lib.model_config(config)
  encoder_len, decoder_len = sequence_lengths(config)
  per_token = (losses.model_flops_per_token(model_config, encoder_len, decoder_len)
               if encoder_len else losses.model_flops_per_token(model_config, decoder_len))
  tokens = config.train.batch_size * decoder_len
  return per_token * tokens, tokens


def mesh_sizes(mesh_shape: Any, num_devices: int) -> dict[str, int]:
  """The (data, fsdp, model) sizes of `mesh_shape` on `num_devices`, the -1 filled in."""
  shape = [int(s) for s in mesh_shape]
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if num_devices % known:
      raise ValueError(f'mesh_shape={tuple(shape)} cannot fill {num_devices} devices; '
                       f'pass a mesh_shape whose sizes multiply to {num_devices}')
    shape[shape.index(-1)] = num_devices // known
  if math.prod(shape) != num_devices or len(shape) != len(partitioning.MESH_AXES):
    raise ValueError(f'mesh_shape={tuple(shape)} needs {math.prod(shape)} devices, the '
                     f'accelerator has {num_devices}; use -1 for one axis to fill')
  return dict(zip(partitioning.MESH_AXES, shape))


def _shard_bytes(shapes: Any, shardings: Any) -> float:
  return float(sum(
      math.prod(s.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
      for x, s in zip(jax.tree.leaves(shapes), jax.tree.leaves(shardings))))


def _state(config: ml_collections.ConfigDict, partitioner: partitioning.Partitioner):
  model_config = config_lib.model_config(config)
  tx = optimizers.make_optimizer(config.optimizer.to_dict())
  return model_config, tx, trainer.abstract_state(model_config, tx, partitioner)


def _activation_bytes_per_token(config: models.ModelConfig, encoder_len: int,
                                decoder_len: int) -> float:
  """Bytes the backward pass keeps per decoder token (the encoder's charged per its own
  tokens and scaled by encoder_len / decoder_len); see the module docstring."""
  width = jnp.dtype(config.dtype).itemsize
  d, heads, kv_heads, head_dim = (config.d_model, config.num_heads, config.num_kv_heads,
                                  config.head_dim)
  mlp = 2 * len(config.activations) * config.d_ff

  def layer(attention_lengths: tuple[int, ...]) -> float:
    if config.remat_policy != 'none':
      return d * width
    hidden = 6 * d + mlp + sum((2 * heads + 2 * kv_heads) * head_dim + 2 * d
                               for _ in attention_lengths)
    return hidden * width + sum(4 * heads * k * 4 for k in attention_lengths)

  logits = 3 * config.vocab_size * 4
  decoder = config.num_decoder_layers * layer(
      (decoder_len, encoder_len) if encoder_len else (decoder_len,))
  encoder = (config.num_encoder_layers * layer((encoder_len,)) * encoder_len / decoder_len
             if encoder_len else 0.0)
  return decoder + encoder + logits


def formula_memory(config: ml_collections.ConfigDict, mesh: dict[str, int]) -> Memory:
  """Bytes per device from shapes and formulas alone (no devices needed)."""
  abstract_mesh = AbstractMesh(tuple(mesh.values()), tuple(mesh),
                               axis_types=(AxisType.Auto,) * len(mesh))
  partitioner = partitioning.Partitioner(
      abstract_mesh, partitioning.logical_rules(config.axis_rules.to_dict()))
  model_config, _, (shapes, shardings) = _state(config, partitioner)
  params = _shard_bytes(shapes.params, shardings.params)
  optimizer = _shard_bytes(shapes.opt_state, shardings.opt_state)
  encoder_len, decoder_len = sequence_lengths(config)
  batch, micro, ways = config.train.batch_size, config.train.num_microbatches, (
      mesh['data'] * mesh['fsdp'])
  if batch % micro or (batch // micro) % ways:
    raise ValueError(f'train.batch_size={batch} with num_microbatches={micro} must split into '
                     f'microbatches divisible by the data-parallel size {ways} (mesh {mesh}); '
                     f'set --config.train.batch_size to a multiple of {ways * micro}')
  tokens = batch // micro // ways * decoder_len
  activations = tokens * _activation_bytes_per_token(model_config, encoder_len, decoder_len)
  return Memory(params, optimizer, params, activations, 'formulas')


def abstract_batch(config: ml_collections.ConfigDict) -> dict[str, jax.ShapeDtypeStruct]:
  """The shapes of one global training batch (unpacked features)."""
  encoder_len, decoder_len = sequence_lengths(config)
  batch = config.train.batch_size

  def tokens(length):
    return jax.ShapeDtypeStruct((batch, length), jnp.int32)

  features = {'decoder_input_tokens': tokens(decoder_len),
              'decoder_target_tokens': tokens(decoder_len),
              'decoder_loss_weights': jax.ShapeDtypeStruct((batch, decoder_len), jnp.float32)}
  if encoder_len:
    features['encoder_input_tokens'] = tokens(encoder_len)
  return features


def jitted_train_step(config: ml_collections.ConfigDict,
                      partitioner: partitioning.Partitioner) -> tuple[Any, Any, Any]:
  """(the jitted `trainer.train_step` as `trainer.train` builds it, the state's shapes, its
  shardings), for compiling without training (here and in the benchmarks)."""
  model_config, tx, (shapes, shardings) = _state(config, partitioner)
  options = trainer.StepOptions(
      num_microbatches=config.train.num_microbatches, z_loss=config.train.z_loss,
      label_smoothing=config.train.label_smoothing,
      loss_normalizing_factor=config.train.loss_normalizing_factor)
  step = jax.jit(
      functools.partial(trainer.train_step, model=models.build_model(model_config), tx=tx,
                        options=options),
      in_shardings=(shardings, partitioner.batch_sharding(), partitioner.replicated()),
      out_shardings=(shardings, partitioner.replicated()), donate_argnums=(0,))
  return step, shapes, shardings


def compiled_memory(config: ml_collections.ConfigDict) -> Memory:
  """Bytes per device from XLA: the train step compiled (not run) on this process's devices.

  Parameters and optimizer state are the step's argument shards; XLA's temporaries hold the
  gradients (counted as the params' float32 shards) and the activations (the rest). On fake
  CPU devices the CPU compiler's schedule decides: with fsdp its temporaries can hold every
  layer's gathered weights at once, which a TPU or GPU schedule would not.
  """
  partitioner = trainer.setup_partitioner(config)
  step, shapes, shardings = jitted_train_step(config, partitioner)
  with partitioner.activate():
    compiled = step.lower(shapes, abstract_batch(config), jax.random.key(0)).compile()
  analysis = compiled.memory_analysis()
  params = _shard_bytes(shapes.params, shardings.params)
  optimizer = _shard_bytes(shapes.opt_state, shardings.opt_state)
  # Donated state is aliased into the outputs, so what outlives the step is args + outputs
  # - aliases; everything else XLA needs lives in its temporaries.
  extra = (analysis.argument_size_in_bytes + analysis.output_size_in_bytes
           - analysis.alias_size_in_bytes - params - optimizer)
  activations = max(analysis.temp_size_in_bytes + extra - params, 0.0)
  return Memory(params, optimizer, params, activations, 'XLA memory_analysis() of the '
                'compiled train step')


def plan(config: ml_collections.ConfigDict, accelerator: str = '', mfu: float = 0.0) -> Plan:
  """The memory and step time of `config`'s training on `accelerator` ('' = this machine's
  devices; e.g. 'v5e-16', 'h100x8'), at `mfu` (0 = `DEFAULT_MFU`, or `CPU_MFU` here on CPU).

  Bytes come from XLA when this process has the mesh's devices (compiling takes seconds to
  minutes for big models), else from formulas.
  """
  if accelerator:
    chip, chips = hardware.parse_accelerator(accelerator)
    name = f'{accelerator} ({chips} x {chip.name})'
    peak, device_bytes = chip.peak_flops, chip.hbm_bytes
  else:
    chips, device = jax.device_count(), jax.devices()[0]
    peak = hardware.peak_flops_per_device(device)
    chip = hardware.chip_for_device_kind(device.device_kind)
    name = f'this machine ({chips} x {device.device_kind})'
    device_bytes = chip.hbm_bytes if chip else _host_memory_bytes() / jax.local_device_count()
  mesh = mesh_sizes(config.mesh_shape, chips)
  if not 0 <= mfu <= 1:
    raise ValueError(f'--plan.mfu={mfu} must be in (0, 1] (0: the default), e.g. 0.4')
  if not mfu:
    mfu = CPU_MFU if not accelerator and jax.devices()[0].platform == 'cpu' else DEFAULT_MFU
  memory = (compiled_memory(config) if jax.device_count() == chips
            else formula_memory(config, mesh))
  flops, tokens = step_flops(config)
  return Plan(memory, mesh, name, device_bytes, peak, mfu, flops, tokens)


def _host_memory_bytes() -> float:
  return float(os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES'))


def advice(config: ml_collections.ConfigDict, result: Plan) -> list[str]:
  """What to change when the plan does not fit, each with the bytes per device it gives."""
  memory, mesh = result.memory, result.mesh
  devices = math.prod(mesh.values())
  state = memory.params + memory.optimizer + memory.gradients
  tips = []
  if mesh['fsdp'] < devices:
    sharded = formula_memory(config, dict(data=1, fsdp=devices, model=1))
    tips.append(f'shard params and optimizer state over all devices: '
                f'--config.mesh_shape="(1,{devices},1)" ({_gib(sharded.total)} per device '
                f'by formulas)')
  if config.model.remat_policy == 'none' and memory.activations > 0.2 * memory.total:
    tips.append("recompute activations in the backward pass: --config.model.remat_policy=full "
                "(or 'dots' to keep the matmul outputs)")
  per_device = config.train.batch_size // (mesh['data'] * mesh['fsdp'])
  micro = config.train.num_microbatches
  if per_device // micro > 1 and memory.activations > 0.2 * memory.total:
    more = 2 * micro
    tips.append(f'accumulate gradients: --config.train.num_microbatches={more} (activations '
                f'{_gib(memory.activations * micro / more)} instead of '
                f'{_gib(memory.activations)})')
  if not tips or state > result.device_bytes:
    tips.append('use more devices or a smaller model: the parameters, optimizer state and '
                f'gradients alone take {_gib(state)} per device')
  return tips


def _gib(num_bytes: float) -> str:
  return f'{num_bytes / 2**30:.2f} GiB'


def report(config: ml_collections.ConfigDict, result: Plan) -> list[str]:
  """The plan as the lines `info --plan` prints."""
  memory = result.memory
  lines = [
      f'plan for {result.accelerator}, mesh {result.mesh}:',
      f'  bytes per device (from {memory.source}):',
      *(f'    {name:<22} {_gib(value):>12}' for name, value in (
          ('parameters', memory.params), ('optimizer state', memory.optimizer),
          ('gradients', memory.gradients), ('activations', memory.activations),
          ('total', memory.total), ('device memory', result.device_bytes))),
      f'  FLOPs per step: {result.flops_per_step:.4g} ({result.tokens_per_step:,} tokens, '
      'forward + backward, MaxText accounting)',
      f'  at {result.mfu:.0%} MFU of {result.peak_flops / 1e12:.4g} TFLOP/s per device: '
      f'{result.step_seconds:.4g} s per step, '
      f'{result.tokens_per_step / result.step_seconds:,.0f} tokens/s',
  ]
  if not result.fits:
    lines.append(f'warning: {_gib(memory.total)} per device does not fit in '
                 f'{_gib(result.device_bytes)}; to fit:')
    lines.extend(f'  - {tip}' for tip in advice(config, result))
  return lines
