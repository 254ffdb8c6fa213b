"""Llama-layout decoder-only tiny, with grouped-query attention, for tests.

Run: python -m t5x_lite.main info --config=configs/decoder_tiny.py
"""

from t5x_lite import config as base


def get_config():
  return base.base_config(
      base.LLAMA, d_model=64, num_heads=4, num_kv_heads=2, d_ff=172, num_decoder_layers=2)
