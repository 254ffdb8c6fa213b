"""T5.1.1 XXL (google/t5-v1_1-xxl shapes).

Run: python -m t5x_lite.main info --config=configs/t5_1_1_xxl.py
Parameters: 11,135,332,352.
"""

from t5x_lite import config as base


def get_config():
  return base.base_config(
      base.T5_1_1, d_model=4096, num_heads=64, d_ff=10240, num_encoder_layers=24,
      num_decoder_layers=24)
