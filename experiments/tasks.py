"""Every bundled task trained from scratch: a small T5.1.1 on all six, a decoder-only prefix-LM
on three, each beside its trivial baseline.

Run from the repository root (one command: the sweep, then the report):

  python experiments/tasks.py --workdir=runs/tasks --parallel=2

It writes experiments/results/tasks/results.md (+ results.csv, loss_curves.png). The trials
alone are an ordinary sweep (`python -m t5x_lite.main sweep --sweep=experiments/tasks.py
--workdir=runs/tasks --parallel=2`); `--report_only` rebuilds the report from finished
trials. Re-running resumes unfinished trials.

The recipe, chosen to fit 25 minutes on 2 cores with --parallel=2 (about 20 minutes on an
idle machine, estimated from each trial's measured CPU time: experiments/tasks.md):
* model: the quickstart's T5.1.1 (d_model 128, 2+2 layers, 2 heads of 64, d_ff 512,
  vocabulary 8,192, bfloat16 activations), from scratch: no pre-trained checkpoint exists
  offline, so "fine-tuning" here is training on each task alone;
* decoder-only: the same T5.1.1 layers (relative position bias, gated GELU) as a 2-layer
  prefix-LM over inputs + targets (converter 'prefix_lm': bidirectional over the input):
  the T5 paper's prefix-LM row, L layers against the encoder-decoder's L + L (2.6M against
  3.3M parameters here, the embeddings dominating; its layers do about the same work per
  example, but logits over the input positions make its steps 1.3-2x dearer). It runs on
  translate_en_de, summarize_debian and classify_debian_section: one task of each output
  kind (translation, summary, class label), the three of the T5 paper's Table 2
  (experiments/t5_table2.py); en→fr and en→zh would repeat translation, sentiment_rt
  classification;
* 200 Adafactor steps of 32 packed rows, learning rate 0.08 (best train loss at 200 steps
  in experiments/lr_size.py), cosine decay after 10% warmup;
* per-task feature lengths from the train split's token counts (Debian descriptions are cut
  to their first 128 tokens; the shipped English/German vocabulary spells French and Chinese
  in many pieces, so their targets get 128), greedy decoding of the first `num_examples`
  test examples (classification too: the label is decoded, as in T5);
* baselines on the same test examples, computed from the data: the input without its task
  prefix for generation tasks (`eval_commands.copy_input_baseline`), the training split's
  most frequent label for classification (`eval_commands.majority_class_baseline`).
"""

import argparse
import csv
import dataclasses
import io
import os
import shutil
import sys
import time

from t5x_lite import eval_commands, evaluation, models, presets, sweeps
from t5x_lite import config as config_lib
from t5x_lite.data import tasks

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results', 'tasks')
STEPS = 200


@dataclasses.dataclass(frozen=True)
class Spec:
  """How one task is trained and scored."""

  inputs: int  # feature length of the inputs (tokens)
  targets: int  # of the targets, and the most tokens decoded
  num_examples: int  # the first this many test examples are evaluated
  baseline: str  # 'copy' (the input) or 'majority' (the commonest training label)
  metrics: tuple[str, ...]  # the task's metrics, in table order


TRANSLATION = ('bleu',)
CLASSIFICATION = ('accuracy', 'macro_f1')
TASKS = {
    'translate_en_de': Spec(64, 64, 200, 'copy', TRANSLATION),
    'translate_en_fr': Spec(64, 128, 200, 'copy', TRANSLATION),
    'translate_en_zh': Spec(64, 128, 200, 'copy', TRANSLATION),
    'summarize_debian': Spec(128, 32, 300, 'copy', ('rouge1', 'rouge2', 'rougeLsum')),
    'classify_debian_section': Spec(128, 8, 500, 'majority', CLASSIFICATION),
    'sentiment_rt': Spec(96, 4, 500, 'majority', CLASSIFICATION),
}
DECODER_TASKS = ('translate_en_de', 'summarize_debian', 'classify_debian_section')
ARCHITECTURES = {'encoder_decoder': 'enc_dec', 'decoder_only': 'prefix_lm'}  # -> converter
# The runner starts trials in list order as cores free up: longest first (measured step
# costs in experiments/tasks.md) keeps both cores busy to the end.
ORDER = [('translate_en_fr', 'encoder_decoder'), ('translate_en_zh', 'encoder_decoder'),
         ('summarize_debian', 'decoder_only'), ('classify_debian_section', 'decoder_only'),
         ('translate_en_de', 'decoder_only'), ('translate_en_de', 'encoder_decoder'),
         ('summarize_debian', 'encoder_decoder'),
         ('classify_debian_section', 'encoder_decoder'), ('sentiment_rt', 'encoder_decoder')]


def get_config():
  """The base run: the quickstart model and optimiser, shortened (see the docstring)."""
  config = presets.get('quickstart')
  config.train.update(num_steps=STEPS, batch_size=32, log_every=10, checkpoint_every=100)
  config.optimizer.update(learning_rate=0.08, warmup_steps=STEPS // 10)
  config.eval.split = 'test'
  return config


def overrides(task: str, architecture: str) -> sweeps.Overrides:
  """One trial: `task` on `architecture` with the task's lengths and evaluation subset."""
  spec = TASKS[task]
  return {'data.task': task, 'model.architecture': architecture,
          'data.converter': ARCHITECTURES[architecture],
          'data.feature_lengths.inputs': spec.inputs,
          'data.feature_lengths.targets': spec.targets,
          'eval.max_decode_length': spec.targets, 'eval.num_examples': spec.num_examples}


def get_sweep():
  """Every task on the encoder-decoder, DECODER_TASKS on the decoder-only model: 9 trials."""
  return [overrides(task, architecture) for task, architecture in ORDER]


# ------------------------------------------------------------------------------- report


def baseline(task_name: str) -> tuple[dict[str, float], int]:
  """The task's trivial baseline on its evaluation examples, and how many there are."""
  spec, task = TASKS[task_name], tasks.get(task_name)
  rows = [{'input': e['inputs_pretokenized'], 'target': e['targets_pretokenized']}
          for e in evaluation.load_examples(task, get_config().eval.split, spec.num_examples)]
  if spec.baseline == 'copy':
    return eval_commands.copy_input_baseline(task, rows), len(rows)
  label = eval_commands.majority_label(task)
  return eval_commands.majority_class_baseline(task, rows, label), len(rows)


def _evaluated(trial_dir: str, task_name: str) -> int | None:
  """Rows in the trial's eval output (None before its eval ran)."""
  path = os.path.join(trial_dir, f'eval_{task_name}_{get_config().eval.split}.jsonl')
  if not os.path.exists(path):
    return None
  with open(path, encoding='utf-8') as f:
    return sum(1 for _ in f)


def table_rows(workdir: str, trials: list[sweeps.Trial]) -> tuple[list[dict], list[dict]]:
  """(one row per task and metric: each architecture's score and the baseline's;
  one row per trial: its size, steps, loss, time and status)."""
  by_task, runs = {}, []
  for trial in trials:
    task, architecture = trial.overrides['data.task'], trial.overrides['model.architecture']
    row = sweeps.trial_row(os.path.join(workdir, trial.name), trial.overrides)
    params = models.count_params(models.param_shapes(config_lib.model_config(trial.config)))
    runs.append({'task': task, 'architecture': architecture, 'params': params,
                 'steps': row['steps'], 'train_loss': row['train_loss'],
                 'wall_time_s': _rounded(row['wall_time_s']),
                 'tokens_per_s': _rounded(row['tokens_per_s']), 'status': row['status']})
    by_task.setdefault(task, {})[architecture] = (row, _evaluated(
        os.path.join(workdir, trial.name), task))
  runs.sort(key=lambda r: (list(TASKS).index(r['task']), list(ARCHITECTURES).index(
      r['architecture'])))
  metrics = []
  for task in (task for task in TASKS if task in by_task):
    spec = TASKS[task]
    scores, count = baseline(task)
    for architecture, (_, evaluated) in by_task[task].items():
      if evaluated not in (None, count):
        raise ValueError(f'{task} {architecture}: evaluated {evaluated} examples, the '
                         f'baseline {count}; re-run its eval')
    for metric in spec.metrics:
      metrics.append({
          'task': task, 'metric': metric,
          **{arch: by_task[task][arch][0].get(f'eval_{metric}') if arch in by_task[task]
             else None for arch in ARCHITECTURES},
          'baseline': scores[metric], 'baseline_kind': spec.baseline, 'examples': count})
  return metrics, runs


def _rounded(value: float | None) -> int | None:
  return None if value is None else round(value)


def _cell(value) -> str:
  if value is None:
    return ''
  if isinstance(value, float):
    return f'{value:.2f}'
  return f'{value:,}' if isinstance(value, int) else str(value)


def _markdown(rows: list[dict], columns: list[str]) -> list[str]:
  return (['| ' + ' | '.join(columns) + ' |',
           '|' + '|'.join('---' if c in ('task', 'metric', 'architecture', 'status',
                                         'baseline_kind') else '---:' for c in columns) + '|']
          + ['| ' + ' | '.join(_cell(row[c]) for c in columns) + ' |' for row in rows])


def write_report(workdir: str, trials: list[sweeps.Trial], wall_minutes: float | None = None
                 ) -> str:
  """results.md / results.csv (and the sweep's loss curves) in RESULTS; returns the text."""
  metrics, runs = table_rows(workdir, trials)
  os.makedirs(RESULTS, exist_ok=True)
  columns = ['task', 'metric', *ARCHITECTURES, 'baseline', 'baseline_kind', 'examples']
  buffer = io.StringIO()
  writer = csv.DictWriter(buffer, columns, lineterminator='\n')
  writer.writeheader()
  writer.writerows(metrics)
  with open(os.path.join(RESULTS, 'results.csv'), 'w', encoding='utf-8') as f:
    f.write(buffer.getvalue())
  config = get_config()
  lines = ['# Every bundled task, trained from scratch (experiments/tasks.py)', '',
           f'{config.train.num_steps} steps of {config.train.batch_size} packed rows per '
           'trial, greedy decoding of the first test examples; baselines on the same '
           'examples: copy = the input without its task prefix, majority = the training '
           "split's most frequent label. Scores are percentages (sacrebleu BLEU, ROUGE F1, "
           'accuracy, macro-F1).', '',
           *_markdown(metrics, columns), '',
           *_markdown(runs, list(runs[0])), '']
  if wall_minutes is not None:
    lines += [f'Wall time of the whole command: {wall_minutes:.1f} minutes.', '']
  text = '\n'.join(lines)
  with open(os.path.join(RESULTS, 'results.md'), 'w', encoding='utf-8') as f:
    f.write(text)
  curves = os.path.join(workdir, 'loss_curves.png')
  if os.path.exists(curves):
    shutil.copy(curves, os.path.join(RESULTS, 'loss_curves.png'))
  return text


def main(argv):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--workdir', default='runs/tasks')
  parser.add_argument('--parallel', type=int, default=2)
  parser.add_argument('--report_only', action='store_true',
                      help='tabulate finished trials without running any')
  parser.add_argument('--dry_run', action='store_true', help="print the trials' commands")
  args = parser.parse_args(argv)
  start, path = time.time(), os.path.relpath(__file__)
  code = sweeps.run_sweep(path, args.workdir, parallel=args.parallel, dry_run=args.dry_run,
                          report_only=args.report_only)
  if args.dry_run:
    return code
  wall = None if args.report_only else (time.time() - start) / 60
  print(write_report(args.workdir, sweeps.make_trials(path), wall))
  return code


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
