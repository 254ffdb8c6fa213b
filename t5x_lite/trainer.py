"""The training loop: sharded init, a jitted train step, checkpoints, logging.

Reads top to bottom like flax's wmt example: set up devices and the mesh, the model and
optimizer, the state (fresh, resumed or initialised from another run), the data, then loop.
"""

import contextlib
import dataclasses
import functools
import signal
import time
from collections.abc import Iterator, Mapping
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from etils import epath

from t5x_lite import checkpoints, eval_commands, evaluation, hardware, logging_utils, losses
from t5x_lite import models, optimizers, partitioning, posttrain
from t5x_lite import config as config_lib
from t5x_lite.data import pipeline, tasks

Array = jax.Array


@flax.struct.dataclass
class TrainState:
  step: Array
  params: Any
  opt_state: Any


class NonFiniteLossError(RuntimeError):
  """Training produced a NaN or Inf and `nan_policy` is 'stop'."""


@dataclasses.dataclass(frozen=True)
class StepOptions:
  """What the train step needs besides the state and batch (static under jit)."""

  num_microbatches: int = 1
  label_smoothing: float = 0.0
  z_loss: float = 1e-4
  loss_normalizing_factor: Any = 'NUM_REAL_TARGET_TOKENS'
  skip_nonfinite: bool = False
  objective: posttrain.Objective | None = None  # a preference objective instead of seq2seq


def _model_inputs(batch: Mapping[str, Array]) -> dict[str, Array]:
  return {k: v for k, v in batch.items() if k != 'decoder_loss_weights'}


def _microbatch_sums(model: nn.Module, options: StepOptions, params: Any,
                     batch: Mapping[str, Array], rng: Array,
                     reference: Any = None) -> tuple[Array, dict[str, Array]]:
  """Summed loss of one microbatch whose weights are already normalised, with metric sums."""
  if options.objective is not None:
    return options.objective.loss(model, params, batch, rng, reference)
  logits = model.apply({'params': params}, **_model_inputs(batch), deterministic=False,
                       rngs={'dropout': rng})
  loss, z_loss = losses.cross_entropy_with_z_loss(
      logits, batch['decoder_target_tokens'], batch['decoder_loss_weights'],
      label_smoothing=options.label_smoothing, z_loss=options.z_loss,
      loss_normalizing_factor=None)
  sums = losses.metric_sums(logits, batch['decoder_target_tokens'],
                            batch['decoder_loss_weights'] > 0)
  return loss, dict(sums, loss=loss, z_loss=z_loss)


def _gradients(model: nn.Module, options: StepOptions, params: Any,
               batch: Mapping[str, Array], rng: Array,
               reference: Any = None) -> tuple[Any, dict[str, Array]]:
  """Gradients and metric sums, accumulated over `num_microbatches` with `lax.scan`."""
  grad_fn = jax.grad(functools.partial(_microbatch_sums, model, options), has_aux=True)
  grad_fn = functools.partial(grad_fn, reference=reference)
  n = options.num_microbatches
  if n == 1:
    return grad_fn(params, batch, rng)

  micro = jax.tree.map(lambda x: x.reshape((n, x.shape[0] // n) + x.shape[1:]), batch)

  def accumulate(carry, inputs):
    index, microbatch = inputs
    grads, sums = grad_fn(params, microbatch, jax.random.fold_in(rng, index))
    return jax.tree.map(jnp.add, carry, (grads, sums)), None

  zeros = jax.eval_shape(grad_fn, params, jax.tree.map(lambda x: x[0], micro), rng)
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zeros)
  (grads, sums), _ = jax.lax.scan(accumulate, zeros, (jnp.arange(n), micro))
  return grads, sums


def train_step(state: TrainState, batch: Mapping[str, Array], base_rng: Array,
               reference: Any = None, *, model: nn.Module, tx: optax.GradientTransformation,
               options: StepOptions) -> tuple[TrainState, dict[str, Array]]:
  """One optimizer update on a global batch; dropout RNG is `fold_in(base_rng, step)`.
  `reference`: DPO's frozen reference params (no gradient, no optimizer state)."""
  rng = jax.random.fold_in(base_rng, state.step)
  if options.objective is None:  # preference objectives read the weights as response masks
    batch = dict(batch, decoder_loss_weights=losses.normalize_weights(
        batch['decoder_loss_weights'], options.loss_normalizing_factor))
  grads, sums = _gradients(model, options, state.params, batch, rng, reference)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = losses.finalize_metrics(sums)
  metrics.update(grad_norm=losses.global_norm(grads), param_norm=losses.global_norm(params))
  new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state)
  if options.skip_nonfinite:
    finite = (jnp.isfinite(metrics['loss']) & jnp.isfinite(metrics['grad_norm'])
              & jnp.isfinite(metrics['param_norm']))  # the update itself may overflow
    kept = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state)
    new_state = kept.replace(step=state.step + 1)
    metrics['skipped'] = 1 - finite.astype(jnp.int32)
  return new_state, metrics


def setup_distributed(config: ml_collections.ConfigDict) -> None:
  """Joins a multi-process run (`jax.distributed`) when the config asks for one; a no-op
  once joined (the CLI joins early, to validate the mesh before writing to the workdir)."""
  dist = config.distributed
  if jax.distributed.is_initialized():
    return
  if dist.num_processes > 1:
    jax.config.update('jax_cpu_collectives_implementation', dist.cpu_collectives)
    jax.distributed.initialize(dist.coordinator_address, dist.num_processes, dist.process_id)
  elif dist.auto:  # Cloud TPU VMs and SLURM: jax detects the cluster itself.
    jax.config.update('jax_cpu_collectives_implementation', dist.cpu_collectives)
    jax.distributed.initialize()


def setup_partitioner(config: ml_collections.ConfigDict) -> partitioning.Partitioner:
  """The mesh and axis rules, checking that the batch and every param (from abstract shapes,
  nothing allocated) split evenly over their mesh axes."""
  mesh = partitioning.make_mesh(config.mesh_shape)
  partitioner = partitioning.Partitioner(
      mesh, partitioning.logical_rules(config.axis_rules.to_dict()))
  batch_size = config.train.batch_size
  per_micro = batch_size // max(config.train.num_microbatches, 1)
  if batch_size % config.train.num_microbatches or per_micro % partitioner.data_parallel_size:
    raise ValueError(
        f'train.batch_size={batch_size} with num_microbatches='
        f'{config.train.num_microbatches} must split into microbatches divisible by the '
        f'data-parallel size {partitioner.data_parallel_size} (mesh {dict(mesh.shape)}).')
  partitioner.boxed_shardings(models.boxed_param_shapes(config_lib.model_config(config)))
  return partitioner


def abstract_state(model_config: models.ModelConfig, tx: optax.GradientTransformation,
                   partitioner: partitioning.Partitioner) -> tuple[Any, Any]:
  """The state's shapes (no allocation) and its shardings."""
  boxed = models.boxed_param_shapes(model_config)
  params = nn.unbox(boxed)
  param_shardings = partitioner.boxed_shardings(boxed)
  opt_state = jax.eval_shape(tx.init, params)
  shapes = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params,
                      opt_state=opt_state)
  shardings = TrainState(
      step=partitioner.replicated(), params=param_shardings,
      opt_state=partitioner.matching_shardings(opt_state, params, param_shardings))
  return shapes, shardings


def init_state(model: nn.Module, model_config: models.ModelConfig,
               tx: optax.GradientTransformation, shardings: TrainState, rng: Array,
               params: Any = None) -> TrainState:
  """A fresh state built directly in its shardings: no host holds the whole model."""

  def init(rng, params):
    # Given params (e.g. an SFT run's) replace the fresh ones; a reward head they lack stays
    # freshly initialised. jit drops the fresh params that are replaced.
    fresh = nn.unbox(model.init(rng, **models.dummy_batch(model_config))['params'])
    params = {**fresh, **(params or {})}
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

  return jax.jit(init, out_shardings=shardings)(rng, params)


class _Preemption(contextlib.AbstractContextManager):
  """Remembers a SIGTERM so the loop can save and stop between steps; the previous handler
  comes back on exit (train() may run inside a longer-lived process)."""

  def __init__(self):
    self.requested = False
    self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def __exit__(self, *exc_info):
    signal.signal(signal.SIGTERM, self._previous)


def train(config: ml_collections.ConfigDict, workdir: epath.PathLike,
          make_batches: Any = None) -> dict[str, float]:
  """Trains per `config`, resuming from `workdir` if it holds checkpoints.

  Args:
    config: the run config (see `config.base_config`).
    workdir: checkpoints, `config.json`, `metrics.jsonl` and TensorBoard events go here.
    make_batches: `(config, shard_index, shard_count) -> iterator` of process-local numpy
      batches with `get_state()`/`set_state()`; defaults to the data pipeline.

  Returns:
    The last logged metrics.
  """
  setup_distributed(config)
  partitioner = setup_partitioner(config)
  model_config = config_lib.model_config(config)
  model = models.build_model(model_config)
  tx = optimizers.make_optimizer(optimizer_settings(config.optimizer, config.train.num_steps))
  shapes, shardings = abstract_state(model_config, tx, partitioner)
  checkpointer = checkpoints.Checkpointer(
      epath.Path(workdir) / 'checkpoints', save_every=config.train.checkpoint_every,
      keep=config.train.keep_checkpoints, async_save=config.train.async_checkpointing)
  batches = (make_batches or pipeline_batches)(
      config, jax.process_index(), jax.process_count())

  rng = jax.random.key(config.seed)
  init_rng, dropout_rng = jax.random.split(rng)
  # The newest checkpoint that restores (older ones stand in for a corrupt newest).
  restored = checkpointer.restore_newest(checkpoints.abstract_with_shardings(shapes, shardings))
  if restored is not None:
    _, state, data_state = restored
    batches.set_state(data_state)
  else:
    pretrained = None
    if config.train.init_from:
      pretrained = checkpoints.restore_params(
          config.train.init_from,
          checkpoints.abstract_with_shardings(models.backbone(shapes.params),
                                              models.backbone(shardings.params)))
    state = init_state(model, model_config, tx, shardings, init_rng, pretrained)

  options = StepOptions(
      num_microbatches=config.train.num_microbatches,
      label_smoothing=config.train.label_smoothing, z_loss=config.train.z_loss,
      loss_normalizing_factor=config.train.loss_normalizing_factor,
      skip_nonfinite=config.train.nan_policy == 'skip',
      objective=posttrain.objective_from_config(config))
  reference = posttrain.load_reference(config, partitioner)
  step_fn = jax.jit(
      functools.partial(train_step, model=model, tx=tx, options=options),
      in_shardings=(shardings, partitioner.batch_sharding(), partitioner.replicated(),
                    None if reference is None else shardings.params),
      out_shardings=(shardings, partitioner.replicated()), donate_argnums=(0,))
  logger = logging_utils.MetricLogger(
      workdir, total_steps=config.train.num_steps, initial_step=int(state.step),
      enabled=jax.process_index() == 0)
  flops_per_token = _flops_per_token(config, model_config)
  # MFU's denominator: the config's, else the device's published (or this CPU's measured) peak.
  peak_flops = config.train.peak_flops_per_device or hardware.peak_flops_per_device()
  schedule = optimizers.make_schedule_from_config(
      optimizer_settings(config.optimizer, config.train.num_steps))
  evaluator = setup_evaluator(config, model, partitioner)
  metrics, last = {}, {}
  tick, tokens = time.time(), 0
  first_bad = _NO_NONFINITE_STEP if config.train.nan_policy == 'stop' else None
  with partitioner.activate(), _finishing(checkpointer, logger), _Preemption() as preemption:
    for step in range(int(state.step), config.train.num_steps):
      local = next(batches)
      tokens += int(np.sum(local['decoder_loss_weights'] > 0)) * jax.process_count()
      state, metrics = step_fn(state, partitioner.shard_batch(local), dropout_rng, reference)
      done = step + 1
      stopping = preemption.requested  # read once: a SIGTERM may land mid-iteration
      saving = checkpointer.should_save(done) or stopping or done == config.train.num_steps
      logging_now = done % config.train.log_every == 0 or done == config.train.num_steps
      if first_bad is not None:
        first_bad = _first_nonfinite(first_bad, metrics, done)  # on device: no sync per step
        if saving or logging_now:
          _check_finite(jax.device_get(first_bad))
      if logging_now:
        last = {k: float(v) for k, v in jax.device_get(metrics).items()}
        elapsed, tick = time.time() - tick, time.time()
        last.update(lr=float(schedule(done - 1)), tokens_per_second=tokens / elapsed)
        last['mfu'] = losses.mfu(last['tokens_per_second'], flops_per_token, peak_flops,
                                 jax.device_count())
        tokens = 0
        logger.write(done, last)
      if evaluator is not None and done % config.eval.every_steps == 0:
        eval_start = time.time()
        logger.write(done, evaluator.evaluate(state.params).metrics, prefix='eval')
        tick += time.time() - eval_start  # keep eval time out of the training throughput
      if saving:
        checkpointer.save(done, state, batches.get_state(), force=True)
      if stopping:
        break
  return last


def setup_evaluator(config: ml_collections.ConfigDict, model: nn.Module,
                    partitioner: partitioning.Partitioner) -> evaluation.Evaluator | None:
  """The evaluator run every `eval.every_steps` steps (None when 0); built before the loop,
  so a bad eval config fails before any training."""
  if not config.eval.every_steps:
    return None
  return eval_commands.evaluator_from_config(config, model, partitioner)


@contextlib.contextmanager
def _finishing(checkpointer: checkpoints.Checkpointer,
               logger: logging_utils.MetricLogger) -> Iterator[None]:
  """Finishes pending asynchronous saves and closes the logs when the loop ends, also on an
  error such as the NaN guard's: the last good checkpoint must not be left half-written."""
  try:
    yield
  finally:
    checkpointer.wait()
    checkpointer.close()
    logger.close()


def optimizer_settings(optimizer: ml_collections.ConfigDict, num_steps: int
                       ) -> dict[str, Any]:
  """The optimizer config, with decay schedules ending at the run's last step by default."""
  values = optimizer.to_dict()
  values['total_steps'] = values['total_steps'] or num_steps
  return values


# The metrics whose non-finite values stop training: param_norm is that of the updated params,
# the state about to be saved; an overflowing update can make them non-finite while the step's
# loss and gradients are still finite.
_GUARDED = ('loss', 'grad_norm', 'param_norm')
_NO_NONFINITE_STEP = {'step': -1, **{name: 0.0 for name in _GUARDED}}


@jax.jit
def _first_nonfinite(first: dict[str, Array], metrics: Mapping[str, Array],
                     step: int) -> dict[str, Array]:
  """`first` until a step's guarded metrics are non-finite; then that step and its values."""
  finite = functools.reduce(jnp.logical_and, [jnp.isfinite(metrics[n]) for n in _GUARDED])
  now = {'step': step, **{name: metrics[name] for name in _GUARDED}}
  take = (first['step'] < 0) & ~finite
  return jax.tree.map(lambda old, new: jnp.where(take, new, old), first, now)


def _check_finite(first_bad: Mapping[str, Any]) -> None:
  """Stops at the first non-finite step, before anything after it is logged or saved."""
  if first_bad['step'] >= 0:
    values = ' '.join(f'{name}={float(first_bad[name])}' for name in _GUARDED)
    raise NonFiniteLossError(
        f'{values} at step {int(first_bad["step"])}: stopping without saving this state '
        '(set train.nan_policy="skip" to skip such updates).')


def pipeline_batches(config: ml_collections.ConfigDict, shard_index: int,
                     shard_count: int) -> Iterator[dict[str, np.ndarray]]:
  """This process's share of each global batch, from the grain pipeline."""
  data = config.data
  return iter(pipeline.get_dataset(
      tasks.from_config(data), data.split,
      data.feature_lengths.to_dict(),
      config.train.batch_size // shard_count, seed=config.seed, shuffle=data.shuffle,
      shard_index=shard_index, shard_count=shard_count, pack=data.pack,
      converter=posttrain.converter_name(config), truncate=data.truncate,
      num_workers=data.num_workers, log_every=0, start_id=config.model.decoder_start_token_id))


def _flops_per_token(config: ml_collections.ConfigDict,
                     model_config: models.ModelConfig) -> float:
  lengths = config.data.feature_lengths
  if config.data.converter == 'enc_dec':
    return losses.model_flops_per_token(model_config, lengths.inputs, lengths.targets)
  return losses.model_flops_per_token(model_config, sum(lengths.values()))
