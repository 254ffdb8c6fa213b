"""Command line: `python -m t5x_lite.main COMMAND --config=configs/X.py [--config.a.b=v]`.

Commands: info (model summary and parameter counts), train (resumes from --workdir when it
holds checkpoints); infer, score and eval (predictions, target log-likelihoods and task
metrics on `eval.split` from --workdir's newest checkpoint); convert (a Hugging Face
directory -> a new workdir with config.py and params: `convert --hf_dir=DIR --workdir=OUT`,
no --config) and export (a run's newest params -> a Hugging Face directory: `export
--config=... --workdir=RUN --hf_dir=OUT`).
"""

import ast
import contextlib
import logging
import os
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import ml_collections
from absl import app, flags
from absl import logging as absl_logging
from etils import epath
from ml_collections import config_flags

from t5x_lite import config as config_lib
from t5x_lite import checkpoints, eval_commands, hf_io, models, plots, trainer, validation

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Path to a configs/*.py file; override fields with --config.a.b=value.',
    lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints and logs.')
_HF_DIR = flags.DEFINE_string(
    'hf_dir', None, 'Hugging Face model directory: read by convert, written by export.')
_MESH_SHAPE = flags.DEFINE_list(
    'mesh_shape', ['1', '-1', '1'],
    'convert: the (data,fsdp,model) mesh the params are read onto, e.g. 1,-1,1.')


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
      _check_config_file(config_file)
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
        f'x {jax.devices()[0].platform}')


def train(config: ml_collections.ConfigDict) -> None:
  """Trains into --workdir, resuming it; checks everything before the workdir is touched."""
  workdir = _WORKDIR.value
  if not workdir:
    _fail('--workdir is required for train, e.g. --workdir=runs/my_run')
  trainer.setup_distributed(config)
  plan = validation.check_train(config, workdir)
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
  print(f'{config.eval.task or config.data.task} {config.eval.split} '
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
  step = hf_io.export(config, _checkpoint_workdir('export', config), hf_dir)
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


# Errors whose message is already the one line the user should see.
_ONE_LINE_ERRORS = (trainer.NonFiniteLossError, checkpoints.CheckpointError)

_COMMANDS: dict[str, Callable[[ml_collections.ConfigDict], None]] = {
    'info': info, 'train': train, 'infer': infer, 'score': score, 'eval': evaluate,
    'export': export, 'convert': convert}


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
  except (ValueError, KeyError, FileNotFoundError, *_ONE_LINE_ERRORS) as e:
    _fail(str(e))


def run() -> None:
  """Console-script entry point."""
  app.run(main, flags_parser=parse_flags)


if __name__ == '__main__':
  run()
