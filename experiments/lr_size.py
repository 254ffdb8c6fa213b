"""Learning rate x model size for the quickstart model (configs/quickstart.py), short runs.

Run (22 minutes with --parallel=2 on a 2-core machine that other jobs shared):
  python -m t5x_lite.main sweep --sweep=experiments/lr_size.py --workdir=runs/lr_size \
      --parallel=2
Results: experiments/results/lr_size/ (results.md, results.csv, loss_curves.png, and each
metric against each swept hyperparameter).
"""

from t5x_lite import presets, sweeps


def get_config():
  """The quickstart's model and recipe, shortened: 200 steps of 32 rows, then greedy
  decoding of 200 validation pairs."""
  config = presets.get('quickstart')
  config.train.num_steps = 200
  config.train.batch_size = 32
  config.train.log_every = 20
  config.train.checkpoint_every = 100
  config.optimizer.warmup_steps = 20
  config.eval.split = 'validation'
  config.eval.num_examples = 200
  config.eval.max_decode_length = 64
  return config


def get_sweep():
  """3 Adafactor learning rates x 2 sizes (d_model 64 / d_ff 256 and the quickstart's
  128 / 512): 6 trials."""
  sizes = sweeps.zipit(sweeps.sweep('model.d_model', [64, 128]),
                       sweeps.sweep('model.d_ff', [256, 512]))
  return sweeps.product(sweeps.sweep('optimizer.learning_rate', [0.005, 0.02, 0.08]), sizes)
