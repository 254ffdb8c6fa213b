"""T5.1.1 base (google/t5-v1_1-base shapes).

Run: python -m t5x_lite.main info --config=configs/t5_1_1_base.py
Parameters: 247,577,856.
"""

from t5x_lite import config as base


def get_config():
  return base.base_config(
      base.T5_1_1, d_model=768, num_heads=12, d_ff=2048, num_encoder_layers=12,
      num_decoder_layers=12)
