"""Tests of `t5x_lite.sweeps`: sweep helpers, trial validation and names, the results report,
bad input on the command line, and a real sweep stopped half way and resumed."""

import csv
import json
import os
import re
import signal
import struct
import subprocess
import sys
import time

import pytest
from absl import flags
from ml_collections import config_flags

from t5x_lite import config as config_lib
from t5x_lite import sweeps
from test_main import REPO, TIMEOUT, Run, assert_one_error_line, compile_cache  # pylint: disable=unused-import

TINY_SWEEP = '''
from t5x_lite import config as base, sweeps

def get_config():
  config = base.base_config(base.T5_1_1, d_model=32, num_heads=2, head_dim=16, d_ff=64,
                            num_encoder_layers=1, num_decoder_layers=1, vocab_size=8192)
  config.train.num_steps = {steps}
  config.train.batch_size = 4
  config.train.log_every = 2
  config.train.checkpoint_every = 50
  config.data.feature_lengths.inputs = 16
  config.data.feature_lengths.targets = 16
  config.eval.num_examples = 4
  config.eval.batch_size = 4
  config.eval.max_decode_length = 4
  return config

def get_sweep():
  {sweep}
'''


def write_sweep(tmp_path, sweep='return sweeps.sweep("seed", [0, 1])', steps=4,
                name='sweep.py'):
  path = tmp_path / name
  path.write_text(TINY_SWEEP.format(steps=steps, sweep=sweep))
  return str(path)


# ----------------------------------------------------------------------------- helpers


def test_product_zipit_chain():
  lr = sweeps.sweep('optimizer.learning_rate', [0.1, 0.2])
  size = sweeps.zipit(sweeps.sweep('model.d_model', [64, 128]),
                      sweeps.sweep('model.d_ff', [256, 512]))
  assert size == [{'model.d_model': 64, 'model.d_ff': 256},
                  {'model.d_model': 128, 'model.d_ff': 512}]
  assert sweeps.product(lr, size) == [
      {'optimizer.learning_rate': 0.1, 'model.d_model': 64, 'model.d_ff': 256},
      {'optimizer.learning_rate': 0.1, 'model.d_model': 128, 'model.d_ff': 512},
      {'optimizer.learning_rate': 0.2, 'model.d_model': 64, 'model.d_ff': 256},
      {'optimizer.learning_rate': 0.2, 'model.d_model': 128, 'model.d_ff': 512}]
  assert sweeps.chain(lr, sweeps.sweep('seed', [3])) == [
      {'optimizer.learning_rate': 0.1}, {'optimizer.learning_rate': 0.2}, {'seed': 3}]
  with pytest.raises(sweeps.SweepError, match='equal length'):
    sweeps.zipit(lr, sweeps.sweep('seed', [1]))
  with pytest.raises(sweeps.SweepError, match='set twice'):
    sweeps.product(lr, lr)


def test_apply_overrides_sets_fields_and_names_bad_ones():
  base = config_lib.base_config(config_lib.T5_1_1, d_model=64)
  config = sweeps.apply_overrides(base, {'optimizer.learning_rate': 3e-3, 'model.d_model': 32,
                                         'mesh_shape': [1, -1, 1]})
  assert config.optimizer.learning_rate == 3e-3 and config.model.d_model == 32
  assert config.mesh_shape == (1, -1, 1)
  assert base.model.d_model == 64  # the base is not modified
  with pytest.raises(KeyError, match='optimizer.lr'):
    sweeps.apply_overrides(base, {'optimizer.lr': 1.0})
  with pytest.raises(KeyError, match='nothing.here'):
    sweeps.apply_overrides(base, {'nothing.here': 1})
  with pytest.raises(TypeError, match='model.d_model'):
    sweeps.apply_overrides(base, {'model.d_model': 'big'})
  with pytest.raises(TypeError, match='section'):
    sweeps.apply_overrides(base, {'optimizer': 1})


def test_trial_names_are_readable_stable_and_distinct():
  name = sweeps.trial_name({'optimizer.learning_rate': 0.003, 'model.d_model': 128,
                            'mesh_shape': (1, -1, 1), 'data.task': 'a b/c'})
  assert name == 'learning_rate=0.003,d_model=128,mesh_shape=1x-1x1,task=a_b_c-' + \
      sweeps.trial_name({'optimizer.learning_rate': 0.003, 'model.d_model': 128,
                         'mesh_shape': (1, -1, 1), 'data.task': 'a b/c'})[-6:]
  assert re.fullmatch(r'base-[0-9a-f]{6}', sweeps.trial_name({}))
  # Same readable part, different values: the hash keeps them apart.
  assert sweeps.trial_name({'a.x': 1, 'b.x': 2}) != sweeps.trial_name({'a.x': 2, 'b.x': 1})


@pytest.mark.parametrize('field,value', [
    ('optimizer.learning_rate', 0.1 + 0.2), ('optimizer.learning_rate', 3e-7),
    ('model.d_model', 48), ('data.pack', False), ('mesh_shape', (2, -1, 1)),
    ('data.task', 'translate_en_fr'), ('optimizer.name', "a 'b' \"c\" $(x); y")])
def test_override_flags_parse_back_to_the_value(field, value):
  """The flags a trial's process receives, parsed by ml_collections' own config flag."""
  argv = ['prog', f'--config={REPO}/configs/t5_1_1_tiny.py', sweeps.override_flag(field, value)]
  values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', flag_values=values, lock_config=True,
                                  sys_argv=argv)
  values(argv)
  node = values.config
  for part in field.split('.'):
    node = node[part]
  assert node == value and type(node) is type(value)


def test_core_slots_split_the_cores():
  assert sweeps.core_slots([0, 1, 2, 3], 2) == [[0, 1], [2, 3]]
  assert sweeps.core_slots([4, 5, 6, 7, 8], 2) == [[4, 5], [6, 7]]
  assert sweeps.core_slots([0, 1], 1) == [[0, 1]]
  with pytest.raises(sweeps.SweepError, match='--parallel=999'):
    sweeps.check_parallel(999)


def test_make_trials_resolves_every_trial(tmp_path):
  path = write_sweep(tmp_path, 'return sweeps.product(sweeps.sweep("seed", [0, 1]), '
                               'sweeps.sweep("optimizer.learning_rate", [0.5]))')
  trials = sweeps.make_trials(path)
  assert [t.overrides for t in trials] == [{'seed': 0, 'optimizer.learning_rate': 0.5},
                                           {'seed': 1, 'optimizer.learning_rate': 0.5}]
  assert [t.config.seed for t in trials] == [0, 1]
  assert trials[1].config.optimizer.learning_rate == 0.5 and trials[1].config.model.d_model == 32


@pytest.mark.parametrize('sweep,fragment', [
    ('return []', 'returned no trials'),
    ('return [{"seed": 0}, {"optimizer.lr": 1.0}]', "trial 1 {'optimizer.lr': 1.0}: unknown "
                                                    "config field 'optimizer.lr'"),
    ('return [{"model.d_model": "wide"}]', 'trial 0'),
    ('return [{"seed": 1}, {"seed": 0}, {"seed": 1}]', 'trial 2 {\'seed\': 1} duplicates trial 0'),
    ('return [{}, {"seed": 0}]', 'duplicates trial 0'),  # the base config's seed is 0
    ('return [{"model.d_model": 0}]', 'trial 0'),  # the model config rejects it
    ('return [{"data.task": "no_such_task"}]', 'no_such_task'),
    ('return {"seed": 1}', 'must return a list of dicts'),
])
def test_make_trials_rejects(tmp_path, sweep, fragment):
  with pytest.raises(sweeps.SweepError) as error:
    sweeps.make_trials(write_sweep(tmp_path, sweep))
  assert fragment in str(error.value)


CHAINED = ('pre = {"seed": 1}\n'
           '  return [pre, {"seed": 2, "train.init_from": sweeps.trial_path(pre, "checkpoints")}]')


def test_a_trial_builds_on_an_earlier_one_through_trial_path(tmp_path):
  path = write_sweep(tmp_path, CHAINED)
  first, second = sweeps.make_trials(path, str(tmp_path / 'runs'))
  assert first.after == () and second.after == (first.name,)
  assert second.config.train.init_from == f'{tmp_path}/runs/{first.name}/checkpoints'
  assert second.overrides['train.init_from'] == second.config.train.init_from
  # Named by the overrides as written: the same names in any workdir.
  assert [t.name for t in sweeps.make_trials(path)] == [first.name, second.name]
  backwards = 'pre = {"seed": 1}\n  return [{"train.init_from": sweeps.trial_path(pre)}, pre]'
  with pytest.raises(sweeps.SweepError, match='trial 0 .* not an earlier trial'):
    sweeps.make_trials(write_sweep(tmp_path, backwards, name='backwards.py'))


def test_a_trial_waits_for_the_one_it_builds_on_and_is_blocked_if_that_fails(tmp_path):
  workdir = tmp_path / 'runs'
  first, second = sweeps.make_trials(write_sweep(tmp_path, CHAINED), str(workdir))
  runner = sweeps.LocalRunner('unused.py', str(workdir), parallel=1, log=lambda line: None)
  assert runner._ready(second, [first, second]) is False  # still to run: wait
  sweeps.write_status(workdir / first.name, status='failed')
  assert runner._ready(second, [second]) is None
  runner._block(second)
  status = sweeps.read_status(workdir / second.name)
  assert status['status'] == 'blocked' and first.name in status['error']
  sweeps.write_status(workdir / first.name, status=sweeps.FINISHED)
  assert runner._ready(second, [second]) is True


def test_eval_stage_only_when_there_is_something_to_report(tmp_path):
  config = sweeps.make_trials(write_sweep(tmp_path))[0].config
  assert sweeps.needs_eval_stage(config)  # translate_en_de has BLEU
  changes = [{'data.task': 'pretrain_span_corruption'},  # a mixture: nothing to score
             {'data.task': 'lm_pretrain_text'},  # a task without metrics
             {'eval.every_steps': 2}]  # train evaluates its last step (4) itself
  for change in changes:
    assert not sweeps.needs_eval_stage(sweeps.apply_overrides(config, change)), change
  assert sweeps.needs_eval_stage(sweeps.apply_overrides(config, {'eval.every_steps': 3}))


def test_a_sweep_file_argument_reaches_get_sweep_and_get_config(tmp_path):
  path = tmp_path / 'scaled.py'
  path.write_text(TINY_SWEEP.format(steps=4, sweep='return [{"seed": int(scale)}]')
                  .replace('def get_config():', 'def get_config(scale="0"):')
                  .replace('def get_sweep():', 'def get_sweep(scale="0"):')
                  .replace('config.train.num_steps = 4', 'config.train.num_steps = 4 + int(scale)'))
  [trial] = sweeps.make_trials(f'{path}:3')
  assert trial.config.seed == 3 and trial.config.train.num_steps == 7
  assert sweeps.command('train', f'{path}:3', 'w', trial.overrides)[4] == f'--config={path}:3'


# ------------------------------------------------------------------------------ report


def _fake_trial(workdir, trial, status, losses, eval_metrics=None, speed=100.0):
  """A trial directory as a run leaves it: trial.json and metrics.jsonl."""
  directory = workdir / trial.name
  sweeps.write_status(directory, status=status, wall_time=12.5, overrides=trial.overrides)
  records = [{'step': 10 * (i + 1), 'split': 'train', 'loss': loss,
              'tokens_per_second': speed * (i + 1)} for i, loss in enumerate(losses)]
  if eval_metrics:
    records.append({'step': 10 * len(losses), 'split': 'eval', **eval_metrics})
  (directory / 'metrics.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in records))


def _read_events(directory):
  """[(step, tag, simple_value, plugin_name, plugin content)] of every event file below."""
  from tensorboardX.proto import event_pb2
  events = {}
  for root, _, names in os.walk(directory):
    for name in names:
      data = open(os.path.join(root, name), 'rb').read()
      offset, rows = 0, []
      while offset < len(data):
        (length,) = struct.unpack('<Q', data[offset:offset + 8])
        event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
        offset += 12 + length + 4
        for value in event.summary.value:
          rows.append((event.step, value.tag, value.simple_value,
                       value.metadata.plugin_data.plugin_name,
                       value.metadata.plugin_data.content))
      events.setdefault(os.path.relpath(root, directory), []).extend(rows)
  return events


def test_report_table_plots_and_hparams(tmp_path):
  path = write_sweep(tmp_path, 'return sweeps.product(sweeps.sweep("optimizer.learning_rate", '
                               '[0.1, 0.2]), sweeps.sweep("model.d_model", [32, 64]))')
  trials = sweeps.make_trials(path)
  workdir = tmp_path / 'runs'
  _fake_trial(workdir, trials[0], 'done', [5.0, 4.0, 3.0], {'bleu': 1.5, 'loss': 3.5})
  _fake_trial(workdir, trials[1], 'done', [5.0, 3.0, 2.0], {'bleu': 2.5, 'loss': 2.5})
  _fake_trial(workdir, trials[2], 'failed', [5.0])
  sweeps.write_status(workdir / trials[2].name, error='train exited with 1: error: boom')
  written = sweeps.write_report(workdir, trials)  # trials[3] never started

  with open(workdir / 'results.csv', newline='') as f:
    rows = list(csv.DictReader(f))
  assert list(rows[0]) == ['trial', 'optimizer.learning_rate', 'model.d_model', 'status',
                           'steps', 'train_loss', 'eval_bleu', 'eval_loss', 'wall_time_s',
                           'tokens_per_s', 'error']
  assert [r['status'] for r in rows] == ['done', 'done', 'failed', 'not started']
  assert rows[0]['trial'] == trials[0].name and rows[0]['optimizer.learning_rate'] == '0.1'
  assert rows[1]['model.d_model'] == '64' and rows[1]['steps'] == '30'
  assert rows[1]['train_loss'] == '2.0' and rows[1]['eval_bleu'] == '2.5'
  # Median speed without the first (compiling) interval: of 200 and 300 -> index 1 -> 300.
  assert rows[0]['tokens_per_s'] == '300.0' and rows[0]['wall_time_s'] == '12.5'
  assert rows[2]['error'] == 'train exited with 1: error: boom' and rows[2]['eval_bleu'] == ''
  markdown = (workdir / 'results.md').read_text().splitlines()
  assert markdown[0].startswith('| trial | optimizer.learning_rate | model.d_model | status |')
  assert markdown[3] == (f'| {trials[1].name} | 0.1 | 64 | done | 30 | 2 | 2.5 | 2.5 | 12.5 '
                         '| 300 |  |')
  names = sorted(os.path.basename(str(p)) for p in written)
  assert names == sorted([
      'results.csv', 'results.md', 'loss_curves.png', 'train_loss_vs_learning_rate.png',
      'train_loss_vs_d_model.png', 'eval_bleu_vs_learning_rate.png',
      'eval_bleu_vs_d_model.png', 'eval_loss_vs_learning_rate.png',
      'eval_loss_vs_d_model.png'])
  for p in written:
    if str(p).endswith('.png'):
      assert open(p, 'rb').read(8) == b'\x89PNG\r\n\x1a\n'

  # HParams: the experiment at the root, one session per finished trial, its metrics as
  # scalars in the session's run (where the dashboard looks them up by tag).
  from tensorboardX.proto import plugin_hparams_pb2
  events = _read_events(workdir / 'hparams')
  assert sorted(events) == sorted(['.', trials[0].name, trials[1].name])
  (_, tag, _, plugin, content), = events['.']
  assert tag == '_hparams_/experiment' and plugin == 'hparams'
  experiment = plugin_hparams_pb2.HParamsPluginData.FromString(content).experiment
  assert {h.name for h in experiment.hparam_infos} == {'optimizer.learning_rate',
                                                       'model.d_model'}
  assert {m.name.tag for m in experiment.metric_infos} == {'train_loss', 'eval_bleu',
                                                          'eval_loss'}
  session = events[trials[1].name]
  start = plugin_hparams_pb2.HParamsPluginData.FromString(
      [c for _, t, _, _, c in session if t == '_hparams_/session_start_info'][0])
  assert start.session_start_info.hparams['optimizer.learning_rate'].number_value == 0.1
  assert start.session_start_info.hparams['model.d_model'].number_value == 64
  scalars = {t: v for _, t, v, p, _ in session if p != 'hparams'}
  assert scalars == {'train_loss': 2.0, 'eval_bleu': 2.5, 'eval_loss': 2.5}
  assert any(t == '_hparams_/session_end_info' for _, t, _, _, _ in session)


def test_zipped_fields_share_one_axis(tmp_path):
  """d_ff moves with d_model: no plot against d_ff, and d_model's plot has one line per
  learning rate (not one point per line)."""
  path = write_sweep(tmp_path, 'return sweeps.product(sweeps.sweep("optimizer.learning_rate", '
                               '[0.1, 0.2]), sweeps.zipit(sweeps.sweep("model.d_model", '
                               '[32, 64]), sweeps.sweep("model.d_ff", [64, 128])))')
  trials = sweeps.make_trials(path)
  for i, trial in enumerate(trials):
    _fake_trial(tmp_path / 'runs', trial, 'done', [5.0 - i], {'bleu': float(i)})
  names = {os.path.basename(str(p)) for p in sweeps.write_report(tmp_path / 'runs', trials)}
  assert {n for n in names if '_vs_' in n} == {
      'train_loss_vs_learning_rate.png', 'train_loss_vs_d_model.png',
      'eval_bleu_vs_learning_rate.png', 'eval_bleu_vs_d_model.png'}
  rows = [sweeps.trial_row(tmp_path / 'runs' / t.name, t.overrides) for t in trials]
  assert sweeps._determines(rows, 'model.d_model', 'model.d_ff')
  assert not sweeps._determines(rows, 'model.d_model', 'optimizer.learning_rate')


def test_workdirs_are_touched_only_through_epath():
  """gs:// workdirs work only if no workdir path reaches os.path or the builtin open. main.py
  opens only config files with them, and hf_io.py only Hugging Face directories, which are
  local (safetensors memory-maps its files)."""
  for module in ('sweeps.py', 'launch.py', 'plots.py', 'logging_utils.py', 'trainer.py',
                 'checkpoints.py', 'eval_commands.py'):
    source = open(os.path.join(REPO, 't5x_lite', module), encoding='utf-8').read()
    assert not re.findall(r'os\.path|(?<![.\w])open\(|os\.(makedirs|listdir|remove|replace)'
                          r'|shutil', source), module


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="etils.epath has no file:// backend: "
                   "epath.Path('file://...') raises KeyError('file://')")
def test_train_into_a_file_uri_workdir(tmp_path):
  workdir = tmp_path / 'run'
  subprocess.run(
      [sys.executable, '-m', 't5x_lite.main', 'train',
       '--config=' + os.path.join(REPO, 'configs/t5_1_1_tiny.py'),
       '--config.data.feature_lengths.inputs=16', '--config.data.feature_lengths.targets=16',
       '--config.train.batch_size=8', '--config.train.num_steps=2',
       f'--workdir=file://{workdir}'], cwd=tmp_path, timeout=TIMEOUT, check=False,
      env=dict(os.environ, PYTHONPATH=REPO, XLA_FLAGS='', JAX_PLATFORMS='cpu'))
  assert (workdir / 'metrics.jsonl').exists() and (workdir / 'checkpoints').is_dir()


# ---------------------------------------------------------------------- the CLI, bad input


UNKNOWN = 'return [{"x.y": 1}]'


@pytest.mark.slow  # eight CLI processes, each importing jax
def test_bad_sweeps_are_one_error_line_and_start_nothing(tmp_path):
  runs = tmp_path / 'runs'
  no_get_sweep = tmp_path / 'no_get_sweep.py'
  no_get_sweep.write_text('def get_config():\n  return None\n')
  cases = {
      'missing file': (['--sweep=experiments/nope.py'], ['nope.py', 'not found']),
      'no get_sweep': ([f'--sweep={no_get_sweep}'], ['has no get_sweep()']),
      'empty': ([f'--sweep={write_sweep(tmp_path, "return []", name="e.py")}'],
                ['returned no trials']),
      'duplicate': ([f'--sweep={write_sweep(tmp_path, "return [{}, {}]", name="d.py")}'],
                    ['trial 1', 'duplicates trial 0']),
      'unknown field': ([f'--sweep={write_sweep(tmp_path, UNKNOWN, name="u.py")}'],
                        ['trial 0', "unknown config field 'x.y'"]),
      'parallel': ([f'--sweep={write_sweep(tmp_path)}', '--parallel=64'],
                   ['--parallel=64', 'cores']),
      'no zone': ([f'--sweep={write_sweep(tmp_path)}', '--launcher=tpu_vm',
                   '--accelerator_type=v4-8', '--workdir=gs://b/r'], ['--zone is required']),
      'no accelerator': ([f'--sweep={write_sweep(tmp_path)}', '--launcher=tpu_vm',
                          '--zone=us-central2-b', '--workdir=gs://b/r'],
                         ['--accelerator_type is required']),
  }
  started = {}
  for name, (args, fragments) in cases.items():
    workdir = [] if any(a.startswith('--workdir') for a in args) else [f'--workdir={runs}']
    started[name] = Run(['sweep', *args, *workdir], str(tmp_path / 'logs'),
                        name.replace(' ', '_'))
  for name, (_, fragments) in cases.items():
    assert_one_error_line(started[name].wait(), *fragments)
  assert not runs.exists()


# --------------------------------------------------------------- a real sweep, resumed


@pytest.mark.slow
def test_sweep_stopped_half_way_resumes_only_the_missing_trials(tmp_path, compile_cache):
  """Three tiny trials and one that fails, one at a time; SIGTERM once the first is done and
  the second is training. The re-run skips the first, resumes the second from its
  checkpoint, runs the third, and records the fourth's error line without stopping."""
  sweep_file = write_sweep(tmp_path, 'return sweeps.chain(sweeps.sweep("seed", [0, 1, 2]), '
                                     '[{"train.num_microbatches": 3}])', steps=200)
  workdir = tmp_path / 'runs'
  trials = sweeps.make_trials(sweep_file)
  args = ['sweep', f'--sweep={sweep_file}', f'--workdir={workdir}', '--parallel=1']
  # One CPU device per trial; the trials differ only in their seed, so they share compiled
  # programs through the cache.
  env = {'XLA_FLAGS': ''}
  first = Run(args, str(tmp_path / 'logs'), 'first', env=env, compile_cache=compile_cache)
  second_trial = workdir / trials[1].name / 'metrics.jsonl'
  deadline = time.time() + TIMEOUT
  while not (second_trial.exists() and len(second_trial.read_text().splitlines()) >= 2):
    assert first.proc.poll() is None, open(first.stdout_path).read()
    assert time.time() < deadline
    time.sleep(0.1)
  first.proc.send_signal(signal.SIGTERM)
  first.wait()
  assert first.returncode == 1, first.stderr[-3000:]
  status = [sweeps.read_status(workdir / t.name) for t in trials]
  assert [s.get('status') for s in status] == ['done', 'interrupted', None, None]
  assert 'signal 15: stopping' in first.stdout
  steps = [r['step'] for r in map(json.loads, second_trial.read_text().splitlines())]
  assert steps[-1] < 200  # stopped in the middle ...
  saved = sorted(int(n) for n in os.listdir(second_trial.parent / 'checkpoints')
                 if n.isdigit())
  assert steps[-1] <= saved[-1] < steps[-1] + 2  # ... and saved where it stopped
  finished_log = (workdir / trials[0].name / 'train.log').read_text()

  second = Run(args, str(tmp_path / 'logs'), 'second', env=env,
               compile_cache=compile_cache).wait()
  assert second.returncode == 1, second.stderr[-3000:]
  assert 'Traceback' not in second.stderr
  assert f'{trials[0].name}: finished before, skipped' in second.stdout
  assert (workdir / trials[0].name / 'train.log').read_text() == finished_log
  status = [sweeps.read_status(workdir / t.name) for t in trials]
  assert [s['status'] for s in status] == ['done'] * 3 + ['failed']
  assert [s['attempts'] for s in status] == [1, 2, 1, 1]
  assert status[3]['error'].startswith('train exited with 2: error: train.batch_size=4 with '
                                       'num_microbatches=3')
  records = [json.loads(l) for l in second_trial.read_text().splitlines()]
  train = [r['step'] for r in records if r['split'] == 'train']
  assert train == sorted(set(train)) and train[-1] == 200  # resumed, not restarted
  assert train.index(steps[-1] + 2) == len(steps)
  # The resolved config in trial.json is what the trial's own train process ran with.
  for trial, s in zip(trials[:3], status):
    ran = json.loads((workdir / trial.name / 'config.json').read_text())
    assert ran == s['config'] == json.loads(trial.config.to_json_best_effort())
  with open(workdir / 'results.csv', newline='') as f:
    rows = list(csv.DictReader(f))
  assert [r['status'] for r in rows] == ['done'] * 3 + ['failed']
  assert all(r['steps'] == '200' and float(r['eval_bleu']) >= 0 for r in rows[:3])
  assert rows[3]['error'] == status[3]['error'] and rows[3]['steps'] == '0'
  assert '1 of 4 trials did not finish' in second.stdout
  assert (workdir / 'loss_curves.png').exists() and (workdir / 'hparams').is_dir()
