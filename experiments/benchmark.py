"""Ours vs Hugging Face PyTorch on the same cores: train steps and decoding, side by side.

Run from the repository root (HF is a test dependency: `pip install -e ".[test]"`):

  .venv/bin/python experiments/benchmark.py --mode=train_t5       # T5.1.1-small, 8 x (256 -> 64)
  .venv/bin/python experiments/benchmark.py --mode=train_decoder  # decoder_100m shape, 8 x 320
  .venv/bin/python experiments/benchmark.py --mode=greedy --batch=4   # and --batch=16
  .venv/bin/python experiments/benchmark.py --mode=beam           # 4 beams at batch 4

Both sides get the same weights (ours, exported with `t5x_lite.hf`: T5 untied as T5.1.1 is,
so both have the same parameters), the same cores (`--threads`, default 2, pinned with
sched_setaffinity), denormals flushed (XLA flushes on its own; torch needs
`set_flush_denormal`) and the same allocator: the script re-executes itself with the one the
CLI uses (t5x_lite/runtime.py: tcmalloc when found, else glibc malloc with huge pages;
`--allocator` picks another); our side also runs with the CLI's XLA:CPU flags. Warm-up (compilation, HF's first call) is timed apart; the timed steps
alternate ours, HF, ours, HF so machine noise hits both. Train rows give tokens/s and the model
FLOP/s (MaxText's per-token formula) against a float32 matmul of the same framework measured in
the same run; decode rows give new tokens/s, the time per token-step ((a call generating N
tokens - a call generating 1) / (N - 1)), the fixed cost of a call (the 1-token call: encoder
and set-up) and the roofline floor of a step: max(decoder weight bytes / the weight-streaming
bandwidth measured here, FLOPs / the matmul peak). A last row runs HF as most users do (no
flush, glibc malloc) in a subprocess, for reference.

Results are appended to experiments/benchmarks.md with the machine (CPU model and flags,
versions): machines differ between sessions, so ratios, not absolute times, are the claims.
`--shape=tiny --steps=2` is the smoke test (tests/test_benchmarks.py). On GPU/TPU our side runs
in bfloat16 against the device's published peak (MFU); the HF side runs on CPU only.
"""

import argparse
import dataclasses
import datetime
import importlib.util
import json
import os
import pathlib
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

from t5x_lite import runtime

REPO = pathlib.Path(__file__).resolve().parent.parent
OUT = REPO / 'experiments' / 'benchmarks.md'
MODES = ('train_t5', 'train_decoder', 'greedy', 'beam')
COLUMNS = ('side', 'settings', 'min tok/s', 'median tok/s', 'ours/HF (median of pairs)',
           'compile or first call (s)', 'model GFLOP/s (% of own matmul)',
           'ms per token-step', 'floor ms per step', 'fixed ms per call', 'sys s per step',
           'step spread (max/min)', 'process peak RSS (GiB)')
# mode -> (config file, batch, encoder or prompt length, target length / new tokens) per shape
SHAPES = {
    'real': {'train_t5': ('t5_1_1_small', 8, 256, 64), 'train_decoder': ('decoder_100m', 8, 0, 320),
             'greedy': ('t5_1_1_small', 4, 128, 64), 'beam': ('t5_1_1_small', 4, 128, 64)},
    'tiny': {'train_t5': ('t5_1_1_tiny', 2, 16, 8), 'train_decoder': ('decoder_tiny', 2, 0, 16),
             'greedy': ('t5_1_1_tiny', 2, 16, 4), 'beam': ('t5_1_1_tiny', 2, 16, 4)},
}
TINY_VOCAB = 256


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--mode', choices=MODES, required=True)
  parser.add_argument('--shape', choices=tuple(SHAPES), default='real')
  parser.add_argument('--batch', type=int, default=0, help='rows (0: the mode\'s default)')
  parser.add_argument('--steps', type=int, default=10, help='timed steps (calls) per side')
  parser.add_argument('--threads', type=int, default=2, help='cores for each side')
  parser.add_argument('--allocator', default='auto',
                      help="as the CLI's T5X_LITE_ALLOCATOR (t5x_lite/runtime.py): 'auto', "
                      "'tcmalloc', 'glibc', 'system', or a library to preload")
  parser.add_argument('--sides', choices=('both', 'ours', 'hf'), default='both')
  parser.add_argument('--no_flush', action='store_true', help='HF: leave denormals on')
  parser.add_argument('--no_reference', action='store_true',
                      help='skip the row of HF as most users run it (no flush, glibc)')
  parser.add_argument('--json', action='store_true', help='print rows as JSON, write nothing')
  parser.add_argument('--out', default=str(OUT), help='the markdown file appended to')
  return parser.parse_args(argv)


def _fail(message: str) -> None:
  print(f'error: {message}', file=sys.stderr)
  sys.exit(2)


def _pin_threads(threads: int) -> None:
  """Both frameworks size their thread pools from the cores they may use."""
  cores = sorted(os.sched_getaffinity(0))
  if not 1 <= threads <= len(cores):
    _fail(f'--threads={threads}: choose 1 to {len(cores)}, the cores this process may use')
  os.sched_setaffinity(0, cores[:threads])


@dataclasses.dataclass
class Side:
  """One framework's contender: `calls` maps a name to a function that runs and waits."""

  name: str
  settings: str
  calls: dict[str, Callable[[], None]]
  warmup_seconds: float = 0.0
  times: dict[str, list[float]] = dataclasses.field(default_factory=dict)
  system: list[float] = dataclasses.field(default_factory=list)


def _timed(fn: Callable[[], None]) -> tuple[float, float]:
  """(wall seconds, system CPU seconds of the whole process) of one call."""
  before = resource.getrusage(resource.RUSAGE_SELF).ru_stime
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF).ru_stime - before


def run_interleaved(sides: list[Side], steps: int) -> None:
  """Warms every call of every side up, then times `steps` rounds of ours, HF, ours, HF..."""
  for side in sides:
    side.warmup_seconds = sum(_timed(fn)[0] for fn in side.calls.values())
  for _ in range(steps):
    for name in sides[0].calls:
      for side in sides:
        seconds, system = _timed(side.calls[name])
        side.times.setdefault(name, []).append(seconds)
        if name == 'main':
          side.system.append(system)


def _load_config(name: str):
  spec = importlib.util.spec_from_file_location(name, REPO / 'configs' / f'{name}.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


class Workload:
  """The shapes, our model and params, the HF model with the same weights, and the batch."""

  def __init__(self, args: argparse.Namespace):
    import jax
    import numpy as np
    from t5x_lite import config as config_lib
    from t5x_lite import models

    name, batch, source_len, target_len = SHAPES[args.shape][args.mode]
    self.batch = args.batch or batch
    self.source_len, self.target_len = source_len, target_len
    config = _load_config(name)
    if args.shape == 'tiny':
      config.model.vocab_size = TINY_VOCAB
    config.model.dtype = 'float32' if jax.devices()[0].platform == 'cpu' else 'bfloat16'
    config.optimizer.name, config.optimizer.schedule = 'adamw', 'constant'
    config.optimizer.learning_rate = 1e-4
    config.train.batch_size = self.batch
    if config.model.architecture == 'decoder_only':
      config.data.converter = 'lm'
      config.data.feature_lengths.targets = target_len
    else:
      config.data.feature_lengths.update(inputs=source_len, targets=target_len)
    self.config = config
    self.model_config = config_lib.model_config(config)
    self.model = models.build_model(self.model_config)
    rng = np.random.default_rng(0)
    vocab = self.model_config.vocab_size
    self.source = rng.integers(2, vocab, (self.batch, max(source_len, 1)), dtype=np.int32)
    self.tokens = rng.integers(2, vocab, (self.batch, target_len + 1), dtype=np.int32)

  def hf_model(self, params):
    """`transformers`' model of the same family holding `params` (numpy)."""
    import torch
    import transformers
    from t5x_lite import hf

    hf_config = hf.config_to_hf(self.model_config)
    if self.model_config.architecture == 'encoder_decoder':
      cls, config = transformers.T5ForConditionalGeneration, transformers.T5Config(**hf_config)
    else:
      cls, config = transformers.LlamaForCausalLM, transformers.LlamaConfig(**hf_config)
    model = cls(config)
    state = {k: torch.from_numpy(v) for k, v in hf.params_to_hf(params, self.model_config).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    # Tied copies are not exported: T5's embed_tokens are `shared`, a tied Llama's lm_head is
    # its embed_tokens; tie_weights() points them at the loaded tensor.
    tied = ('embed_tokens.weight', 'lm_head.weight')
    if unexpected or any(not k.endswith(tied) for k in missing):
      raise RuntimeError(f'HF weights do not match: missing {missing}, unexpected {unexpected}')
    model.tie_weights()
    if 'lm_head.weight' in missing and not torch.equal(model.lm_head.weight,
                                                       model.model.embed_tokens.weight):
      raise RuntimeError('HF lm_head is missing and not tied to the embedding')
    return model


def _train_sides(work: Workload, args: argparse.Namespace) -> tuple[list[Side], float]:
  """Ours and HF, one AdamW update each per call; returns the model FLOPs per step."""
  import jax
  import numpy as np
  from t5x_lite import losses, optimizers, planner, trainer

  config = work.config
  partitioner = trainer.setup_partitioner(config)
  step, _, shardings = planner.jitted_train_step(config, partitioner)
  tx = optimizers.make_optimizer(config.optimizer.to_dict())
  state = trainer.init_state(work.model, work.model_config, tx, shardings, jax.random.key(0))
  inputs, targets = work.tokens[:, :-1], work.tokens[:, 1:]
  encoder_decoder = work.model_config.architecture == 'encoder_decoder'
  batch = {'decoder_input_tokens': inputs, 'decoder_target_tokens': targets,
           'decoder_loss_weights': np.ones(targets.shape, np.float32)}
  if encoder_decoder:  # teacher forcing: the start token, then the targets shifted right
    targets = work.tokens[:, :-1]
    batch.update(encoder_input_tokens=work.source, decoder_target_tokens=targets,
                 decoder_input_tokens=np.pad(targets[:, :-1], ((0, 0), (1, 0))))
  per_token = (losses.model_flops_per_token(work.model_config, work.source_len, work.target_len)
               if encoder_decoder else losses.model_flops_per_token(work.model_config,
                                                                    work.target_len))
  sides = []
  if args.sides in ('both', 'ours'):
    holder = {'state': state}
    rng = jax.random.key(1)
    with partitioner.activate():
      sharded = partitioner.shard_batch(batch)

    def ours():
      with partitioner.activate():
        holder['state'], metrics = step(holder['state'], sharded, rng)
      jax.block_until_ready(metrics['loss'])

    sides.append(Side('ours', f'{config.model.dtype}, XLA', {'main': ours}))
  if args.sides in ('both', 'hf'):
    sides.append(_hf_train_side(work, jax.device_get(state.params), batch, args))
  return sides, per_token * work.batch * work.target_len


def _hf_train_side(work: Workload, params, batch, args: argparse.Namespace) -> Side:
  import torch

  model = work.hf_model(params).train()
  optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, eps=1e-8, weight_decay=0.0)
  if work.model_config.architecture == 'encoder_decoder':
    inputs = dict(input_ids=torch.from_numpy(work.source),
                  labels=torch.from_numpy(batch['decoder_target_tokens']).long())
  else:
    ids = torch.from_numpy(work.tokens[:, :-1]).long()
    inputs = dict(input_ids=ids, labels=ids)

  def hf():
    loss = model(**inputs).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)

  return Side('HF', _hf_settings(args), {'main': hf})


def _hf_settings(args: argparse.Namespace) -> str:
  flush = 'denormals on' if args.no_flush else 'flush denormals'
  return f'float32, torch, {flush}'


def _decode_sides(work: Workload, args: argparse.Namespace) -> tuple[list[Side], float]:
  """Ours and HF generating exactly `target_len` tokens ('main') and 1 token ('one');
  returns the decoder's weight bytes (what each step streams)."""
  import jax
  from t5x_lite import decoding, evaluation, models

  params = jax.jit(lambda rng: models.init_params(work.model_config, rng))(jax.random.key(0))
  beams = 4 if args.mode == 'beam' else 1
  vocab = work.model_config.vocab_size
  sides = []
  if args.sides in ('both', 'ours'):
    batch = {'encoder_input_tokens': work.source}

    def ours(length):
      config = decoding.DecodeConfig(method=args.mode, max_decode_length=length,
                                     num_beams=beams, eos_id=vocab)  # no early end
      return lambda: evaluation.predict_batch(work.model, params, batch, config)

    sides.append(Side('ours', f'{work.config.model.dtype}, XLA',
                      {'main': ours(work.target_len), 'one': ours(1)}))
  if args.sides in ('both', 'hf'):
    sides.append(_hf_decode_side(work, jax.device_get(params), beams, args))
  decoder = jax.device_get(params)
  weights = models.count_params({k: decoder[k] for k in ('decoder', 'logits_dense')
                                 if k in decoder})
  return sides, 4.0 * weights


def _hf_decode_side(work: Workload, params, beams: int, args: argparse.Namespace) -> Side:
  import torch

  model = work.hf_model(params).eval()
  source = torch.from_numpy(work.source).long()

  def hf(length):
    def call():
      with torch.inference_mode():
        model.generate(input_ids=source, attention_mask=torch.ones_like(source),
                       max_new_tokens=length, min_new_tokens=length, num_beams=beams,
                       do_sample=False)
    return call

  return Side('HF', _hf_settings(args), {'main': hf(work.target_len), 'one': hf(1)})


@dataclasses.dataclass(frozen=True)
class Machine:
  """What this run measured of the machine: the claims are relative to these."""

  jax_matmul: float  # FLOP/s, float32 jitted (or the device's published peak)
  torch_matmul: float  # FLOP/s, float32
  bandwidth: float  # bytes/s of a weight-streaming matmul
  description: str


def measure_machine(args: argparse.Namespace, weight_bytes: float, rows: int) -> Machine:
  import jax
  import torch
  from t5x_lite import hardware

  size = 2048 if args.shape == 'real' else 256
  platform_name = jax.devices()[0].platform
  jax_peak = (hardware.measure_matmul_flops(size) if platform_name == 'cpu'
              else hardware.peak_flops_per_device())
  a = torch.ones(size, size)
  torch.matmul(a, a)
  start, repeats = time.perf_counter(), 5
  for _ in range(repeats):
    torch.matmul(a, a)
  torch_peak = 2 * size**3 * repeats / (time.perf_counter() - start)
  bandwidth = hardware.measure_weight_stream_bandwidth(weight_bytes, rows=rows)
  flags = set()
  try:
    with open('/proc/cpuinfo', encoding='utf-8') as f:
      flags = next((line.split(':', 1)[1].split() for line in f if line.startswith('flags')),
                   [])
  except OSError:
    pass
  wanted = ('avx2', 'fma', 'avx512f', 'avx512_bf16', 'avx512_vnni', 'amx_bf16')
  import jaxlib
  import transformers
  description = (
      f'{hardware.cpu_model()} ({os.cpu_count()} cores; flags: '
      f'{" ".join(f for f in wanted if f in flags) or "none of " + "/".join(wanted)}), '
      f'{jax.devices()[0].device_kind}; {args.threads} threads per side; allocator '
      f'{runtime.loaded()}; Python '
      f'{platform.python_version()}, jax {jax.__version__}, jaxlib {jaxlib.__version__}, '
      f'torch {torch.__version__}, transformers {transformers.__version__}. Same run: float32 '
      f'{size}³ matmul {jax_peak / 1e9:,.1f} GFLOP/s in JAX, {torch_peak / 1e9:,.1f} in torch; '
      f'weight streaming ({weight_bytes / 1e6:,.1f} MB, {rows} rows) '
      f'{bandwidth / 1e9:,.1f} GB/s.')
  return Machine(jax_peak, torch_peak, bandwidth, description)


def _cell(value: float | None, fmt: str) -> str:
  return '—' if value is None else format(value, fmt)


def side_rows(sides: list[Side], args: argparse.Namespace, work: Workload, machine: Machine,
              flops_or_bytes: float) -> list[list[str]]:
  """One table row per side; the ratio is the median over rounds of HF time / our time."""
  decode = args.mode in ('greedy', 'beam')
  tokens = work.batch * work.target_len
  by_name = {side.name: side for side in sides}
  ratio = None
  if 'ours' in by_name and 'HF' in by_name:
    ratio = statistics.median(h / o for o, h in zip(by_name['ours'].times['main'],
                                                     by_name['HF'].times['main']))
  peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30
  rows = []
  for side in sides:
    main = side.times['main']
    median = statistics.median(main)
    step_ms = floor_ms = fixed_ms = achieved = None
    if decode:
      fixed = statistics.median(side.times['one'])
      fixed_ms = 1e3 * fixed
      step_ms = 1e3 * (median - fixed) / max(work.target_len - 1, 1)
      rows_per_step = work.batch * (4 if args.mode == 'beam' else 1)
      floor_ms = 1e3 * max(flops_or_bytes / machine.bandwidth,
                           2 * rows_per_step * flops_or_bytes / 4 / machine.jax_matmul)
    else:
      matmul = machine.jax_matmul if side.name == 'ours' else machine.torch_matmul
      achieved = f'{flops_or_bytes / median / 1e9:,.1f} ({flops_or_bytes / median / matmul:.0%})'
    rows.append([
        side.name, side.settings, f'{tokens / max(main):,.1f}', f'{tokens / median:,.1f}',
        _cell(ratio if side.name == 'ours' else None, '.2f'),
        f'{side.warmup_seconds:.2f}', achieved or '—', _cell(step_ms, '.2f'),
        _cell(floor_ms, '.2f'), _cell(fixed_ms, '.1f'),
        f'{statistics.median(side.system):.3f}', f'{max(main) / min(main):.2f}',
        f'{peak_rss:.2f}'])
  return rows


def reference_row(args: argparse.Namespace) -> list[str]:
  """HF as most users run it: its own process, denormals on, glibc malloc."""
  env = {k: v for k, v in os.environ.items()
         if k not in ('LD_PRELOAD', 'GLIBC_TUNABLES', runtime.ENV, runtime.LOADED)}
  command = [sys.executable, __file__, f'--mode={args.mode}', f'--shape={args.shape}',
             f'--batch={args.batch}', f'--steps={args.steps}', f'--threads={args.threads}',
             '--allocator=system', '--sides=hf', '--no_flush', '--no_reference', '--json']
  result = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
  row = json.loads(result.stdout.strip().splitlines()[-1])[0]
  row[1] += ', glibc malloc (as most users run it)'
  return row


def planner_check(work: Workload, measured_seconds: float) -> str:
  """The planner's step time and bytes for this config on this machine, against the
  measured step and XLA's memory_analysis()."""
  from t5x_lite import planner
  result = planner.plan(work.config)  # this machine: bytes from XLA, time at CPU_MFU
  formulas = planner.formula_memory(work.config, result.mesh)
  return (f'Planner (`info --plan`): {result.step_seconds:.3g} s per step predicted at '
          f'{result.mfu:.0%} of {result.peak_flops / 1e9:,.0f} GFLOP/s, {measured_seconds:.3g} s '
          f'measured (measured / predicted {measured_seconds / result.step_seconds:.2f}); '
          f'bytes per device by formulas {formulas.total / 2**30:.3g} GiB vs '
          f'{result.memory.total / 2**30:.3g} GiB from XLA memory_analysis() '
          f'({formulas.total / result.memory.total:.2f}).')


def write_table(rows: list[list[str]], args: argparse.Namespace, machine: Machine,
                work: Workload, notes: str = '') -> None:
  shape = (f'batch {work.batch} x ({work.source_len} -> {work.target_len})'
           if work.source_len else f'batch {work.batch} x {work.target_len}')
  command = ' '.join(['python experiments/benchmark.py', *sys.argv[1:]])
  lines = [
      '', f'## {args.mode}, {args.shape} shape ({shape}), '
      f'{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC', '',
      f'`{command}`: {args.steps} timed steps per side, interleaved. {machine.description}', '',
      '| ' + ' | '.join(COLUMNS) + ' |', '|' + '---|' * len(COLUMNS),
      *('| ' + ' | '.join(row) + ' |' for row in rows)]
  if notes:
    lines += ['', notes]
  out = pathlib.Path(args.out)
  if not out.exists():
    lines = ['# Ours vs Hugging Face PyTorch on the same cores',
             '', 'Appended by `experiments/benchmark.py` (see its docstring).', *lines]
  with out.open('a', encoding='utf-8') as f:
    f.write('\n'.join(lines) + '\n')
  print('\n'.join(lines))


def main(argv=None) -> None:
  args = parse_args(argv)
  if args.steps < 1 or args.batch < 0:
    _fail(f'--steps={args.steps} --batch={args.batch}: steps must be >= 1 and batch >= 0 '
          "(0: the mode's default)")
  os.environ.setdefault(runtime.ENV, args.allocator)
  runtime.configure()
  _pin_threads(args.threads)
  import torch
  torch.set_num_threads(args.threads)
  torch.set_flush_denormal(not args.no_flush)
  import jax
  if jax.devices()[0].platform != 'cpu' and args.sides == 'both':
    args.sides = 'ours'  # HF runs on CPU here: a CPU-vs-accelerator ratio would mean nothing
  work = Workload(args)
  if args.mode in ('greedy', 'beam'):
    sides, measure = _decode_sides(work, args)
    weight_bytes = measure
  else:
    sides, measure = _train_sides(work, args)
    weight_bytes = 4.0 * 2**20 * (16 if args.shape == 'real' else 1)
  run_interleaved(sides, args.steps)
  rows_per_step = work.batch * (4 if args.mode == 'beam' else 1)
  machine = measure_machine(args, weight_bytes, rows_per_step)
  rows = side_rows(sides, args, work, machine, measure)
  if args.json:
    print(json.dumps(rows))
    return
  notes = ''
  if args.mode.startswith('train') and args.sides != 'hf':
    notes = planner_check(work, statistics.median(sides[0].times['main']))
  if not args.no_reference and args.sides == 'both':
    rows.append(reference_row(args))
  write_table(rows, args, machine, work, notes)


if __name__ == '__main__':
  main()
