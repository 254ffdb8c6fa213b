"""Adafactor (T5's settings) vs AdamW, each at 3 learning rates, on the lr_size sweep's base
(the quickstart model, 200 steps).

Run:
  python -m t5x_lite.main sweep --sweep=experiments/optimizers.py --workdir=runs/optimizers \
      --parallel=2
Adafactor's steps are relative to each parameter's scale, AdamW's absolute, so each gets its
own learning-rate range (experiments/quickstart.md compares the two at one setting).
"""

from etils import epath

from t5x_lite import sweeps


def get_config():
  return sweeps.load_config(epath.Path(__file__).parent / 'lr_size.py')


def get_sweep():
  return sweeps.chain(
      sweeps.product(sweeps.sweep('optimizer.name', ['adafactor']),
                     sweeps.sweep('optimizer.learning_rate', [0.005, 0.02, 0.08])),
      sweeps.product(sweeps.sweep('optimizer.name', ['adamw']),
                     sweeps.sweep('optimizer.learning_rate', [1e-3, 3e-3, 1e-2])))
