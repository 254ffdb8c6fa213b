"""The T5 paper's Table 2 at CPU scale: architectures x pre-training objectives, 3 seeds.

Raffel et al. 2020 ("Exploring the limits of transfer learning with a unified text-to-text
transformer"), Table 2. Run (SCALES['cpu']: see experiments/t5_table2.md for its timing):

  python -m t5x_lite.main sweep --sweep=experiments/t5_table2.py --workdir=runs/t5_table2 \\
      --parallel=2

and `--sweep=experiments/t5_table2.py:tpu` for the v4-8-sized setting (run the same command
on the TPU VM itself; it is only dry-run-tested here). It writes, besides the sweep's own
per-trial table in the workdir, experiments/results/t5_table2/results.md (the paper's layout:
rows architecture x objective, columns tasks, mean ± std over seeds), results.csv and
table2.png. `--report_only` rebuilds them from the workdir.

Architectures (one T5.1.1 layer layout throughout: pre-norm, gated GELU, relative position
bias, tied embeddings), L layers as in the paper's P / M accounting:
  enc_dec        encoder-decoder, L + L layers               2P params, M FLOPs
  enc_dec_half   encoder-decoder, L/2 + L/2 layers            P params, M/2 FLOPs
  lm             decoder-only, L layers, causal over input + target (converter causal_lm)
  prefix_lm      decoder-only, L layers, bidirectional over the input (converter prefix_lm)
Objectives: T5 span corruption (15% noise, mean span 3), the prefix-LM objective (a chunk of
text split at a uniform random point, the start predicts the rest: the enc-dec reads the
start in its encoder, the LM causally, the prefix-LM both ways), and no pre-training.
Every (architecture, objective, seed s) pre-trained model is fine-tuned with seed s, each
task on its own, from its checkpoint (`train.init_from`) and evaluated on the first
`eval_examples` of the task's validation split: translate_en_de (BLEU),
summarize_debian (ROUGE-Lsum), classify_debian_section (accuracy of the decoded label).
"""

import csv
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np
from etils import epath

from t5x_lite import config as base
from t5x_lite import losses, models, plots, sweeps
from t5x_lite.data import preprocessors, tasks, vocabularies

RESULTS = epath.Path(__file__).parent / 'results'
SEEDS = (0, 1, 2)  # pre-training seed s -> fine-tuning seed s
# Where write_results puts the table of each scale: experiments/results/<dir>, else
# <workdir>/table2.
RESULT_DIRS = {'cpu': 't5_table2', 'tpu': 't5_table2_tpu'}

# Per scale: the model (the paper's L layers, one T5.1.1 layout), pre-training (span
# corruption's inputs length fixes the text chunk both objectives read; packing puts ~2.6 LM
# chunks in a row and ~1.5 span-corruption ones, so `lm_batch` rows hold about as many chunks
# as `pretrain_batch` rows), fine-tuning (per task) and evaluation (the first `eval_examples`
# of the validation split).
SCALES = {
    'cpu': dict(d_model=64, num_heads=4, head_dim=16, d_ff=256, layers=2, dtype='bfloat16',
                # 2k ids: with 8k the output layer and softmax took most of every step
                vocabulary='small_2k.model', vocab_size=2176,
                corruption_inputs=48, pretrain_steps=1000, pretrain_batch=32, lm_batch=18,
                learning_rate=0.2, warmup_steps=50,  # rsqrt: 0.028 to step 50, 0.0063 at 1000
                finetune_steps=250, finetune_batch=16, finetune_learning_rate=0.01,
                translate_length=64, summary_inputs=64, summary_targets=24,
                eval_examples=200, eval_batch_size=200),
    # T5.1.1-base-shaped (L = 12, as the paper), on a v4-8's 4 chips, data parallel.
    'tpu': dict(d_model=768, num_heads=12, head_dim=64, d_ff=2048, layers=12, dtype='bfloat16',
                vocabulary='bundled_32k.model', vocab_size=32128,
                corruption_inputs=512, pretrain_steps=65536, pretrain_batch=128, lm_batch=80,
                learning_rate=1.0, warmup_steps=10000,  # T5's 0.01 to 10k, then 1/sqrt(step)
                finetune_steps=16384, finetune_batch=128, finetune_learning_rate=0.001,
                translate_length=128, summary_inputs=512, summary_targets=64,
                eval_examples=0, eval_batch_size=128),
    # The two-stage flow in seconds (tests/test_t5_table2.py): one cell, one seed.
    'smoke': dict(d_model=16, num_heads=2, head_dim=8, d_ff=32, layers=2, dtype='float32',
                  vocabulary='small_2k.model', vocab_size=2176,
                  corruption_inputs=16, pretrain_steps=2, pretrain_batch=4, lm_batch=4,
                  learning_rate=0.2, warmup_steps=1,
                  finetune_steps=2, finetune_batch=4, finetune_learning_rate=0.005,
                  translate_length=16, summary_inputs=16, summary_targets=8,
                  eval_examples=4, eval_batch_size=4,
                  architectures=('enc_dec_half',), objectives=('denoising',),
                  tasks=('classify_debian_section',), seeds=(0,)),
}

ARCHITECTURES = {  # name -> (table label, model fields, converter) given L layers
    'enc_dec': ('Encoder-decoder (L+L)', lambda n: dict(
        architecture='encoder_decoder', num_encoder_layers=n, num_decoder_layers=n), 'enc_dec'),
    'enc_dec_half': ('Enc-dec, L/2+L/2 layers', lambda n: dict(
        architecture='encoder_decoder', num_encoder_layers=n // 2,
        num_decoder_layers=n // 2), 'enc_dec'),
    'lm': ('Language model (L)', lambda n: dict(
        architecture='decoder_only', num_encoder_layers=0, num_decoder_layers=n), 'causal_lm'),
    'prefix_lm': ('Prefix LM (L)', lambda n: dict(
        architecture='decoder_only', num_encoder_layers=0, num_decoder_layers=n), 'prefix_lm'),
}
OBJECTIVES = {'denoising': 'Denoising', 'lm': 'LM', 'none': 'No pre-training'}
# task -> (table label, metric key in the eval records)
TASKS = {'translate_en_de': ('EnDe BLEU', 'bleu'),
         'summarize_debian': ('Debian summary ROUGE-L', 'rougeLsum'),
         'classify_debian_section': ('Debian section accuracy', 'accuracy')}


def _cells(scale: str) -> tuple[list[str], list[str], list[str], tuple[int, ...]]:
  """The architectures, objectives, tasks and seeds a scale runs (default: all)."""
  settings = SCALES[scale]
  return (list(settings.get('architectures', ARCHITECTURES)),
          list(settings.get('objectives', OBJECTIVES)), list(settings.get('tasks', TASKS)),
          tuple(settings.get('seeds', SEEDS)))


def _pretraining_tasks(scale: str) -> dict[str, tuple[str, dict[str, int], int]]:
  """objective -> (registered task, feature lengths, batch rows), both made from the same
  chunk length: span corruption's inputs_length fixes the raw chunk (52 tokens for 48),
  which the LM objective splits in two (each part with its EOS)."""
  settings = SCALES[scale]
  inputs = settings['corruption_inputs']
  chunk, targets = preprocessors.random_spans_helper(inputs)
  names = {'denoising': f'span_corruption_pretrain_text_{inputs}',
           'lm': f'prefix_lm_pretrain_text_{chunk}'}
  # Registered again at every load (the runner and each trial load this file).
  tasks.register(tasks.span_corruption_task(names['denoising'], 'pretrain_text',
                                            inputs_length=inputs), overwrite=True)
  tasks.register(tasks.language_modeling_task(names['lm'], 'pretrain_text', 'prefix_lm',
                                              max_length=chunk), overwrite=True)
  return {'denoising': (names['denoising'], {'inputs': inputs, 'targets': targets},
                        settings['pretrain_batch']),
          'lm': (names['lm'], {'inputs': chunk, 'targets': chunk},  # each part < chunk + EOS
                 settings['lm_batch'])}


def _finetuning_lengths(scale: str) -> dict[str, dict[str, int]]:
  settings = SCALES[scale]
  translate, summary = settings['translate_length'], settings['summary_inputs']
  return {'translate_en_de': {'inputs': translate, 'targets': translate},
          'summarize_debian': {'inputs': summary, 'targets': settings['summary_targets']},
          'classify_debian_section': {'inputs': summary, 'targets': 8}}


def get_config(scale: str = 'cpu') -> ml_collections.ConfigDict:
  """The shared run config: the model layout and training recipe; trials set the rest."""
  if scale not in SCALES:
    raise ValueError(f'unknown scale {scale!r}; use experiments/t5_table2.py:cpu or :tpu')
  settings = SCALES[scale]
  _pretraining_tasks(scale)
  config = base.base_config(
      base.T5_1_1, vocab_size=settings['vocab_size'], d_model=settings['d_model'],
      num_heads=settings['num_heads'], head_dim=settings['head_dim'], d_ff=settings['d_ff'],
      num_encoder_layers=settings['layers'], num_decoder_layers=settings['layers'],
      logits_via_embedding=True,  # the paper's T5 ties input embedding and output layer
      dtype=settings['dtype'])  # activations; params, softmax and loss stay float32
  config.train.update(batch_size=settings['finetune_batch'], log_every=50,
                      checkpoint_every=settings['pretrain_steps'], keep_checkpoints=1)
  config.optimizer.update(name='adafactor', learning_rate=settings['learning_rate'],
                          warmup_steps=settings['warmup_steps'])
  config.eval.update(split='validation', num_examples=settings['eval_examples'],
                     batch_size=settings['eval_batch_size'])
  config.data.vocabulary = os.fspath(vocabularies.VOCABS_DIR / settings['vocabulary'])
  return config


def _plan(scale: str) -> list[tuple[dict[str, Any], dict[str, Any]]]:
  """Every trial as (labels: stage, arch, objective, task, seed; its overrides): the
  pre-training runs first, then the fine-tuning runs that build on them."""
  settings = SCALES[scale]
  architectures, objectives, task_names, seeds = _cells(scale)
  pretraining = _pretraining_tasks(scale)
  plan, pretrained = [], {}
  for arch in architectures:
    _, model_fields, converter = ARCHITECTURES[arch]
    # What tells trials apart comes first: it is what their (shortened) names show.
    model = {'data.converter': converter,
             **{f'model.{k}': v for k, v in model_fields(settings['layers']).items()}}
    for objective in objectives:
      if objective == 'none':
        continue
      task, lengths, batch_size = pretraining[objective]
      for seed in seeds:
        overrides = {'data.task': task, 'seed': seed, **model,
                     'train.num_steps': settings['pretrain_steps'],
                     'train.batch_size': batch_size,
                     **{f'data.feature_lengths.{k}': v for k, v in lengths.items()}}
        pretrained[arch, objective, seed] = overrides
        plan.append((dict(stage='pretrain', arch=arch, objective=objective, seed=seed),
                     overrides))
    for objective in objectives:
      for task in task_names:
        lengths = _finetuning_lengths(scale)[task]
        for seed in seeds:
          overrides = {
              'data.task': task, 'seed': seed, **model,
              'train.num_steps': settings['finetune_steps'],
              'train.checkpoint_every': settings['finetune_steps'],
              'optimizer.schedule': 'constant',  # T5's fine-tuning schedule
              'optimizer.learning_rate': settings['finetune_learning_rate'],
              'eval.every_steps': settings['finetune_steps'],  # one eval, in the train process
              'eval.max_decode_length': lengths['targets'],
              **{f'data.feature_lengths.{k}': v for k, v in lengths.items()}}
          if objective != 'none':
            overrides['train.init_from'] = sweeps.trial_path(
                pretrained[arch, objective, seed], 'checkpoints')
          plan.append((dict(stage='finetune', arch=arch, objective=objective, task=task,
                            seed=seed), overrides))
  return plan


def get_sweep(scale: str = 'cpu') -> list[dict[str, Any]]:
  """24 pre-training then 108 fine-tuning trials (4 architectures x 3 objectives x 3 tasks
  x 3 seeds; the 'none' objective fine-tunes from scratch)."""
  return [overrides for _, overrides in _plan(scale)]


# ------------------------------------------------------------------------------ results


Cost = tuple[int, int, float, float]  # params, without embedding, FLOPs, without logits


def _model_cost(scale: str, arch: str) -> Cost:
  """Params (all; without the embedding) and training FLOPs per en-de example at its
  feature lengths (all; without the output layer, which the paper's M leaves out):
  MaxText's per-token count (losses.model_flops_per_token) times the positions it is
  charged to: the targets (enc-dec) or inputs + targets (decoder-only)."""
  config = get_config(scale)
  config.model.update(ARCHITECTURES[arch][1](SCALES[scale]['layers']))
  model_config = base.model_config(config)
  shapes = models.param_shapes(model_config)
  total = models.count_params(shapes)
  lengths = _finetuning_lengths(scale)['translate_en_de']
  if model_config.architecture == 'encoder_decoder':
    positions = lengths['targets']
    per_token = losses.model_flops_per_token(model_config, lengths['inputs'], positions)
  else:
    positions = lengths['inputs'] + lengths['targets']
    per_token = losses.model_flops_per_token(model_config, positions)
  logits = 6 * model_config.d_model * model_config.vocab_size * positions  # fwd + bwd
  flops = per_token * positions
  return (total, total - models.count_params(shapes['token_embedder']), flops,
          flops - logits)


def _stats(values: Sequence[float]) -> tuple[float, float, int]:
  """Mean, sample standard deviation (ddof 1) and count."""
  values = np.asarray(values, np.float64)
  std = float(values.std(ddof=1)) if len(values) > 1 else 0.0
  return float(values.mean()), std, len(values)


def _beyond_noise(a: tuple[float, float, int], b: tuple[float, float, int]) -> bool:
  """Whether two (mean, std, n) cells differ by more than twice the standard error of the
  difference of their means (about a two-sided 5-10% test for 3 seeds each); never for a
  cell of one seed, whose noise is unknown."""
  if min(a[2], b[2]) < 2:
    return False
  standard_error = math.sqrt(a[1] ** 2 / a[2] + b[1] ** 2 / b[2])
  return abs(a[0] - b[0]) > 2 * standard_error


def _compare(cells: Mapping[tuple[str, str, str], tuple[float, float, int]],
             pairs: Sequence[tuple[tuple[str, str], tuple[str, str]]]) -> tuple[int, int, int]:
  """Over every task and (first, second) (arch, objective) pair: how often the first is
  better beyond noise, within noise, worse beyond noise."""
  better = tie = worse = 0
  for task in TASKS:
    for first, second in pairs:
      a, b = cells.get((*first, task)), cells.get((*second, task))
      if a is None or b is None:
        continue
      if not _beyond_noise(a, b):
        tie += 1
      elif a[0] > b[0]:
        better += 1
      else:
        worse += 1
  return better, tie, worse


def findings(cells: Mapping[tuple[str, str, str], tuple[float, float, int]]) -> list[str]:
  """Five lines: the paper's findings, each checked against these numbers."""
  lines, where = [], []
  for task, (label, _) in TASKS.items():
    ranked = sorted(((v, k[:2]) for k, v in cells.items() if k[2] == task), reverse=True)
    ours = cells.get(('enc_dec', 'denoising', task))
    if ours is None:
      continue
    (top, top_cell), rest = ranked[0], ranked[1:]
    if top_cell == ('enc_dec', 'denoising'):
      clear = bool(rest) and _beyond_noise(top, rest[0][0])
      where.append(f'{label}: best' + (', beyond noise of the next' if clear
                                        else ', within noise of the next'))
    else:
      near = 'within noise of' if not _beyond_noise(ours, top) else 'below, beyond noise,'
      where.append(f'{label}: {near} the best ({"/".join(top_cell)})')
  lines.append('1. Paper: encoder-decoder + denoising is best. Here it is: '
               f'{"; ".join(where)}.')

  def verdict(number: int, text: str, pairs) -> str:
    better, tie, worse = _compare(cells, pairs)
    if better > worse and better >= tie:
      word = 'holds'
    elif worse > better and worse >= tie:
      word = 'reversed'
    else:
      word = 'not shown beyond seed noise'
    return (f'{number}. Paper: {text}. Here: {word} (better beyond seed noise in {better} '
            f'of {better + tie + worse} comparisons, within noise in {tie}, worse in {worse}).')

  archs = list(ARCHITECTURES)
  lines.append(verdict(2, 'denoising beats the LM objective (same architecture)',
                       [((a, 'denoising'), (a, 'lm')) for a in archs]))
  lines.append(verdict(3, 'the prefix LM beats the causal LM architecture (same objective)',
                       [(('prefix_lm', o), ('lm', o)) for o in OBJECTIVES]))
  lines.append(verdict(4, 'the L+L encoder-decoder beats the L/2+L/2 one (same objective)',
                       [(('enc_dec', o), ('enc_dec_half', o)) for o in OBJECTIVES]))
  lines.append(verdict(5, 'pre-training (either objective) beats none (same architecture)',
                       [((a, o), (a, 'none')) for a in archs for o in ('denoising', 'lm')]))
  return lines


def write_results(workdir: epath.PathLike, rows: Sequence[Mapping[str, Any]],
                  scale: str = 'cpu') -> list[epath.Path]:
  """results.md (the paper's layout), results.csv and table2.png from the sweep's rows, in
  experiments/results/ (RESULT_DIRS) or, for other scales, <workdir>/table2."""
  labels = {sweeps.trial_name(o): l for l, o in _plan(scale)}
  values = {}  # (arch, objective, task) -> the metric of each finished seed
  wall = {'pretrain': 0.0, 'finetune': 0.0}
  for row in rows:
    label = labels.get(row['trial'])
    if label is None:
      continue
    wall[label['stage']] += row.get('wall_time_s') or 0.0
    if label['stage'] == 'finetune' and row['status'] == sweeps.FINISHED:
      metric = row.get(f'eval_{TASKS[label["task"]][1]}')
      if metric is not None:
        values.setdefault((label['arch'], label['objective'], label['task']), []).append(metric)
  cells = {key: _stats(v) for key, v in values.items()}
  architectures, objectives, task_names, seeds = _cells(scale)
  out = (RESULTS / RESULT_DIRS[scale] if scale in RESULT_DIRS
         else epath.Path(workdir) / 'table2')
  out.mkdir(parents=True, exist_ok=True)
  costs = {arch: _model_cost(scale, arch) for arch in architectures}
  csv_rows = [{'architecture': arch, 'objective': objective, 'task': task,
               'metric': TASKS[task][1], 'mean': m, 'std': s, 'seeds': n,
               'params': costs[arch][0], 'params_without_embedding': costs[arch][1],
               'train_flops_per_example': costs[arch][2],
               'train_flops_per_example_without_logits': costs[arch][3]}
              for (arch, objective, task), (m, s, n) in sorted(cells.items())]
  with (out / 'results.csv').open('w') as f:
    writer = csv.DictWriter(f, list(csv_rows[0]) if csv_rows else ['architecture'],
                            lineterminator='\n')
    writer.writeheader()
    writer.writerows(csv_rows)
  (out / 'results.md').write_text(_markdown(scale, cells, costs, wall))
  # Two-line group labels: four one-line ones overlap under a panel.
  group_label = lambda arch: ARCHITECTURES[arch][0].replace(' (', '\n(').replace(', ', '\n')
  panels = {TASKS[task][0]: {group_label(arch): {OBJECTIVES[o]: cells[arch, o, task][:2]
                                                 for o in objectives if (arch, o, task) in cells}
                             for arch in architectures} for task in task_names}
  figure = plots.plot_grouped_bars(
      panels, out / 'table2.png',
      title=f'T5 Table 2 at {scale} scale: mean ± std over {len(seeds)} seeds')
  return [out / 'results.csv', out / 'results.md', figure]


def _markdown(scale: str, cells: Mapping[tuple[str, str, str], tuple[float, float, int]],
              costs: Mapping[str, Cost], wall: Mapping[str, float]) -> str:
  """The paper's layout: a row per (architecture, objective), a column per task."""
  settings = SCALES[scale]
  architectures, objectives, task_names, seeds = _cells(scale)
  lines = [
      f'# T5 paper Table 2 at {scale} scale (experiments/t5_table2.py)', '',
      f'L = {settings["layers"]}, d_model {settings["d_model"]}, '
      f'{settings["num_heads"]} heads x {settings["head_dim"]}, d_ff {settings["d_ff"]}; '
      f'pre-training {settings["pretrain_steps"]} steps of {settings["pretrain_batch"]} '
      f'rows (span corruption) or {settings["lm_batch"]} (LM objective), fine-tuning '
      f'{settings["finetune_steps"]} steps of {settings["finetune_batch"]} rows per task; '
      f'mean ± std over seeds {", ".join(map(str, seeds))} (n = seeds finished, if fewer); '
      f'metrics on the first {settings["eval_examples"] or "all"} validation examples. '
      f'Trial wall time summed: pre-training {wall["pretrain"] / 60:.0f} min, fine-tuning '
      f'{wall["finetune"] / 60:.0f} min. FLOPs: training FLOPs per en-de example at its '
      'feature lengths (in brackets: without the output layer, as the paper counts M).', '',
      '| Architecture | Objective | Params (without embedding) | FLOPs / example | '
      + ' | '.join(TASKS[task][0] for task in task_names) + ' |',
      '|---|---|---:|---:|' + '---:|' * len(task_names)]
  for arch in architectures:
    total, body, flops, layer_flops = costs[arch]
    for objective in objectives:
      entries = []
      for task in task_names:
        cell = cells.get((arch, objective, task))
        entries.append('' if cell is None else f'{cell[0]:.2f} ± {cell[1]:.2f}'
                       + ('' if cell[2] == len(seeds) else f' (n={cell[2]})'))
      lines.append(f'| {ARCHITECTURES[arch][0]} | {OBJECTIVES[objective]} | '
                   f'{total / 1e6:.2f}M ({body / 1e6:.3f}M) | '
                   f'{flops / 1e6:.0f}M ({layer_flops / 1e6:.0f}M) | '
                   + ' | '.join(entries) + ' |')
  lines += ['', 'Beyond seed noise = the two means differ by more than twice the standard '
            'error of their difference.', '', *findings(cells)]
  return '\n'.join(lines) + '\n'
