"""The CLI's process settings: what each allocator choice puts in the environment, that the
re-executed process really runs with it, and the XLA:CPU flags it adds."""

import os
import subprocess
import sys

import pytest

from t5x_lite import runtime

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_CLEAN = {k: v for k, v in os.environ.items()
          if k not in ('LD_PRELOAD', 'GLIBC_TUNABLES', runtime.ENV, runtime.LOADED, 'XLA_FLAGS')}


def _info_allocator(choice: str) -> str:
  result = subprocess.run(
      [sys.executable, '-m', 't5x_lite.main', 'info', '--config=configs/t5_1_1_tiny.py'],
      cwd=REPO, env=dict(_CLEAN, **{runtime.ENV: choice}), capture_output=True, text=True,
      check=True)
  return result.stdout.strip().splitlines()[-1].split('allocator: ')[1]


def test_settings_and_their_environment(tmp_path):
  assert runtime.environment('system') == {}
  glibc = runtime.environment('glibc')
  assert 'glibc.malloc.hugetlb=1' in glibc['GLIBC_TUNABLES'] and 'LD_PRELOAD' not in glibc
  library = tmp_path / 'libmy_malloc.so'
  library.write_bytes(b'')
  assert runtime.environment(str(library))['LD_PRELOAD'].endswith(str(library))
  with pytest.raises(ValueError, match='no such library'):
    runtime.environment(str(tmp_path / 'missing.so'))


def test_cli_reexecutes_with_the_chosen_allocator():
  expected = 'tcmalloc' if runtime.find_tcmalloc() else 'glibc (huge pages)'
  assert _info_allocator('auto') == expected
  assert _info_allocator('system') == 'system'
  assert _info_allocator('glibc') == 'glibc (huge pages)'


def test_bad_allocator_is_one_line_and_exit_2():
  result = subprocess.run(
      [sys.executable, '-m', 't5x_lite.main', 'info', '--config=configs/t5_1_1_tiny.py'],
      cwd=REPO, env=dict(_CLEAN, **{runtime.ENV: 'no_such_malloc'}), capture_output=True,
      text=True)
  assert result.returncode == 2
  assert result.stderr.strip().splitlines() == [
      f'error: {runtime.ENV}=no_such_malloc: no such library; use one of auto, tcmalloc, '
      'glibc, system or the path of an allocator shared library']


@pytest.mark.skipif(runtime.find_tcmalloc() is None, reason='no tcmalloc on this machine')
def test_tcmalloc_is_mapped_into_the_process():
  env = dict(_CLEAN, **runtime.environment('tcmalloc'))
  maps = subprocess.run([sys.executable, '-c', 'print(open("/proc/self/maps").read())'],
                        env=env, capture_output=True, text=True, check=True).stdout
  assert 'libtcmalloc' in maps


def test_xla_flags_added_unless_given():
  flags = runtime.xla_cpu_flags('--xla_force_host_platform_device_count=2')
  assert flags.startswith('--xla_force_host_platform_device_count=2 ')
  assert '--xla_cpu_experimental_ynn_fusion_type=dot,eltwise,reduce' in flags
  assert runtime.xla_cpu_flags(flags) == flags  # idempotent: a re-executed CLI adds nothing
  mine = runtime.xla_cpu_flags('--xla_cpu_experimental_ynn_fusion_type=dot')
  assert 'eltwise' not in mine


def _flags_after_configure(**env: str) -> str:
  """XLA_FLAGS in a process (with the system allocator: no re-exec) after configure()."""
  code = ('from t5x_lite import runtime; import os; runtime.configure(); '
          'print(os.environ.get("XLA_FLAGS", ""))')
  return subprocess.run([sys.executable, '-c', code], env=dict(_CLEAN, **env),
                        capture_output=True, text=True, check=True).stdout.strip()


def test_configure_sets_xla_flags_unless_told_not_to():
  assert _flags_after_configure(**{runtime.ENV: 'system'}) == runtime.xla_cpu_flags('')
  assert _flags_after_configure(**{runtime.ENV: 'system', runtime.XLA_ENV: 'none'}) == ''
