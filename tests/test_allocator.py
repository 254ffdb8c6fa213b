"""The CLI's allocator choice: what each setting puts in the environment, and that the
re-executed process really runs with it."""

import os
import subprocess
import sys

import pytest

from t5x_lite import allocator

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_CLEAN = {k: v for k, v in os.environ.items()
          if k not in ('LD_PRELOAD', 'GLIBC_TUNABLES', allocator.ENV, allocator.LOADED)}


def _info_allocator(choice: str) -> str:
  result = subprocess.run(
      [sys.executable, '-m', 't5x_lite.main', 'info', '--config=configs/t5_1_1_tiny.py'],
      cwd=REPO, env=dict(_CLEAN, **{allocator.ENV: choice}), capture_output=True, text=True,
      check=True)
  return result.stdout.strip().splitlines()[-1].split('allocator: ')[1]


def test_settings_and_their_environment(tmp_path):
  assert allocator.environment('system') == {}
  glibc = allocator.environment('glibc')
  assert 'glibc.malloc.hugetlb=1' in glibc['GLIBC_TUNABLES'] and 'LD_PRELOAD' not in glibc
  library = tmp_path / 'libmy_malloc.so'
  library.write_bytes(b'')
  assert allocator.environment(str(library))['LD_PRELOAD'].endswith(str(library))
  with pytest.raises(ValueError, match='no such library'):
    allocator.environment(str(tmp_path / 'missing.so'))


def test_cli_reexecutes_with_the_chosen_allocator():
  expected = 'tcmalloc' if allocator.find_tcmalloc() else 'glibc (huge pages)'
  assert _info_allocator('auto') == expected
  assert _info_allocator('system') == 'system'
  assert _info_allocator('glibc') == 'glibc (huge pages)'


def test_bad_allocator_is_one_line_and_exit_2():
  result = subprocess.run(
      [sys.executable, '-m', 't5x_lite.main', 'info', '--config=configs/t5_1_1_tiny.py'],
      cwd=REPO, env=dict(_CLEAN, **{allocator.ENV: 'no_such_malloc'}), capture_output=True,
      text=True)
  assert result.returncode == 2
  assert result.stderr.strip().splitlines() == [
      f'error: {allocator.ENV}=no_such_malloc: no such library; use one of auto, tcmalloc, '
      'glibc, system or the path of an allocator shared library']


@pytest.mark.skipif(allocator.find_tcmalloc() is None, reason='no tcmalloc on this machine')
def test_tcmalloc_is_mapped_into_the_process():
  env = dict(_CLEAN, **allocator.environment('tcmalloc'))
  maps = subprocess.run([sys.executable, '-c', 'print(open("/proc/self/maps").read())'],
                        env=env, capture_output=True, text=True, check=True).stdout
  assert 'libtcmalloc' in maps
