"""Llama-layout decoder-only tiny, with grouped-query attention, for tests.

Run: python -m t5x_lite.main info --config=configs/decoder_tiny.py
"""

from t5x_lite import presets


def get_config():
  return presets.get('decoder_tiny')
