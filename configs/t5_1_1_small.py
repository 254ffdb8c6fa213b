"""T5.1.1 small (google/t5-v1_1-small shapes).

Run: python -m t5x_lite.main info --config=configs/t5_1_1_small.py
Parameters: 76,961,152.
"""

from t5x_lite import config as base


def get_config():
  return base.base_config(
      base.T5_1_1, d_model=512, num_heads=6, d_ff=1024, num_encoder_layers=8,
      num_decoder_layers=8)
