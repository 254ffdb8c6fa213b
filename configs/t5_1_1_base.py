"""T5.1.1 base (google/t5-v1_1-base shapes).

Run: python -m t5x_lite.main info --config=configs/t5_1_1_base.py
Parameters: 247,577,856.
"""

from t5x_lite import presets


def get_config():
  return presets.get('t5_1_1_base')
