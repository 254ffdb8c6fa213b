"""T5.1.1 XL (google/t5-v1_1-xl shapes).

Run: python -m t5x_lite.main info --config=configs/t5_1_1_xl.py
Parameters: 2,849,757,184.
"""

from t5x_lite import presets


def get_config():
  return presets.get('t5_1_1_xl')
