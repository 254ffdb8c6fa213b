"""What the devices can do: published accelerator peaks, and measured CPU figures.

`peak_flops_per_device()` fills MFU's denominator from `jax.devices()[0].device_kind`: the
vendors' published dense bfloat16 peak for TPUs and NVIDIA GPUs, and on CPU a short jitted
float32 matmul measurement, cached per machine in a small JSON file under the user's cache
directory (keyed by CPU model and core count, so a copied home directory re-measures).
"""

import dataclasses
import json
import os
import platform
import time

import jax
import jax.numpy as jnp

# Dense bfloat16 peak FLOP/s and HBM per chip (GPU: per GPU), as published by the vendors:
# TPU v4 (275 TF, 32 GiB), v5e (197 TF, 16 GiB), v5p (459 TF, 95 GiB), v6e/Trillium
# (918 TF, 32 GiB): cloud.google.com/tpu/docs/{v4,v5e,v5p,v6e} "System architecture" tables;
# A100 SXM (312 TF without sparsity, 80 GB): NVIDIA A100 datasheet; H100 SXM (989 TF dense,
# 1,979 with sparsity, 80 GB) and H200 SXM (989 TF dense, 141 GB): the H100 and H200
# datasheets. Bandwidth is not listed: the planner's step time is compute-bound.


@dataclasses.dataclass(frozen=True)
class Chip:
  """One accelerator generation: peak dense bf16 FLOP/s and device memory per chip."""

  name: str
  peak_flops: float
  hbm_bytes: float
  # Accelerator names (`v4-8`) count TensorCores for v4 and v5p: two per chip.
  cores_per_chip: int = 1


CHIPS = {
    'v4': Chip('TPU v4', 275e12, 32 * 2**30, cores_per_chip=2),
    'v5e': Chip('TPU v5e', 197e12, 16 * 2**30),
    'v5p': Chip('TPU v5p', 459e12, 95 * 2**30, cores_per_chip=2),
    'v6e': Chip('TPU v6e', 918e12, 32 * 2**30),
    'a100': Chip('NVIDIA A100', 312e12, 80e9),
    'h100': Chip('NVIDIA H100', 989e12, 80e9),
    'h200': Chip('NVIDIA H200', 989e12, 141e9),
}

# Substrings of `device_kind` (lower-cased) -> CHIPS key, most specific first: jax reports
# e.g. 'TPU v4', 'TPU v5 lite', 'TPU v5p', 'TPU v6 lite', 'NVIDIA H100 80GB HBM3'.
_DEVICE_KINDS = (
    ('v5 lite', 'v5e'), ('v5e', 'v5e'), ('v5p', 'v5p'), ('v6 lite', 'v6e'), ('v6e', 'v6e'),
    ('tpu v4', 'v4'), ('tpu v5', 'v5p'), ('a100', 'a100'), ('h100', 'h100'), ('h200', 'h200'))

_CACHE_FILE = 'cpu_matmul_2048.json'  # renamed when the measurement changes


def chip_for_device_kind(device_kind: str) -> Chip | None:
  """The published chip behind a `jax.Device.device_kind`, or None when we know no figure."""
  kind = device_kind.lower()
  for fragment, key in _DEVICE_KINDS:
    if fragment in kind:
      return CHIPS[key]
  return None


def parse_accelerator(name: str) -> tuple[Chip, int]:
  """'v5e-16', 'v4-8' (TPU names, as `gcloud` spells them) or 'h100x8' -> (chip, chips).

  TPU v4 and v5p names count TensorCores (a v4-8 has 4 chips); v5e and v6e count chips.
  """
  text = name.strip().lower().replace('v5litepod', 'v5e')
  key, sep, count = text.partition('-') if '-' in text else text.partition('x')
  chip = CHIPS.get(key)
  if chip is None or not sep or not count.isdigit() or int(count) < 1:
    raise ValueError(f'unknown accelerator {name!r}; write e.g. v5e-16, v4-8, v6e-8 or '
                     f'h100x8 (chips: {", ".join(sorted(CHIPS))})')
  chips = int(count) // chip.cores_per_chip if sep == '-' else int(count)
  if chips < 1:
    raise ValueError(f'accelerator {name!r} has no whole chip: {chip.name} names count '
                     f'{chip.cores_per_chip} cores per chip')
  return chip, chips


def cpu_model() -> str:
  """The CPU's model name (from /proc/cpuinfo on Linux), e.g. 'Intel(R) Xeon(R) ...'."""
  try:
    with open('/proc/cpuinfo', encoding='utf-8') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def _median_seconds(fn, *args, repeats: int) -> float:
  """Median wall time of `fn(*args)` (already compiled by one warm-up call)."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return sorted(times)[len(times) // 2]


def measure_matmul_flops(size: int = 2048, repeats: int = 5,
                         dtype: jnp.dtype = jnp.float32) -> float:
  """FLOP/s of a jitted square matmul of `size` on the default device (median of repeats)."""
  a = jnp.ones((size, size), dtype)
  seconds = _median_seconds(jax.jit(jnp.matmul), a, a, repeats=repeats)
  return 2 * size**3 / seconds


def measure_weight_stream_bandwidth(num_bytes: float = 168e6, rows: int = 4,
                                    width: int = 512, repeats: int = 5) -> float:
  """Bytes/s at which a jitted [rows, K] @ [K, width] float32 product reads its K x width
  matrix of `num_bytes`: the rate at which a decode step can stream its weights."""
  depth = max(int(num_bytes // (4 * width)), 1)
  weights = jnp.ones((depth, width), jnp.float32)
  x = jnp.ones((rows, depth), jnp.float32)
  return 4 * depth * width / _median_seconds(jax.jit(jnp.matmul), x, weights, repeats=repeats)


def _cache_path() -> str:
  base = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
  return os.path.join(base, 't5x_lite', _CACHE_FILE)


def cpu_peak_flops(cache_path: str | None = None) -> float:
  """This CPU's jitted float32 matmul FLOP/s, measured once per machine and cached.

  The cache is a JSON object {"<cpu model> x<cores>": flops}; an unreadable or unwritable
  cache only costs a re-measurement (about a second).
  """
  path = cache_path or _cache_path()
  key = f'{cpu_model()} x{os.cpu_count()}'
  try:
    with open(path, encoding='utf-8') as f:
      cached = json.load(f)
  except (OSError, ValueError):
    cached = {}
  if not isinstance(cached, dict):
    cached = {}
  if isinstance(cached.get(key), (int, float)) and cached[key] > 0:
    return float(cached[key])
  flops = measure_matmul_flops()
  try:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + '.tmp', 'w', encoding='utf-8') as f:
      json.dump({**cached, key: flops}, f, indent=1)
    os.replace(path + '.tmp', path)
  except OSError:
    pass
  return flops


def peak_flops_per_device(device: jax.Device | None = None,
                          cache_path: str | None = None) -> float:
  """Peak FLOP/s of one device for MFU: published bf16 dense for known TPUs/GPUs, measured
  (and cached) float32 matmul on CPU, 0.0 for an accelerator we have no figure for."""
  device = device or jax.devices()[0]
  if device.platform == 'cpu':
    return cpu_peak_flops(cache_path)
  chip = chip_for_device_kind(device.device_kind)
  return chip.peak_flops if chip else 0.0
