"""Llama-layout decoder-only with about 100M parameters (GPT-2 small width, tied).

Run: python -m t5x_lite.main info --config=configs/decoder_100m.py
Parameters: 109,529,856.
"""

from t5x_lite import config as base


def get_config():
  return base.base_config(
      base.LLAMA, d_model=768, num_heads=12, d_ff=2048, num_decoder_layers=12,
      logits_via_embedding=True)
