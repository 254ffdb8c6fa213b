"""End-to-end tests of the command line, `python -m t5x_lite.main`, in subprocesses.

Training runs use the tiny T5.1.1 config with 16-token features and a global batch of 8 on
two fake CPU devices. They share a persistent XLA compilation cache (one per test session),
so only the first run of each program pays for compiling it; a cached executable is the same
code, so bitwise comparisons between runs are unaffected. Commands that are expected to fail
fast are started together and then checked one by one.
"""

import fcntl
import importlib.util
import json
import os
import pty
import re
import signal
import socket
import struct
import subprocess
import sys
import termios
import threading
import time

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ['--config=configs/t5_1_1_tiny.py', '--config.data.feature_lengths.inputs=16',
        '--config.data.feature_lengths.targets=16', '--config.train.batch_size=8']
# The run whose determinism is checked: dropout on, so the per-step dropout RNG matters;
# packing and shuffling on, so the data iterator state matters.
DETERMINISM = [*TINY, '--config.model.dropout_rate=0.1', '--config.train.log_every=1']
# Metrics that depend only on the computation (not on wall time).
EXACT_METRICS = ('loss', 'cross_ent_loss', 'z_loss', 'accuracy', 'num_tokens', 'grad_norm',
                 'param_norm', 'lr')
TIMEOUT = 300


@pytest.fixture(scope='session')
def compile_cache(tmp_path_factory):
  return str(tmp_path_factory.mktemp('xla_cache'))


class Run:
  """A `python -m t5x_lite.main ...` subprocess whose stdout/stderr go to files."""

  def __init__(self, args, logs_dir, name, *, devices=2, compile_cache=None, env=None,
               stderr_tty=False):
    environ = dict(os.environ, JAX_PLATFORMS='cpu',
                   XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}')
    if compile_cache:
      environ.update(JAX_COMPILATION_CACHE_DIR=compile_cache,
                     JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
                     JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0')
    environ.update(env or {})
    os.makedirs(logs_dir, exist_ok=True)
    self.stdout_path = os.path.join(logs_dir, f'{name}.stdout')
    self.stderr_path = os.path.join(logs_dir, f'{name}.stderr')
    self._stdout = open(self.stdout_path, 'wb')
    self._reader = None
    if stderr_tty:  # tqdm draws its bar only on a terminal
      master, slave = pty.openpty()
      fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack('HHHH', 24, 200, 0, 0))
      stderr = slave
    else:
      stderr = self._stderr = open(self.stderr_path, 'wb')
    self.proc = subprocess.Popen([sys.executable, '-m', 't5x_lite.main', *args], cwd=REPO,
                                 env=environ, stdout=self._stdout, stderr=stderr)
    if stderr_tty:
      os.close(slave)
      self._reader = threading.Thread(target=self._copy_tty, args=(master,), daemon=True)
      self._reader.start()

  def _copy_tty(self, master):
    with open(self.stderr_path, 'wb') as out:
      while True:
        try:
          data = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
          break
        if not data:
          break
        out.write(data)
    os.close(master)

  def wait(self, timeout=TIMEOUT):
    try:
      self.returncode = self.proc.wait(timeout)
    except subprocess.TimeoutExpired:
      self.proc.kill()
      self.proc.wait()
      raise
    finally:
      if self._reader:
        self._reader.join(10)
      self._stdout.close()
      if not self._reader:
        self._stderr.close()
    self.stdout = open(self.stdout_path, encoding='utf-8', errors='replace').read()
    self.stderr = open(self.stderr_path, encoding='utf-8', errors='replace').read()
    return self

  def check(self):
    """Waits; fails with the stderr tail unless the exit code is 0."""
    self.wait()
    assert self.returncode == 0, self.stderr[-3000:]
    return self


def read_metrics(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
    return [json.loads(line) for line in f]


def checkpoint_steps(workdir):
  directory = os.path.join(workdir, 'checkpoints')
  return sorted(int(n) for n in os.listdir(directory) if n.isdigit())


def read_scalar_events(directory):
  """{tag: [(step, value)]} from the TensorBoard event files (TFRecord framing)."""
  from tensorboardX.proto import event_pb2
  scalars = {}
  for name in sorted(os.listdir(directory)):
    with open(os.path.join(directory, name), 'rb') as f:
      data = f.read()
    offset = 0
    while offset < len(data):
      (length,) = struct.unpack('<Q', data[offset:offset + 8])
      event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
      offset += 12 + length + 4
      for value in event.summary.value:
        scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
  return scalars


def assert_one_error_line(run, *fragments):
  """Exit code 2, stderr's last line is `error: ...` with these fragments, no traceback."""
  lines = run.stderr.strip().splitlines()
  assert run.returncode == 2, run.stderr[-3000:]
  assert lines and lines[-1].startswith('error: '), run.stderr[-3000:]
  assert 'Traceback' not in run.stderr
  for fragment in fragments:
    assert fragment in lines[-1]
  return lines[-1]


def free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


# ------------------------------------------------------------------------------ train


@pytest.fixture(scope='module')
def run_a(tmp_path_factory, compile_cache):
  """20 straight steps (checkpoints every 5), stderr on a terminal."""
  root = tmp_path_factory.mktemp('run_a')
  workdir = str(root / 'workdir')
  run = Run(['train', *DETERMINISM, '--config.train.num_steps=20',
             '--config.train.checkpoint_every=5', f'--workdir={workdir}'],
            str(root), 'train', compile_cache=compile_cache, stderr_tty=True).check()
  run.workdir = workdir
  run.records = read_metrics(workdir)
  return run


@pytest.mark.slow
def test_train_writes_config_metrics_events_checkpoints_and_progress(run_a):
  with open(os.path.join(run_a.workdir, 'config.json'), encoding='utf-8') as f:
    config = json.load(f)
  assert config['train']['num_steps'] == 20 and config['train']['batch_size'] == 8
  assert config['train']['checkpoint_every'] == 5
  assert config['data']['feature_lengths'] == {'inputs': 16, 'targets': 16}
  assert config['model']['dropout_rate'] == 0.1 and config['model']['d_model'] == 64

  records = run_a.records
  assert [r['step'] for r in records] == list(range(1, 21))
  for record in records:
    assert record['split'] == 'train'
    assert {'loss', 'lr', 'accuracy', 'tokens_per_second', 'mfu'} <= set(record)
    assert np.isfinite(record['loss']) and record['tokens_per_second'] > 0
    assert 0 < record['mfu'] < 1  # against this CPU's measured matmul peak
  assert records[-1]['lr'] == pytest.approx(0.01)  # rsqrt: 1 / sqrt(10k warmup)
  assert f"loss={records[-1]['loss']:.4g}" in run_a.stdout  # the `final:` line

  events = os.path.join(run_a.workdir, 'tensorboard')
  assert len(os.listdir(events)) == 1
  scalars = read_scalar_events(events)
  for tag in ('train/loss', 'train/lr', 'train/tokens_per_second', 'train/accuracy',
              'train/mfu'):
    assert [step for step, _ in scalars[tag]] == list(range(1, 21)), tag
  assert [v for _, v in scalars['train/loss']] == [
      float(np.float32(r['loss'])) for r in records]

  # Every 5 steps, the newest 3 kept (no extra save of step 1), nothing half-written.
  assert checkpoint_steps(run_a.workdir) == [10, 15, 20]
  assert not [n for n in os.listdir(os.path.join(run_a.workdir, 'checkpoints')) if 'tmp' in n]

  # The tqdm bar: steps, ETA, loss and tokens/s (in its last refresh, after step 20).
  bars = re.findall(r'(\d+)/20 \[[\d:]+<[\d:?]+, [^\]]*loss=([\d.]+), '
                    r'tokens_per_second=[\d.]+\]', run_a.stderr)
  assert bars, run_a.stderr[-2000:]
  assert bars[-1] == ('20', f"{records[-1]['loss']:.4g}")


@pytest.mark.slow
def test_resume_after_kill_9_gives_the_same_losses_bitwise(run_a, tmp_path, compile_cache):
  """Run B: the same 20-step run killed with SIGKILL once checkpoint 10 is complete, then
  started again: it resumes from checkpoint 10 and every record matches run A bitwise."""
  workdir = str(tmp_path / 'workdir')
  args = ['train', *DETERMINISM, '--config.train.num_steps=20',
          '--config.train.checkpoint_every=10', f'--workdir={workdir}']
  first = Run(args, str(tmp_path), 'first', compile_cache=compile_cache)
  deadline = time.time() + TIMEOUT
  # Orbax writes `10.orbax-checkpoint-tmp` and renames it to `10` once complete.
  while not os.path.isdir(os.path.join(workdir, 'checkpoints', '10')):
    assert first.proc.poll() is None, 'run B ended before checkpoint 10 appeared'
    assert time.time() < deadline
    time.sleep(0.02)
  first.proc.send_signal(signal.SIGKILL)
  first.wait()
  assert first.returncode == -signal.SIGKILL
  resume_step = max(checkpoint_steps(workdir))
  assert resume_step == 10, 'run B got to step 20 before the kill: nothing to resume'
  before = read_metrics(workdir)
  assert [r['step'] for r in before] == list(range(1, len(before) + 1))
  assert len(before) >= 10

  Run(args, str(tmp_path), 'resumed', compile_cache=compile_cache).check()
  records = read_metrics(workdir)
  assert records[:len(before)] == before  # appended to
  resumed = records[len(before):]
  assert [r['step'] for r in resumed] == list(range(resume_step + 1, 21))
  assert checkpoint_steps(workdir) == [10, 20]

  reference = {r['step']: r for r in run_a.records}
  for record in records:  # both runs' records, including steps the kill made redo
    for key in EXACT_METRICS:
      assert record[key] == reference[record['step']][key], (record['step'], key)
  print('losses A:', [reference[s]['loss'] for s in range(1, 21)])
  print(f'run B killed after {len(before)} logged steps, resumed from step {resume_step}')


@pytest.mark.slow
def test_sigterm_saves_the_current_step_and_exits_0(tmp_path, compile_cache):
  workdir = str(tmp_path / 'workdir')
  run = Run(['train', *DETERMINISM, '--config.train.num_steps=1000',
             '--config.train.checkpoint_every=500', f'--workdir={workdir}'],
            str(tmp_path), 'train', compile_cache=compile_cache)
  metrics = os.path.join(workdir, 'metrics.jsonl')
  deadline = time.time() + TIMEOUT
  while not (os.path.exists(metrics) and len(read_metrics(workdir)) >= 3):
    assert run.proc.poll() is None, 'the run ended early'
    assert time.time() < deadline
    time.sleep(0.05)
  run.proc.send_signal(signal.SIGTERM)
  run.check()
  last = read_metrics(workdir)[-1]['step']
  assert 3 <= last < 500
  assert checkpoint_steps(workdir) == [last]  # saved where it stopped, and only there


# ------------------------------------------------------------------------- multi-host


@pytest.mark.slow
def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path, compile_cache):
  """Two processes with one CPU device each (gloo collectives) vs one process with two
  devices. Without shuffling or packing, process i reads examples i, i+2, ..., so each
  global batch holds the same rows as the single process's, in another order."""
  common = ['train', *TINY, '--config.data.shuffle=False', '--config.data.pack=False',
            '--config.train.num_steps=4', '--config.train.log_every=1',
            '--config.train.checkpoint_every=2']
  address = f'127.0.0.1:{free_port()}'
  multi = str(tmp_path / 'multi')
  hosts = [Run([*common, '--config.distributed.num_processes=2',
                f'--config.distributed.process_id={i}',
                f'--config.distributed.coordinator_address={address}', f'--workdir={multi}'],
               str(tmp_path), f'process_{i}', devices=1, compile_cache=compile_cache)
           for i in range(2)]
  single = str(tmp_path / 'single')
  Run([*common, f'--workdir={single}'], str(tmp_path), 'single', devices=2,
      compile_cache=compile_cache).check()
  for host in hosts:
    host.check()

  ones, twos = read_metrics(single), read_metrics(multi)
  # Only process 0 logs: one record per step, one event file, one `final:` line.
  assert [r['step'] for r in twos] == [1, 2, 3, 4] == [r['step'] for r in ones]
  assert len(os.listdir(os.path.join(multi, 'tensorboard'))) == 1
  assert 'final:' in hosts[0].stdout and 'final:' not in hosts[1].stdout
  with open(os.path.join(multi, 'config.json'), encoding='utf-8') as f:
    assert json.load(f)['distributed']['process_id'] == 0
  diffs = []
  for one, two in zip(ones, twos):
    assert one['num_tokens'] == two['num_tokens']
    for key in ('loss', 'grad_norm', 'param_norm', 'accuracy'):
      diffs.append(abs(one[key] - two[key]) / max(abs(one[key]), 1.0))
  print('losses 1 process:', [r['loss'] for r in ones])
  print('losses 2 processes:', [r['loss'] for r in twos])
  print('max relative difference:', max(diffs))
  assert max(diffs) <= 1e-5
  assert ones[0]['loss'] != ones[-1]['loss']  # the params did change
  assert checkpoint_steps(multi) == [2, 4]
  assert not [n for n in os.listdir(os.path.join(multi, 'checkpoints')) if 'tmp' in n]


# ------------------------------------------------------------------- info and commands


def load_config(name):
  spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, 'configs',
                                                                   f'{name}.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


PARAM_COUNTS = {'t5_1_1_small': 76_961_152, 't5_1_1_base': 247_577_856,
                't5_1_1_large': 783_150_080, 't5_1_1_xl': 2_849_757_184,
                'llama2_7b': 6_738_415_616}


def test_info_command_prints_the_parameter_count(tmp_path):
  run = Run(['info', '--config=configs/t5_1_1_small.py'], str(tmp_path), 'info').wait()
  assert run.returncode == 0, run.stderr[-3000:]
  assert re.search(r'^\s+total\s+76,961,152$', run.stdout, re.M), run.stdout
  assert 'architecture: encoder_decoder' in run.stdout


@pytest.mark.parametrize('name', sorted(PARAM_COUNTS))
def test_info_parameter_counts(name, capsys):
  from t5x_lite import main
  main.info(load_config(name))
  out = capsys.readouterr().out
  assert re.search(rf'^\s+total\s+{PARAM_COUNTS[name]:,}$', out, re.M), out


def test_convert_and_export_need_their_directories(capsys):
  from t5x_lite import main
  main.parse_flags(['t5x_lite.main'])
  for argv, fragment in [(['convert'], '--hf_dir is required for convert'),
                         (['export'], '--config is required')]:
    with pytest.raises(SystemExit) as exit_info:
      main.main(['t5x_lite.main', *argv])
    assert exit_info.value.code == 2
    out, err = capsys.readouterr()
    assert out == '' and err.startswith('error: ') and fragment in err, err


# -------------------------------------------------------------------------- bad input


def _snapshot(directory):
  """Every file under `directory` with its size, mtime and (for small files) contents."""
  files = {}
  for root, _, names in os.walk(directory):
    for name in names:
      path = os.path.join(root, name)
      stat = os.stat(path)
      content = open(path, 'rb').read() if stat.st_size < 1 << 16 else None
      files[os.path.relpath(path, directory)] = (stat.st_size, stat.st_mtime_ns, content)
  return files


BAD_INPUTS = {
    # name: (extra flags, devices, fragments of the error line)
    'unknown_key': (['--config.train.nope=1'], 2, ["'nope'"]),
    'wrong_type': (['--config.train.num_steps=abc'], 2, ['num_steps', 'abc']),
    'batch_not_divisible': (['--config.train.batch_size=3'], 2,
                            ['batch_size=3', 'data-parallel size 2']),
    'mesh_not_matching_devices': (['--config.mesh_shape=(3,1,1)'], 2,
                                  ['(3, 1, 1)', '2 are available']),
    'unknown_task': (['--config.data.task=nope'], 2, ["'nope'", 'translate_en_de']),
    'unwritable_workdir': (None, 2, ['cannot write to workdir']),
    'missing_config': (None, 2, ['--config is required']),
}


@pytest.fixture(scope='module')
def bad_runs(run_a, tmp_path_factory):
  """Each bad input run against run A's workdir (all at once), with snapshots around them."""
  root = tmp_path_factory.mktemp('bad')
  (root / 'a_file').write_text('not a directory')
  before = _snapshot(run_a.workdir)
  runs = {}
  for name, (flags, devices, _) in BAD_INPUTS.items():
    args = ['train', *TINY, *(flags or []), f'--workdir={run_a.workdir}']
    if name == 'unwritable_workdir':
      args = ['train', *TINY, f'--workdir={root / "a_file" / "run"}']
    if name == 'missing_config':
      args = ['train', f'--workdir={run_a.workdir}']
    runs[name] = Run(args, str(root), name, devices=devices)
  for run in runs.values():
    run.wait()
  return runs, before, _snapshot(run_a.workdir)


@pytest.mark.slow
@pytest.mark.parametrize('name', sorted(BAD_INPUTS))
def test_bad_input_is_one_error_line_and_exit_code_2(bad_runs, name):
  runs, _, _ = bad_runs
  line = assert_one_error_line(runs[name], *BAD_INPUTS[name][2])
  assert len(runs[name].stderr.strip().splitlines()) == 1, runs[name].stderr[-3000:]
  assert runs[name].stdout == ''
  print(line)


@pytest.mark.slow
def test_bad_input_overwrites_nothing_in_an_existing_workdir(bad_runs):
  _, before, after = bad_runs
  assert 'config.json' in before and any(p.startswith('checkpoints') for p in before)
  assert after == before
