"""The catalogue of bad inputs: each through the real CLI (`t5x_lite.main.run()`, in a process
of its own) must exit with code 2 and print exactly one stderr line,
`error: ...`, naming the problem and the fix — and leave every file as it was: the tree under
the test's root (an existing run with a checkpoint and config.json, a run whose config.json is
corrupt, HF directories) is hashed before and after, and a fresh workdir must not appear.

The existing run's checkpoint is written here with zero-valued arrays through
`checkpoints.Checkpointer` (nothing is trained or compiled); its config.json is what the CLI
resolves from `TINY`, so a case changes exactly the field it names.

Starting Python and importing jax, orbax and grain takes ~5-10 s per process on two shared
cores, so one driver process imports the CLI once and forks a child per case (before any jax
backend exists); each child runs `main.run()` with its own argv, stdout, stderr and exit code.
"""

import hashlib
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from safetensors.numpy import save_file

from t5x_lite import checkpoints, optimizers, trainer, validation
from t5x_lite import config as config_lib
from test_checkpoints import tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ['--config=configs/t5_1_1_tiny.py', '--config.data.feature_lengths.inputs=16',
        '--config.data.feature_lengths.targets=16', '--config.train.batch_size=8']
VOCAB = os.path.join(REPO, 't5x_lite', 'data', 'vocabs', 'bundled_32k.model')

# name: (argv with {run} (existing run), {fresh} (must stay absent), {root}; error fragments)
CASES = {
    # train: values out of range, each named with the allowed range and the flag to fix it
    'keep_checkpoints_negative': (['train', '--config.train.keep_checkpoints=-1', '{run}'],
                                  ['train.keep_checkpoints=-1', '0 keeps all']),
    'batch_size_0': (['train', '--config.train.batch_size=0', '{run}'],
                     ['train.batch_size=0', '>= 1', '--config.train.batch_size=']),
    'learning_rate_negative': (['train', '--config.optimizer.learning_rate=-0.1', '{run}'],
                               ['learning_rate=-0.1', '>= 0']),
    'learning_rate_nan': (['train', '--config.optimizer.learning_rate=nan', '{run}'],
                          ['learning_rate=nan', '>= 0']),
    'inputs_length_0': (['train', '--config.data.feature_lengths.inputs=0', '{run}'],
                        ['data.feature_lengths.inputs=0', '>= 1']),
    'targets_length_negative': (['train', '--config.data.feature_lengths.targets=-4', '{run}'],
                                ['data.feature_lengths.targets=-4', '>= 1']),
    'optimizer_unknown': (['train', '--config.optimizer.name=sgdx', '{run}'],
                          ["'sgdx'", 'adafactor', 'adamw']),
    'schedule_unknown': (['train', '--config.optimizer.schedule=stepwise', '{run}'],
                         ["'stepwise'", 'rsqrt', 'cosine']),
    'dropout_1_5': (['train', '--config.model.dropout_rate=1.5', '{run}'],
                    ['dropout_rate=1.5', '[0, 1)']),
    'label_smoothing_negative': (['train', '--config.train.label_smoothing=-1.0', '{run}'],
                                 ['train.label_smoothing=-1.0', '[0.0, 1.0)']),
    'converter_unknown': (['train', '--config.data.converter=bogus', '{run}'],
                          ["data.converter='bogus'",
                           'causal_lm, enc_dec, lm, pairs_enc_dec, pairs_prefix_lm, prefix_lm']),
    'num_steps_negative': (['train', '--config.train.num_steps=-5', '{fresh}'],
                           ['train.num_steps=-5', '>= 1']),
    'num_steps_0': (['train', '--config.train.num_steps=0', '{fresh}'],
                    ['train.num_steps=0', '>= 1']),
    'nan_policy_unknown': (['train', '--config.train.nan_policy=ignore', '{run}'],
                           ["train.nan_policy='ignore'", 'stop, skip']),
    'checkpoint_every_0': (['train', '--config.train.checkpoint_every=0', '{run}'],
                           ['train.checkpoint_every=0', '>= 1']),
    'log_every_0': (['train', '--config.train.log_every=0', '{run}'],
                    ['train.log_every=0', '>= 1']),
    'num_microbatches_0': (['train', '--config.train.num_microbatches=0', '{run}'],
                           ['train.num_microbatches=0', '>= 1']),
    'z_loss_negative': (['train', '--config.train.z_loss=-1.0', '{run}'],
                        ['train.z_loss=-1.0', '[0.0, inf]']),
    'loss_normalizer_unknown': (['train', '--config.train.loss_normalizing_factor=bogus',
                                 '{run}'], ['loss_normalizing_factor', 'NUM_REAL_TARGET_TOKENS']),
    'decode_method_unknown': (['train', '--config.eval.method=nucleus', '{run}'],
                              ["method='nucleus'", 'greedy']),
    'eval_batch_size_0': (['train', '--config.eval.batch_size=0', '{run}'],
                          ['eval.batch_size=0', '>= 1']),
    'eval_every_negative': (['train', '--config.eval.every_steps=-1', '{run}'],
                            ['eval.every_steps=-1', '0 = never']),
    'num_heads_0': (['train', '--config.model.num_heads=0', '{run}'],
                    ['num_heads=0', 'positive']),
    # meshes and batches the devices cannot hold
    'mesh_not_dividing_heads': (['train', '--config.mesh_shape=(1,1,2)',
                                 '--config.model.num_heads=3', '{fresh}'], ['heads', '3']),
    'mesh_not_dividing_mlp': (['train', '--config.mesh_shape=(1,1,2)',
                               '--config.model.d_ff=127', '{run}'], ['mlp', '127']),
    'mesh_not_matching_devices': (['train', '--config.mesh_shape=(3,1,1)', '{run}'],
                                  ['(3, 1, 1)', '2 are available']),
    'mesh_wrong_length': (['train', '--config.mesh_shape=(2,1)', '{run}'], ['(2, 1)']),
    'batch_not_divisible': (['train', '--config.train.batch_size=3', '{run}'],
                            ['batch_size=3', 'data-parallel size 2']),
    # config files and flags
    'config_syntax_error': (['train', '--config={root}/syntax_error.py', '{fresh}'],
                            ['syntax_error.py:2:', 'fix that line']),
    'config_without_get_config': (['train', '--config={root}/no_get_config.py', '{fresh}'],
                                  ['no_get_config.py has no get_config()']),
    'config_raises': (['train', '--config={root}/raises.py', '{fresh}'],
                      ['raises.py failed in get_config()', 'NameError', 'undefined_name']),
    'config_binary': (['train', '--config={root}/binary.py', '{fresh}'],
                      ['binary.py is not Python source']),
    'config_missing': (['train', '--config={root}/nope.py', '{fresh}'], ['not found']),
    'no_config': (['train', '{run}'], ['--config is required']),
    'unknown_field': (['train', '--config.train.num_stepz=5', '{run}'],
                      ["'num_stepz'", 'num_steps']),
    'wrong_type': (['train', '--config.train.num_steps=abc', '{run}'], ['num_steps', 'abc']),
    'unknown_command': (['trian', '{run}'], ['unknown command "trian"', 'train']),
    'no_workdir': (['train'], ['--workdir is required']),
    # data: task, split, vocabulary, init_from
    'unknown_task': (['train', '--config.data.task=nope', '{run}'],
                     ["'nope'", 'translate_en_de']),
    'unknown_split': (['train', '--config.data.split=nope', '{run}'],
                      ["unknown split 'nope'", 'train, validation, test']),
    'vocabulary_missing': (['train', '--config.data.vocabulary={root}/none.model', '{run}'],
                           ['data.vocabulary=', 'not a file']),
    'vocabulary_not_sentencepiece': (['train', '--config.data.vocabulary={root}/binary.py',
                                      '{fresh}'], ['binary.py', 'SentencePiece']),
    'init_from_missing': (['train', '--config.train.init_from={root}/nowhere', '{fresh}'],
                          ['train.init_from=', 'holds no checkpoint']),
    'init_from_other_shape': (['train', '--config.train.init_from={root}/run/checkpoints',
                               '--config.model.d_ff=96', '{fresh}'],
                              ['mismatch', '(64, 96)']),
    # workdirs
    'workdir_is_a_file': (['train', '--workdir={root}/a_file'], ['is a file']),
    'workdir_under_a_file': (['train', '--workdir={root}/a_file/run'],
                             ['cannot write to workdir']),
    # resuming a stored run with a changed model, vocabulary or a corrupt config.json
    'resume_other_d_model': (['train', '--config.model.d_model=32', '{run}'],
                             ['model.d_model 64 -> 32', '--config.train.init_from=']),
    'resume_other_vocabulary': (['train', f'--config.data.vocabulary={VOCAB}', '{run}'],
                                ['data.vocabulary', 'another --workdir']),
    'resume_corrupt_config_json': (['train', '--workdir={root}/bad_json_run'],
                                   ['config.json is not a valid run config']),
    # eval / infer / score / export / convert / info
    'eval_no_checkpoint': (['eval', '--workdir={root}/empty'], ['no checkpoint']),
    'infer_unknown_eval_task': (['infer', '--config.eval.task=nope', '{run}'], ["'nope'"]),
    'score_other_d_model': (['score', '--config.model.d_model=32', '{run}'],
                            ['mismatch', 'use the config that run was trained with']),
    'export_into_non_empty_dir': (['export', '{run}', '--hf_dir={root}/hf_truncated'],
                                  ['not empty', 'choose a new one']),
    'convert_truncated_safetensors': (['convert', '--hf_dir={root}/hf_truncated',
                                       '--workdir={fresh}'],
                                      ['model.safetensors', 'cannot read']),
    'convert_corrupt_hf_config': (['convert', '--hf_dir={root}/hf_bad_json',
                                   '--workdir={fresh}'], ['config.json is not valid JSON']),
    'info_bad_model_field': (['info', '--config.model.d_ff=0'], ['d_ff=0', 'positive']),
}


def write_run(workdir, config, step=5):
  """A run's workdir as `train` leaves it: config.json and one checkpoint of zeros."""
  partitioner = trainer.setup_partitioner(config)
  tx = optimizers.make_optimizer(trainer.optimizer_settings(config.optimizer,
                                                            config.train.num_steps))
  shapes, shardings = trainer.abstract_state(config_lib.model_config(config), tx, partitioner)
  state = jax.tree.map(lambda s, sh: jax.device_put(np.zeros(s.shape, s.dtype), sh),
                       shapes, shardings)
  state = state.replace(step=jax.device_put(np.int32(step), shardings.step))
  checkpointer = checkpoints.Checkpointer(os.path.join(workdir, 'checkpoints'), save_every=1)
  checkpointer.save(step, state, {'batches': step})
  checkpointer.wait()
  checkpointer.close()
  validation.save_run_config(config, workdir, {})


def tree_hash(root):
  """Every path under `root` with its file contents' sha256 (directories too)."""
  digest = {}
  for directory, names, files in os.walk(root):
    for name in names:
      digest[os.path.relpath(os.path.join(directory, name), root)] = 'dir'
    for name in files:
      path = os.path.join(directory, name)
      with open(path, 'rb') as f:
        digest[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
  return digest


# Forks one child per case after the imports; prints "name exit_code" per case.
_DRIVER = """
import json, os, sys
from t5x_lite import main
cases, out = json.loads(sys.argv[1]), sys.argv[2]
for name, argv in cases.items():
  pid = os.fork()
  if pid == 0:
    for fd, suffix in ((1, 'stdout'), (2, 'stderr')):
      os.dup2(os.open(os.path.join(out, name + '.' + suffix), os.O_WRONLY | os.O_CREAT), fd)
    sys.argv = ['t5x_lite.main', *argv]
    try:
      main.run()
      code = 0
    except SystemExit as e:
      code = e.code if isinstance(e.code, int) else 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
  print(name, os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), flush=True)
"""


def run_cli_cases(argvs, out_dir):
  """{name: (exit code, stdout, stderr)} of each argv run through the CLI in its own process."""
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             XLA_FLAGS='--xla_force_host_platform_device_count=2')
  driver = subprocess.run([sys.executable, '-c', _DRIVER, json.dumps(argvs), str(out_dir)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
                          check=True)
  codes = dict(line.split() for line in driver.stdout.splitlines())
  read = lambda name, suffix: (out_dir / f'{name}.{suffix}').read_text(errors='replace')
  return {name: (int(codes[name]), read(name, 'stdout'), read(name, 'stderr'))
          for name in argvs}


def _argv(template, root):
  argv = []
  for arg in template:
    arg = arg.format(root=root, run=f'--workdir={root}/run', fresh=f'{root}/fresh')
    if arg == f'{root}/fresh':
      arg = f'--workdir={arg}'
    argv.append(arg)
  if argv[0] != 'convert' and not any(a.startswith('--config=') for a in argv):
    argv[1:1] = TINY
  return argv


@pytest.fixture(scope='module')
def catalogue(tmp_path_factory):
  root = tmp_path_factory.mktemp('bad_inputs')
  config = tiny_config()
  write_run(str(root / 'run'), config)
  write_run(str(root / 'bad_json_run'), config)
  (root / 'bad_json_run' / 'config.json').write_text('{"model": {"d_model": 64,')
  (root / 'empty').mkdir()
  (root / 'a_file').write_text('not a directory')
  (root / 'syntax_error.py').write_text('def get_config():\n  return {\n')
  (root / 'no_get_config.py').write_text('CONFIG = 1\n')
  (root / 'raises.py').write_text('def get_config():\n  return undefined_name\n')
  (root / 'binary.py').write_bytes(bytes(range(256)))
  for name in ('hf_truncated', 'hf_bad_json'):
    (root / name).mkdir()
    (root / name / 'config.json').write_text(json.dumps({'model_type': 't5'}))
  save_file({'shared.weight': np.zeros((64, 64), np.float32)},
            str(root / 'hf_truncated' / 'model.safetensors'))
  data = (root / 'hf_truncated' / 'model.safetensors').read_bytes()
  (root / 'hf_truncated' / 'model.safetensors').write_bytes(data[:len(data) // 2])
  (root / 'hf_bad_json' / 'config.json').write_text('{"model_type": "t5",\n "d_model": }')
  before = tree_hash(root)
  argvs = {name: _argv(template, root) for name, (template, _) in CASES.items()}
  argvs['no_config'] = ['train', f'--workdir={root}/run']
  argvs['unknown_command'] = ['trian', *TINY, f'--workdir={root}/run']
  results = run_cli_cases(argvs, tmp_path_factory.mktemp('outputs'))
  return results, before, tree_hash(root), root


def test_the_catalogue_has_at_least_40_cases():
  assert len(CASES) >= 40


@pytest.mark.parametrize('name', sorted(CASES))
def test_bad_input_is_one_error_line_and_nothing_written(catalogue, name):
  results, before, after, root = catalogue
  code, stdout, stderr = results[name]
  lines = stderr.strip().splitlines()
  print(name, '->', stderr.strip())
  assert code == 2, stderr[-3000:]
  assert len(lines) == 1 and lines[0].startswith('error: '), stderr[-3000:]
  for fragment in CASES[name][1]:
    assert fragment in lines[0], (fragment, lines[0])
  assert stdout == ''
  assert not (root / 'fresh').exists()
  assert after == before
