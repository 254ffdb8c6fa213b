"""Quickstart: a small T5.1.1 trained from scratch on the bundled English→German pairs.

Run: bash run.sh quickstart
(about 300 steps, a few minutes on 2 CPU cores; writes TensorBoard logs, metrics.jsonl,
checkpoints and loss_curve.png to runs/quickstart. BLEU evaluation joins with decoding.)
"""

from t5x_lite import config as base


def get_config():
  config = base.base_config(
      base.T5_1_1, vocab_size=8192, d_model=192, num_heads=3, d_ff=768,
      num_encoder_layers=3, num_decoder_layers=3, dropout_rate=0.1)
  config.train.num_steps = 300
  config.train.batch_size = 32
  config.train.log_every = 25
  config.train.checkpoint_every = 100
  config.optimizer.name = 'adamw'
  config.optimizer.schedule = 'cosine'
  config.optimizer.learning_rate = 2e-3
  config.optimizer.warmup_steps = 50
  config.optimizer.weight_decay = 0.01
  config.data.feature_lengths.inputs = 32
  config.data.feature_lengths.targets = 32
  return config
