"""T5.1.1 small (google/t5-v1_1-small shapes).

Run: python -m t5x_lite.main info --config=configs/t5_1_1_small.py
Parameters: 76,961,152.
"""

from t5x_lite import presets


def get_config():
  return presets.get('t5_1_1_small')
