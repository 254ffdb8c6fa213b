"""T5 1.0 small (t5-small shapes: ReLU MLP, tied logits).

Run: python -m t5x_lite.main info --config=configs/t5_1_0_small.py
Parameters: 60,506,624.
"""

from t5x_lite import presets


def get_config():
  return presets.get('t5_1_0_small')
