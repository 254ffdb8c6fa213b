"""Command lines that run training on Cloud TPU VMs and SLURM clusters.

Pure functions turn a `Job` (a config file, its `--config.*` overrides, a workdir) and the
launcher's settings into argument lists for `gcloud` or `sbatch`; `execute` runs them or,
with `dry_run`, prints them. Every value that ends up inside a shell line (the remote
command of `gcloud ... ssh --command=...`, the body of an sbatch script) goes through
`shlex.quote`; everything else stays one argv entry.

TPU VM, as a user would by hand (MaxText's and big_vision's READMEs): create the slice
(`tpu-vm create`, or `queued-resources create` to wait in the queue; `--spot`/`--reserved`),
copy the wheel (if any) and the config file to every worker, `pip install` the package with
its `tpu` extra on `--worker=all`, and start the same `train` (then `eval`) on every worker,
detached, with `--config.distributed.auto=True` so that `jax.distributed` finds the slice.
Checkpoints go to a `gs://` workdir, so re-running the launch after a spot preemption resumes
from the last one.
"""

import dataclasses
import re
import shlex
import subprocess
from collections.abc import Callable, Sequence

from etils import epath

REMOTE_ROOT = 't5x_lite_runs'  # on each TPU worker, relative to the login directory
_TPU_NAME = re.compile(r'[a-z]([-a-z0-9]{0,61}[a-z0-9])?$')
_SLURM_VALUE = re.compile(r'[A-Za-z0-9._:,@+-]+$')
# The runtime versions Cloud TPU documents for JAX, by accelerator generation.
RUNTIME_VERSIONS = {'v4': 'tpu-ubuntu2204-base', 'v5litepod': 'v2-alpha-tpuv5-lite',
                    'v5p': 'v2-alpha-tpuv5', 'v6e': 'v2-alpha-tpuv6e'}


class LaunchError(ValueError):
  """Launcher settings that cannot work: the message names the flag and the fix."""


@dataclasses.dataclass(frozen=True)
class Job:
  """One training run: `train` (and `eval` if `evaluate`) of `config_file` + `overrides`."""

  name: str  # TPU VM / SLURM job name: lowercase letters, digits and hyphens
  config_file: str  # a local configs/*.py or sweep file, copied to TPU workers
  workdir: str  # gs://... for TPU VMs; a shared filesystem path for SLURM
  overrides: tuple[str, ...] = ()  # '--config.a.b=v' flags
  evaluate: bool = False


@dataclasses.dataclass(frozen=True)
class TpuVm:
  """A Cloud TPU slice and how to install t5x_lite on it."""

  zone: str
  accelerator_type: str = ''  # e.g. v4-8, v5litepod-16, v5p-32, v6e-8
  runtime_version: str = ''  # '' = RUNTIME_VERSIONS[generation]
  project: str = ''
  spot: bool = False
  reserved: bool = False
  queued: bool = False  # queued-resources create instead of tpu-vm create
  install: str = ''  # a pip git URL (git+https://...) or a local .whl

  def __post_init__(self):
    if not self.zone:
      raise LaunchError('--zone is required for --launcher=tpu_vm, e.g. --zone=us-central2-b')
    if self.spot and self.reserved:
      raise LaunchError('--spot and --reserved exclude each other; choose one')

  def check_slice(self) -> None:
    """What creating and installing the slice needs besides the zone."""
    if not re.fullmatch(r'v\w+-\d+', self.accelerator_type or ''):
      raise LaunchError('--accelerator_type is required for --launcher=tpu_vm, e.g. '
                        f'v4-8 or v5litepod-16 (got {self.accelerator_type!r})')
    if not self.runtime_version and self.generation not in RUNTIME_VERSIONS:
      raise LaunchError(f'no default runtime for {self.accelerator_type}; pass '
                        '--runtime_version (see Cloud TPU\'s "TPU software versions")')
    if not self.install:
      raise LaunchError('--install is required for --launcher=tpu_vm: a pip git URL such as '
                        'git+https://github.com/ORG/t5x_lite@main or a wheel from '
                        '`pip wheel --no-deps .`')

  @property
  def generation(self) -> str:
    return self.accelerator_type.rsplit('-', 1)[0]

  @property
  def version(self) -> str:
    return self.runtime_version or RUNTIME_VERSIONS[self.generation]


def _check_tpu_name(name: str) -> None:
  if not _TPU_NAME.match(name):
    raise LaunchError(f'--name={name!r}: a TPU name is 1-63 lowercase letters, digits '
                      'and hyphens, starting with a letter')


def check_tpu_job(job: Job) -> None:
  """TPU names are GCE resource names; the workers share no disk, so the workdir is GCS."""
  _check_tpu_name(job.name)
  if not job.workdir.startswith('gs://'):
    raise LaunchError(f'--workdir={job.workdir!r}: TPU workers share no disk; use a GCS '
                      'path, e.g. --workdir=gs://BUCKET/runs/NAME')


def _location(vm: TpuVm) -> list[str]:
  return [f'--zone={vm.zone}', *([f'--project={vm.project}'] if vm.project else [])]


def tpu_create(job: Job, vm: TpuVm) -> list[str]:
  """Creates the slice (as a queued resource of the same name when `vm.queued`)."""
  provisioning = ['--spot'] if vm.spot else ['--reserved'] if vm.reserved else []
  if vm.queued:
    return ['gcloud', 'compute', 'tpus', 'queued-resources', 'create', job.name,
            f'--node-id={job.name}', *_location(vm), f'--accelerator-type={vm.accelerator_type}',
            f'--runtime-version={vm.version}', *provisioning]
  return ['gcloud', 'compute', 'tpus', 'tpu-vm', 'create', job.name, *_location(vm),
          f'--accelerator-type={vm.accelerator_type}', f'--version={vm.version}',
          *provisioning]


def tpu_ssh(job: Job, vm: TpuVm, remote: str, worker: str = 'all') -> list[str]:
  """Runs the shell line `remote` on `worker` (`all` or an index)."""
  return ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', job.name, *_location(vm),
          f'--worker={worker}', f'--command={remote}']


def tpu_scp(job: Job, vm: TpuVm, local: str, remote: str) -> list[str]:
  """Copies a local file to `remote` on every worker."""
  return ['gcloud', 'compute', 'tpus', 'tpu-vm', 'scp', local, f'{job.name}:{remote}',
          *_location(vm), '--worker=all']


def _run_dir(job: Job) -> str:
  return f'{REMOTE_ROOT}/{job.name}'


def tpu_install(job: Job, vm: TpuVm) -> list[list[str]]:
  """Copies the wheel (when installing one) and the config file to every worker, then
  `pip install`s the package with its `tpu` extra there."""
  run_dir = _run_dir(job)
  commands = [tpu_ssh(job, vm, f'mkdir -p {shlex.quote(run_dir)}')]
  source = vm.install
  if source.endswith('.whl'):
    wheel = f'{run_dir}/{source.rsplit("/", 1)[-1]}'
    commands.append(tpu_scp(job, vm, source, wheel))
    source = f'./{wheel}'
  commands.append(tpu_scp(job, vm, job.config_file, f'{run_dir}/config.py'))
  requirement = f't5x_lite[tpu] @ {source}' if '://' in source else f'{source}[tpu]'
  commands.append(tpu_ssh(job, vm, f'python3 -m pip install --upgrade '
                                   f'{shlex.quote(requirement)}'))
  return commands


def _cli(job: Job, verb: str, config_file: str) -> list[str]:
  return ['python3', '-m', 't5x_lite.main', verb, f'--config={config_file}',
          f'--workdir={job.workdir}', '--config.distributed.auto=True', *job.overrides]


def tpu_start(job: Job, vm: TpuVm) -> list[str]:
  """Starts the job on every worker in its own session (so it outlives the ssh), logging to
  `<run dir>/train.log` there; when it ends the log is copied to `<workdir>/logs/`."""
  run_dir, config_file = _run_dir(job), 'config.py'
  steps = [shlex.join(_cli(job, 'train', config_file))]
  if job.evaluate:
    steps.append(shlex.join(_cli(job, 'eval', config_file)))
  log_copy = shlex.join(['gcloud', 'storage', 'cp', 'train.log', f'{job.workdir}/logs/'])
  script = f'{" && ".join(steps)}; status=$?; {log_copy}"$(hostname).log"; exit $status'
  remote = (f'cd {shlex.quote(run_dir)} && nohup setsid sh -c {shlex.quote(script)} '
            '> train.log 2>&1 < /dev/null & echo $! > pid')
  return tpu_ssh(job, vm, remote)


def tpu_launch(job: Job, vm: TpuVm) -> list[list[str]]:
  """Everything from nothing to a running job: create, install, start."""
  check_tpu_job(job)
  vm.check_slice()
  return [tpu_create(job, vm), *tpu_install(job, vm), tpu_start(job, vm)]


def tpu_manage(action: str, job: Job, vm: TpuVm) -> list[list[str]]:
  """`status`, `logs`, `stop` (SIGTERM: the trainer checkpoints) or `delete` the slice."""
  _check_tpu_name(job.name)
  run_dir = shlex.quote(_run_dir(job))
  if action == 'status':
    return [['gcloud', 'compute', 'tpus', 'tpu-vm', 'describe', job.name, *_location(vm),
             '--format=value(state)'],
            tpu_ssh(job, vm, f'cd {run_dir} && if kill -0 "$(cat pid)" 2>/dev/null; then '
                             'echo "$(hostname): running"; else echo "$(hostname): stopped"; '
                             'fi; tail -n 2 train.log')]
  if action == 'logs':
    return [tpu_ssh(job, vm, f'tail -n 100 -f {run_dir}/train.log', worker='0')]
  if action == 'stop':
    return [tpu_ssh(job, vm, f'kill -TERM "$(cat {run_dir}/pid)"')]
  if action == 'delete':
    if vm.queued:
      return [['gcloud', 'compute', 'tpus', 'queued-resources', 'delete', job.name,
               *_location(vm), '--force', '--quiet']]
    return [['gcloud', 'compute', 'tpus', 'tpu-vm', 'delete', job.name, *_location(vm),
             '--quiet']]
  raise LaunchError(f'unknown action {action!r}; choose status, logs, stop or delete')


# ------------------------------------------------------------------------------ SLURM


@dataclasses.dataclass(frozen=True)
class Slurm:
  """A multi-node GPU allocation: one process per GPU, as JAX's SLURM detection expects."""

  nodes: int = 1
  gpus_per_node: int = 8
  partition: str = ''
  time_limit: str = ''  # e.g. 24:00:00
  account: str = ''

  def __post_init__(self):
    if self.nodes < 1 or self.gpus_per_node < 1:
      raise LaunchError(f'--nodes={self.nodes} --gpus_per_node={self.gpus_per_node}: both '
                        'must be at least 1')
    for flag in ('partition', 'time_limit', 'account'):
      value = getattr(self, flag)
      if value and not _SLURM_VALUE.match(value):
        raise LaunchError(f'--{flag}={value!r}: use letters, digits and . _ : , @ + - only')


def slurm_script(job: Job, slurm: Slurm) -> str:
  """The sbatch script: SBATCH lines, then `srun` of train (and eval) on every task."""
  if not _SLURM_VALUE.match(job.name):
    raise LaunchError(f'--name={job.name!r}: use letters, digits and . _ - only')
  options = [f'--job-name={job.name}', f'--nodes={slurm.nodes}',
             f'--ntasks-per-node={slurm.gpus_per_node}',
             f'--gpus-per-node={slurm.gpus_per_node}',
             '--signal=TERM@120']  # SIGTERM 2 minutes before the time limit: a checkpoint
  options += [f'--{option}={getattr(slurm, field)}' for field, option in
              (('partition', 'partition'), ('time_limit', 'time'), ('account', 'account'))
              if getattr(slurm, field)]
  steps = [shlex.join(['srun', *_cli(job, 'train', job.config_file)])]
  if job.evaluate:
    steps.append(shlex.join(['srun', *_cli(job, 'eval', job.config_file)]))
  return '\n'.join(['#!/bin/bash', *(f'#SBATCH {option}' for option in options),
                    'set -euo pipefail', *steps]) + '\n'


def sbatch(job: Job, script_path: str) -> list[str]:
  """Submits the script, its output going to `<workdir>/slurm-<job id>.out`."""
  return ['sbatch', '--parsable', f'--output={job.workdir}/slurm-%j.out', script_path]


def slurm_submit(job: Job, slurm: Slurm, dry_run: bool,
                 log: Callable[[str], None] = print) -> None:
  """Writes `<workdir>/<name>.sbatch` and submits it; with `dry_run`, prints both."""
  script, path = slurm_script(job, slurm), f'{job.workdir}/{job.name}.sbatch'
  if dry_run:
    log(f'# {path}\n{script}')
  else:
    epath.Path(job.workdir).mkdir(parents=True, exist_ok=True)
    epath.Path(path).write_text(script)
  execute([sbatch(job, path)], dry_run, log)


def _launch_tpu(job: Job, vm: TpuVm, dry_run: bool) -> None:
  """Launches, or re-launches after a preemption: a slice that is up is reused, one that
  was preempted is deleted and created again; the job resumes from its checkpoints."""
  commands = tpu_launch(job, vm)
  if not dry_run:
    describe = tpu_manage('status', job, vm)[0]
    state = subprocess.run(describe, capture_output=True, text=True, check=False).stdout.strip()
    if state == 'READY':
      commands = commands[1:]
    elif state in ('PREEMPTED', 'TERMINATED'):
      execute(tpu_manage('delete', job, vm), dry_run)
    elif state:
      raise LaunchError(f'TPU {job.name} is {state}; re-run once it is READY (or `delete` it)')
  execute(commands, dry_run)


Launcher = Callable[[Job, bool], None]


def launcher(kind: str, tpu_vm: TpuVm | None = None, slurm: Slurm | None = None) -> Launcher:
  """`(job, dry_run) -> None` for `tpu_vm` or `slurm`: what a sweep calls per trial."""
  if kind == 'tpu_vm':
    return lambda job, dry_run: _launch_tpu(job, tpu_vm, dry_run)
  if kind == 'slurm':
    return lambda job, dry_run: slurm_submit(job, slurm, dry_run)
  raise LaunchError(f'--launcher={kind!r}: choose local, tpu_vm or slurm')


def slurm_manage(action: str, job: Job) -> list[list[str]]:
  """`status`, `logs` or `stop`/`delete` (scancel: SIGTERM first) of the named job."""
  if action == 'status':
    return [['squeue', f'--name={job.name}', '--format=%i %j %T %M %D %R']]
  if action == 'logs':
    return [['sh', '-c', f'tail -n 100 -f {shlex.quote(job.workdir)}/slurm-*.out']]
  if action in ('stop', 'delete'):
    return [['scancel', '--signal=TERM', '--full', f'--name={job.name}']]
  raise LaunchError(f'unknown action {action!r}; choose status, logs, stop or delete')


def execute(commands: Sequence[Sequence[str]], dry_run: bool,
            log: Callable[[str], None] = print) -> None:
  """Prints each command as a shell line (`shlex.join`) and, unless `dry_run`, runs it,
  stopping at the first that fails."""
  for args in commands:
    log(shlex.join(args))
    if not dry_run:
      subprocess.run(list(args), check=True)
