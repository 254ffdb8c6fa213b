"""Smoke test of experiments/benchmark.py: every mode at tiny shapes writes its full table.

No timing is asserted: the numbers of a 1-step tiny run are noise; only the table's shape and
the machine line are checked.
"""

import importlib.util
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, 'experiments', 'benchmark.py')
_spec = importlib.util.spec_from_file_location('benchmark', SCRIPT)
benchmark = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(benchmark)


def _table(text: str) -> list[list[str]]:
  """The cells of the markdown table's rows (header and separator included)."""
  return [[cell.strip() for cell in line.strip().strip('|').split('|')]
          for line in text.splitlines() if line.startswith('|')]


@pytest.mark.parametrize('mode, reference', [
    ('train_t5', True), ('train_decoder', False), ('greedy', False), ('beam', False)])
def test_each_mode_appends_a_full_table(tmp_path, mode, reference):
  out = tmp_path / 'benchmarks.md'
  out.write_text('# earlier results\n', encoding='utf-8')
  command = [sys.executable, SCRIPT, f'--mode={mode}', '--shape=tiny', '--steps=1',
             f'--out={out}'] + ([] if reference else ['--no_reference'])
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}  # one CPU device
  subprocess.run(command, cwd=REPO, env=env, check=True, capture_output=True, text=True)
  text = out.read_text(encoding='utf-8')
  assert text.startswith('# earlier results\n')  # appended, not overwritten
  assert f'## {mode}, tiny shape' in text
  for fact in ('threads per side', 'jax ', 'torch ', 'transformers ', 'GFLOP/s in JAX',
               'GB/s', 'allocator'):
    assert fact in text
  header, separator, *rows = _table(text)
  assert tuple(header) == benchmark.COLUMNS and len(separator) == len(header)
  assert [row[0] for row in rows] == ['ours', 'HF'] + (['HF'] if reference else [])
  assert all(len(row) == len(header) and all(row) for row in rows)
  assert 'flush denormals' in rows[1][1]
  if reference:
    assert 'denormals on, glibc malloc' in rows[2][1]
  decode = mode in ('greedy', 'beam')
  for row in rows:
    float(row[3].replace(',', ''))  # median tok/s is a number
    assert (row[7] != '—') == decode and (row[8] != '—') == decode  # per step, floor
    assert (row[6] != '—') != decode  # achieved FLOP/s: training only
  float(rows[0][4])  # the ratio sits on our row


def test_bad_steps_is_one_error_line(tmp_path):
  result = subprocess.run([sys.executable, SCRIPT, '--mode=greedy', '--steps=0',
                           f'--out={tmp_path / "b.md"}'], capture_output=True, text=True)
  assert result.returncode == 2
  assert result.stderr.strip().splitlines() == [
      "error: --steps=0 --batch=0: steps must be >= 1 and batch >= 0 (0: the mode's default)"]
  assert not (tmp_path / 'b.md').exists()
