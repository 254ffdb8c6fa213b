"""Llama-2-7B shapes (meta-llama/Llama-2-7b-hf).

Run: python -m t5x_lite.main info --config=configs/llama2_7b.py
Parameters: 6,738,415,616.
"""

from t5x_lite import config as base


def get_config():
  return base.base_config(
      base.LLAMA, d_model=4096, num_heads=32, d_ff=11008, num_decoder_layers=32)
