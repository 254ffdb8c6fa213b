"""T5.1.1 tiny: a few hundred thousand non-embedding params, for tests and smoke runs.

Run: python -m t5x_lite.main info --config=configs/t5_1_1_tiny.py
"""

from t5x_lite import config as base


def get_config():
  return base.base_config(
      base.T5_1_1, d_model=64, num_heads=4, head_dim=16, d_ff=128, num_encoder_layers=2,
      num_decoder_layers=2)
