"""T5.1.1 tiny: a few hundred thousand non-embedding params, for tests and smoke runs.

Run: python -m t5x_lite.main info --config=configs/t5_1_1_tiny.py
"""

from t5x_lite import presets


def get_config():
  return presets.get('t5_1_1_tiny')
