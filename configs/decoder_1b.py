"""Llama-layout decoder-only with about 1.1B parameters (TinyLlama-1.1B shapes).

Run: python -m t5x_lite.main info --config=configs/decoder_1b.py
Parameters: 1,100,048,384.
"""

from t5x_lite import presets


def get_config():
  return presets.get('decoder_1b')
