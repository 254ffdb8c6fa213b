"""T5.1.1 large (google/t5-v1_1-large shapes).

Run: python -m t5x_lite.main info --config=configs/t5_1_1_large.py
Parameters: 783,150,080.
"""

from t5x_lite import config as base


def get_config():
  return base.base_config(
      base.T5_1_1, d_model=1024, num_heads=16, d_ff=2816, num_encoder_layers=24,
      num_decoder_layers=24)
