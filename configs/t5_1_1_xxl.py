"""T5.1.1 XXL (google/t5-v1_1-xxl shapes).

Run: python -m t5x_lite.main info --config=configs/t5_1_1_xxl.py
Parameters: 11,135,332,352.
"""

from t5x_lite import presets


def get_config():
  return presets.get('t5_1_1_xxl')
