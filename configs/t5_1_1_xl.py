"""T5.1.1 XL (google/t5-v1_1-xl shapes).

Run: python -m t5x_lite.main info --config=configs/t5_1_1_xl.py
Parameters: 2,849,757,184.
"""

from t5x_lite import config as base


def get_config():
  return base.base_config(
      base.T5_1_1, d_model=2048, num_heads=32, d_ff=5120, num_encoder_layers=24,
      num_decoder_layers=24)
