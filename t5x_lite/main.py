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
`info --plan [--plan.accelerator=v5e-16]` adds bytes per device, FLOPs and step time
(planner.py).
"""

import ast
import contextlib
import logging
import os
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from t5x_lite import runtime

if __name__ == '__main__':
  runtime.configure()  # before jax starts: XLA flags and the allocator are read at start

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import ml_collections
from absl import app, flags
from absl import logging as absl_logging
from etils import epath
from ml_collections import config_flags

from t5x_lite import config as config_lib
from t5x_lite import checkpoints, eval_commands, hardware, hf_io, launch, models, planner
from t5x_lite import plots, posttrain, sweeps, trainer, validation
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
_SWEEP = flags.DEFINE_string(
    'sweep', None, 'sweep: an experiments/*.py sweep file (FILE.py:ARG passes ARG to it).')
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
_PLAN = flags.DEFINE_bool('plan', False, 'info: bytes per device, FLOPs and step time of a '
                          'train step (see t5x_lite/planner.py).')
_PLAN_ACCELERATOR = flags.DEFINE_string(
    'plan.accelerator', '', 'info --plan: e.g. v5e-16, v4-8, h100x8 (default: this machine).')
_PLAN_MFU = flags.DEFINE_float('plan.mfu', 0.0, 'info --plan: the MFU assumed (0: 40%, or '
                               '50% on this CPU).')
# info --plan compiles the train step on this many fake CPU devices at most (else formulas).
_MAX_FAKE_DEVICES = 64


def _fail(message: str) -> None:
  """One clear line on stderr, exit code 2."""
  print(f'error: {message}', file=sys.stderr)
  sys.exit(2)


def parse_flags(argv: Sequence[str]) -> list[str]:
  """absl flag parsing whose errors become one line and exit code 2."""
  config_file = None
  for arg in argv[1:]:
    if arg.startswith('--config='):
      config_file = arg.split('=', 1)[1]
      _check_config_file(sweeps.split_argument(config_file)[0])  # FILE.py[:ARG]
  try:
    return flags.FLAGS(list(argv))
  except (AttributeError, KeyError) as e:
    if config_file and "attribute 'get_config'" in str(e):
      _fail(f'config file {config_file} has no get_config(); define one that returns the run '
            'config, as configs/t5_1_1_small.py does')
    lines = _unquoted(str(e)).splitlines()
    hint = f' ({lines[1].strip().rstrip("?")}?)' if len(lines) > 1 else ''
    _fail(f'unknown config field {_unquoted(lines[0])!r} in a --config.* override{hint}; '
          '`info` lists the fields.')
  except (flags.Error, TypeError, ValueError) as e:
    _fail(f'bad flag: {_first_line(e)}')
  except Exception as e:  # pylint: disable=broad-except  # the config file's own code failed
    _fail(f'config file {config_file} failed in get_config() ({type(e).__name__}: '
          f'{_first_line(e)}); fix the file')


def _unquoted(text: str) -> str:
  """ml_collections' KeyError messages arrive quoted, sometimes twice: the plain text."""
  while len(text) > 1 and text[0] == text[-1] and text[0] in '\'"':
    try:
      text = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      text = text[1:-1]
  return text


def _first_line(error: BaseException) -> str:
  return (str(error).strip().splitlines() or [type(error).__name__])[0]


def _check_config_file(path: str) -> None:
  """The --config file exists and compiles; errors name the file (and line)."""
  if not os.path.isfile(path):
    _fail(f'config file {path!r} not found; pass e.g. --config=configs/t5_1_1_small.py')
  try:
    with open(path, encoding='utf-8') as f:
      compile(f.read(), path, 'exec')
  except SyntaxError as e:
    _fail(f'{path}:{e.lineno}: {e.msg} in the config file; fix that line')
  except (UnicodeDecodeError, ValueError) as e:
    _fail(f'config file {path} is not Python source ({_first_line(e)}); pass a configs/*.py '
          'file')


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
        f'x {jax.devices()[0].platform}; allocator: {runtime.loaded()}')


def info_and_plan(config: ml_collections.ConfigDict) -> None:
  """`info`, then with --plan the planner's bytes per device and step time."""
  if _PLAN.value:
    _fake_cpu_devices(_PLAN_ACCELERATOR.value)  # before `info` starts jax's backend
  info(config)
  if _PLAN.value:
    print('\n'.join(planner.report(config, planner.plan(
        config, _PLAN_ACCELERATOR.value, _PLAN_MFU.value))))


def _fake_cpu_devices(accelerator: str) -> None:
  """Before jax starts on a CPU-only host: as many CPU devices as the named accelerator has
  chips, so the planner can compile the train step for its mesh."""
  if not accelerator or 'xla_force_host_platform_device_count' in os.environ.get('XLA_FLAGS', ''):
    return
  _, chips = hardware.parse_accelerator(accelerator)
  if chips <= _MAX_FAKE_DEVICES and jax.config.jax_platforms in (None, '', 'cpu'):
    os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                               f' --xla_force_host_platform_device_count={chips}').strip()


def train(config: ml_collections.ConfigDict) -> None:
  """Trains into --workdir, resuming it; checks everything before the workdir is touched."""
  workdir = _WORKDIR.value
  if not workdir:
    _fail('--workdir is required for train, e.g. --workdir=runs/my_run')
  trainer.setup_distributed(config)
  plan = validation.check_train(config, workdir)
  posttrain.check_reference(config)
  truncation = data_report.truncation_summary(config.data)
  lead = jax.process_index() == 0
  if plan.finished:
    if lead:
      print(f'the run in {workdir} is finished: its newest checkpoint is step '
            f'{plan.latest_step} of train.num_steps={config.train.num_steps}; raise '
            '--config.train.num_steps to train further')
    return
  try:
    epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  except OSError as e:
    _fail(f'cannot write to workdir {workdir!r} ({e.strerror}); choose a writable directory.')
  with checkpoints.WorkdirLock(workdir, enabled=lead), _errors_logged(workdir):
    if lead:
      validation.save_run_config(config, workdir, plan.changes)
      if plan.changes:
        print('config changes since the stored run (appended to config_history.jsonl): '
              + validation.describe(plan.changes))
      print(truncation)
    metrics = trainer.train(config, workdir)
  if lead:
    print('final: ' + ', '.join(f'{k}={v:.4g}' for k, v in sorted(metrics.items())))
    print(f'loss curve: {plots.plot_loss_curve(workdir)}')


# How Python writes the last line of that traceback: in pieces, or whole.
_EVENT_LOOP_PIECES = ('RuntimeError', ': ', 'Event loop is closed', '\n',
                      'RuntimeError: Event loop is closed\n')


class _SaveErrors(logging.Filter):
  """Holds back what a failed asynchronous save prints, so the terminal keeps one line:
  Orbax's save threads and asyncio log a traceback per array (absl records), and tensorstore's
  callbacks print "Event loop is closed" tracebacks on sys.stderr. All go to error.log."""

  def __init__(self, stderr: Any):
    super().__init__()
    self.lines = []
    self._stderr, self._traceback = stderr, []
    self._formatter = logging.Formatter('%(asctime)s %(pathname)s:%(lineno)d %(message)s')

  def filter(self, record: logging.LogRecord) -> bool:
    if record.levelno >= logging.ERROR and (
        record.name == 'asyncio' or f'{os.sep}orbax{os.sep}' in record.pathname):
      self.lines.append(self._formatter.format(record) + '\n')
      return False
    return True

  def write(self, text: str) -> int:
    """sys.stderr's write: a traceback is collected until its last line decides where it
    goes; everything else (tqdm's bar, warnings) passes straight through."""
    if not self._traceback and not text.startswith('Traceback (most recent call last)'):
      if text.startswith(('  File "', '    ')) or text in _EVENT_LOOP_PIECES:
        self.lines.append(text)  # a piece of a traceback that another thread interleaved
        return len(text)
      return self._stderr.write(text)
    self._traceback.append(text)
    whole = ''.join(self._traceback)
    last = whole.rstrip('\n').rsplit('\n', 1)[-1]
    if whole.endswith('\n') and last[:1] not in ('', ' ') and not last.startswith('Traceback'):
      self._traceback = []
      if last == 'RuntimeError: Event loop is closed':
        self.lines.append(whole)
      else:
        self._stderr.write(whole)
    return len(text)

  def __getattr__(self, name: str) -> Any:  # flush, isatty, fileno, ... of the real stderr
    return getattr(self._stderr, name)


@contextlib.contextmanager
def _errors_logged(workdir: str) -> Iterator[None]:
  """A failure while training (a save error, a full disk, a NaN) becomes one line on the
  terminal; its full traceback, and what `_SaveErrors` held back, go to <workdir>/error.log."""
  held_back = _SaveErrors(sys.stderr)
  handler = absl_logging.get_absl_handler()
  handler.addFilter(held_back)
  sys.stderr = held_back
  try:
    yield
  except Exception as e:  # pylint: disable=broad-except  # every failure gets one line
    log = epath.Path(workdir) / 'error.log'
    try:
      with log.open('a') as f:
        f.write(f'--- {time.strftime("%Y-%m-%d %H:%M:%S")}\n' + ''.join(held_back.lines)
                + traceback.format_exc())
      where = f' (traceback in {log})'
    except OSError:  # the disk that failed the save may fail this too
      where = ''
    expected = isinstance(e, (ValueError, KeyError, FileNotFoundError, *_ONE_LINE_ERRORS))
    reason = (str(e) if expected else f'{type(e).__name__}: {e}').strip().splitlines()
    # sys.stderr stays filtered: the failed save's tasks print again at interpreter exit.
    _fail((reason[0] if reason else type(e).__name__) + where)
  sys.stderr = held_back._stderr  # pylint: disable=protected-access
  handler.removeFilter(held_back)


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


def _listing(directory: str) -> str:
  return ', '.join(sorted(path.name for path in epath.Path(directory).iterdir()))


def export(config: ml_collections.ConfigDict) -> None:
  """Writes --workdir's newest params as a Hugging Face directory (--hf_dir)."""
  hf_dir = _hf_dir('export')
  step = hf_io.export(config, _checkpoint_workdir('export', config), hf_dir,
                      tokenizer=not _NO_TOKENIZER.value)
  print(f'wrote the step {step} params to {hf_dir}: {_listing(hf_dir)}')


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
        f'{_listing(workdir)}')
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


# Errors whose message is already the one line the user should see.
_ONE_LINE_ERRORS = (trainer.NonFiniteLossError, checkpoints.CheckpointError,
                    subprocess.CalledProcessError)

_COMMANDS: dict[str, Callable[[ml_collections.ConfigDict], None]] = {
    'info': info_and_plan, 'train': train, 'infer': infer, 'score': score,
    'eval': evaluate, 'export': export, 'convert': convert, 'data': data, 'vocab': vocab,
    'sweep': sweep, 'launch': launch_run,
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
  except (ValueError, KeyError, FileNotFoundError, *_ONE_LINE_ERRORS) as e:
    _fail(str(e))


def run() -> None:
  """Runs the CLI in this process (the module's entry point; tests call it too)."""
  app.run(main, flags_parser=parse_flags)


def console() -> None:
  """The `t5x_lite` console script: the process settings first (runtime.py), then the CLI."""
  runtime.configure()
  run()


if __name__ == '__main__':
  run()
