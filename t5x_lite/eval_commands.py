"""What the `eval`, `infer` and `score` commands do, from a run config and a workdir.

  decode_config / eval_task /     the decode settings, task and `evaluation.Evaluator` a
  evaluator_from_config           run config's `eval` section describes
  load_params                     a workdir's newest params, checked against the config
  run_infer / run_score / run_eval  predictions, log-likelihoods or metrics of the eval split,
                                  written to the workdir (eval also beside a copy-the-input
                                  baseline, with sample rows)
  copy_input_baseline /           trivial baselines beside the metrics: copy the input
  majority_class_baseline         (generation), the training split's commonest label
                                  (classification)
"""

import collections
import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from t5x_lite import checkpoints, decoding, evaluation, logging_utils, models, partitioning
from t5x_lite import config as config_lib
from t5x_lite.data import tasks


def decode_config(config: ml_collections.ConfigDict, eos_id: int = 1
                  ) -> decoding.DecodeConfig:
  """The search described by a run config's `eval` section."""
  ev = config.eval
  return decoding.DecodeConfig(
      method=ev.method, max_decode_length=ev.max_decode_length, temperature=ev.temperature,
      top_k=ev.top_k, top_p=ev.top_p, num_beams=ev.num_beams, alpha=ev.alpha, eos_id=eos_id)


def eval_task(config: ml_collections.ConfigDict) -> tasks.Task:
  """`eval.task` (default: the `data` section's task), as a k-shot variant when
  `eval.few_shot_k` > 0."""
  task = tasks.from_config(config.data, config.eval.task)
  if isinstance(task, tasks.Mixture):
    raise ValueError(f'{task.name} is a mixture; evaluate one of its tasks with '
                     f'--config.eval.task=NAME (one of {", ".join(task.task_names)})')
  if config.eval.few_shot_k:
    task = evaluation.few_shot_task(task, config.eval.few_shot_k,
                                    shots_split=config.eval.few_shot_split,
                                    seed=config.eval.seed)
  return task


def make_partitioner(config: ml_collections.ConfigDict) -> partitioning.Partitioner:
  return partitioning.Partitioner(partitioning.make_mesh(config.mesh_shape),
                                  partitioning.logical_rules(config.axis_rules.to_dict()))


def evaluator_from_config(config: ml_collections.ConfigDict,
                          model: evaluation.Model | None = None,
                          partitioner: partitioning.Partitioner | None = None
                          ) -> evaluation.Evaluator:
  """The Evaluator a run config's `eval` section describes."""
  task = eval_task(config)
  model = model or models.build_model(config_lib.model_config(config))
  candidates = [c.strip() for c in config.eval.candidates.split(',') if c.strip()]
  return evaluation.Evaluator(
      task, config.eval.split, model, feature_lengths=config.data.feature_lengths.to_dict(),
      batch_size=config.eval.batch_size,
      decode_config=decode_config(config, task.output_features['targets'].vocabulary.eos_id),
      num_examples=config.eval.num_examples,
      bidirectional_prefix=config.data.converter == 'prefix_lm', candidates=candidates,
      partitioner=partitioner, seed=config.eval.seed)


def checkpoint_param_shapes(path: str) -> dict[str, tuple[int, ...]]:
  """Param name -> shape in a saved state, read from its metadata (no arrays loaded)."""
  metadata = ocp.PyTreeCheckpointHandler().metadata(epath.Path(path))['params']
  return {_name(p): tuple(m.shape) for p, m in jax.tree_util.tree_leaves_with_path(metadata)}


def _name(key_path: Any) -> str:
  return jax.tree_util.keystr(key_path, simple=True, separator='/')


def check_params_match(path: str, abstract_params: Any, workdir: str) -> None:
  """A clear error when the config's model does not match the checkpoint's params."""
  saved = checkpoint_param_shapes(path)
  for key_path, leaf in jax.tree_util.tree_leaves_with_path(abstract_params):
    name = _name(key_path)
    if name not in saved:
      raise ValueError(f'config/checkpoint mismatch: param {name} is not in the checkpoint '
                       f'of {workdir!r}; use the config that run was trained with')
    if saved[name] != tuple(leaf.shape):
      raise ValueError(f'config/checkpoint mismatch: param {name} has shape {saved[name]} in '
                       f'the checkpoint of {workdir!r} but {tuple(leaf.shape)} in this '
                       'config; use the config that run was trained with')


def _checked_newest(config: ml_collections.ConfigDict, workdir: str,
                    partitioner: partitioning.Partitioner) -> tuple[epath.Path, int, Any]:
  """The checkpoint directory, its newest step and the config's abstract params, checked
  against that step's metadata (no arrays read)."""
  directory = checkpoints.as_path(epath.Path(workdir) / 'checkpoints')
  step = checkpoints.latest_step(directory)
  if step is None:
    raise FileNotFoundError(f'no checkpoint in {os.fspath(directory)!r}; pass the --workdir of '
                            'a train run')
  boxed = models.boxed_param_shapes(config_lib.model_config(config))
  abstract = checkpoints.abstract_with_shardings(nn.unbox(boxed),
                                                 partitioner.boxed_shardings(boxed))
  check_params_match(os.fspath(directory / str(step) / 'state'), abstract, workdir)
  return directory, step, abstract


def check_checkpoint(config: ml_collections.ConfigDict, workdir: str) -> None:
  """`load_params`' checks alone: the newest checkpoint exists and fits the config."""
  _checked_newest(config, workdir, make_partitioner(config))


def load_params(config: ml_collections.ConfigDict, workdir: str,
                partitioner: partitioning.Partitioner) -> tuple[Any, int]:
  """The newest checkpoint's params in `workdir`, sharded per the config, and its step.

  Raises:
    FileNotFoundError: `workdir` holds no checkpoint.
    ValueError: the config's model differs from the checkpoint's (names a param).
  """
  directory, step, abstract = _checked_newest(config, workdir, partitioner)
  return checkpoints.restore_params(directory, abstract, step), step


def _setup(config: ml_collections.ConfigDict, workdir: str
           ) -> tuple[evaluation.Evaluator, Any, int]:
  partitioner = make_partitioner(config)
  params, step = load_params(config, workdir, partitioner)
  return evaluator_from_config(config, partitioner=partitioner), params, step


def _write_jsonl(path: str, rows: Sequence[Mapping[str, Any]]) -> None:
  if jax.process_index() != 0:
    return
  temporary = epath.Path(path + '.tmp')
  temporary.write_text(''.join(json.dumps(row, ensure_ascii=False) + '\n' for row in rows),
                       encoding='utf-8')
  temporary.replace(path)


def _output_path(workdir: str, kind: str, evaluator: evaluation.Evaluator) -> str:
  return os.fspath(epath.Path(workdir) / f'{kind}_{evaluator.task.name}_{evaluator.split}.jsonl')


def run_infer(config: ml_collections.ConfigDict, workdir: str) -> tuple[str, int]:
  """Decodes the eval split; writes `<workdir>/infer_<task>_<split>.jsonl` rows
  {"input", "target", "prediction"}; returns the path and the row count."""
  evaluator, params, _ = _setup(config, workdir)
  rows = evaluator.rows(prediction=evaluator.predict(params))
  path = _output_path(workdir, 'infer', evaluator)
  _write_jsonl(path, rows)
  return path, len(rows)


def run_score(config: ml_collections.ConfigDict, workdir: str) -> tuple[str, float]:
  """Writes each eval example's target log-likelihood to
  `<workdir>/score_<task>_<split>.jsonl` rows {"input", "target", "log_likelihood"};
  returns the path and the mean."""
  evaluator, params, _ = _setup(config, workdir)
  scores = evaluator.score(params)
  rows = evaluator.rows(log_likelihood=[float(s) for s in scores])
  path = _output_path(workdir, 'score', evaluator)
  _write_jsonl(path, rows)
  return path, float(np.mean(scores))


@dataclasses.dataclass
class EvalReport:
  """What the eval command prints: the model's metrics next to a copy-the-input baseline's,
  and a few example rows."""

  step: int
  num_examples: int
  metrics: dict[str, float]
  baseline: dict[str, float]
  samples: list[dict[str, str]]


def strip_task_prefix(text: str) -> str:
  """The input without its T5-style "task prefix: " ("translate English to German: x" -> x),
  which is what a copy-the-input baseline predicts."""
  prefix, separator, rest = text.partition(': ')
  return rest if separator and '\n' not in prefix else text


def copy_input_baseline(task: tasks.Task, rows: Sequence[Mapping[str, str]]) -> dict[str, float]:
  """The task's metrics when each prediction is its own input with the task prefix removed:
  the floor a trained model must clear (copying is not free in translation, whose text
  shares names, numbers and menu paths with its source)."""
  if not task.metric_fns:
    return {}
  scores = task.score([r['target'] for r in rows], [strip_task_prefix(r['input']) for r in rows])
  return {k: float(v) for k, v in scores.items()}


def majority_label(task: tasks.Task, split: str = 'train') -> str:
  """The most frequent target text of `split` (after the task's prompt template and its
  postprocess_fn; a tie goes to the label first in sorted order): what a majority-class
  baseline predicts. Read from the training split, so it never peeks at evaluation labels."""
  text_steps, _ = tasks.split_at_tokenize(task)
  text_task = dataclasses.replace(task, preprocessors=tuple(text_steps))
  source = task.source(split)
  labels = collections.Counter(
      (task.postprocess_fn or str)(example['targets'])
      for example in (text_task.preprocess(source[i]) for i in range(len(source))) if example)
  if not labels:
    raise ValueError(f'split {split!r} of task {task.name} has no examples to take a majority '
                     'label from')
  return min(labels, key=lambda label: (-labels[label], label))


def majority_class_baseline(task: tasks.Task, rows: Sequence[Mapping[str, str]],
                            label: str) -> dict[str, float]:
  """The task's metrics on `rows` ({'target': text}) when every prediction is `label`
  (e.g. `majority_label(task)`): the floor a classifier must clear."""
  return {k: float(v) for k, v in
          task.score([r['target'] for r in rows], [label] * len(rows)).items()}


def run_eval(config: ml_collections.ConfigDict, workdir: str, num_samples: int = 5
             ) -> EvalReport:
  """The task metrics on the eval split, logged (prefix 'eval') to `metrics.jsonl` and
  TensorBoard at the checkpoint's step, with the predictions in
  `<workdir>/eval_<task>_<split>.jsonl`; returns them with the copy-input baseline and
  `num_samples` rows spread over the split."""
  evaluator, params, step = _setup(config, workdir)
  result = evaluator.evaluate(params)
  _write_jsonl(_output_path(workdir, 'eval', evaluator), result.rows)
  logger = logging_utils.MetricLogger(workdir, total_steps=step, initial_step=step,
                                      enabled=jax.process_index() == 0, prefix='eval')
  logger.write(step, result.metrics)
  logger.close()
  stride = max(1, len(result.rows) // max(1, num_samples))
  return EvalReport(step, len(result.rows), result.metrics,
                    copy_input_baseline(evaluator.task, result.rows),
                    result.rows[::stride][:num_samples])
