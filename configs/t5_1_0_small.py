"""T5 1.0 small (t5-small shapes: ReLU MLP, tied logits).

Run: python -m t5x_lite.main info --config=configs/t5_1_0_small.py
Parameters: 60,506,624.
"""

from t5x_lite import config as base


def get_config():
  return base.base_config(
      base.T5_1_0, d_model=512, num_heads=8, d_ff=2048, num_encoder_layers=6,
      num_decoder_layers=6)
