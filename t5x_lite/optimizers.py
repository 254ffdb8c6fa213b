"""Optimizers and learning-rate schedules, built from optax.

Two optimizers, chosen by `config.name`:

- `adafactor`: T5's settings (second-moment decay 1 - t^-0.8, update clipping at block RMS 1.0,
  steps relative to the parameter RMS, factored second moments for params whose two largest
  dims are both >= 128, epsilon1 = 1e-30 on squared gradients, epsilon2 = 1e-3 as the floor of
  the parameter scale). It is optax's `adafactor` chain (`scale_by_factored_rms`,
  `clip_by_block_rms`, `scale_by_learning_rate`, `scale_by_param_block_rms`, ...) composed here
  so that epsilon2, optax's fixed `min_scale` of `scale_by_param_block_rms`, is configurable.
- `adamw`: `optax.adamw` with decoupled weight decay on `weight_decay_mask(params)` only.

Either is optionally preceded by `optax.clip_by_global_norm(grad_clip_norm)`.

Where this Adafactor differs from T5X's own (`t5x.adafactor.Adafactor` with
`standard_logical_factor_rules`):

- Factoring follows optax's heuristic, the two largest dims of each array, not logical axis
  names. MLP kernels [embed, mlp], the embedding [vocab, embed] and the logits kernel
  [embed, vocab] are factored as in T5X. Attention kernels ([embed, heads, kv] and
  [heads, kv, embed]) are factored only if their second-largest dim is >= 128: with T5's
  head_dim 64 their second moment is stored in full (correct, but more optimizer memory than
  T5X's heads*kv-as-one-column factoring); with head_dim 128 (Llama-2-7B) each head is factored
  separately over embed x kv.
- With `scan_layers`, the stacked `layers` dim is kept in the factored statistics (per-layer
  factoring is right) but the update clipping and parameter-scale blocks span all layers of the
  stacked array, where T5X computes them per layer.

Schedules (`make_schedule`) take the optax step count, which is 0 for the first update.
"""

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

OPTIMIZERS = ('adafactor', 'adamw')
SCHEDULES = ('rsqrt', 'constant', 'linear', 'cosine')

# Leaf names that never get weight decay: RMSNorm scales, biases, and T5's relative position
# bias table (2-D, [heads, relpos_buckets], but an additive attention bias, not a weight).
NO_DECAY_NAMES = frozenset({'scale', 'bias', 'rel_embedding'})


def default_optimizer_config() -> ml_collections.ConfigDict:
  """Every optimizer field with T5's pretraining defaults (T5X's Adafactor and
  `constant * rsqrt_decay` schedule: base 1.0, 10k warmup steps)."""
  c = ml_collections.ConfigDict()
  c.name = 'adafactor'  # 'adafactor' (T5) or 'adamw'
  c.learning_rate = 1.0  # base lr; rsqrt gives lr/sqrt(max(step, warmup_steps)) (0.01 for 10k)
  c.schedule = 'rsqrt'  # 'rsqrt' (T5 pretraining), 'constant' (T5 fine-tuning), 'linear', 'cosine'
  c.warmup_steps = 10000  # rsqrt: steps held at lr/sqrt(warmup_steps); linear/cosine: ramp from 0
  c.total_steps = 0  # linear/cosine: step at which the decay reaches end_learning_rate
  c.end_learning_rate = 0.0  # linear/cosine: final lr
  c.grad_clip_norm = 0.0  # > 0: clip gradients to this global norm first (T5 uses none)
  c.weight_decay = 0.0  # decoupled decay on weight_decay_mask params (adamw: scaled by lr)
  c.b1 = 0.9  # adamw: first-moment decay
  c.b2 = 0.999  # adamw: second-moment decay
  c.eps = 1e-8  # adamw: added to the root of the second moment
  c.decay_rate = 0.8  # adafactor: second-moment decay 1 - (t + 1)^-decay_rate at step t
  c.decay_offset = 0  # adafactor: step subtracted before the decay schedule (T5X's step_offset)
  c.clipping_threshold = 1.0  # adafactor: max RMS of each param's update (0: no clipping)
  c.multiply_by_parameter_scale = True  # adafactor: step size relative to the param's RMS
  c.factored = True  # adafactor: factored second moments for large enough matrices
  c.min_dim_size_to_factor = 128  # adafactor: factor only if the two largest dims are >= this
  c.epsilon1 = 1e-30  # adafactor: added to squared gradients
  c.epsilon2 = 1e-3  # adafactor: floor of the parameter RMS scale
  c.momentum = 0.0  # adafactor: > 0 keeps a first moment with this decay (T5 uses none)
  return c


def _as_dict(config: ml_collections.ConfigDict | Mapping[str, Any]) -> dict[str, Any]:
  """`config` on top of the defaults, rejecting unknown fields."""
  values = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else dict(config)
  defaults = default_optimizer_config().to_dict()
  unknown = sorted(set(values) - set(defaults))
  if unknown:
    raise ValueError(f'Unknown optimizer config field(s) {unknown}; allowed: {sorted(defaults)}')
  return {**defaults, **values}


def _check(ok: bool, field: str, value: Any, allowed: str):
  if not ok:
    raise ValueError(f'Invalid optimizer config: {field}={value!r}; must be {allowed}.')


def make_schedule(name: str, *, learning_rate: float, warmup_steps: int = 0,
                  total_steps: int = 0, end_learning_rate: float = 0.0) -> optax.Schedule:
  """A learning-rate schedule: step (0 for the first update) -> lr.

  Args:
    name: one of `SCHEDULES`:
      - 'rsqrt': `learning_rate / sqrt(max(step, warmup_steps))`, T5X's
        'constant * rsqrt_decay' (T5 pretraining: 1.0 and 10k give 0.01 up to step 10k, then
        1/sqrt(step)). There is no ramp: the "warmup" is the flat start.
      - 'constant': `learning_rate` at every step (T5 fine-tuning uses 1e-3 with Adafactor);
        `warmup_steps` is ignored, as in T5X's 'constant'.
      - 'linear': linear ramp 0 -> `learning_rate` over `warmup_steps`, then linear decay to
        `end_learning_rate` at `total_steps`, constant after.
      - 'cosine': the same ramp, then cosine decay to `end_learning_rate` at `total_steps`
        (`optax.warmup_cosine_decay_schedule`).
    learning_rate: the base (rsqrt, constant) or peak (linear, cosine) learning rate.
    warmup_steps: see `name`.
    total_steps: where linear and cosine decays end; must exceed `warmup_steps`.
    end_learning_rate: the final lr of linear and cosine.

  Returns:
    An optax schedule.

  Raises:
    ValueError: for an unknown name or inconsistent step counts.
  """
  _check(name in SCHEDULES, 'schedule', name, f'one of {SCHEDULES}')
  _check(learning_rate >= 0, 'learning_rate', learning_rate, '>= 0')
  _check(warmup_steps >= 0, 'warmup_steps', warmup_steps, '>= 0')
  if name == 'constant':
    return optax.constant_schedule(learning_rate)
  if name == 'rsqrt':
    _check(warmup_steps >= 1, 'warmup_steps', warmup_steps, '>= 1 for the rsqrt schedule')

    def rsqrt(step):
      step = jnp.asarray(step, jnp.float32)
      return learning_rate * jax.lax.rsqrt(jnp.maximum(step, float(warmup_steps)))

    return rsqrt
  _check(total_steps > warmup_steps, 'total_steps', total_steps,
         f'> warmup_steps={warmup_steps} for the {name} schedule')
  _check(end_learning_rate >= 0, 'end_learning_rate', end_learning_rate, '>= 0')
  if name == 'cosine':
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=learning_rate, warmup_steps=warmup_steps,
        decay_steps=total_steps, end_value=end_learning_rate)
  decay = optax.linear_schedule(learning_rate, end_learning_rate, total_steps - warmup_steps)
  if warmup_steps == 0:
    return decay
  return optax.join_schedules(
      [optax.linear_schedule(0.0, learning_rate, warmup_steps), decay], [warmup_steps])


def make_schedule_from_config(
    config: ml_collections.ConfigDict | Mapping[str, Any]) -> optax.Schedule:
  """The schedule an optimizer config trains with (for logging the learning rate)."""
  c = _as_dict(config)
  return make_schedule(c['schedule'], learning_rate=c['learning_rate'],
                       warmup_steps=c['warmup_steps'], total_steps=c['total_steps'],
                       end_learning_rate=c['end_learning_rate'])


def _leaf_name(path) -> str:
  last = path[-1]
  return str(getattr(last, 'key', getattr(last, 'name', getattr(last, 'idx', last))))


def weight_decay_mask(params: Any) -> Any:
  """True where weight decay applies: matrices and embeddings (ndim >= 2), except leaves
  named in `NO_DECAY_NAMES` (norm scales, biases, the relative position bias table, also when
  `scan_layers` stacks them into 2-D arrays). Works on arrays or shape structs."""
  return jax.tree_util.tree_map_with_path(
      lambda path, x: len(x.shape) >= 2 and _leaf_name(path) not in NO_DECAY_NAMES, params)


def _adafactor(c: Mapping[str, Any], schedule: optax.Schedule) -> optax.GradientTransformation:
  """optax.adafactor's chain, with epsilon2 exposed."""
  parts = [optax.scale_by_factored_rms(
      factored=c['factored'], decay_rate=c['decay_rate'], step_offset=c['decay_offset'],
      min_dim_size_to_factor=c['min_dim_size_to_factor'], epsilon=c['epsilon1'])]
  if c['clipping_threshold'] > 0:
    parts.append(optax.clip_by_block_rms(c['clipping_threshold']))
  parts.append(optax.scale_by_learning_rate(schedule, flip_sign=False))
  if c['multiply_by_parameter_scale']:
    parts.append(optax.scale_by_param_block_rms(c['epsilon2']))
  if c['momentum'] > 0:
    parts.append(optax.ema(c['momentum'], debias=False))
  if c['weight_decay'] > 0:
    parts.append(optax.add_decayed_weights(c['weight_decay'], mask=weight_decay_mask))
  parts.append(optax.scale(-1.0))
  return optax.chain(*parts)


def make_optimizer(
    config: ml_collections.ConfigDict | Mapping[str, Any]) -> optax.GradientTransformation:
  """The optimizer described by `config` (fields: see `default_optimizer_config`; missing
  fields take their defaults). Its `update` needs `params`.

  Weight decay: AdamW subtracts `lr(step) * weight_decay * p`; Adafactor multiplies the masked
  params by `1 - weight_decay` per step (not scaled by the lr, as T5X and optax do).

  Raises:
    ValueError: for an unknown field, optimizer or schedule name, or an invalid value.
  """
  c = _as_dict(config)
  _check(c['name'] in OPTIMIZERS, 'name', c['name'], f'one of {OPTIMIZERS}')
  _check(c['grad_clip_norm'] >= 0, 'grad_clip_norm', c['grad_clip_norm'], '>= 0 (0: off)')
  _check(c['weight_decay'] >= 0, 'weight_decay', c['weight_decay'], '>= 0')
  schedule = make_schedule_from_config(c)
  if c['name'] == 'adamw':
    for field in ('b1', 'b2'):
      _check(0 <= c[field] < 1, field, c[field], 'in [0, 1)')
    _check(c['eps'] >= 0, 'eps', c['eps'], '>= 0')
    tx = optax.adamw(schedule, b1=c['b1'], b2=c['b2'], eps=c['eps'],
                     weight_decay=c['weight_decay'], mask=weight_decay_mask)
  else:
    _check(c['decay_rate'] > 0, 'decay_rate', c['decay_rate'], '> 0')
    _check(c['clipping_threshold'] == 0 or c['clipping_threshold'] >= 1,
           'clipping_threshold', c['clipping_threshold'], '0 (off) or >= 1')
    _check(c['min_dim_size_to_factor'] >= 1, 'min_dim_size_to_factor',
           c['min_dim_size_to_factor'], '>= 1')
    _check(c['epsilon1'] >= 0, 'epsilon1', c['epsilon1'], '>= 0')
    _check(c['epsilon2'] >= 0, 'epsilon2', c['epsilon2'], '>= 0')
    _check(0 <= c['momentum'] < 1, 'momentum', c['momentum'], 'in [0, 1) (0: none)')
    tx = _adafactor(c, schedule)
  if c['grad_clip_norm'] > 0:
    tx = optax.chain(optax.clip_by_global_norm(c['grad_clip_norm']), tx)
  return tx
