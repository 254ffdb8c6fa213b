"""Llama-layout decoder-only with about 1.1B parameters (TinyLlama-1.1B shapes).

Run: python -m t5x_lite.main info --config=configs/decoder_1b.py
Parameters: 1,100,048,384.
"""

from t5x_lite import config as base


def get_config():
  return base.base_config(
      base.LLAMA, d_model=2048, num_heads=32, num_kv_heads=4, d_ff=5632,
      num_decoder_layers=22)
