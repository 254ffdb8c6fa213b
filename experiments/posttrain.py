"""Post-training end to end at tiny scale: SFT -> reward model -> DPO, on 2 CPU cores.

Run from the repository root (about 25 minutes on 2 CPU cores):

  python experiments/posttrain.py --workdir=runs/posttrain

It writes experiments/results/posttrain/results.md (and results.json). Every stage is the
CLI's own machinery called in-process: `trainer.train` (SFT, then `train.objective=reward`,
then `dpo`), `eval_commands.run_infer` / `run_eval` for greedy decoding and task metrics,
`posttrain.evaluate_pairs` for held-out pairs. Stages whose workdir holds a finished run are
skipped, so re-running resumes.

1. SFT (`sft_mix`: the four bundled instruction tasks) for `WEAK_STEPS`, then greedy samples
   of that weak checkpoint on train and validation prompts, then SFT on to `SFT_STEPS`
   (resumed in the same workdir).
2. Preference pairs, chosen = the corpus's real answer, rejected = (a) the real answer to a
   different prompt, or (b) the weak checkpoint's sample where it differs from the answer.
3. A reward model (`model.reward_head=True`) initialised from SFT, Bradley-Terry on (a)+(b).
4. DPO from SFT with the SFT model as frozen reference, on the same pairs.
5. Held out: RM pairwise accuracy on (a) and (b) validation pairs; DPO reward accuracy and
   margins there; greedy samples of SFT and DPO on validation prompts, judged by the RM (win
   rate of DPO) and by each task's metric.
"""

import argparse
import json
import os
import sys
import time

import jax
import numpy as np

from t5x_lite import checkpoints, eval_commands, models, posttrain, presets, trainer
from t5x_lite import config as config_lib
from t5x_lite.data import pipeline, posttrain_data, sources, tasks

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results', 'posttrain')
TASKS = list(posttrain_data.INSTRUCTIONS)
WEAK_STEPS, SFT_STEPS, RM_STEPS, DPO_STEPS = 100, 1000, 500, 150
TRAIN_PROMPTS = 250  # per task: weak samples and (a)/(b) training pairs
HELD_OUT = 100  # per task: validation prompts


def base_config():
  """A 2-layer Llama-layout decoder (d_model 64) as a prefix-LM on the shipped vocabulary."""
  config = presets.get('decoder_tiny')
  config.model.update(vocab_size=8192, d_model=64, num_heads=4, num_kv_heads=2, d_ff=256,
                      num_decoder_layers=2)
  config.data.feature_lengths.update(inputs=80, targets=24)
  config.data.task = 'sft_mix'
  config.train.update(batch_size=32, log_every=50, checkpoint_every=WEAK_STEPS,
                      keep_checkpoints=20)
  config.optimizer.update(name='adamw', schedule='constant', learning_rate=3e-3)
  config.eval.update(max_decode_length=24, batch_size=64, split='validation')
  return config


def finished(workdir, steps):
  step = checkpoints.latest_step(os.path.join(workdir, 'checkpoints'))
  return step is not None and step >= steps


def train(config, workdir):
  if not finished(workdir, config.train.num_steps):
    trainer.train(config, workdir)


def samples(config, workdir, split, count, name):
  """{task: greedy predictions of the newest checkpoint on the first `count` prompts},
  kept in <workdir>/samples_<name>.json (so a re-run reuses the weak checkpoint's)."""
  cached = os.path.join(workdir, f'samples_{name}.json')
  if os.path.exists(cached):
    with open(cached, encoding='utf-8') as f:
      return json.load(f)
  out = {}
  for task in TASKS:
    run = config.copy_and_resolve_references()
    run.eval.update(task=f'sft_{task}', split=split, num_examples=count)
    path, _ = eval_commands.run_infer(run, workdir)
    with open(path, encoding='utf-8') as f:
      out[task] = [json.loads(line)['prediction'] for line in f]
  with open(cached, 'w', encoding='utf-8') as f:
    json.dump(out, f, ensure_ascii=False)
  return out


def prompt_rows(split, count):
  return {task: posttrain_data.instruction_rows(task, split)[:count] for task in TASKS}


def sample_pairs(rows, predictions):
  """(b)-type pairs: the real answer over the weak checkpoint's different sample."""
  return [{'prompt': r['prompt'], 'chosen': r['response'], 'rejected': p, 'kind': 'weak_sample'}
          for task in TASKS for r, p in zip(rows[task], predictions[task])
          if p.strip() and p.strip() != r['response'].strip()]


def write_jsonl(path, rows):
  with open(path, 'w', encoding='utf-8') as f:
    f.writelines(json.dumps(row, ensure_ascii=False) + '\n' for row in rows)
  return path


def pair_config(config, objective, files, **train):
  run = config.copy_and_resolve_references()
  run.data.update(format='preference', files=files)
  run.train.update(objective=objective, **train)
  run.model.reward_head = objective == 'reward'
  return run


def evaluate(run, workdir, pairs):
  """Mean held-out metrics and per-pair values of a reward or DPO run on `pairs`."""
  partitioner = eval_commands.make_partitioner(run)
  params, _ = eval_commands.load_params(run, workdir, partitioner)
  reference = posttrain.load_reference(run, partitioner)
  model = models.build_model(config_lib.model_config(run))
  task = posttrain_data.preference_task('held_out', lambda split: sources.InMemorySource(pairs))
  with partitioner.activate():
    return posttrain.evaluate_pairs(posttrain.objective_from_config(run), model, params,
                                    posttrain.pair_batches(run, 'train', 64, task), reference)


def sft_validation_loss(config, workdir):
  """Teacher-forced mean cross-entropy per response token on validation (up to 50 batches)."""
  partitioner = eval_commands.make_partitioner(config)
  params, _ = eval_commands.load_params(config, workdir, partitioner)
  model = models.build_model(config_lib.model_config(config))
  batches = pipeline.get_dataset(
      'sft_mix', 'validation', config.data.feature_lengths.to_dict(), 32, shuffle=False,
      num_epochs=1, converter='prefix_lm', log_every=0)

  @jax.jit
  def sums(params, batch):
    logits = model.apply({'params': params}, **posttrain.model_inputs(batch))
    loss, _ = trainer.losses.cross_entropy_with_z_loss(
        logits, batch['decoder_target_tokens'], batch['decoder_loss_weights'], z_loss=0.0)
    return loss, batch['decoder_loss_weights'].sum()

  totals = np.zeros(2)
  for i, batch in enumerate(batches):
    if i == 50:
      break
    totals += np.array(jax.device_get(sums(params, dict(batch))), np.float64)
  return totals[0] / totals[1]


def task_metrics(config, workdir):
  out = {}
  for task in TASKS:
    run = config.copy_and_resolve_references()
    run.eval.update(task=f'sft_{task}', num_examples=HELD_OUT)
    out[task] = eval_commands.run_eval(run, workdir, num_samples=0).metrics
  return out


def main(argv):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--workdir', default='runs/posttrain')
  args = parser.parse_args(argv)
  root = os.path.abspath(args.workdir)
  os.makedirs(root, exist_ok=True)
  start = time.time()
  config = base_config()
  sft_dir = os.path.join(root, 'sft')

  # 1. SFT: a weak early checkpoint first, its samples, then on to the full run.
  weak = config.copy_and_resolve_references()
  weak.train.num_steps = WEAK_STEPS
  train(weak, sft_dir)
  train_rows, held_rows = prompt_rows('train', TRAIN_PROMPTS), prompt_rows('validation', HELD_OUT)
  weak_train = samples(config, sft_dir, 'train', TRAIN_PROMPTS, 'weak_train')
  weak_held = samples(config, sft_dir, 'validation', HELD_OUT, 'weak_validation')
  config.train.num_steps = SFT_STEPS
  train(config, sft_dir)

  # 2. Preference pairs.
  flat = lambda rows: [r for task in TASKS for r in rows[task]]
  pairs = {
      'train': posttrain_data.other_prompt_pairs(flat(train_rows), seed=0)
               + sample_pairs(train_rows, weak_train),
      'held_a': posttrain_data.other_prompt_pairs(flat(held_rows), seed=1),
      'held_b': sample_pairs(held_rows, weak_held)}
  paths = {k: write_jsonl(os.path.join(root, f'pairs_{k}.jsonl'), v) for k, v in pairs.items()}
  files = {'train': paths['train'], 'validation': paths['held_a']}
  init = os.path.join(sft_dir, 'checkpoints')

  # 3. Reward model; 4. DPO against the frozen SFT model.
  rm = pair_config(config, 'reward', files, num_steps=RM_STEPS, init_from=init)
  rm.optimizer.learning_rate = 1e-3
  train(rm, os.path.join(root, 'rm'))
  dpo = pair_config(config, 'dpo', files, num_steps=DPO_STEPS, init_from=init)
  dpo.optimizer.learning_rate = 3e-4
  train(dpo, os.path.join(root, 'dpo'))

  # 5. Held-out evaluation.
  results = {'sft_validation_loss': sft_validation_loss(config, sft_dir),
             'num_pairs': {k: len(v) for k, v in pairs.items()}}
  for name, run in (('rm', rm), ('dpo', dpo)):
    for kind in ('held_a', 'held_b'):
      results[f'{name}_{kind}'] = evaluate(run, os.path.join(root, name), pairs[kind])[0]
  sft_samples = samples(config, sft_dir, 'validation', HELD_OUT, 'sft_validation')
  dpo_samples = samples(config, os.path.join(root, 'dpo'), 'validation', HELD_OUT,
                        'dpo_validation')
  duel = [{'prompt': r['prompt'], 'chosen': d or ' ', 'rejected': s or ' '}
          for task in TASKS for r, d, s in zip(held_rows[task], dpo_samples[task],
                                               sft_samples[task])]
  _, judged = evaluate(rm, os.path.join(root, 'rm'), duel)
  same = np.array([d['chosen'] == d['rejected'] for d in duel])
  wins = np.where(same, 0.5, judged['reward_chosen'] > judged['reward_rejected'])
  results['dpo_win_rate_by_rm'] = float(np.mean(wins))
  results['identical_samples'] = float(np.mean(same))
  results['task_metrics'] = {'sft': task_metrics(config, sft_dir),
                             'dpo': task_metrics(config, os.path.join(root, 'dpo'))}
  results['wall_time_minutes'] = (time.time() - start) / 60
  os.makedirs(RESULTS, exist_ok=True)
  with open(os.path.join(RESULTS, 'results.json'), 'w', encoding='utf-8') as f:
    json.dump(results, f, indent=2, sort_keys=True)
  with open(os.path.join(RESULTS, 'results.md'), 'w', encoding='utf-8') as f:
    f.write(report(results))
  print(report(results))


def report(r):
  """The results table in markdown."""
  lines = [
      '# Post-training at tiny scale (experiments/posttrain.py)', '',
      f'Decoder-only prefix-LM, d_model 64, 2 layers, from scratch (no pre-training); '
      f'SFT {SFT_STEPS} steps (weak checkpoint: step {WEAK_STEPS}), RM {RM_STEPS} steps, '
      f'DPO {DPO_STEPS} steps (beta 0.1), batch 32; {r["wall_time_minutes"]:.0f} minutes. '
      f'Pairs: {r["num_pairs"]["train"]} train, {r["num_pairs"]["held_a"]} held-out (a) '
      f'other-prompt, {r["num_pairs"]["held_b"]} held-out (b) weak-sample.', '',
      '| stage | metric | held-out (a) other prompt | held-out (b) weak sample |',
      '|---|---|---:|---:|',
      f'| SFT | validation loss per response token | {r["sft_validation_loss"]:.3f} | |']
  for name, label in (('rm', 'RM'), ('dpo', 'DPO')):
    a, b = r[f'{name}_held_a'], r[f'{name}_held_b']
    what = 'pairwise accuracy' if name == 'rm' else 'reward accuracy'
    lines.append(f'| {label} | {what} | {a["accuracy"]:.3f} | {b["accuracy"]:.3f} |')
    lines.append(f'| {label} | mean margin | {a["margin"]:.3f} | {b["margin"]:.3f} |')
  lines += ['', f'DPO vs SFT greedy samples on {4 * HELD_OUT} held-out prompts: win rate judged '
            f'by the RM {r["dpo_win_rate_by_rm"]:.3f} (ties = identical samples, '
            f'{r["identical_samples"]:.3f} of them, count 1/2).', '',
            '| task | metric | SFT | DPO |', '|---|---|---:|---:|']
  for task in TASKS:
    for metric, value in sorted(r['task_metrics']['sft'][task].items()):
      lines.append(f'| {task} | {metric} | {value:.3f} | '
                   f'{r["task_metrics"]["dpo"][task][metric]:.3f} |')
  return '\n'.join(lines) + '\n'


if __name__ == '__main__':
  main(sys.argv[1:])
