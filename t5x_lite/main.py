"""Command line: `python -m t5x_lite.main COMMAND --config=configs/X.py [--config.a.b=v]`.

Commands: info (model summary and parameter counts), train (resumes from --workdir when it
holds checkpoints); infer, score and eval (predictions, target log-likelihoods and task
metrics on `eval.split` from --workdir's newest checkpoint); convert (a Hugging Face
directory -> a new workdir with config.py and params: `convert --hf_dir=DIR --workdir=OUT`,
no --config) and export (a run's newest params -> a Hugging Face directory: `export
--config=... --workdir=RUN --hf_dir=OUT`); data (a report on the task's splits: sizes,
examples, token-length percentiles, what feature_lengths cut, packing) and vocab (a
SentencePiece model trained on the task's text: `vocab --config=... --vocab.size=8000
--vocab.out=my.model`).
"""

import logging
import os
import sys
from collections.abc import Callable, Sequence

import jax
import ml_collections
from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from t5x_lite import config as config_lib
from t5x_lite import eval_commands, hf_io, models, plots, trainer
from t5x_lite.data import report as data_report
from t5x_lite.data import tasks

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Path to a configs/*.py file; override fields with --config.a.b=value.',
    lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints and logs.')
_HF_DIR = flags.DEFINE_string(
    'hf_dir', None, 'Hugging Face model directory: read by convert, written by export.')
_VOCAB = config_flags.DEFINE_config_dict(
    'vocab', ml_collections.ConfigDict({
        'size': 8000,  # SentencePiece pieces (100 sentinel ids come on top)
        'out': '',  # the .model file to write
        'max_texts': 100_000,  # train on at most this many examples (evenly spaced)
    }), 'The vocab command: --vocab.size=8000 --vocab.out=my.model.', lock_config=True)


def _fail(message: str) -> None:
  """One clear line on stderr, exit code 2."""
  print(f'error: {message}', file=sys.stderr)
  sys.exit(2)


def parse_flags(argv: Sequence[str]) -> list[str]:
  """absl flag parsing whose errors become one line and exit code 2."""
  for arg in argv[1:]:
    if arg.startswith('--config=') and not os.path.isfile(arg.split('=', 1)[1]):
      _fail(f'config file {arg.split("=", 1)[1]!r} not found; pass e.g. '
            '--config=configs/t5_1_1_small.py')
  try:
    return flags.FLAGS(list(argv))
  except (KeyError, AttributeError) as e:
    field = str(e).strip('\'"')
    _fail(f'unknown config field {field!r} in a --config.* override; `info` lists the fields.')
  except (flags.Error, TypeError, ValueError) as e:
    _fail(f'bad flag: {e}')


def param_table(params) -> list[tuple[str, int]]:
  """(top-level module, parameter count) rows, in the params tree's order."""
  return [(name, models.count_params(subtree)) for name, subtree in params.items()]


def info(config: ml_collections.ConfigDict) -> None:
  """Prints the model config and its parameter counts, computed without allocating."""
  model_config = config_lib.model_config(config)
  shapes = models.param_shapes(model_config)
  total = models.count_params(shapes)
  print(f'architecture: {model_config.architecture}')
  for field, value in sorted(config.model.items()):
    print(f'  {field}: {value}')
  print('parameters:')
  for name, count in param_table(shapes):
    print(f'  {name:<24} {count:>16,}')
  print(f'  {"total":<24} {total:>16,}')
  print(f'float32 size: {total * 4 / 2**30:.2f} GiB; devices: {jax.device_count()} '
        f'x {jax.devices()[0].platform}')


def train(config: ml_collections.ConfigDict) -> None:
  """Trains into --workdir, saving the resolved config there first."""
  workdir = _WORKDIR.value
  if not workdir:
    _fail('--workdir is required for train, e.g. --workdir=runs/my_run')
  # A bad mesh, batch size or task fails here, before the workdir is touched.
  trainer.setup_distributed(config)
  trainer.setup_partitioner(config)
  truncation = data_report.truncation_summary(config.data)
  try:
    os.makedirs(workdir, exist_ok=True)
    if jax.process_index() == 0:
      config_path = os.path.join(workdir, 'config.json')
      with open(config_path + '.tmp', 'w', encoding='utf-8') as f:
        f.write(config.to_json_best_effort(indent=2, sort_keys=True))
      os.replace(config_path + '.tmp', config_path)
      print(truncation)
  except OSError as e:
    _fail(f'cannot write to workdir {workdir!r} ({e.strerror}); choose a writable directory.')
  metrics = trainer.train(config, workdir)
  if jax.process_index() == 0:
    print('final: ' + ', '.join(f'{k}={v:.4g}' for k, v in sorted(metrics.items())))
    print(f'loss curve: {plots.plot_loss_curve(workdir)}')


def _checkpoint_workdir(command: str, config: ml_collections.ConfigDict) -> str:
  """--workdir, required; joins a multi-process run first, as train does."""
  workdir = _WORKDIR.value
  if not workdir:
    _fail(f'--workdir is required for {command}: the workdir of a train run')
  trainer.setup_distributed(config)
  return workdir


def infer(config: ml_collections.ConfigDict) -> None:
  """Writes <workdir>/infer_<task>_<split>.jsonl: input, target and prediction per example."""
  path, count = eval_commands.run_infer(config, _checkpoint_workdir('infer', config))
  if jax.process_index() == 0:
    print(f'wrote {count} predictions to {path}')


def score(config: ml_collections.ConfigDict) -> None:
  """Writes <workdir>/score_<task>_<split>.jsonl: each example's target log-likelihood."""
  path, mean = eval_commands.run_score(config, _checkpoint_workdir('score', config))
  if jax.process_index() == 0:
    print(f'wrote scores to {path}; mean log-likelihood {mean:.4f}')


def evaluate(config: ml_collections.ConfigDict) -> None:
  """Prints the task's metrics beside a copy-the-input baseline, and sample predictions;
  logs the metrics (prefix 'eval') and writes every prediction in the workdir."""
  report = eval_commands.run_eval(config, _checkpoint_workdir('eval', config))
  if jax.process_index() != 0:
    return
  print(f'{tasks.from_config(config.data, config.eval.task).name} {config.eval.split} '
        f'({report.num_examples} examples) at step {report.step}:')
  print(f'  {"metric":<20} {"model":>10} {"copy input":>12}')
  for name, value in sorted(report.metrics.items()):
    print(f'  {name:<20} {value:>10.4f} {report.baseline.get(name, float("nan")):>12.4f}')
  for row in report.samples:
    print(f'\n  input:      {row["input"]}\n  target:     {row["target"]}\n'
          f'  prediction: {row["prediction"]}')


def _hf_dir(command: str) -> str:
  if not _HF_DIR.value:
    _fail(f'--hf_dir is required for {command}: a Hugging Face model directory')
  return _HF_DIR.value


def export(config: ml_collections.ConfigDict) -> None:
  """Writes --workdir's newest params as a Hugging Face directory (--hf_dir)."""
  hf_dir = _hf_dir('export')
  step = hf_io.export(config, _checkpoint_workdir('export', config), hf_dir)
  print(f'wrote the step {step} params to {hf_dir}: ' + ', '.join(sorted(os.listdir(hf_dir))))


def convert(config: ml_collections.ConfigDict | None) -> None:
  """Writes a Hugging Face directory (--hf_dir) as a new workdir: config.py, checkpoints/0."""
  if config is not None:
    _fail('convert takes no --config: it writes one, <workdir>/config.py')
  hf_dir, workdir = _hf_dir('convert'), _WORKDIR.value
  if not workdir:
    _fail('--workdir is required for convert: the new directory to write, e.g. runs/t5_small')
  model = hf_io.convert(hf_dir, workdir)
  print(f'converted {hf_dir} ({model.architecture}, '
        f'{models.count_params(models.param_shapes(model)):,} params) to {workdir}: '
        + ', '.join(sorted(os.listdir(workdir))))
  print(f'next: python -m t5x_lite.main eval --config={workdir}/config.py --workdir={workdir}')


def data(config: ml_collections.ConfigDict) -> None:
  """Prints the data report: per split its size, rendered examples, token-length
  percentiles, the share feature_lengths cut, packing efficiency and lengths to use."""
  print(data_report.data_report(config))


def vocab(config: ml_collections.ConfigDict) -> None:
  """Trains a SentencePiece model on the task's text (--vocab.size, --vocab.out) and prints
  its coverage and the config line that uses it."""
  if not _VOCAB.value.out:
    _fail('--vocab.out is required for vocab: the .model file to write, e.g. '
          '--vocab.out=my.model')
  print(data_report.train_vocabulary(config, _VOCAB.value.size, _VOCAB.value.out,
                                     _VOCAB.value.max_texts))


_COMMANDS: dict[str, Callable[[ml_collections.ConfigDict], None]] = {
    'info': info, 'train': train, 'infer': infer, 'score': score, 'eval': evaluate,
    'export': export, 'convert': convert, 'data': data, 'vocab': vocab}


def main(argv: Sequence[str]) -> None:
  # jax's probe for absent TPU/GPU backends and Orbax's per-save progress log at INFO: noise
  # unless asked for with --verbosity.
  logging.getLogger('jax._src.xla_bridge').setLevel(logging.WARNING)
  if not flags.FLAGS['verbosity'].present:
    absl_logging.set_verbosity(absl_logging.WARNING)
  commands = sorted(_COMMANDS)
  if len(argv) != 2:
    _fail(f'expected one command, got {argv[1:]}; usage: python -m t5x_lite.main '
          f'{{{",".join(commands)}}} --config=configs/NAME.py')
  command = argv[1]
  if command not in _COMMANDS:
    _fail(f'unknown command "{command}"; choose one of {commands}.')
  if _CONFIG.value is None and command != 'convert':
    _fail('--config is required, e.g. --config=configs/t5_1_1_small.py')
  try:
    _COMMANDS[command](_CONFIG.value)
  except (ValueError, KeyError, FileNotFoundError, trainer.NonFiniteLossError) as e:
    _fail(str(e))


def run() -> None:
  """Console-script entry point."""
  app.run(main, flags_parser=parse_flags)


if __name__ == '__main__':
  run()
