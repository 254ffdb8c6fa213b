"""Sweeps: a base config and a list of overrides -> validated trials -> one process per trial.

A sweep file (`experiments/*.py`) has `get_config()`, the base run config as in `configs/`,
and `get_sweep()`, a list of override dicts keyed by dotted config fields, built with
`sweep` / `product` / `zipit` / `chain` (XManager's `hyper` vocabulary):

  def get_sweep():
    return sweeps.product(sweeps.sweep('optimizer.learning_rate', [1e-3, 3e-3]),
                          sweeps.sweep('model.d_model', [64, 128]))

Every trial is resolved against `get_config()` and checked before any starts. A trial runs
the CLI's own `train` and then `eval` (`python -m t5x_lite.main ... --config=<sweep file>
--config.a.b=v`) in `<workdir>/<trial name>/`, where `trial.json` records its overrides,
resolved config, status, error line and wall time; a re-run skips finished trials and resumes
the others from their checkpoints. The `eval` stage is left out when there is nothing for it
to report (see `needs_eval_stage`).

A trial may build on an earlier one: `trial_path(overrides, 'checkpoints')` names a path in
that trial's workdir (e.g. as `train.init_from`, to fine-tune a pre-trained model), and the
local runner starts the trial only once that one has finished.

`write_report` turns the workdirs into a table, plots and HParams summaries, plus whatever
the sweep file's optional `write_results(workdir, rows[, ARG])` writes from the table's rows.
A sweep file given as `FILE.py:ARG` gets ARG in get_config, get_sweep and write_results (as
config_flags passes it to get_config in every trial).
"""

import csv
import dataclasses
import hashlib
import importlib.util
import io
import itertools
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ml_collections
from etils import epath

from t5x_lite import config as config_lib
from t5x_lite import launch, logging_utils, plots
from t5x_lite.data import tasks

Overrides = dict[str, Any]
TRIAL_FILE = 'trial.json'
FINISHED = 'done'
# Stands for the sweep's --workdir in override values until the trials are made.
SWEEP_WORKDIR = '{sweep_workdir}'


def _print(line: str) -> None:
  print(line, flush=True)  # progress shows up in a log file as it happens


class SweepError(ValueError):
  """A sweep that cannot start: the message names the trial or file and the fix."""


def sweep(field: str, values: Sequence[Any]) -> list[Overrides]:
  """One field over `values`: `[{field: v} for v in values]`."""
  return [{field: value} for value in values]


def product(*sweeps: list[Overrides]) -> list[Overrides]:
  """Every combination, the last sweep varying fastest."""
  return [_merge(combination) for combination in itertools.product(*sweeps)]


def zipit(*sweeps: list[Overrides]) -> list[Overrides]:
  """Element-wise: the i-th trial takes the i-th entry of every sweep (equal lengths)."""
  if len({len(s) for s in sweeps}) > 1:
    raise SweepError(f'zipit needs sweeps of equal length, got {[len(s) for s in sweeps]}')
  return [_merge(entries) for entries in zip(*sweeps)]


def chain(*sweeps: list[Overrides]) -> list[Overrides]:
  """One sweep after another."""
  return [dict(trial) for s in sweeps for trial in s]


def _merge(parts: Sequence[Overrides]) -> Overrides:
  merged = {}
  for part in parts:
    clash = sorted(set(merged) & set(part))
    if clash:
      raise SweepError(f'field(s) {clash} set twice in one trial of a product/zipit')
    merged.update(part)
  return merged


def trial_path(overrides: Mapping[str, Any], *parts: str) -> str:
  """A path in the workdir of the trial with `overrides`, e.g. `trial_path(pretrain,
  'checkpoints')` as a `train.init_from` value: the trial using it starts once that trial
  (an earlier one of the same sweep) has finished."""
  return '/'.join([SWEEP_WORKDIR, trial_name(overrides), *parts])


@dataclasses.dataclass(frozen=True)
class Trial:
  """One run of a sweep: its overrides, the config they resolve to, its workdir's name and
  the trials it builds on (`trial_path`), which must finish before it starts."""

  index: int
  overrides: Overrides
  config: ml_collections.ConfigDict
  name: str
  after: tuple[str, ...] = ()


def _load_module(path: epath.PathLike) -> Any:
  spec = importlib.util.spec_from_file_location(epath.Path(path).stem, os.fspath(path))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load_config(path: epath.PathLike) -> ml_collections.ConfigDict:
  """`get_config()` of a config or sweep file: what a sweep file builds its base on."""
  return _load_module(path).get_config()


def split_argument(path: str) -> tuple[str, tuple[str, ...]]:
  """'FILE.py:ARG' -> ('FILE.py', ('ARG',)); 'FILE.py' -> ('FILE.py', ()). As config_flags
  reads --config=FILE.py:ARG, a sweep file's get_config and get_sweep then receive ARG."""
  file, *argument = path.split(':', 1)
  return file, tuple(argument)


def load_sweep_file(path: str) -> tuple[ml_collections.ConfigDict, list[Overrides]]:
  """`get_config()` and `get_sweep()` of a sweep file (given ARG for 'FILE.py:ARG')."""
  file, argument = split_argument(path)
  if not epath.Path(file).is_file():
    raise SweepError(f'sweep file {file!r} not found; pass e.g. '
                     '--sweep=experiments/lr_size.py')
  module = _load_module(file)
  for function in ('get_config', 'get_sweep'):
    if not callable(getattr(module, function, None)):
      raise SweepError(f'{file} has no {function}(); a sweep file defines get_config() (the '
                       'base run config) and get_sweep() (a list of override dicts)')
  trials = module.get_sweep(*argument)
  if not isinstance(trials, list) or not all(isinstance(t, dict) for t in trials):
    raise SweepError(f'get_sweep() in {file} must return a list of dicts, got '
                     f'{type(trials).__name__}')
  if not trials:
    raise SweepError(f'get_sweep() in {file} returned no trials; add at least one override '
                     'dict (an empty dict {} runs the base config)')
  return module.get_config(*argument), trials


def apply_overrides(base: ml_collections.ConfigDict,
                    overrides: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """A locked copy of `base` with `overrides` set; raises KeyError (unknown field) or
  TypeError (wrong type) naming the field."""
  config = ml_collections.ConfigDict(base.to_dict())  # a deep copy, type-safe
  config.lock()
  for field, value in overrides.items():
    *parents, leaf = field.split('.')
    node = config
    for part in parents:
      node = node[part] if isinstance(node, ml_collections.ConfigDict) and part in node else None
      if node is None:
        raise KeyError(field)
    if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
      raise KeyError(field)
    if isinstance(node[leaf], ml_collections.ConfigDict):
      raise TypeError(f'{field} is a section; override its fields one by one')
    if isinstance(value, list):
      value = tuple(value)
    try:
      node[leaf] = value
    except TypeError as e:
      raise TypeError(f'{field}={value!r} has the wrong type ({e})') from None
  return config


def trial_name(overrides: Mapping[str, Any]) -> str:
  """Readable from the overrides (last name component = value), plus a stable short hash
  of all of them so that names never collide."""
  digest = hashlib.sha1(_canonical(overrides).encode()).hexdigest()[:6]
  parts = [f'{field.rsplit(".", 1)[-1]}={_format_value(value)}'
           for field, value in overrides.items()]
  readable = re.sub(r'[^A-Za-z0-9._=,+-]', '_', ','.join(parts))[:80]
  return f'{readable}-{digest}' if readable else f'base-{digest}'


def _canonical(value: Any) -> str:
  return json.dumps(value, sort_keys=True, default=repr)


def _format_value(value: Any) -> str:
  if isinstance(value, float):
    return f'{value:g}'
  if isinstance(value, (tuple, list)):
    return 'x'.join(_format_value(v) for v in value)
  return str(value)


def _referenced_trials(overrides: Mapping[str, Any]) -> tuple[str, ...]:
  """The names of the trials whose workdirs `trial_path` values in `overrides` point into."""
  pattern = re.escape(SWEEP_WORKDIR) + r'/([^/]+)'
  return tuple(dict.fromkeys(name for value in overrides.values() if isinstance(value, str)
                             for name in re.findall(pattern, value)))


def make_trials(path: str, workdir: str = '') -> list[Trial]:
  """The sweep file's trials, each resolved and checked; raises SweepError naming the first
  bad trial (unknown field, wrong type, invalid model or task, duplicate, a `trial_path` to
  no earlier trial). `trial_path` values point into `workdir` (if given)."""
  base, sweep_overrides = load_sweep_file(path)
  trials, seen = [], {}
  for index, raw_overrides in enumerate(sweep_overrides):
    where = f'trial {index} {raw_overrides}'
    after = _referenced_trials(raw_overrides)
    earlier = {trial.name for trial in trials}
    unknown = [name for name in after if name not in earlier]
    if unknown:
      raise SweepError(f'{where}: builds on trial {unknown[0]}, which is not an earlier trial '
                       'of this sweep; list the trial it builds on before it')
    overrides = {field: value.replace(SWEEP_WORKDIR, os.fspath(workdir) or SWEEP_WORKDIR)
                 if isinstance(value, str) else value for field, value in raw_overrides.items()}
    try:
      for value in overrides.values():
        override_flag('x', value)  # representable on a command line
      config = apply_overrides(base, overrides)
      config_lib.model_config(config)
    except KeyError as e:
      raise SweepError(f'{where}: unknown config field {str(e).strip(chr(39))!r}; '
                       '`info --config=...` lists the fields') from None
    except (TypeError, ValueError) as e:
      raise SweepError(f'{where}: {e}') from None
    try:
      tasks.get(config.data.task)
    except KeyError as e:
      raise SweepError(f'{where}: {str(e).strip(chr(34))}') from None
    resolved = config.to_json_best_effort(sort_keys=True)
    if resolved in seen:
      raise SweepError(f'{where} duplicates trial {seen[resolved]}: both resolve to the same '
                       'config; remove one')
    seen[resolved] = index
    # Named by the overrides as written, so a trial's name does not depend on the workdir.
    trials.append(Trial(index, overrides, config, trial_name(raw_overrides), after))
  return trials


def needs_eval_stage(config: ml_collections.ConfigDict) -> bool:
  """Whether a trial runs `eval` after `train`: not when training already evaluated its last
  step (`eval.every_steps` divides `train.num_steps`), nor when its task (or mixture) has no
  metrics to report, as pre-training tasks have not."""
  every = config.eval.every_steps
  if every and config.train.num_steps % every == 0:
    return False
  return bool(getattr(tasks.from_config(config.data, config.eval.task), 'metric_fns', ()))


def override_flag(field: str, value: Any) -> str:
  """`--config.FIELD=VALUE` as `config_flags` parses it back to `value` (one argv entry)."""
  if isinstance(value, (bool, int, str)):
    text = str(value)
  elif isinstance(value, float):
    text = repr(value)  # round-trips exactly
  elif isinstance(value, (tuple, list)) and all(isinstance(v, (int, float, str)) for v in value):
    text = repr(tuple(value))
  else:
    raise TypeError(f'{field}={value!r}: a sweep value must be a bool, int, float, str or '
                    'a tuple of them')
  return f'--config.{field}={text}'


def command(verb: str, sweep_file: str, workdir: str, overrides: Mapping[str, Any],
            python: str = sys.executable) -> list[str]:
  """The argument list of `python -m t5x_lite.main VERB` for one trial."""
  return [python, '-m', 't5x_lite.main', verb, f'--config={sweep_file}',
          f'--workdir={workdir}',
          *(override_flag(field, value) for field, value in overrides.items())]


def read_status(trial_dir: epath.PathLike) -> dict[str, Any]:
  """The trial's `trial.json` ({} before its first start)."""
  path = epath.Path(trial_dir) / TRIAL_FILE
  return json.loads(path.read_text()) if path.exists() else {}


def write_status(trial_dir: epath.PathLike, **fields: Any) -> dict[str, Any]:
  """Updates `trial.json` (written whole, then renamed into place)."""
  trial_dir = epath.Path(trial_dir)
  status = {**read_status(trial_dir), **fields}
  trial_dir.mkdir(parents=True, exist_ok=True)
  tmp = trial_dir / (TRIAL_FILE + '.tmp')
  tmp.write_text(json.dumps(status, indent=2, sort_keys=True, default=repr))
  tmp.replace(trial_dir / TRIAL_FILE)
  return status


def check_parallel(parallel: int) -> list[int]:
  """The cores this process may use; raises if `parallel` trials cannot have one each."""
  cores = sorted(os.sched_getaffinity(0))
  if not 1 <= parallel <= len(cores):
    raise SweepError(f'--parallel={parallel} but this machine gives us {len(cores)} cores; '
                     f'choose 1..{len(cores)} (each trial gets its own cores)')
  return cores


def core_slots(cores: Sequence[int], parallel: int) -> list[list[int]]:
  """`parallel` disjoint sets of cores, one per running trial. XLA:CPU sizes its thread pool
  from the process's CPU affinity (XLA_FLAGS and OMP_NUM_THREADS do not bound it), so the
  affinity is what keeps N trials from oversubscribing the machine."""
  per_slot = len(cores) // parallel
  return [list(cores[i * per_slot:(i + 1) * per_slot]) for i in range(parallel)]


@dataclasses.dataclass
class _Running:
  trial: Trial
  stage: str  # 'train' or 'eval'
  proc: subprocess.Popen
  slot: int
  started: float


class LocalRunner:
  """Runs trials as local processes, `parallel` at a time, each pinned to its own cores.

  SIGINT and SIGTERM stop starting trials and forward SIGTERM to the running ones (the
  trainer saves a checkpoint and exits); their status becomes 'interrupted'. Trials share
  compiled programs through JAX's persistent cache in `<workdir>/xla_cache` (unless
  JAX_COMPILATION_CACHE_DIR is set): trials that differ only in seed, init_from or the like
  compile once.
  """

  def __init__(self, sweep_file: str, workdir: str, parallel: int,
               log: Callable[[str], None] = _print):
    self.sweep_file, self.workdir, self.log = sweep_file, epath.Path(workdir), log
    self.slots = core_slots(check_parallel(parallel), parallel)
    self.stopping = False
    self._running: list[_Running] = []
    self.env = dict(os.environ)
    if '://' not in os.fspath(workdir) and 'JAX_COMPILATION_CACHE_DIR' not in self.env:
      self.env.update(JAX_COMPILATION_CACHE_DIR=os.fspath(self.workdir / 'xla_cache'),
                      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0')  # small programs too

  def trial_dir(self, trial: Trial) -> epath.Path:
    return self.workdir / trial.name

  def run(self, trials: Sequence[Trial]) -> dict[str, str]:
    """Runs the unfinished trials; returns {trial name: final status}."""
    pending = [t for t in trials if read_status(self.trial_dir(t)).get('status') != FINISHED]
    for trial in trials:
      if trial not in pending:
        self.log(f'[{trial.index}] {trial.name}: finished before, skipped')
    previous = {s: signal.signal(s, self._stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
      while (pending and not self.stopping) or self._running:
        free = sorted(set(range(len(self.slots))) - {r.slot for r in self._running})
        for trial in list(pending):  # in order, each once the trials it builds on are done
          if not free or self.stopping:
            break
          ready = self._ready(trial, pending)
          if ready:
            pending.remove(trial)
            self._start(trial, 'train', free.pop(0))
          elif ready is None:
            pending.remove(trial)
            self._block(trial)
        self._reap()
        time.sleep(0.2)
    finally:  # also on an error of our own: no child outlives the sweep unasked
      if self._running:
        self._stop(signal.SIGTERM, None)
        for running in self._running:
          running.proc.wait()
      for s, handler in previous.items():
        signal.signal(s, handler)
    return {t.name: read_status(self.trial_dir(t)).get('status', 'not started')
            for t in trials}

  def _ready(self, trial: Trial, pending: Sequence[Trial]) -> bool | None:
    """True once every trial `trial` builds on has finished, False while one is still to
    run, None if one ended without finishing (failed, interrupted, blocked)."""
    to_run = {t.name for t in pending} | {r.trial.name for r in self._running}
    waiting = False
    for name in trial.after:
      if read_status(self.workdir / name).get('status') == FINISHED:
        continue
      if name not in to_run:
        return None
      waiting = True
    return not waiting

  def _block(self, trial: Trial) -> None:
    """Records that `trial` cannot start: a trial it builds on did not finish."""
    failed = next(name for name in trial.after
                  if read_status(self.workdir / name).get('status') != FINISHED)
    error = f'not started: trial {failed} it builds on did not finish; re-run the sweep'
    write_status(self.trial_dir(trial), name=trial.name, overrides=trial.overrides,
                 status='blocked', error=error)
    self.log(f'[{trial.index}] {trial.name}: blocked, {error}')

  def _stop(self, signum, frame) -> None:
    del frame
    if not self.stopping:
      self.log(f'signal {signum}: stopping; running trials save a checkpoint (re-run the '
               'same command to resume them)')
    self.stopping = True
    for running in self._running:
      if running.proc.poll() is None:
        running.proc.send_signal(signal.SIGTERM)

  def _start(self, trial: Trial, stage: str, slot: int) -> None:
    trial_dir = self.trial_dir(trial)
    if stage == 'train':
      status = read_status(trial_dir)
      write_status(trial_dir, name=trial.name, overrides=trial.overrides,
                   config=json.loads(trial.config.to_json_best_effort()),
                   status='running', error='', attempts=status.get('attempts', 0) + 1,
                   wall_time=status.get('wall_time', 0.0))
    args = command(stage, self.sweep_file, os.fspath(trial_dir), trial.overrides)
    cores = self.slots[slot]
    with (trial_dir / f'{stage}.log').open('ab') as log_file:
      proc = subprocess.Popen(
          args, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
          env=self.env,
          start_new_session=True,  # a terminal's Ctrl-C reaches only us; we forward SIGTERM
          preexec_fn=lambda: os.sched_setaffinity(0, cores))
    self._running.append(_Running(trial, stage, proc, slot, time.time()))
    self.log(f'[{trial.index}] {trial.name}: {stage} started on cores {cores}')

  def _reap(self) -> None:
    for running in list(self._running):
      code = running.proc.poll()
      if code is None:
        continue
      self._running.remove(running)
      trial, trial_dir = running.trial, self.trial_dir(running.trial)
      wall_time = read_status(trial_dir).get('wall_time', 0.0) + time.time() - running.started
      trained = running.stage == 'train' and code == 0 and _trained(trial, trial_dir)
      if code == 0 and (running.stage == 'eval'
                        or (trained and not needs_eval_stage(trial.config))):
        status = write_status(trial_dir, status=FINISHED, wall_time=wall_time)
      elif self.stopping or (code == 0 and not trained):
        status = write_status(trial_dir, status='interrupted', wall_time=wall_time)
      elif code:
        error = last_error_line(trial_dir / f'{running.stage}.log')
        status = write_status(trial_dir, status='failed', wall_time=wall_time,
                              error=f'{running.stage} exited with {code}: {error}')
      else:
        write_status(trial_dir, wall_time=wall_time)
        self._start(trial, 'eval', running.slot)
        continue
      self.log(f'[{trial.index}] {trial.name}: {status["status"]} after {wall_time:.0f} s'
               + (f': {status["error"]}' if status.get('error') else ''))


def _trained(trial: Trial, trial_dir: epath.Path) -> bool:
  """Whether the train process got to the last step (it also exits 0 after a SIGTERM)."""
  records = plots.read_metrics(trial_dir) if (trial_dir / 'metrics.jsonl').exists() else []
  return bool(records) and records[-1]['step'] == trial.config.train.num_steps


def last_error_line(log_path: epath.PathLike) -> str:
  """The `error: ...` line of a failed command's log, else its last line."""
  path = epath.Path(log_path)
  text = path.read_bytes().decode('utf-8', errors='replace')
  lines = [l.strip() for l in text.splitlines() if l.strip()]
  errors = [l for l in lines if l.startswith('error: ')]
  return (errors or lines or ['(no output)'])[-1]


# ------------------------------------------------------------------------------ results


def trial_row(trial_dir: epath.PathLike, overrides: Mapping[str, Any]) -> dict[str, Any]:
  """One results-table row from a trial's workdir: the swept values, status, steps, final
  train loss, every eval metric, wall time and median tokens/s (first interval, which
  compiles, left out)."""
  trial_dir = epath.Path(trial_dir)
  status = read_status(trial_dir)
  has_metrics = (trial_dir / 'metrics.jsonl').exists()
  train = plots.read_metrics(trial_dir, 'train') if has_metrics else []
  evals = plots.read_metrics(trial_dir, 'eval') if has_metrics else []
  speeds = sorted(r['tokens_per_second'] for r in train[1:] or train)
  row = {'trial': trial_dir.name, **overrides,
         'status': status.get('status') or ('done' if evals else 'not started'),
         'steps': train[-1]['step'] if train else 0,
         'train_loss': train[-1]['loss'] if train else None}
  if evals:
    row.update({f'eval_{k}': v for k, v in evals[-1].items() if k not in ('step', 'split')})
  row.update(wall_time_s=status.get('wall_time'),
             tokens_per_s=speeds[len(speeds) // 2] if speeds else None,
             error=status.get('error', ''))
  return row


def write_report(workdir: epath.PathLike, trials: Sequence[Trial],
                 write_results: Callable[..., list[epath.Path]] | None = None
                 ) -> list[epath.Path]:
  """`results.csv`, `results.md`, loss-curve and metric-vs-hyperparameter PNGs and
  TensorBoard HParams summaries in the sweep's workdir, then what `write_results(workdir,
  rows)` (a sweep file's own tables, e.g. seeds aggregated) writes from the same rows;
  returns the files written."""
  workdir = epath.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  rows = [trial_row(workdir / t.name, t.overrides) for t in trials]
  columns = list(dict.fromkeys(k for row in rows for k in row))
  columns.append(columns.pop(columns.index('error')))
  written = [_write_csv(workdir / 'results.csv', rows, columns),
             _write_markdown(workdir / 'results.md', rows, columns)]
  curves = {}
  for trial in trials:
    if (workdir / trial.name / 'metrics.jsonl').exists():
      records = [r for r in plots.read_metrics(workdir / trial.name) if 'loss' in r]
      curves[trial.name] = ([r['step'] for r in records], [r['loss'] for r in records])
  written.append(plots.plot_loss_curves(curves, workdir / 'loss_curves.png',
                                        title=f'{workdir.name}: train loss'))
  params = list(dict.fromkeys(f for t in trials for f in t.overrides))
  metrics = [c for c in columns if c.startswith('eval_') or c == 'train_loss']
  # Zipped fields (d_model with d_ff) move together: one x axis for them, and a line per
  # value of the fields that vary independently of the one on the x axis.
  axes = [p for i, p in enumerate(params)
          if not any(_determines(rows, q, p) and _determines(rows, p, q) for q in params[:i])]
  for param, metric in itertools.product(axes, metrics):
    group_by = [q for q in params if q != param and not _determines(rows, param, q)]
    written.append(plots.plot_metric_against(
        rows, param, metric, group_by,
        workdir / f'{metric}_vs_{param.rsplit(".", 1)[-1]}.png'))
  done = [row for row in rows if row['status'] == FINISHED]
  logging_utils.write_hparams(
      workdir / 'hparams', {row['trial']: {p: row.get(p) for p in params} for row in done},
      {row['trial']: {m: row[m] for m in metrics if row.get(m) is not None} for row in done})
  if write_results is not None:
    written += write_results(workdir, rows)
  return written


def _determines(rows: Sequence[Mapping[str, Any]], a: str, b: str) -> bool:
  """Whether the value of field `a` fixes that of field `b` in every row."""
  seen = {}
  return all(seen.setdefault(repr(row.get(a)), repr(row.get(b))) == repr(row.get(b))
             for row in rows)


def _cell(value: Any) -> str:
  if isinstance(value, float):
    return f'{value:.4g}'
  return '' if value is None else str(value)


def _write_csv(path: epath.Path, rows: Sequence[Mapping[str, Any]],
               columns: Sequence[str]) -> epath.Path:
  buffer = io.StringIO()
  writer = csv.DictWriter(buffer, columns, lineterminator='\n')
  writer.writeheader()
  writer.writerows(rows)
  path.write_text(buffer.getvalue())
  return path


def _write_markdown(path: epath.Path, rows: Sequence[Mapping[str, Any]],
                    columns: Sequence[str]) -> epath.Path:
  columns = [c for c in columns if c != 'error' or any(row.get('error') for row in rows)]
  lines = ['| ' + ' | '.join(columns) + ' |',
           '|' + '|'.join('---:' if c not in ('trial', 'status', 'error') else '---'
                          for c in columns) + '|']
  lines += ['| ' + ' | '.join(_cell(row.get(c)) for c in columns) + ' |' for row in rows]
  path.write_text('\n'.join(lines) + '\n')
  return path


def run_sweep(sweep_file: str, workdir: str, *, parallel: int = 1, dry_run: bool = False,
              report_only: bool = False, launcher: launch.Launcher | None = None,
              name: str = '', log: Callable[[str], None] = _print) -> int:
  """Validates every trial, then runs them locally (`launcher` None) or hands each to a
  remote launcher as a `launch.Job`; writes the report after a local run. Returns the exit
  code: 0 when every trial finished, 1 otherwise."""
  trials = make_trials(sweep_file, workdir)
  file, argument = split_argument(sweep_file)
  hook = getattr(_load_module(file), 'write_results', None)
  write_results = hook and (lambda directory, rows: hook(directory, rows, *argument))
  if report_only:
    for path in write_report(workdir, trials, write_results):
      log(f'wrote {path}')
    return 0
  if launcher is not None:
    chained = next((t for t in trials if t.after), None)
    if chained is not None:
      raise SweepError(f'trial {chained.index} builds on trial {chained.after[0]}: trials that '
                       'build on others run only with the local runner (on a TPU VM: run the '
                       'sweep command there, without --launcher)')
    for trial in trials:
      launcher(launch.Job(name=f'{name}-{trial.name.rsplit("-", 1)[-1]}',
                          config_file=sweep_file, workdir=f'{workdir}/{trial.name}',
                          overrides=tuple(override_flag(f, v) for f, v in
                                          trial.overrides.items()),
                          evaluate=needs_eval_stage(trial.config)), dry_run)
    log(f'{len(trials)} trials {"printed" if dry_run else "launched"}; tabulate them with '
        '--report_only once they finish')
    return 0
  runner = LocalRunner(sweep_file, workdir, parallel, log)
  if dry_run:
    for trial in trials:
      for verb in ('train', 'eval') if needs_eval_stage(trial.config) else ('train',):
        log(shlex.join(command(verb, sweep_file, os.fspath(runner.trial_dir(trial)),
                               trial.overrides)))
    return 0
  statuses = runner.run(trials)
  for path in write_report(workdir, trials, write_results):
    log(f'wrote {path}')
  log((epath.Path(workdir) / 'results.md').read_text())
  unfinished = {n: s for n, s in statuses.items() if s != FINISHED}
  if unfinished:
    log(f'{len(unfinished)} of {len(trials)} trials did not finish: '
        + ', '.join(f'{n} ({s})' for n, s in unfinished.items())
        + '; re-run the same command to resume them')
  return 1 if unfinished else 0
