"""Building blocks for the `configs/*.py` files: one ConfigDict per run, model presets.

A config file's `get_config()` returns `base_config(model=...)`; every field exists up front
so `--config.model.d_model=256` works and a typo fails (configs are loaded locked).
"""

import dataclasses
from typing import Any

import ml_collections

from t5x_lite import models

# T5.1.1 (Raffel et al. 2020, and the t5.1.1 checkpoints): gated-GELU, untied logits,
# relative position bias, no 1/sqrt(d) in attention.
T5_1_1 = dict(
    architecture='encoder_decoder', vocab_size=32128, head_dim=64,
    activations=('gelu', 'linear'), logits_via_embedding=False,
    position_embedding='relative', scale_attention_logits=False, norm_eps=1e-6)

# T5 1.0: ReLU MLP and logits tied to the embedding, scaled by d_model**-0.5.
T5_1_0 = dict(T5_1_1, activations=('relu',), logits_via_embedding=True,
              scale_tied_logits=True)

# Llama layout: RoPE, SwiGLU, grouped-query attention, 1/sqrt(head_dim) at run time.
LLAMA = dict(
    architecture='decoder_only', vocab_size=32000, head_dim=0, num_encoder_layers=0,
    activations=('silu', 'linear'), position_embedding='rope', rope_theta=10000.0,
    scale_attention_logits=True, scale_tied_logits=False, norm_eps=1e-5,
    embedding_init_stddev=0.02)


def model_config_dict(**fields: Any) -> ml_collections.ConfigDict:
  """All `ModelConfig` fields (defaults overridden by `fields`), validated once here."""
  defaults = {f.name: f.default for f in dataclasses.fields(models.ModelConfig)}
  unknown = sorted(set(fields) - set(defaults))
  if unknown:
    raise ValueError(f'Unknown model config field(s) {unknown}; allowed: {sorted(defaults)}')
  values = {**defaults, **fields}
  models.ModelConfig(**values)
  return ml_collections.ConfigDict(values)


def base_config(preset: dict[str, Any], **model_fields: Any) -> ml_collections.ConfigDict:
  """The full run config: a model (a preset such as `T5_1_1` with `model_fields` on top)
  plus run-level settings."""
  config = ml_collections.ConfigDict()
  config.model = model_config_dict(**{**preset, **model_fields})
  config.seed = 0  # init and dropout RNG seed
  return config


def model_config(config: ml_collections.ConfigDict) -> models.ModelConfig:
  """The frozen `ModelConfig` described by a run config."""
  return models.ModelConfig.from_dict(config.model.to_dict())
