"""Input-pipeline throughput (tokens/s) of t5x_lite.data.pipeline on the bundled corpora.

Run from the repository root (after `bash run.sh test` has made .venv):

  .venv/bin/python experiments/benchmark_pipeline.py

It times the full pipeline (read, template, tokenize, span-corrupt where the task does,
pack or pad, batch, model features) for a few settings and writes
experiments/benchmark_pipeline.md. tokens/s counts real tokens (encoder inputs + decoder
targets, padding excluded); slots/s counts every position of the batches.
"""

import argparse
import multiprocessing
import os
import pathlib
import platform
import time

import grain

from t5x_lite.data import pipeline

OUT = pathlib.Path(__file__).with_suffix('.md')
EN_DE = dict(task='translate_en_de', task_feature_lengths={'inputs': 128, 'targets': 128},
             batch_size=32)
SPAN = dict(task='pretrain_span_corruption', task_feature_lengths={'inputs': 512, 'targets': 114},
            batch_size=8)
SETTINGS = (
    ('en-de, packed', EN_DE, dict(pack=True, num_workers=0)),
    ('en-de, packed', EN_DE, dict(pack=True, num_workers=2)),
    ('en-de, packed, 16 read threads', EN_DE, dict(pack=True, num_workers=0, read_threads=16)),
    ('en-de, padded', EN_DE, dict(pack=False, num_workers=0)),
    ('span corruption mixture, packed', SPAN, dict(pack=True, num_workers=0)),
    ('span corruption mixture, packed', SPAN, dict(pack=True, num_workers=2)),
)


def _row(name: str, base: dict, options: dict, num_batches: int, repeats: int) -> str:
  dataset = pipeline.get_dataset(split='train', seed=0, **base, **options)
  start = time.perf_counter()
  # Warm-up batches absorb worker start-up; the median run shrugs off a busy neighbour.
  runs = [pipeline.measure_throughput(dataset, num_batches, warmup=5) for _ in range(repeats)]
  result = sorted(runs, key=lambda r: r['tokens_per_s'])[len(runs) // 2]
  lengths = '/'.join(str(v) for v in base['task_feature_lengths'].values())
  print(f'{name}, {options["num_workers"]} workers: {result["tokens_per_s"]:,.0f} tokens/s '
        f'({time.perf_counter() - start:.1f} s)', flush=True)
  return (f'| {name} | {lengths} | {base["batch_size"]} | {options["num_workers"]} | '
          f'{result["tokens_per_s"]:,.0f} | {result["slots_per_s"]:,.0f} | '
          f'{result["packing_efficiency"]:.3f} | {result["batches_per_s"]:.1f} |')


def _spin(_) -> float:
  start = time.perf_counter()
  total = 0
  for i in range(20_000_000):
    total += i
  return time.perf_counter() - start


def _parallel_speedup() -> float:
  """How much faster two processes get through two CPU-bound loops than one process does."""
  one = _spin(0)
  with multiprocessing.get_context('spawn').Pool(2) as pool:
    return 2 * one / max(pool.map(_spin, [0, 1]))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--num_batches', type=int, default=200, help='timed batches per run')
  parser.add_argument('--repeats', type=int, default=3, help='runs per row; the median is kept')
  args = parser.parse_args()
  rows = [_row(name, base, options, args.num_batches, args.repeats)
          for name, base, options in SETTINGS]
  speedup = _parallel_speedup()
  header = [
      '# Input-pipeline throughput',
      '',
      f'`.venv/bin/python experiments/benchmark_pipeline.py`: the median of {args.repeats} '
      f'runs of {args.num_batches} batches each after 5 warm-up batches; train split, seed 0.',
      f'Machine: {os.cpu_count()} CPUs, Python {platform.python_version()}, grain '
      f'{grain.__version__}; two CPU-bound processes together do {speedup:.2f}x the work of '
      'one here, which caps what workers can add.',
      '',
      'tokens/s counts real tokens (encoder inputs + decoder targets); slots/s every position '
      'including padding; packing efficiency = tokens / slots.',
      '',
      '| pipeline | lengths (inputs/targets) | batch | workers | tokens/s | slots/s '
      '| packing efficiency | batches/s |',
      '|---|---|---:|---:|---:|---:|---:|---:|',
  ]
  OUT.write_text('\n'.join(header + rows) + '\n')
  print(f'wrote {OUT}')


if __name__ == '__main__':
  main()
