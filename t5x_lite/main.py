"""Command line: `python -m t5x_lite.main COMMAND --config=configs/X.py [--config.a.b=v]`.

Commands: info (model summary and parameter counts), train (resumes from --workdir when it
holds checkpoints); infer, score and eval (predictions, target log-likelihoods and task
metrics on `eval.split` from --workdir's newest checkpoint); convert (a Hugging Face
directory -> a new workdir with config.py and params: `convert --hf_dir=DIR --workdir=OUT`,
no --config) and export (a run's newest params -> a Hugging Face directory: `export
--config=... --workdir=RUN --hf_dir=OUT`); data (a report on the task's splits: sizes,
examples, token-length percentiles, what feature_lengths cut, packing) and vocab (a
SentencePiece model trained on the task's text: `vocab --config=... --vocab.size=8000
--vocab.out=my.model`); sweep (every trial of an experiments/*.py sweep
file, locally or on a launcher: `sweep --sweep=FILE --workdir=DIR [--parallel=N]
[--launcher=local|tpu_vm|slurm] [--dry_run] [--report_only]`); launch (train + eval of
--config on a Cloud TPU VM or SLURM cluster) and status, logs, stop, delete of a launched run.
"""

import logging
import os
import subprocess
import sys
from collections.abc import Callable, Sequence

import jax
import ml_collections
from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from t5x_lite import config as config_lib
from t5x_lite import eval_commands, hf_io, launch, models, plots, posttrain, sweeps, trainer
from t5x_lite.data import report as data_report
from t5x_lite.data import tasks

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Path to a configs/*.py file; override fields with --config.a.b=value.',
    lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints and logs.')
_HF_DIR = flags.DEFINE_string(
    'hf_dir', None, 'Hugging Face model directory: read by convert, written by export.')
_NO_TOKENIZER = flags.DEFINE_bool(
    'no_tokenizer', False, 'export: write no tokenizer, only config.json and the weights.')
_MESH_SHAPE = flags.DEFINE_list(
    'mesh_shape', ['1', '-1', '1'],
    'convert: the (data,fsdp,model) mesh the params are read onto, e.g. 1,-1,1.')
_SWEEP = flags.DEFINE_string('sweep', None, 'sweep: an experiments/*.py sweep file.')
_PARALLEL = flags.DEFINE_integer('parallel', 1, 'sweep: local trials run at a time.')
_REPORT_ONLY = flags.DEFINE_bool(
    'report_only', False, 'sweep: rebuild the results table and plots from the workdirs.')
_DRY_RUN = flags.DEFINE_bool('dry_run', False, 'sweep/launch: print the commands only.')
_LAUNCHER = flags.DEFINE_enum('launcher', 'local', ['local', 'tpu_vm', 'slurm'],
                              'Where sweep/launch/status/logs/stop/delete run.')
_NAME = flags.DEFINE_string('name', None, 'TPU VM or SLURM job name (a sweep appends a hash).')
_ZONE = flags.DEFINE_string('zone', '', 'tpu_vm: the zone, e.g. us-central2-b.')
_ACCELERATOR = flags.DEFINE_string('accelerator_type', '', 'tpu_vm: e.g. v4-8, v5litepod-16.')
_RUNTIME = flags.DEFINE_string('runtime_version', '', 'tpu_vm: default by TPU generation.')
_PROJECT = flags.DEFINE_string('project', '', 'tpu_vm: the project (default: gcloud\'s).')
_SPOT = flags.DEFINE_bool('spot', False, 'tpu_vm: a spot (preemptible) slice.')
_RESERVED = flags.DEFINE_bool('reserved', False, 'tpu_vm: use reserved capacity.')
_QUEUED = flags.DEFINE_bool('queued', False, 'tpu_vm: request via queued-resources.')
_INSTALL = flags.DEFINE_string('install', '', 'tpu_vm: a pip git URL (git+https://...) or '
                               'a local wheel.')
_NODES = flags.DEFINE_integer('nodes', 1, 'slurm: nodes.')
_GPUS = flags.DEFINE_integer('gpus_per_node', 8, 'slurm: GPUs (= tasks) per node.')
_PARTITION = flags.DEFINE_string('partition', '', 'slurm: the partition.')
_TIME_LIMIT = flags.DEFINE_string('time_limit', '', 'slurm: e.g. 24:00:00.')
_ACCOUNT = flags.DEFINE_string('account', '', 'slurm: the account charged.')
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
  posttrain.check_reference(config)
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
  """Writes <workdir>/score_<task>_<split>.jsonl: each example's target log-likelihood; for
  a reward or DPO run, each pair's rewards (score_pairs_<split>.jsonl)."""
  if config.train.objective != 'seq2seq':
    path, means = posttrain.run_score_pairs(config, _checkpoint_workdir('score', config))
    print(f'wrote rewards of {means["num_pairs"]} pairs to {path}; pairwise accuracy '
          f'{means["accuracy"]:.4f}, mean margin {means["margin"]:.4f}, loss {means["loss"]:.4f}')
    return
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
  step = hf_io.export(config, _checkpoint_workdir('export', config), hf_dir,
                      tokenizer=not _NO_TOKENIZER.value)
  print(f'wrote the step {step} params to {hf_dir}: ' + ', '.join(sorted(os.listdir(hf_dir))))


def convert(config: ml_collections.ConfigDict | None) -> None:
  """Writes a Hugging Face directory (--hf_dir) as a new workdir: config.py, checkpoints/0."""
  if config is not None:
    _fail('convert takes no --config: it writes one, <workdir>/config.py')
  hf_dir, workdir = _hf_dir('convert'), _WORKDIR.value
  if not workdir:
    _fail('--workdir is required for convert: the new directory to write, e.g. runs/t5_small')
  try:
    mesh_shape = tuple(int(size.strip('() ')) for size in _MESH_SHAPE.value)
  except ValueError:
    _fail(f'--mesh_shape={",".join(_MESH_SHAPE.value)} must be three integers, e.g. 1,-1,1')
  model = hf_io.convert(hf_dir, workdir, mesh_shape)
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


def sweep(config: ml_collections.ConfigDict | None) -> None:
  """Runs every trial of --sweep (validated first) under --workdir, or tabulates them."""
  if config is not None:
    _fail('sweep takes --sweep=experiments/NAME.py instead of --config')
  if not _SWEEP.value or not _WORKDIR.value:
    _fail('sweep needs --sweep=experiments/NAME.py and --workdir=runs/NAME')
  remote = None if _LAUNCHER.value == 'local' else _launcher()
  name = _NAME.value or os.path.basename(os.path.normpath(_WORKDIR.value)).replace('_', '-')
  sys.exit(sweeps.run_sweep(
      _SWEEP.value, _WORKDIR.value, parallel=_PARALLEL.value, dry_run=_DRY_RUN.value,
      report_only=_REPORT_ONLY.value, launcher=remote, name=name.lower()))


def _tpu_vm() -> launch.TpuVm:
  return launch.TpuVm(
      zone=_ZONE.value, accelerator_type=_ACCELERATOR.value,
      runtime_version=_RUNTIME.value, project=_PROJECT.value, spot=_SPOT.value,
      reserved=_RESERVED.value, queued=_QUEUED.value, install=_INSTALL.value)


def _slurm() -> launch.Slurm:
  return launch.Slurm(nodes=_NODES.value, gpus_per_node=_GPUS.value,
                      partition=_PARTITION.value, time_limit=_TIME_LIMIT.value,
                      account=_ACCOUNT.value)


def _launcher() -> launch.Launcher:
  if _LAUNCHER.value == 'tpu_vm':
    return launch.launcher('tpu_vm', tpu_vm=_tpu_vm())
  return launch.launcher(_LAUNCHER.value, slurm=_slurm())


def _job(config_file: str = '') -> launch.Job:
  if _LAUNCHER.value == 'local':
    _fail('launch and its status/logs/stop/delete need --launcher=tpu_vm or --launcher=slurm')
  if not _NAME.value:
    _fail('--name is required: the TPU VM or SLURM job, e.g. --name=t5-small-run1')
  overrides = [a for a in sys.argv[1:] if a.startswith('--config.')]
  if any('=' not in a for a in overrides):
    _fail('write config overrides as --config.a.b=value (one argument each) to launch them')
  return launch.Job(name=_NAME.value, config_file=config_file, workdir=_WORKDIR.value or '',
                    overrides=tuple(overrides), evaluate=True)


def launch_run(config: ml_collections.ConfigDict) -> None:
  """Starts train + eval of --config (and its --config.* overrides) on --launcher."""
  del config  # validated by flag parsing; the remote hosts load the file again
  if not _WORKDIR.value:
    _fail('--workdir is required for launch: gs://BUCKET/runs/NAME (tpu_vm) or a shared path')
  job = _job(config_flags.get_config_filename(flags.FLAGS['config']))
  _launcher()(job, _DRY_RUN.value)


def _manage(action: str) -> Callable[[ml_collections.ConfigDict | None], None]:
  def command(config: ml_collections.ConfigDict | None) -> None:
    del config
    job = _job()
    commands = (launch.tpu_manage(action, job, _tpu_vm()) if _LAUNCHER.value == 'tpu_vm'
                else launch.slurm_manage(action, job))
    launch.execute(commands, _DRY_RUN.value)
  command.__doc__ = f'{action} of a launched run (--name, --launcher and its settings).'
  return command


_COMMANDS: dict[str, Callable[[ml_collections.ConfigDict], None]] = {
    'info': info, 'train': train, 'infer': infer, 'score': score, 'eval': evaluate,
    'export': export, 'convert': convert, 'data': data, 'vocab': vocab, 'sweep': sweep,
    'launch': launch_run,
    **{action: _manage(action) for action in ('status', 'logs', 'stop', 'delete')}}
# Commands that take no --config: they write one, read a sweep file, or manage a launch.
_CONFIGLESS = ('convert', 'sweep', 'status', 'logs', 'stop', 'delete')


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
  if _CONFIG.value is None and command not in _CONFIGLESS:
    _fail('--config is required, e.g. --config=configs/t5_1_1_small.py')
  try:
    _COMMANDS[command](_CONFIG.value)
  except (ValueError, KeyError, FileNotFoundError, trainer.NonFiniteLossError,
          subprocess.CalledProcessError) as e:
    _fail(str(e))


def run() -> None:
  """Console-script entry point."""
  app.run(main, flags_parser=parse_flags)


if __name__ == '__main__':
  run()
