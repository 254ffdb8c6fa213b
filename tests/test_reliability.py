"""Fault injection: corrupt checkpoints, two writers, a full disk, a changed device count.

The training runs are `trainer.train` on the one-layer T5.1.1 tiny of test_trainer (batch 8,
16/16-token features, dropout 0.1 so the per-step RNG matters), compared with an uninterrupted
run: after a fallback restore bitwise, after a device-count change within 1e-6 relative with
equal token counts. The lock and save-failure tests use the real lock and Orbax; the full
disk is an epath stub whose writes under the checkpoint directory fail with ENOSPC.
"""

import errno
import json
import os
import shutil
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from etils import epath

from t5x_lite import checkpoints, main, trainer
from test_bad_inputs import TINY, run_cli_cases, tree_hash, write_run
from test_checkpoints import setup, tiny_config
from test_trainer import _run_config, _train

EXACT = ('loss', 'cross_ent_loss', 'z_loss', 'accuracy', 'num_tokens', 'grad_norm',
         'param_norm', 'lr')


def _config(num_steps):
  return _run_config((-1, 1, 1), num_steps=num_steps, checkpoint_every=2)


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
  """6 uninterrupted steps on 8 devices, checkpoints at 2, 4 and 6."""
  workdir = tmp_path_factory.mktemp('reference')
  _, records, _ = _train(_config(6), workdir)
  return workdir, {r['step']: r for r in records}


def _resume_from(reference_dir, workdir, step):
  """A copy of the reference run as it was after `step`: checkpoints up to it, no metrics."""
  shutil.copytree(reference_dir / 'checkpoints', workdir / 'checkpoints')
  for name in os.listdir(workdir / 'checkpoints'):
    if name.isdigit() and int(name) > step:
      shutil.rmtree(workdir / 'checkpoints' / name)


def test_corrupt_and_empty_newest_checkpoints_fall_back_bitwise(reference, tmp_path, caplog):
  """Checkpoint 4 with its largest array file cut in half and an empty directory 5 (a torn
  save): both are skipped with a warning each, 4 is renamed aside, training resumes from 2
  and steps 3-6 equal the uninterrupted run's bitwise."""
  reference_dir, expected = reference
  _resume_from(reference_dir, tmp_path, 4)
  data_dir = tmp_path / 'checkpoints' / '4' / 'state' / 'ocdbt.process_0' / 'd'
  largest = max(data_dir.iterdir(), key=lambda p: p.stat().st_size)
  largest.write_bytes(largest.read_bytes()[:largest.stat().st_size // 2])
  (tmp_path / 'checkpoints' / '5').mkdir()
  _, records, _ = _train(_config(6), tmp_path)
  warnings = [r.getMessage() for r in caplog.records if 'cannot be restored' in r.getMessage()]
  assert len(warnings) == 2 and 'step 5' in warnings[0] and 'step 4' in warnings[1], warnings
  assert [r['step'] for r in records] == [3, 4, 5, 6]
  for record in records:
    for key in EXACT:
      assert record[key] == expected[record['step']][key], (record['step'], key)
  names = sorted(os.listdir(tmp_path / 'checkpoints'))
  assert [n for n in names if n.isdigit()] == ['2', '4', '6']  # 4 and 6 saved anew
  assert sum(n.startswith('4.corrupt-') for n in names) == 1
  assert sum(n.startswith('5.corrupt-') for n in names) == 1


@pytest.mark.parametrize('devices', [4, 2])
def test_resume_on_fewer_devices_sees_the_same_batches(reference, tmp_path, devices):
  """Checkpoint 2 of the 8-device run resumed on 4 or 2 devices: equal token counts per
  step and losses within 1e-6 relative of the uninterrupted run."""
  reference_dir, expected = reference
  _resume_from(reference_dir, tmp_path, 2)
  _, records, _ = _train(_config(6), tmp_path, jax.devices()[:devices])
  assert [r['step'] for r in records] == [3, 4, 5, 6]
  worst = 0.0
  for record in records:
    want = expected[record['step']]
    assert record['num_tokens'] == want['num_tokens']
    for key in ('loss', 'grad_norm', 'param_norm', 'accuracy'):
      worst = max(worst, abs(record[key] - want[key]) / max(abs(want[key]), 1e-12))
  print(f'8 -> {devices} devices: max relative difference {worst:.3g}')
  assert worst <= 1e-6


def _saved_run(tmp_path, step=2):
  config = tiny_config()
  write_run(str(tmp_path), config, step)
  return config


def test_restore_newest_skips_each_kind_of_damage(tmp_path):
  """Steps 2 (good), then 3-7 each damaged another way: 2 is restored, 3-7 renamed aside."""
  config = _saved_run(tmp_path)
  directory = tmp_path / 'checkpoints'
  damage = {3: 'state/manifest.ocdbt', 4: 'state/_METADATA', 5: 'data', 6: 'meta', 7: None}
  for step, victim in damage.items():
    shutil.copytree(directory / '2', directory / str(step))
    if victim == 'meta':  # a torn write: the checksum no longer matches the arrays
      meta = json.loads((directory / str(step) / 'meta' / 'metadata').read_text())
      (directory / str(step) / 'meta' / 'metadata').write_text(json.dumps(dict(meta, step=2)))
    elif victim:
      path = directory / str(step) / victim
      shutil.rmtree(path) if path.is_dir() else path.unlink()
    else:
      shutil.rmtree(directory / str(step))
      (directory / str(step)).mkdir()
  run = setup(config, (-1, 1, 1))
  checkpointer = checkpoints.Checkpointer(directory, save_every=1)
  step, state, data_state = checkpointer.restore_newest(
      checkpoints.abstract_with_shardings(run.shapes, run.shardings))
  checkpointer.close()
  assert step == 2 and int(state.step) == 2 and data_state == {'batches': 2}
  names = os.listdir(directory)
  assert sorted(n for n in names if n.isdigit()) == ['2']
  for bad in damage:
    assert sum(n.startswith(f'{bad}.corrupt-') for n in names) == 1, names


def test_when_no_checkpoint_restores_nothing_is_renamed(tmp_path):
  config = _saved_run(tmp_path)
  with config.unlocked():
    config.model.d_ff = 96  # the checkpoints do not fit this model
  run = setup(config, (-1, 1, 1))
  before = tree_hash(tmp_path)
  checkpointer = checkpoints.Checkpointer(tmp_path / 'checkpoints', save_every=1)
  with pytest.raises(checkpoints.CheckpointError, match=r'no checkpoint .* restores: tried '
                     r'step 2 \('):
    checkpointer.restore_newest(checkpoints.abstract_with_shardings(run.shapes, run.shardings))
  checkpointer.close()
  assert tree_hash(tmp_path) == before


# ---------------------------------------------------------------------------- one writer


def test_second_writer_is_refused_and_a_stale_lock_taken_over(tmp_path, caplog):
  with checkpoints.WorkdirLock(tmp_path):
    with pytest.raises(checkpoints.CheckpointError, match=rf'process {os.getpid()} on host'):
      checkpoints.WorkdirLock(tmp_path).__enter__()
  assert not (tmp_path / 'train.lock').exists()  # released on exit

  dead = subprocess.run([sys.executable, '-c', 'import os; print(os.getpid())'],
                        capture_output=True, text=True, check=True)
  lock = checkpoints.WorkdirLock(tmp_path)
  (tmp_path / 'train.lock').mkdir()
  (tmp_path / 'train.lock' / 'owner.json').write_text(json.dumps(
      {'host': lock._me['host'], 'pid': int(dead.stdout), 'heartbeat': 0}))
  with lock:  # its process is gone: taken over
    assert json.loads(lock.path.read_text())['pid'] == os.getpid()
  assert any('stale lock' in r.getMessage() for r in caplog.records)

  for heartbeat_age, refused in ((10.0, True), (3600.0, False)):  # another host
    (tmp_path / 'train.lock').mkdir()
    (tmp_path / 'train.lock' / 'owner.json').write_text(json.dumps(
        {'host': 'elsewhere', 'pid': 1, 'heartbeat': time.time() - heartbeat_age}))
    if refused:
      with pytest.raises(checkpoints.CheckpointError, match='process 1 on host elsewhere'):
        checkpoints.WorkdirLock(tmp_path).__enter__()
      shutil.rmtree(tmp_path / 'train.lock')
    else:
      with checkpoints.WorkdirLock(tmp_path):
        pass


def test_second_train_on_a_held_workdir_is_one_line_and_writes_nothing(tmp_path):
  """A live process (this one) holds the run's lock; `train` through the CLI stops at once."""
  workdir = tmp_path / 'run'
  _saved_run(workdir)
  with checkpoints.WorkdirLock(workdir):
    before = tree_hash(workdir)
    results = run_cli_cases({'second': ['train', *TINY, f'--workdir={workdir}']}, tmp_path)
    assert tree_hash(workdir) == before
  code, stdout, stderr = results['second']
  assert code == 2 and stdout == '', stderr
  assert stderr.count('\n') == 1 and stderr.startswith('error: '), stderr
  assert f'in use by process {os.getpid()} on host' in stderr and 'delete' in stderr


# ----------------------------------------------------------------------------- full disk


def test_disk_full_during_a_save_is_one_line_and_keeps_older_checkpoints(
    tmp_path, monkeypatch, capsys):
  """Writes under checkpoints/ fail with ENOSPC once step 2 is on disk: training stops with
  one `error:` line (traceback in error.log), no temporary directory is left, 2 restores."""
  config = _config(6)
  config.train.async_checkpointing = False
  workdir = tmp_path / 'run'
  workdir.mkdir()
  target = str(workdir / 'checkpoints')
  real = {name: getattr(epath.Path, name) for name in ('write_text', 'write_bytes')}

  def failing(name):
    def write(self, *args, **kwargs):
      if os.fspath(self).startswith(target) and (workdir / 'checkpoints' / '2').exists():
        raise OSError(errno.ENOSPC, 'No space left on device', os.fspath(self))
      return real[name](self, *args, **kwargs)
    return write

  for name in real:
    monkeypatch.setattr(type(epath.Path(target)), name, failing(name))
  with pytest.raises(SystemExit) as exit_info, main._errors_logged(str(workdir)):
    trainer.train(config, workdir)
  assert exit_info.value.code == 2
  err = capsys.readouterr().err
  lines = [line for line in err.splitlines() if line.strip()]
  assert len(lines) == 1 and lines[0].startswith('error: saving checkpoints (at step 4)'), err
  assert 'No space left on device' in lines[0] and 'error.log' in lines[0]
  assert 'Traceback' in (workdir / 'error.log').read_text()
  names = os.listdir(workdir / 'checkpoints')
  assert names == ['2'], names
  monkeypatch.undo()
  _, records, _ = _train(_config(6), workdir)
  assert [r['step'] for r in records][-4:] == [3, 4, 5, 6]  # resumed from 2


# ------------------------------------------------------------------------ kill -9, 10 times


@pytest.mark.slow
def test_kill_9_at_10_random_points_then_resume_matches_an_uninterrupted_run(tmp_path):
  """The CLI killed with SIGKILL 10 times at random moments (start-up, compiling, training,
  saving), then run to the end: every logged step, redone ones included, equals the
  uninterrupted run's bitwise, and the checkpoints are complete."""
  args = ['-m', 't5x_lite.main', 'train', *TINY, '--config.model.dropout_rate=0.1',
          '--config.train.log_every=1', '--config.train.num_steps=12',
          '--config.train.checkpoint_every=2']
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='--xla_force_host_platform_device_count=2',
             JAX_COMPILATION_CACHE_DIR=str(tmp_path / 'xla_cache'),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0')
  start = lambda workdir: subprocess.Popen(
      [sys.executable, *args, f'--workdir={workdir}'], cwd=os.path.dirname(os.path.dirname(
          os.path.abspath(__file__))), env=env, stdout=subprocess.DEVNULL,
      stderr=subprocess.DEVNULL)
  began = time.time()
  assert start(tmp_path / 'reference').wait(300) == 0
  duration = time.time() - began  # compiling included; later runs hit the compile cache
  reference = {r['step']: r for r in _records(tmp_path / 'reference')}
  workdir = tmp_path / 'killed'
  delays = np.random.default_rng(0).uniform(0.3, 0.9, size=10) * duration
  for delay in delays:
    process = start(workdir)
    try:
      process.wait(delay)
    except subprocess.TimeoutExpired:
      process.kill()
      process.wait()
  assert start(workdir).wait(300) == 0
  records = _records(workdir)
  assert {r['step'] for r in records} == set(range(1, 13))
  for record in records:
    for key in EXACT:
      assert record[key] == reference[record['step']][key], (record['step'], key)
  assert sorted(int(n) for n in os.listdir(workdir / 'checkpoints') if n.isdigit()) == [8, 10,
                                                                                   12]
  print(f'uninterrupted run {duration:.1f} s; kill delays (s): {np.round(delays, 1).tolist()}; '
        f'logged steps incl. redone: {len(records)}')


def _records(workdir):
  path = workdir / 'metrics.jsonl'
  return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
