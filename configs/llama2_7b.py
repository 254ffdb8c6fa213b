"""Llama-2-7B shapes (meta-llama/Llama-2-7b-hf).

Run: python -m t5x_lite.main info --config=configs/llama2_7b.py
Parameters: 6,738,415,616.
"""

from t5x_lite import presets


def get_config():
  return presets.get('llama2_7b')
