"""Tests of `t5x_lite.launch`: dry-run command lines against golden files, shell quoting of
hostile values (parsed back with shlex and run through a real shell with stand-in
programs), bad settings, and a 2-process run under SLURM's environment variables."""

import os
import random
import shlex
import socket
import stat
import subprocess

import pytest

from t5x_lite import launch
from test_main import REPO, Run, read_metrics

GOLDEN = os.path.join(REPO, 'tests', 'golden')
HOSTILE_WORKDIR = 'gs://bucket/it\'s a "run" $(touch pwned); echo `id` & x'
HOSTILE_OVERRIDE = '--config.data.task=a b \'c\' "d" $(rm -rf ~); e && f | g'
COMMANDS = {
    'tpu_v4-8': [
        'launch', '--config=configs/t5_1_1_small.py', '--launcher=tpu_vm', '--name=t5-small',
        '--workdir=gs://my-bucket/runs/t5-small', '--zone=us-central2-b',
        '--accelerator_type=v4-8', '--install=git+https://github.com/my-org/t5x_lite@v0.1',
        '--config.train.num_steps=1000'],
    'tpu_v5litepod-16': [
        'launch', '--config=configs/t5_1_1_base.py', '--launcher=tpu_vm', '--name=t5-base',
        '--workdir=gs://my-bucket/runs/t5-base', '--zone=us-west4-a', '--project=my-project',
        '--accelerator_type=v5litepod-16', '--spot', '--queued',
        '--install=dist/t5x_lite-0.1.0-py3-none-any.whl', '--config.train.batch_size=256',
        '--config.mesh_shape=(-1,1,1)'],
    'slurm': [
        'launch', '--config=configs/t5_1_1_small.py', '--launcher=slurm', '--name=t5-small',
        '--workdir=/shared/runs/t5-small', '--nodes=2', '--gpus_per_node=8',
        '--partition=gpu', '--time_limit=24:00:00', '--config.train.batch_size=256'],
    'tpu_stop': ['stop', '--launcher=tpu_vm', '--name=t5-base', '--zone=us-west4-a'],
}


def read_golden(name):
  with open(os.path.join(GOLDEN, f'launch_{name}.txt'), encoding='utf-8') as f:
    return f.read()


def test_dry_run_command_lines_equal_the_golden_files(tmp_path):
  runs = {name: Run([*args, '--dry_run'], str(tmp_path), name, devices=1)
          for name, args in COMMANDS.items()}
  for name, run in runs.items():
    run.check()
    assert run.stdout == read_golden(name), name
  assert not os.path.exists('/shared/runs/t5-small')  # a dry run writes nothing


def test_status_logs_stop_delete_equal_the_golden_file():
  job = launch.Job(name='t5-base', config_file='', workdir='/shared/runs/t5 base')
  vm = launch.TpuVm(zone='us-west4-a', project='my-project', queued=True)
  lines = [f'# {action}\n' + '\n'.join(shlex.join(c) for c in launch.tpu_manage(action, job, vm))
           for action in ('status', 'logs', 'stop', 'delete')]
  slurm = [f'# slurm {action}\n' + '\n'.join(shlex.join(c) for c in
                                             launch.slurm_manage(action, job))
           for action in ('status', 'logs', 'stop')]
  assert '\n'.join(lines + slurm) + '\n' == read_golden('manage')


def _tokens(shell_line):
  """Words and operators (&&, ;, >, |, ...) as a POSIX shell splits them."""
  lexer = shlex.shlex(shell_line, posix=True, punctuation_chars=True)
  lexer.whitespace_split = True
  return list(lexer)


def _stand_ins(tmp_path, *programs):
  """A bin directory whose programs append their argv (NUL-separated) to `argv.log`."""
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  for program in programs:
    path = bin_dir / program
    path.write_text(f'#!/bin/sh\nprintf "%s\\0" {program} "$@" >> "{tmp_path}/argv.log"\n'
                    f'printf "\\n\\0" >> "{tmp_path}/argv.log"\n')
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
  return bin_dir


def _recorded(tmp_path):
  calls = (tmp_path / 'argv.log').read_text().split('\n\0')
  return [call.rstrip('\0').split('\0') for call in calls if call]


def test_hostile_values_reach_the_tpu_workers_as_one_argument_each(tmp_path):
  job = launch.Job(name='t5-small', config_file='my configs/x.py', workdir=HOSTILE_WORKDIR,
                   overrides=(HOSTILE_OVERRIDE,), evaluate=True)
  vm = launch.TpuVm(zone='us-central2-b', accelerator_type='v4-8',
                    install='git+https://example.org/t5x_lite')
  expected = ['python3', '-m', 't5x_lite.main', 'train', '--config=config.py',
              f'--workdir={HOSTILE_WORKDIR}', '--config.distributed.auto=True',
              HOSTILE_OVERRIDE]
  for args in launch.tpu_launch(job, vm):
    assert shlex.split(shlex.join(args)) == args  # the printed line is the argv
  start = launch.tpu_start(job, vm)
  assert start[-1].startswith('--command=')
  remote = _tokens(start[-1][len('--command='):])
  assert remote[:7] == ['cd', 't5x_lite_runs/t5-small', '&&', 'nohup', 'setsid', 'sh', '-c']
  script = _tokens(remote[7])
  assert script[:len(expected)] == expected and script[len(expected)] == '&&'
  assert script[len(expected) + 1:2 * len(expected) + 1] == [
      *expected[:3], 'eval', *expected[4:]]
  scp = launch.tpu_install(job, vm)[1]
  assert scp[5] == 'my configs/x.py'

  # The same script in a real shell, with python3 and gcloud standing in: each value arrives
  # as one literal argument and nothing in it runs.
  bin_dir = _stand_ins(tmp_path, 'python3', 'gcloud')
  subprocess.run(['sh', '-c', remote[7]], cwd=tmp_path, check=True,
                 env={'PATH': f'{bin_dir}:/usr/bin:/bin', 'HOME': str(tmp_path)})
  calls = _recorded(tmp_path)
  assert calls[0] == expected and calls[1] == [*expected[:3], 'eval', *expected[4:]]
  assert calls[2][:4] == ['gcloud', 'storage', 'cp', 'train.log']
  assert calls[2][4].startswith(f'{HOSTILE_WORKDIR}/logs/') and calls[2][4].endswith('.log')
  assert not (tmp_path / 'pwned').exists()


def test_hostile_values_reach_srun_as_one_argument_each(tmp_path):
  job = launch.Job(name='t5-small', config_file='configs/a b.py', workdir=HOSTILE_WORKDIR,
                   overrides=(HOSTILE_OVERRIDE,), evaluate=True)
  script = launch.slurm_script(job, launch.Slurm(nodes=2, gpus_per_node=4))
  train = ['srun', 'python3', '-m', 't5x_lite.main', 'train', '--config=configs/a b.py',
           f'--workdir={HOSTILE_WORKDIR}', '--config.distributed.auto=True', HOSTILE_OVERRIDE]
  srun_lines = [_tokens(l) for l in script.splitlines() if l.startswith('srun')]
  assert srun_lines == [train, [*train[:4], 'eval', *train[5:]]]
  assert shlex.split(shlex.join(launch.sbatch(job, 'x y.sbatch')))[-1] == 'x y.sbatch'

  bin_dir = _stand_ins(tmp_path, 'srun')
  subprocess.run(['bash', '-c', script], cwd=tmp_path, check=True,
                 env={'PATH': f'{bin_dir}:/usr/bin:/bin'})
  assert _recorded(tmp_path) == [train, [*train[:4], 'eval', *train[5:]]]
  assert not (tmp_path / 'pwned').exists()


_V4 = launch.TpuVm(zone='z', accelerator_type='v4-8', install='t5x_lite.whl')


@pytest.mark.parametrize('make,fragment', [
    (lambda: launch.TpuVm(zone='', accelerator_type='v4-8'), '--zone is required'),
    (lambda: launch.TpuVm(zone='z', spot=True, reserved=True), 'exclude each other'),
    (lambda: launch.tpu_launch(launch.Job('n', 'c.py', 'gs://b/r'), launch.TpuVm(zone='z')),
     '--accelerator_type is required'),
    (lambda: launch.tpu_launch(launch.Job('n', 'c.py', 'gs://b/r'),
                               launch.TpuVm(zone='z', accelerator_type='v4-8')),
     '--install is required'),
    (lambda: launch.tpu_launch(launch.Job('n', 'c.py', 'gs://b/r'),
                               launch.TpuVm(zone='z', accelerator_type='v9x-8', install='w')),
     '--runtime_version'),
    (lambda: launch.tpu_launch(launch.Job('Bad_Name', 'c.py', 'gs://b/r'), _V4), "'Bad_Name'"),
    (lambda: launch.tpu_launch(launch.Job('n', 'c.py', 'runs/local'), _V4), 'gs://'),
    (lambda: launch.Slurm(nodes=0), '--nodes=0'),
    (lambda: launch.Slurm(partition='gpu; rm -rf ~'), '--partition='),
    (lambda: launch.slurm_script(launch.Job('a b', 'c.py', '/w'), launch.Slurm()), "'a b'"),
])
def test_bad_launcher_settings_name_the_flag(make, fragment):
  with pytest.raises(launch.LaunchError) as error:
    make()
  assert fragment in str(error.value)


def test_runtime_version_defaults_by_generation():
  assert launch.tpu_create(launch.Job('n', '', 'gs://b'), launch.TpuVm(
      zone='z', accelerator_type='v6e-8', reserved=True)) == [
          'gcloud', 'compute', 'tpus', 'tpu-vm', 'create', 'n', '--zone=z',
          '--accelerator-type=v6e-8', '--version=v2-alpha-tpuv6e', '--reserved']


def _job_id_with_a_free_port():
  """A SLURM job id whose coordinator port (jax: 61440 + id % 4096) is free here."""
  for job_id in random.Random(os.getpid()).sample(range(2**12), 64):
    with socket.socket() as s:
      try:
        s.bind(('127.0.0.1', 65535 - 2**12 + 1 + job_id))
        return job_id
      except OSError:
        continue
  raise AssertionError('no free port in 61440..65535')


@pytest.mark.slow
def test_two_processes_under_slurm_variables_match_one_process(tmp_path):
  """What `srun` gives each task on one node: jax's SlurmCluster detects the run from these
  variables alone (--config.distributed.auto=True), with gloo collectives between the two
  CPU processes; the losses equal a 1-process run on 2 devices with the same global batch."""
  common = ['train', '--config=configs/t5_1_1_tiny.py',
            '--config.data.feature_lengths.inputs=16', '--config.data.feature_lengths.targets=16',
            '--config.train.batch_size=8', '--config.data.shuffle=False',
            '--config.data.pack=False', '--config.train.num_steps=3',
            '--config.train.log_every=1', '--config.train.checkpoint_every=3']
  job_id = _job_id_with_a_free_port()
  multi = str(tmp_path / 'multi')
  tasks = [Run([*common, '--config.distributed.auto=True', f'--workdir={multi}'],
               str(tmp_path), f'task_{i}', devices=1,
               env={'SLURM_JOB_ID': str(job_id), 'SLURM_NTASKS': '2', 'SLURM_PROCID': str(i),
                    'SLURM_LOCALID': str(i), 'SLURM_STEP_NODELIST': 'localhost',
                    'SLURM_STEP_NUM_NODES': '1',
                    'JAX_CPU_COLLECTIVES_IMPLEMENTATION': 'gloo'})
           for i in range(2)]
  single = str(tmp_path / 'single')
  Run([*common, f'--workdir={single}'], str(tmp_path), 'single', devices=2).check()
  for task in tasks:
    task.check()
  ones, twos = read_metrics(single), read_metrics(multi)
  assert [r['step'] for r in twos] == [1, 2, 3] == [r['step'] for r in ones]
  assert 'final:' in tasks[0].stdout and 'final:' not in tasks[1].stdout  # process 0 logs
  for one, two in zip(ones, twos):
    assert one['num_tokens'] == two['num_tokens']
    for key in ('loss', 'grad_norm', 'param_norm', 'accuracy'):
      assert abs(one[key] - two[key]) <= 1e-5 * max(abs(one[key]), 1.0), (key, one, two)
  print('losses 1 process:', [r['loss'] for r in ones])
  print('losses 2 SLURM tasks:', [r['loss'] for r in twos])
