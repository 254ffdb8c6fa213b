"""Everything `train` checks before it creates or writes anything in the workdir.

`check_train` validates the resolved config (every field's type and range, the mesh against
every parameter's logical axes, the task, vocabulary, `init_from`, the eval settings), the
workdir itself and, on resume, the stored run: its `config.json` and its checkpoints' shapes.
Every problem is a `ValueError` whose message is one line naming the field, the value, what
is allowed and the fix; the CLI prints it as `error: ...` with exit code 2.
"""

import dataclasses
import json
import math
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import ml_collections
from etils import epath

from t5x_lite import checkpoints, eval_commands, models, optimizers, partitioning, trainer
from t5x_lite import config as config_lib
from t5x_lite.data import feature_converters, posttrain_data, tasks

NAN_POLICIES = ('stop', 'skip')
LOSS_NORMALIZERS = ('NUM_REAL_TARGET_TOKENS', 'NUM_TOTAL_TARGET_TOKENS', 'AVERAGE_PER_SEQUENCE')

# Changes that make a stored run's checkpoints or data stream unusable: resuming with any of
# them stops (a new workdir, or fine-tuning with init_from, is the way). Everything else
# (steps, learning rate, logging, checkpointing, mesh, eval) may change between restarts.
FROZEN_FIELDS = ('model.', 'data.task', 'data.split', 'data.vocabulary', 'data.feature_lengths',
                 'data.converter', 'data.pack', 'data.truncate', 'data.shuffle', 'data.files',
                 'data.format', 'data.header', 'data.columns', 'data.inputs_template',
                 'data.targets_template', 'data.bad_rows', 'data.validation_fraction', 'seed',
                 'train.batch_size', 'optimizer.name', 'optimizer.factored',
                 'optimizer.min_dim_size_to_factor', 'optimizer.momentum',
                 'optimizer.grad_clip_norm', 'optimizer.weight_decay')
# Model fields that change neither the params' shapes nor the batches.
_FREE_MODEL_FIELDS = ('model.dropout_rate', 'model.dtype', 'model.remat_policy')


@dataclasses.dataclass(frozen=True)
class Rule:
  """What a config field may hold: `ok(value)`, said in words, and a value to suggest."""

  ok: Callable[[Any], bool]
  allowed: str
  example: Any


def _int(low: int, example: int, note: str = '') -> Rule:
  return Rule(lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= low,
              f'an integer >= {low}{note}', example)


def _float(low: float, high: float, example: float, high_open: bool = False) -> Rule:
  def ok(v):
    return (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            and low <= v and (v < high if high_open else v <= high))
  return Rule(ok, f'a number in [{low}, {high}{")" if high_open else "]"}', example)


def _one_of(choices: tuple[str, ...]) -> Rule:
  return Rule(lambda v: v in choices, f'one of {", ".join(choices)}', choices[0])


def _loss_normalizer(value: Any) -> bool:
  if value is None or value in LOSS_NORMALIZERS:
    return True
  return _float(1e-30, math.inf, 1.0).ok(value)


_BOOL = Rule(lambda v: isinstance(v, bool), 'True or False', True)

RULES: dict[str, Rule] = {
    'seed': _int(0, 0),
    'train.num_steps': _int(1, 1000),
    'train.batch_size': _int(1, 32),
    'train.num_microbatches': _int(1, 1),
    'train.log_every': _int(1, 10),
    'train.checkpoint_every': _int(1, 200),
    'train.keep_checkpoints': _int(0, 3, ' (0 keeps all)'),
    'train.async_checkpointing': _BOOL,
    'train.z_loss': _float(0.0, math.inf, 1e-4),
    'train.label_smoothing': _float(0.0, 1.0, 0.1, high_open=True),
    'train.loss_normalizing_factor': Rule(
        _loss_normalizer, f'None, a positive number or one of {", ".join(LOSS_NORMALIZERS)}',
        LOSS_NORMALIZERS[0]),
    'train.nan_policy': _one_of(NAN_POLICIES),
    'train.peak_flops_per_device': _float(0.0, math.inf, 197e12),
    'data.converter': _one_of(tuple(sorted(feature_converters.CONVERTERS))),
    'data.pack': _BOOL,
    'data.truncate': _BOOL,
    'data.shuffle': _BOOL,
    'data.num_workers': _int(0, 0),
    'eval.num_examples': _int(0, 0, ' (0 = all)'),
    'eval.batch_size': _int(1, 32),
    'eval.every_steps': _int(0, 0, ' (0 = never)'),
    'eval.few_shot_k': _int(0, 0),
}


def _fail(field: str, value: Any, allowed: str, example: Any) -> ValueError:
  return ValueError(f'{field}={value!r} is not allowed: it must be {allowed}; pass e.g. '
                    f'--config.{field}={example}')


def flatten(tree: Mapping[str, Any], prefix: str = '') -> dict[str, Any]:
  """{'a': {'b': 1}} -> {'a.b': 1}."""
  flat = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      flat.update(flatten(value, f'{prefix}{key}.'))
    else:
      flat[f'{prefix}{key}'] = value
  return flat


def check_config(config: ml_collections.ConfigDict) -> None:
  """Every field's type and range, the model and optimizer, the decoding settings.

  Raises:
    ValueError: one line naming the first bad field, its value, what is allowed, the fix.
  """
  values = flatten(config.to_dict())
  for field, rule in RULES.items():
    if field in values and not rule.ok(values[field]):
      raise _fail(field, values[field], rule.allowed, rule.example)
  for field, length in config.data.feature_lengths.items():
    if not _int(1, 64).ok(length):
      raise _fail(f'data.feature_lengths.{field}', length, 'an integer >= 1', 64)
  config_lib.model_config(config)  # ModelConfig names the field, value and allowed range
  settings = trainer.optimizer_settings(config.optimizer, config.train.num_steps)
  optimizers.make_optimizer(settings)
  optimizers.make_schedule_from_config(settings)
  eval_commands.decode_config(config)


def _check_workdir(workdir: str) -> None:
  """The workdir is a directory we can write, or can be created."""
  path = epath.Path(workdir)
  if path.exists() and not path.is_dir():
    raise ValueError(f'--workdir={workdir} is a file, not a directory; pass a directory, '
                     'e.g. --workdir=runs/my_run')
  if '://' in workdir:  # object stores: permissions show on the first write
    return
  existing = os.path.abspath(workdir)
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
    raise ValueError(f'cannot write to workdir {workdir!r} ({existing} is not a writable '
                     'directory); choose a writable directory')


def _check_data(config: ml_collections.ConfigDict) -> None:
  vocabulary = config.data.vocabulary
  if vocabulary and vocabulary != tasks.NO_VOCABULARY and not epath.Path(vocabulary).is_file():
    raise ValueError(f'data.vocabulary={vocabulary!r} is not a file; pass a SentencePiece '
                     '.model file, or --config.data.vocabulary= for the task\'s own')
  task = tasks.from_config(config.data)
  if isinstance(task, tasks.Task):
    task.source(config.data.split)
  if config.data.format in posttrain_data.FORMATS and not config.data.truncate:
    posttrain_data.check_lengths(task, config.data.feature_lengths.to_dict())
  if config.eval.every_steps:
    eval_commands.evaluator_from_config(config)


def _check_params_fit(directory: epath.Path, config: ml_collections.ConfigDict,
                      partitioner: partitioning.Partitioner, run: str,
                      backbone_only: bool = False) -> None:
  """The newest checkpoint in `directory` whose metadata reads has this config's param
  shapes (an unreadable newest one is left to the fallback restore); `backbone_only` leaves
  out the reward head, which `init_from` does not restore."""
  boxed = models.boxed_param_shapes(config_lib.model_config(config))
  abstract = checkpoints.abstract_with_shardings(nn.unbox(boxed),
                                                 partitioner.boxed_shardings(boxed))
  if backbone_only:
    abstract = models.backbone(abstract)
  steps = sorted((int(p.name) for p in directory.iterdir() if p.name.isdigit()), reverse=True)
  for step in steps:
    path = os.fspath(checkpoints.as_path(directory) / str(step) / 'state')
    try:
      eval_commands.checkpoint_param_shapes(path)
    except Exception:  # pylint: disable=broad-except  # unreadable: the restore falls back
      continue
    eval_commands.check_params_match(path, abstract, run)
    return


def _read_stored_config(path: epath.Path) -> dict[str, Any] | None:
  if not path.exists():
    return None
  try:
    return flatten(json.loads(path.read_text()))
  except (ValueError, AttributeError) as e:
    raise ValueError(f'{path} is not a valid run config ({e}); restore it from '
                     f'{path.parent / "config_history.jsonl"} or move it away') from None


def config_changes(config: ml_collections.ConfigDict, stored: Mapping[str, Any]
                   ) -> dict[str, tuple[Any, Any]]:
  """field -> (stored value, new value) for every field that differs ('<absent>' if none)."""
  current = flatten(json.loads(config.to_json_best_effort()))
  absent = '<absent>'
  return {field: (stored.get(field, absent), current.get(field, absent))
          for field in sorted(set(stored) | set(current))
          if stored.get(field, absent) != current.get(field, absent)}


def _frozen(field: str) -> bool:
  return field.startswith(FROZEN_FIELDS) and field not in _FREE_MODEL_FIELDS


def describe(changes: Mapping[str, tuple[Any, Any]]) -> str:
  return ', '.join(f'{field} {old!r} -> {new!r}' for field, (old, new) in changes.items())


@dataclasses.dataclass(frozen=True)
class TrainPlan:
  """What `check_train` found: the stored run's config changes and whether it is done."""

  changes: dict[str, tuple[Any, Any]]
  latest_step: int | None  # the newest checkpoint, if resuming
  finished: bool  # the newest checkpoint is at or past train.num_steps


def check_train(config: ml_collections.ConfigDict, workdir: str) -> TrainPlan:
  """Validates everything `train` needs, touching nothing (see the module docstring).

  Raises:
    ValueError: one line naming the problem and the fix.
  """
  _check_workdir(workdir)
  check_config(config)
  partitioner = trainer.setup_partitioner(config)  # the mesh against every param's axes
  _check_data(config)
  run = epath.Path(workdir)
  stored = _read_stored_config(run / 'config.json') if run.is_dir() else None
  changes = config_changes(config, stored) if stored is not None else {}
  latest = checkpoints.latest_step(run / 'checkpoints')
  if latest is None:
    if config.train.init_from:
      _check_init_from(config, partitioner)
    return TrainPlan(changes, None, False)
  frozen = {field: change for field, change in changes.items() if _frozen(field)}
  if frozen:
    raise ValueError(
        f'the run in {workdir} has checkpoints made with other values of {describe(frozen)} '
        '(its config.json -> this command); that changes the params\' shapes or the data: '
        f'start a new run with another --workdir, or fine-tune from this one with '
        f'--config.train.init_from={run / "checkpoints"}')
  _check_params_fit(run / 'checkpoints', config, partitioner, workdir)
  return TrainPlan(changes, latest, latest >= config.train.num_steps)


def _check_init_from(config: ml_collections.ConfigDict, partitioner: Any) -> None:
  directory = epath.Path(config.train.init_from)
  if checkpoints.latest_step(directory) is None:
    raise ValueError(f'train.init_from={config.train.init_from!r} holds no checkpoint; pass '
                     'another run\'s checkpoints directory, e.g. runs/base/checkpoints')
  _check_params_fit(directory, config, partitioner, config.train.init_from,
                    backbone_only=True)


def save_run_config(config: ml_collections.ConfigDict, workdir: str,
                    changes: Mapping[str, tuple[Any, Any]]) -> None:
  """Writes `<workdir>/config.json` (atomically, only if it differs) after appending the
  changes from the stored one to `config_history.jsonl`: nothing is silently overwritten."""
  run = epath.Path(workdir)
  if changes:
    with (run / 'config_history.jsonl').open('a') as f:
      f.write(json.dumps({'time': time.strftime('%Y-%m-%dT%H:%M:%S%z'),
                          'changes': {k: list(v) for k, v in changes.items()}}) + '\n')
  path, text = run / 'config.json', config.to_json_best_effort(indent=2, sort_keys=True)
  if path.exists() and path.read_text() == text:
    return
  tmp = run / 'config.json.tmp'
  tmp.write_text(text)
  tmp.replace(path)
