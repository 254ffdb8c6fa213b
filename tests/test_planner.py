"""The planner's bytes and FLOPs against XLA's memory_analysis() and hand computation, and
the published-peak lookup and cached CPU measurement of t5x_lite.hardware."""

import importlib.util
import json
import os
import subprocess
import sys

import jax
import pytest

from t5x_lite import hardware, losses, planner

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tiny(name: str, **train):
  """configs/<name>.py with a 256-token vocabulary and `train` fields overridden."""
  spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, 'configs', f'{name}.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.model.vocab_size = 256
  for field, value in train.items():
    setattr(config.train, field, value)
  return config


@pytest.mark.parametrize('name', ['t5_1_1_tiny', 'decoder_tiny'])
def test_formula_bytes_near_memory_analysis(name):
  # Params and optimizer state are exact. Activations: within 5% of XLA on one device at
  # 32 rows, but up to ~20% over on an 8-device mesh (XLA reuses buffers the formulas
  # count), so the 10% holds for the XLA path only; the bound here is 25%.
  config = _tiny(name, batch_size=256)
  compiled = planner.compiled_memory(config)
  formulas = planner.formula_memory(config, planner.mesh_sizes(config.mesh_shape, 8))
  assert formulas.params == compiled.params and formulas.optimizer == compiled.optimizer
  assert abs(formulas.total / compiled.total - 1) < 0.25, (formulas, compiled)


def test_param_and_optimizer_bytes_by_hand():
  config = _tiny('decoder_tiny')  # d 64, 4 heads of 16 (2 kv heads), d_ff 172, 2 layers
  config.optimizer.name = 'adamw'
  d, layers, vocab = 64, 2, 256
  per_layer = d * 64 + 2 * d * 32 + 64 * d + 3 * d * 172 + 2 * d  # q, k+v, out, mlp, 2 norms
  # float32; the final norm, the embedding and the untied logits layer
  params = 4 * (layers * per_layer + d + 2 * vocab * d)
  # fsdp over 8 devices splits every 'embed' dim (64 = 8 x 8); norm scales are 'embed' too.
  sharded = planner.formula_memory(config, dict(data=1, fsdp=8, model=1))
  assert sharded.params == params / 8
  # AdamW: mu and nu shaped like the params (sharded alike), beside a few scalar counters.
  assert 0 <= sharded.optimizer - 2 * params / 8 <= 16
  replicated = planner.formula_memory(config, dict(data=8, fsdp=1, model=1))
  assert replicated.params == params
  assert replicated.gradients == params


def test_step_flops_by_hand():
  config = _tiny('decoder_tiny', batch_size=4)  # prefix_lm: rows of inputs 64 + targets 64
  flops, tokens = planner.step_flops(config)
  assert tokens == 4 * 128
  d, heads, kv_heads, head_dim, d_ff, layers, vocab, s = 64, 4, 2, 16, 172, 2, 256, 128
  weights = layers * (3 * d * d_ff + d * heads * head_dim * 2 + 2 * d * kv_heads * head_dim)
  per_token = 6 * (weights + d * vocab) + 3 * layers * 4 * heads * head_dim * s / 2
  assert flops == pytest.approx(per_token * tokens)
  model = planner.config_lib.model_config(config)
  assert flops == pytest.approx(losses.model_flops_per_token(model, s) * tokens)


def test_step_time_and_fit_on_a_named_accelerator():
  config = _tiny('t5_1_1_tiny')
  result = planner.plan(config, 'v5e-16', mfu=0.5)  # 16 devices are not here: formulas
  assert result.memory.source == 'formulas' and result.mesh == dict(data=16, fsdp=1, model=1)
  assert result.device_bytes == 16 * 2**30 and result.fits
  assert result.step_seconds == pytest.approx(result.flops_per_step / (16 * 197e12 * 0.5))
  assert not any(line.startswith('warning') for line in planner.report(config, result))


def test_a_config_too_big_warns_with_the_fixes():
  config = _tiny('t5_1_1_tiny', batch_size=4096)
  config.model.vocab_size = 32128
  result = planner.plan(config, 'v5e-4', mfu=0.5)
  assert not result.fits
  lines = planner.report(config, result)
  warning = lines.index(next(line for line in lines if line.startswith('warning')))
  fixes = '\n'.join(lines[warning:])
  assert 'does not fit in 16.00 GiB' in fixes
  assert '--config.mesh_shape="(1,4,1)"' in fixes
  assert '--config.model.remat_policy=full' in fixes
  assert '--config.train.num_microbatches=2' in fixes


def test_info_plan_compiles_on_fake_devices_for_the_named_accelerator():
  result = subprocess.run(
      [sys.executable, '-m', 't5x_lite.main', 'info', '--config=configs/t5_1_1_tiny.py',
       '--config.model.vocab_size=256', '--config.train.batch_size=8', '--plan',
       '--plan.accelerator=v4-8', '--plan.mfu=0.5'],
      cwd=REPO, capture_output=True, text=True, check=True,
      env={k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'})
  out = result.stdout
  assert 'devices: 4 x cpu' in out  # a v4-8 is 4 chips of 2 TensorCores
  assert 'plan for v4-8 (4 x TPU v4)' in out and "'data': 4" in out
  assert 'from XLA memory_analysis()' in out
  assert 'at 50% MFU of 275 TFLOP/s per device' in out


def test_bad_accelerator_is_one_error_line():
  result = subprocess.run(
      [sys.executable, '-m', 't5x_lite.main', 'info', '--config=configs/t5_1_1_tiny.py',
       '--plan', '--plan.accelerator=v9-8'], cwd=REPO, capture_output=True, text=True)
  assert result.returncode == 2
  assert result.stderr.strip().splitlines() == [
      "error: unknown accelerator 'v9-8'; write e.g. v5e-16, v4-8, v6e-8 or h100x8 "
      '(chips: a100, h100, h200, v4, v5e, v5p, v6e)']


@pytest.mark.parametrize('kind, peak', [
    ('TPU v4', 275e12), ('TPU v5 lite', 197e12), ('TPU v5p', 459e12), ('TPU v6 lite', 918e12),
    ('NVIDIA A100-SXM4-80GB', 312e12), ('NVIDIA H100 80GB HBM3', 989e12),
    ('NVIDIA H200', 989e12)])
def test_published_peaks_by_device_kind(kind, peak):
  assert hardware.chip_for_device_kind(kind).peak_flops == peak


def test_accelerator_names_count_chips():
  assert hardware.parse_accelerator('v4-8')[1] == 4
  assert hardware.parse_accelerator('v5litepod-16') == (hardware.CHIPS['v5e'], 16)
  assert hardware.parse_accelerator('h100x8') == (hardware.CHIPS['h100'], 8)
  with pytest.raises(ValueError, match='unknown accelerator'):
    hardware.parse_accelerator('v5e')


def test_cpu_peak_is_measured_once_and_cached(tmp_path):
  path = str(tmp_path / 'peak.json')
  measured = hardware.peak_flops_per_device(jax.devices()[0], cache_path=path)
  assert measured > 1e8  # any CPU of this decade does more than 0.1 GFLOP/s
  with open(path, encoding='utf-8') as f:
    cached = json.load(f)
  assert list(cached.values()) == [measured]
  key = next(iter(cached))
  assert key.startswith(hardware.cpu_model())
  with open(path, 'w', encoding='utf-8') as f:
    json.dump({key: 123.0}, f)  # the cached figure wins over a new measurement
  assert hardware.peak_flops_per_device(jax.devices()[0], cache_path=path) == 123.0
