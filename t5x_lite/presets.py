"""The shipped run configs by name, so your own config can start from one without a path:

  from t5x_lite import presets

  def get_config():
    config = presets.get('t5_1_1_small')
    config.data.files.train = 'pairs_train.tsv'
    return config

`configs/<name>.py` is each preset as a file for `--config=` (with its run command and
result in the docstring); both return the same ConfigDict.
"""

from collections.abc import Callable

import ml_collections

from t5x_lite import config as base

# name -> (architecture preset, model fields); published shapes (parameter counts in README).
_MODELS = {
    't5_1_1_tiny': (base.T5_1_1, dict(d_model=64, num_heads=4, head_dim=16, d_ff=128,
                                      num_encoder_layers=2, num_decoder_layers=2)),
    't5_1_1_small': (base.T5_1_1, dict(d_model=512, num_heads=6, d_ff=1024,
                                       num_encoder_layers=8, num_decoder_layers=8)),
    't5_1_1_base': (base.T5_1_1, dict(d_model=768, num_heads=12, d_ff=2048,
                                      num_encoder_layers=12, num_decoder_layers=12)),
    't5_1_1_large': (base.T5_1_1, dict(d_model=1024, num_heads=16, d_ff=2816,
                                       num_encoder_layers=24, num_decoder_layers=24)),
    't5_1_1_xl': (base.T5_1_1, dict(d_model=2048, num_heads=32, d_ff=5120,
                                    num_encoder_layers=24, num_decoder_layers=24)),
    't5_1_1_xxl': (base.T5_1_1, dict(d_model=4096, num_heads=64, d_ff=10240,
                                     num_encoder_layers=24, num_decoder_layers=24)),
    't5_1_0_small': (base.T5_1_0, dict(d_model=512, num_heads=8, d_ff=2048,
                                       num_encoder_layers=6, num_decoder_layers=6)),
    'decoder_tiny': (base.LLAMA, dict(d_model=64, num_heads=4, num_kv_heads=2, d_ff=172,
                                      num_decoder_layers=2)),
    'decoder_100m': (base.LLAMA, dict(d_model=768, num_heads=12, d_ff=2048,
                                      num_decoder_layers=12, logits_via_embedding=True)),
    'decoder_1b': (base.LLAMA, dict(d_model=2048, num_heads=32, num_kv_heads=4, d_ff=5632,
                                    num_decoder_layers=22)),
    'llama2_7b': (base.LLAMA, dict(d_model=4096, num_heads=32, d_ff=11008,
                                   num_decoder_layers=32)),
}


def quickstart() -> ml_collections.ConfigDict:
  """A small T5.1.1 trained from scratch on the bundled English→German pairs (run.sh)."""
  config = base.base_config(
      base.T5_1_1, vocab_size=8192, d_model=128, num_heads=2, d_ff=512,
      num_encoder_layers=2, num_decoder_layers=2,
      # params, softmax and loss stay float32; 1.9x faster steps on a CPU with AVX512-BF16
      dtype='bfloat16')
  config.train.num_steps = 1000
  config.train.batch_size = 48
  config.train.log_every = 50
  config.train.checkpoint_every = 250
  config.optimizer.name = 'adafactor'
  config.optimizer.schedule = 'cosine'
  config.optimizer.learning_rate = 0.02  # relative to each parameter's scale, as in T5
  config.optimizer.warmup_steps = 100
  config.data.feature_lengths.inputs = 64  # 95% of the pairs fit whole
  config.data.feature_lengths.targets = 64
  config.eval.split = 'test'
  config.eval.max_decode_length = 96
  return config


_RECIPES: dict[str, Callable[[], ml_collections.ConfigDict]] = {'quickstart': quickstart}


def names() -> list[str]:
  """Every preset name, sorted."""
  return sorted([*_MODELS, *_RECIPES])


def get(name: str) -> ml_collections.ConfigDict:
  """A new copy of the run config called `name` (e.g. 't5_1_1_small'; see `names()`)."""
  if name in _RECIPES:
    return _RECIPES[name]()
  if name not in _MODELS:
    raise ValueError(f'unknown preset {name!r}; presets: {", ".join(names())}')
  preset, fields = _MODELS[name]
  return base.base_config(preset, **fields)
