"""Llama-layout decoder-only with about 100M parameters (GPT-2 small width, tied).

Run: python -m t5x_lite.main info --config=configs/decoder_100m.py
Parameters: 109,529,856.
"""

from t5x_lite import presets


def get_config():
  return presets.get('decoder_100m')
