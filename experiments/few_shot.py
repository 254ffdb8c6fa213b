"""Few-shot in-context learning at CPU scale: a decoder-only language model pre-trained on the
bundled English text, then Rotten Tomatoes sentiment with k = 0, 1 and 4 shots by rank
classification.

Run from the repository root (one command; about 9 minutes on 2 idle CPU cores, estimated
from measured CPU time in experiments/tasks.md):

  python experiments/few_shot.py --workdir=runs/few_shot

It writes experiments/results/few_shot/results.md (+ results.csv). A finished pre-training
run in the workdir is reused, so a re-run only evaluates again.

1. Pre-training: `trainer.train` (what the CLI's `train` runs) on `lm_pretrain_text`, the
   bundled English paragraphs as one language-modelling stream (converter 'lm': causal,
   loss on every token), 150 steps of 16 packed rows of 512 tokens (1.2M tokens).
2. Evaluation, for each k in SHOTS and each shot-draw seed in SEEDS (k=0 draws nothing: one
   run): the run config's own eval fields, `eval.few_shot_k=k`, `eval.seed=seed`,
   `eval.candidates=negative,positive` (the labels found in the training split), read by
   `eval_commands.evaluator_from_config` as for the CLI's `eval`. Each test input becomes
   `preprocessors.few_shot_prompt`: k solved training examples ("sentiment: <review>" and
   its label) before the query; the prediction is the label whose summed log-likelihood
   (label tokens and EOS) after the prompt is highest (`evaluation.rank_classification`,
   through the same `score_batch` as the CLI's `score`), scored causally, as pre-trained.
3. Baseline: the training split's most frequent label, on the same test examples.

The shipped vocabulary turns newlines into spaces, so the shots are separated by their
"sentiment:" prefix only; it was trained on LibreOffice help text, so review English is spelt
in small pieces. Expect a small model to stay near the majority baseline.
"""

import argparse
import csv
import io
import os
import sys
import time

import ml_collections
import numpy as np

from t5x_lite import checkpoints, eval_commands, plots, presets, trainer
from t5x_lite.data import tasks

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results', 'few_shot')
PRETRAIN_STEPS = 150
LENGTH = 512  # pre-training sequence length; the longest prompt + label fits in it
SHOTS = (0, 1, 4)
SEEDS = (0, 1, 2)
TASK, SPLIT, NUM_EXAMPLES = 'sentiment_rt', 'test', 500


def pretrain_config() -> ml_collections.ConfigDict:
  """A Llama-layout decoder (d_model 128, 4 layers) as a causal LM on the bundled text."""
  config = presets.get('decoder_tiny')
  config.model.update(vocab_size=8192, d_model=128, num_heads=4, num_kv_heads=4, d_ff=512,
                      num_decoder_layers=4, dtype='bfloat16')
  config.data.update(task='lm_pretrain_text', converter='lm')
  config.data.feature_lengths = ml_collections.ConfigDict({'targets': LENGTH})
  config.train.update(num_steps=PRETRAIN_STEPS, batch_size=16, log_every=20,
                      checkpoint_every=200)
  config.optimizer.update(name='adamw', schedule='cosine', learning_rate=3e-3,
                          warmup_steps=PRETRAIN_STEPS // 10)
  return config


def prompt_length(k: int) -> int:
  """Input tokens kept for a k-shot prompt (its last ones, so the query stays whole): 128,
  192, 384 for k = 0, 1, 4, above the longest test prompts of seed 0 (110, 168, 299 tokens)
  and within the pre-training length; `prompts_cut` in the results counts any cut."""
  return min(64 * (k + 2), LENGTH - 8)


def labels() -> list[str]:
  """The label words: every distinct target of the training split."""
  task = tasks.get(TASK)
  source = task.source('train')
  return sorted({task.postprocess_fn(source[i]['label']) for i in range(len(source))})


def eval_config(config: ml_collections.ConfigDict, k: int, seed: int
                ) -> ml_collections.ConfigDict:
  """The pre-training config turned into a k-shot rank-classification evaluation."""
  run = config.copy_and_resolve_references()
  run.data.task = TASK
  run.data.feature_lengths = ml_collections.ConfigDict({'inputs': prompt_length(k),
                                                        'targets': 8})
  run.eval.update(split=SPLIT, num_examples=NUM_EXAMPLES, few_shot_k=k, seed=seed,
                  candidates=','.join(labels()), batch_size=16)
  return run


def evaluate(config: ml_collections.ConfigDict, workdir: str
             ) -> tuple[list[dict], dict[str, float], str]:
  """One row per (k, seed): accuracy, macro-F1, the share predicted positive, prompts cut;
  and the majority-label baseline (and its label) on the same examples."""
  partitioner = eval_commands.make_partitioner(config)
  params, _ = eval_commands.load_params(config, workdir, partitioner)
  task = tasks.get(TASK)
  label = eval_commands.majority_label(task)
  rows, baseline = [], None
  for k in SHOTS:
    for seed in SEEDS if k else SEEDS[:1]:
      evaluator = eval_commands.evaluator_from_config(eval_config(config, k, seed),
                                                      partitioner=partitioner)
      result = evaluator.evaluate(params)
      baseline = baseline or eval_commands.majority_class_baseline(task, result.rows, label)
      positive = [r['prediction'] == 'positive' for r in result.rows]
      rows.append({'k': k, 'seed': seed, **result.metrics,
                   'predicted_positive': 100 * sum(positive) / len(positive),
                   'prompts_cut': sum(len(e['inputs']) > prompt_length(k)
                                      for e in evaluator.examples),
                   'examples': len(result.rows)})
      print(rows[-1], flush=True)
  return rows, baseline, label


def report(rows: list[dict], baseline: dict[str, float], label: str, final_loss: float,
           minutes: float) -> str:
  """The results table in markdown: mean ± std over shot draws per k, then every run."""
  n = rows[0]['examples']
  lines = ['# Few-shot sentiment by rank classification (experiments/few_shot.py)', '',
           f'Decoder-only LM (d_model 128, 4 layers, Llama layout) pre-trained for '
           f'{PRETRAIN_STEPS} steps on the bundled English text (final train loss '
           f'{final_loss:.2f}); {TASK} {SPLIT}, the first {n} examples; accuracy in %, '
           f'mean ± std over {len(SEEDS)} shot draws (k=0 has none). Binomial standard error '
           f'of one accuracy near 50%: ±{100 * (0.25 / n) ** 0.5:.1f}. '
           f'{minutes:.1f} minutes in all.', '',
           '| k | accuracy | macro-F1 | predicted positive |', '|---:|---:|---:|---:|']
  for k in SHOTS:
    runs = [r for r in rows if r['k'] == k]
    cells = [np.array([r[key] for r in runs]) for key in ('accuracy', 'macro_f1',
                                                          'predicted_positive')]
    lines.append(f'| {k} | ' + ' | '.join(
        f'{c.mean():.1f}' + (f' ± {c.std(ddof=1):.1f}' if len(c) > 1 else '') for c in cells)
        + ' |')
  lines.append(f'| majority ("{label}") | {baseline["accuracy"]:.1f} | '
               f'{baseline["macro_f1"]:.1f} | {100.0 * (label == "positive"):.1f} |')
  lines += ['', 'Every run:', '', '| k | seed | accuracy | macro-F1 | prompts cut |',
            '|---:|---:|---:|---:|---:|']
  lines += [f'| {r["k"]} | {r["seed"]} | {r["accuracy"]:.1f} | {r["macro_f1"]:.1f} | '
            f'{r["prompts_cut"]} |' for r in rows]
  return '\n'.join(lines) + '\n'


def main(argv):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--workdir', default='runs/few_shot')
  args = parser.parse_args(argv)
  start = time.time()
  config = pretrain_config()
  step = checkpoints.latest_step(os.path.join(args.workdir, 'checkpoints'))
  if step is None or step < PRETRAIN_STEPS:
    trainer.train(config, args.workdir)
  rows, baseline, label = evaluate(config, args.workdir)
  final_loss = plots.read_metrics(args.workdir)[-1]['loss']
  text = report(rows, baseline, label, final_loss, (time.time() - start) / 60)
  os.makedirs(RESULTS, exist_ok=True)
  buffer = io.StringIO()
  writer = csv.DictWriter(buffer, list(rows[0]), lineterminator='\n')
  writer.writeheader()
  writer.writerows(rows)
  with open(os.path.join(RESULTS, 'results.csv'), 'w', encoding='utf-8') as f:
    f.write(buffer.getvalue())
  with open(os.path.join(RESULTS, 'results.md'), 'w', encoding='utf-8') as f:
    f.write(text)
  print(text)


if __name__ == '__main__':
  main(sys.argv[1:])
