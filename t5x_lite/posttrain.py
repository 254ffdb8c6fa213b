"""Post-training objectives for the one train step: a pairwise reward model and DPO.

SFT needs nothing here: it is seq2seq training on an instruction task (data/posttrain_data.py)
whose converter puts the loss on the response tokens only. The preference objectives read
batches whose rows 2i / 2i + 1 are pair i's chosen / rejected response
(`posttrain_data.PairFeatureConverter`) and return, per microbatch, a loss already divided
by the number of microbatches plus additive metric sums, the trainer's contract:

  reward (Bradley-Terry):  loss = mean_i -log sigmoid(r(chosen_i) - r(rejected_i))
  dpo (Rafailov et al. 2023), with h_i = [log pi(c_i) - log ref(c_i)] - [log pi(r_i) - log ref(r_i)]
    (sequence log-probs summed over response tokens):
    sigmoid:  -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)   (eps: label smoothing)
    ipo:      (h - 1 / (2 beta))^2
  implicit rewards: beta (log pi - log ref) of the chosen and of the rejected response.

The reference log-probs come from frozen reference params (passed to the step beside the
state, sharded like the policy's, no optimizer state) or from the batch's `reference_logps`,
precomputed once per example (`precompute_reference`).

Shape letters: B pairs, R = 2B rows, L length, V vocab.
"""

import dataclasses
import functools
import json
import os
from collections.abc import Iterator, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from t5x_lite import eval_commands, models, partitioning
from t5x_lite import config as config_lib
from t5x_lite.data import pipeline, posttrain_data, sources, tasks

Array = jax.Array
OBJECTIVES = ('seq2seq', 'reward', 'dpo')
DPO_LOSSES = ('sigmoid', 'ipo')
REFERENCES = ('params', 'precomputed')
# Batch features that are not model inputs.
NON_INPUTS = ('decoder_loss_weights', 'reference_logps')


@dataclasses.dataclass(frozen=True)
class Objective:
  """A preference objective and its settings (static under jit)."""

  name: str  # 'reward' or 'dpo'
  beta: float = 0.1
  dpo_loss: str = 'sigmoid'
  label_smoothing: float = 0.0
  reference: str = 'params'  # or 'precomputed': the batch's `reference_logps`
  num_microbatches: int = 1

  def __post_init__(self):
    checks = ((self.name in ('reward', 'dpo'), f'name must be reward or dpo, not {self.name!r}'),
              (self.beta > 0, f'beta must be positive, got {self.beta}'),
              (self.dpo_loss in DPO_LOSSES, f'dpo_loss must be one of {DPO_LOSSES}'),
              (0 <= self.label_smoothing < 0.5, 'label_smoothing must be in [0, 0.5)'),
              (self.reference in REFERENCES, f'reference must be one of {REFERENCES}'))
    for ok, message in checks:
      if not ok:
        raise ValueError(f'posttrain: {message}')

  def per_pair(self, model: nn.Module, params: Any, batch: Mapping[str, Array],
               reference: Any = None, *, deterministic: bool = True, rngs: Any = None
               ) -> tuple[Array, dict[str, Array]]:
    """Per-pair losses [B] and per-pair stats (`bradley_terry` / `dpo`) of a batch."""
    if self.name == 'reward':
      rewards = model.apply({'params': params}, **model_inputs(batch),
                            deterministic=deterministic, rngs=rngs, method='reward')
      return bradley_terry(*split_pairs(rewards))
    policy = sequence_logprobs(model, params, batch, deterministic=deterministic, rngs=rngs)
    if self.reference == 'precomputed':
      ref = batch['reference_logps']
    else:
      ref = sequence_logprobs(model, jax.lax.stop_gradient(reference), batch)
    return dpo(*split_pairs(policy), *split_pairs(ref), beta=self.beta,
               loss_type=self.dpo_loss, label_smoothing=self.label_smoothing)

  def loss(self, model: nn.Module, params: Any, batch: Mapping[str, Array], rng: Array,
           reference: Any = None) -> tuple[Array, dict[str, Array]]:
    """(loss / num_microbatches, metric sums) of one training microbatch of pairs."""
    per_pair, stats = self.per_pair(model, params, batch, reference, deterministic=False,
                                    rngs={'dropout': rng})
    scale = 1.0 / (per_pair.shape[0] * self.num_microbatches)  # sums over microbatches = means
    loss = jnp.sum(per_pair) * scale
    sums = {k: jnp.sum(v) * scale for k, v in stats.items()}
    # The trainer's finalize_metrics: 'accuracy' = correct / weight_sum, the pairwise accuracy.
    sums.update(loss=loss, z_loss=jnp.zeros(()), correct=jnp.sum(stats['accuracy']) * scale,
                weight_sum=jnp.asarray(1.0 / self.num_microbatches),
                num_tokens=jnp.sum((batch['decoder_loss_weights'] > 0).astype(jnp.float32)))
    return loss, sums


def objective_from_config(config: ml_collections.ConfigDict) -> Objective | None:
  """The run's preference objective, None for plain seq2seq (incl. SFT) training."""
  name = config.train.objective
  if name not in OBJECTIVES:
    raise ValueError(f'train.objective={name!r} is not one of {OBJECTIVES}')
  if name == 'seq2seq':
    return None
  if name == 'reward' and not config.model.reward_head:
    raise ValueError('train.objective=reward needs a reward head: --config.model.reward_head=True')
  post = config.posttrain
  return Objective(name, beta=post.beta, dpo_loss=post.dpo_loss,
                   label_smoothing=post.label_smoothing, reference=post.reference,
                   num_microbatches=config.train.num_microbatches)


def converter_name(config: ml_collections.ConfigDict) -> str:
  """The feature converter of the run's training batches: preference objectives pair theirs."""
  if config.train.objective == 'seq2seq':
    return config.data.converter
  return f'pairs_{config.data.converter}'


def reference_workdir(config: ml_collections.ConfigDict) -> str | None:
  """The workdir of DPO's frozen reference model; None when no params are needed."""
  if config.train.objective != 'dpo' or config.posttrain.reference == 'precomputed':
    return None
  workdir = config.posttrain.reference_workdir
  if not workdir and config.train.init_from:
    workdir = os.path.dirname(os.path.normpath(config.train.init_from))
  if not workdir:
    raise ValueError('train.objective=dpo needs a reference model: set train.init_from=<SFT '
                     'workdir>/checkpoints or posttrain.reference_workdir (or '
                     "posttrain.reference='precomputed' with reference log-probs in the data)")
  return workdir


def load_reference(config: ml_collections.ConfigDict,
                   partitioner: partitioning.Partitioner) -> Any:
  """DPO's frozen reference params, sharded like the policy's (None if not needed).

  Raises:
    FileNotFoundError / ValueError: no checkpoint there, or its shapes differ from the policy's.
  """
  workdir = reference_workdir(config)
  if workdir is None:
    return None
  return eval_commands.load_params(config, workdir, partitioner)[0]


def check_reference(config: ml_collections.ConfigDict) -> None:
  """Validates the objective and the reference's checkpoint metadata (no arrays read), so a
  missing or mismatched reference fails before the workdir is touched (the CLI calls this
  first; the trainer loads it)."""
  objective_from_config(config)
  workdir = reference_workdir(config)
  if workdir is not None:
    eval_commands.check_checkpoint(config, workdir)


def model_inputs(batch: Mapping[str, Array]) -> dict[str, Array]:
  """The batch's model features (pairs are never packed: no segment ids or positions)."""
  return {k: v for k, v in batch.items() if k not in NON_INPUTS}


def split_pairs(x: Array) -> tuple[Array, Array]:
  """[R, ...] interleaved rows -> (chosen [B, ...], rejected [B, ...])."""
  return x[0::2], x[1::2]


def token_logprobs(logits: Array, targets: Array, weights: Array) -> Array:
  """[R]: sum over positions of log softmax(logits)[target] * weight (the response's
  log-probability when weights are 1 on its tokens)."""
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  picked = jnp.take_along_axis(log_probs, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
  return jnp.sum(picked * (weights > 0), axis=-1)


def sequence_logprobs(model: nn.Module, params: Any, batch: Mapping[str, Array], *,
                      deterministic: bool = True, rngs: Any = None) -> Array:
  """[R] log-probabilities of each row's loss-weighted (response) tokens."""
  logits = model.apply({'params': params}, **model_inputs(batch), deterministic=deterministic,
                       rngs=rngs)  # [R, L, V]
  return token_logprobs(logits, batch['decoder_target_tokens'], batch['decoder_loss_weights'])


def bradley_terry(chosen: Array, rejected: Array) -> tuple[Array, dict[str, Array]]:
  """Per-pair -log sigmoid(r_c - r_r) [B] and per-pair stats (accuracy, margin, rewards)."""
  margin = chosen - rejected
  return -jax.nn.log_sigmoid(margin), {
      'accuracy': (margin > 0).astype(jnp.float32), 'margin': margin,
      'reward_chosen': chosen, 'reward_rejected': rejected}


def dpo(policy_chosen: Array, policy_rejected: Array, reference_chosen: Array,
        reference_rejected: Array, *, beta: float, loss_type: str = 'sigmoid',
        label_smoothing: float = 0.0) -> tuple[Array, dict[str, Array]]:
  """Per-pair DPO losses [B] and stats (module docstring), from sequence log-probs [B]."""
  chosen_ratio = policy_chosen - reference_chosen
  rejected_ratio = policy_rejected - reference_rejected
  h = chosen_ratio - rejected_ratio
  if loss_type == 'ipo':
    per_pair = jnp.square(h - 1.0 / (2.0 * beta))
  else:
    per_pair = (-(1.0 - label_smoothing) * jax.nn.log_sigmoid(beta * h)
                - label_smoothing * jax.nn.log_sigmoid(-beta * h))
  reward_chosen, reward_rejected = beta * chosen_ratio, beta * rejected_ratio
  margin = reward_chosen - reward_rejected
  return per_pair, {
      'accuracy': (margin > 0).astype(jnp.float32), 'margin': margin,
      'reward_chosen': reward_chosen, 'reward_rejected': reward_rejected,
      'log_ratio_chosen': chosen_ratio, 'log_ratio_rejected': rejected_ratio,
      'logp_chosen': policy_chosen, 'logp_rejected': policy_rejected}


def pair_batches(config: ml_collections.ConfigDict, split: str, batch_size: int,
                 task: tasks.Task | None = None) -> Iterator[dict[str, np.ndarray]]:
  """One pass over a preference split in order, as paired batches (last one smaller)."""
  data = config.data
  return iter(pipeline.get_dataset(
      task or tasks.from_config(data), split, data.feature_lengths.to_dict(), batch_size,
      shuffle=False, num_epochs=1, converter=f'pairs_{data.converter}', truncate=data.truncate,
      drop_remainder=False, log_every=0, prefetch=0,
      start_id=config.model.decoder_start_token_id))


def evaluate_pairs(objective: Objective, model: nn.Module, params: Any,
                   batches: Iterator[Mapping[str, np.ndarray]], reference: Any = None
                   ) -> tuple[dict[str, float], dict[str, np.ndarray]]:
  """Mean metrics over every pair of `batches` (no dropout), and per-pair arrays of
  `reward_chosen`, `reward_rejected` (implicit rewards for DPO) and `margin`."""
  stats = jax.jit(functools.partial(objective.per_pair, model))
  parts = [jax.device_get(stats(params, dict(batch), reference)) for batch in batches]
  per_pair = {k: np.concatenate([p[1][k] for p in parts]) for k in parts[0][1]}
  per_pair['loss'] = np.concatenate([p[0] for p in parts])
  means = {k: float(np.mean(v)) for k, v in per_pair.items()}
  means['num_pairs'] = len(per_pair['loss'])
  return means, per_pair


def run_score_pairs(config: ml_collections.ConfigDict, workdir: str
                    ) -> tuple[str, dict[str, float]]:
  """The `score` command for preference runs: writes `<workdir>/score_pairs_<split>.jsonl`
  rows {"prompt", "chosen", "rejected", "reward_chosen", "reward_rejected"} (the reward
  model's rewards, or DPO's implicit ones) for the pairs of `eval.split`; returns the path
  and the mean metrics (pairwise accuracy, margin, loss)."""
  objective = objective_from_config(config)
  partitioner = eval_commands.make_partitioner(config)
  params, _ = eval_commands.load_params(config, workdir, partitioner)
  model = models.build_model(config_lib.model_config(config))
  task = tasks.from_config(config.data)
  split = config.eval.split
  reference = load_reference(config, partitioner)
  with partitioner.activate():
    means, per_pair = evaluate_pairs(
        objective, model, params, pair_batches(config, split, config.eval.batch_size, task),
        reference)
  source = task.source(split)
  if len(source) != means['num_pairs']:
    raise ValueError(f'{means["num_pairs"]} of {len(source)} pairs fit the feature lengths '
                     'whole; score with data.truncate=True to score them all')
  path = os.path.join(workdir, f'score_pairs_{split}.jsonl')
  with open(path, 'w', encoding='utf-8') as f:
    for i in range(len(source)):
      row = {k: source[i][k] for k in ('prompt', 'chosen', 'rejected')}
      row.update(reward_chosen=float(per_pair['reward_chosen'][i]),
                 reward_rejected=float(per_pair['reward_rejected'][i]))
      f.write(json.dumps(row, ensure_ascii=False) + '\n')
  return path, means


def precompute_reference(model: nn.Module, reference: Any, rows: list[Mapping[str, Any]],
                         config: ml_collections.ConfigDict, out_path: str,
                         batch_size: int = 32) -> int:
  """Writes `rows` ({"prompt", "chosen", "rejected"}) to `out_path` as JSONL with each
  pair's reference log-probs (`reference_chosen_logp`, `reference_rejected_logp`), computed
  once, for DPO with `posttrain.reference='precomputed'`; returns the number of rows."""
  task = posttrain_data.preference_task('precompute', lambda split: sources.InMemorySource(rows))
  logp = jax.jit(lambda params, batch: sequence_logprobs(model, params, batch))
  values = np.concatenate([np.asarray(logp(reference, dict(batch)))
                           for batch in pair_batches(config, 'train', batch_size, task)])
  if len(values) != 2 * len(rows):
    raise ValueError(f'{len(values) // 2} of {len(rows)} pairs fit the feature lengths whole; '
                     'precompute with data.truncate=True to keep every pair')
  with open(out_path, 'w', encoding='utf-8') as f:
    for i, row in enumerate(rows):
      out = dict(row, reference_chosen_logp=float(values[2 * i]),
                 reference_rejected_logp=float(values[2 * i + 1]))
      f.write(json.dumps(out, ensure_ascii=False) + '\n')
  return len(rows)
