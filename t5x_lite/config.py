"""Building blocks for the `configs/*.py` files: one ConfigDict per run, model presets.

A config file's `get_config()` returns `base_config(model=...)`; every field exists up front
so `--config.model.d_model=256` works and a typo fails (configs are loaded locked).
"""

import dataclasses
from typing import Any

import ml_collections

from t5x_lite import models, optimizers, partitioning

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
  """The full run config: a model (a preset such as `T5_1_1` with `model_fields` on top),
  its training, optimizer, data, mesh and multi-host settings."""
  config = ml_collections.ConfigDict()
  config.model = model_config_dict(**{**preset, **model_fields})
  config.seed = 0  # init and dropout RNG seed
  config.mesh_shape = (-1, 1, 1)  # devices along (data, fsdp, model); one -1 takes the rest
  # logical axis -> mesh axes: 'model', 'data,fsdp' or '' (replicated), e.g.
  # --config.axis_rules.embed='' to replicate embed instead of sharding it over fsdp
  config.axis_rules = ml_collections.ConfigDict(partitioning.default_rule_strings())

  config.distributed = ml_collections.ConfigDict()
  config.distributed.num_processes = 1  # > 1: join a jax.distributed run of this many
  config.distributed.process_id = 0  # this process's index in that run
  config.distributed.coordinator_address = '127.0.0.1:12345'  # host:port of process 0
  config.distributed.cpu_collectives = 'gloo'  # CPU cross-process collectives
  config.distributed.auto = False  # let jax detect the cluster (Cloud TPU VMs, SLURM)

  config.train = ml_collections.ConfigDict()
  config.train.num_steps = 1000  # optimizer updates in all
  config.train.batch_size = 32  # global batch, split over processes and data-parallel devices
  config.train.num_microbatches = 1  # gradient accumulation: batch split into this many
  config.train.log_every = 10  # steps between metric records
  config.train.checkpoint_every = 200  # steps between (asynchronous) checkpoints
  config.train.keep_checkpoints = 3  # newest checkpoints kept (0 keeps all)
  config.train.async_checkpointing = True  # write checkpoints in the background
  config.train.init_from = ''  # another run's checkpoints dir: start from its params
  config.train.z_loss = 1e-4  # weight of log(Z)^2 in the loss
  config.train.label_smoothing = 0.0  # mass spread over the other tokens
  # None / 'NUM_REAL_TARGET_TOKENS' / 'NUM_TOTAL_TARGET_TOKENS' / 'AVERAGE_PER_SEQUENCE' / a float
  config.train.loss_normalizing_factor = 'NUM_REAL_TARGET_TOKENS'
  config.train.nan_policy = 'stop'  # on NaN/Inf loss: 'stop' (nothing saved) or 'skip' the update
  # MFU's denominator; 0 = the device's published bf16 peak (TPU v4/v5e/v5p/v6e, A100/H100/
  # H200) or, on CPU, a measured float32 matmul peak (t5x_lite/hardware.py)
  config.train.peak_flops_per_device = 0.0
  # 'seq2seq' (pre-training, SFT), or on preference pairs 'reward' (needs model.reward_head)
  # or 'dpo'; train.batch_size then counts pairs (two rows each)
  config.train.objective = 'seq2seq'

  config.posttrain = ml_collections.ConfigDict()  # preference objectives (t5x_lite.posttrain)
  config.posttrain.beta = 0.1  # DPO: strength of the KL tie to the reference
  config.posttrain.dpo_loss = 'sigmoid'  # 'sigmoid' (DPO) or 'ipo'
  config.posttrain.label_smoothing = 0.0  # DPO: assumed share of flipped labels (cDPO)
  # DPO's reference log-probs: 'params' (a frozen model) or 'precomputed' (in the data)
  config.posttrain.reference = 'params'
  config.posttrain.reference_workdir = ''  # the frozen reference's run ('' = train.init_from's)

  config.optimizer = optimizers.default_optimizer_config()

  config.data = ml_collections.ConfigDict()
  config.data.task = 'translate_en_de'  # a registered task or mixture (t5x_lite.data.tasks)
  # Your own files instead (see tasks.from_config): globs per split, several comma-separated;
  # the task is named after its format, e.g. 'tsv'
  config.data.files = ml_collections.ConfigDict({'train': '', 'validation': '', 'test': ''})
  config.data.format = ''  # 'tsv', 'csv', 'jsonl' or 'text' ('' = from the file name)
  config.data.header = True  # tsv/csv: the first line names the columns
  config.data.columns = ''  # headerless tsv/csv: field names in order, e.g. 'en,es'
  config.data.inputs_template = ''  # str.format over the columns, e.g. 'translate: {en}'
  config.data.targets_template = ''  # e.g. '{es}'
  config.data.metrics = ''  # comma-separated names from t5x_lite.metrics.METRICS, e.g. 'bleu'
  config.data.bad_rows = 'error'  # a bad row: 'error' (names file:line) or 'skip' (counted)
  config.data.validation_fraction = 0.0  # no validation file: hold out this share of train
  config.data.vocabulary = ''  # a SentencePiece .model for every feature ('' = the task's)
  config.data.split = 'train'  # the split trained on
  config.data.feature_lengths = ml_collections.ConfigDict({'inputs': 64, 'targets': 64})
  encoder_decoder = config.model.architecture == 'encoder_decoder'
  # decoder-only: 'prefix_lm' (inputs attend both ways), 'causal_lm' (causal throughout) or
  # 'lm' (targets only)
  config.data.converter = 'enc_dec' if encoder_decoder else 'prefix_lm'
  config.data.pack = True  # several examples per row
  config.data.truncate = True  # over-long examples: cut to the feature lengths, or dropped
  config.data.shuffle = True  # reshuffled every epoch
  config.data.num_workers = 0  # input worker processes (0: in the training process)

  config.eval = ml_collections.ConfigDict()  # eval / infer / score, and eval during training
  config.eval.task = ''  # task evaluated ('' = data.task; a mixture needs one of its tasks)
  config.eval.split = 'validation'  # the split decoded and scored
  config.eval.num_examples = 0  # the first this many examples (0 = all)
  config.eval.batch_size = 32  # examples per batch (rounded up to the data-parallel size)
  config.eval.every_steps = 0  # during training: evaluate every this many steps (0 = never)
  config.eval.method = 'greedy'  # 'greedy', 'sample' or 'beam'
  config.eval.max_decode_length = 64  # generated tokens at most
  config.eval.num_beams = 4  # beam search width
  config.eval.alpha = 0.6  # beam search length penalty exponent
  config.eval.temperature = 1.0  # sampling temperature
  config.eval.top_k = 0  # sample among the k likeliest tokens (0 = all)
  config.eval.top_p = 1.0  # nucleus sampling mass
  config.eval.seed = 0  # sampling and few-shot draw seed
  config.eval.few_shot_k = 0  # decoder-only: prepend k solved examples to each input
  config.eval.few_shot_split = 'train'  # where those examples come from
  config.eval.candidates = ''  # comma-separated answers: rank-classify instead of decoding
  return config


def model_config(config: ml_collections.ConfigDict) -> models.ModelConfig:
  """The frozen `ModelConfig` described by a run config."""
  return models.ModelConfig.from_dict(config.model.to_dict())
