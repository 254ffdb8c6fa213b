"""T5.1.1 large (google/t5-v1_1-large shapes).

Run: python -m t5x_lite.main info --config=configs/t5_1_1_large.py
Parameters: 783,150,080.
"""

from t5x_lite import presets


def get_config():
  return presets.get('t5_1_1_large')
