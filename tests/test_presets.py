"""Tests for t5x_lite.presets: every shipped config by name, equal to its configs/ file."""

import importlib.util
import pathlib

import pytest

from t5x_lite import presets

CONFIGS = pathlib.Path(__file__).parent.parent / 'configs'


def _load(path: pathlib.Path):
  spec = importlib.util.spec_from_file_location(path.stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def test_every_config_file_is_a_preset():
  assert presets.names() == sorted(p.stem for p in CONFIGS.glob('*.py'))
  for path in CONFIGS.glob('*.py'):
    assert _load(path).to_dict() == presets.get(path.stem).to_dict(), path.stem


def test_presets_are_fresh_copies_with_their_settings():
  config = presets.get('quickstart')
  config.train.num_steps = 1
  assert presets.get('quickstart').train.num_steps == 1000
  small = presets.get('t5_1_1_small').model
  assert (small.d_model, small.num_heads, small.num_encoder_layers) == (512, 6, 8)


def test_unknown_preset_lists_the_names():
  with pytest.raises(ValueError, match="unknown preset 't5_small'; presets: decoder_100m, "):
    presets.get('t5_small')
