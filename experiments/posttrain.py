"""Post-training end to end at tiny scale: pre-training -> SFT -> reward model -> DPO.

Run from the repository root (29 minutes on 2 idle CPU cores):

  python experiments/posttrain.py --workdir=runs/posttrain

It writes experiments/results/posttrain/results.md (and results.json, with each stage's wall
time). Every stage is the CLI's own machinery called in-process: `trainer.train` (pre-training,
SFT, then `train.objective=reward`, then `dpo`), `eval_commands.run_infer` for greedy
decoding, `posttrain.evaluate_pairs` for held-out pairs. Stages whose workdir holds a
finished run are skipped, so re-running resumes.

0. Pre-training: the same decoder as a causal LM over the bundled English text
   (`lm_pretrain_text`, converter 'lm', packed PRETRAIN_LENGTH-token rows; its train split
   holds no text of a held-out prompt). SFT starts from its params through `train.init_from`,
   which restores params only: the task, converter and feature lengths may differ, the model
   config may not.
1. SFT (`sft_mix`: the four bundled instruction tasks) for `WEAK_STEPS`, then greedy samples
   of that weak checkpoint on train and validation prompts, then SFT on to `SFT_STEPS`
   (resumed in the same workdir).
2. Preference pairs, chosen = the corpus's real answer, rejected = (a) the real answer to a
   different prompt (`PAIR_PROMPTS` train prompts per task), or (b) the weak checkpoint's
   sample where it differs from the answer (`SAMPLE_PROMPTS` per task); the rules are in
   experiments/results/posttrain/README.md.
3. A reward model (`model.reward_head=True`) initialised from SFT, Bradley-Terry on (a)+(b).
4. DPO from SFT with the SFT model as frozen reference, on the same pairs.
5. Held out (`HELD_OUT` validation prompts per task): RM pairwise accuracy on (a) and (b)
   pairs, (a) split by whether the rejected answer is one of the same task's; DPO reward
   accuracy and margins there; greedy samples of SFT and DPO, judged by the RM (win rate of
   DPO) and by each task's metric.
"""

import argparse
import json
import os
import sys
import time

import jax
import ml_collections
import numpy as np

from t5x_lite import checkpoints, eval_commands, models, posttrain, presets, trainer
from t5x_lite import config as config_lib
from t5x_lite.data import pipeline, posttrain_data, sources, tasks

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results', 'posttrain')
TASKS = list(posttrain_data.INSTRUCTIONS)
PRETRAIN_STEPS, PRETRAIN_LENGTH = 1000, 128
WEAK_STEPS, SFT_STEPS, RM_STEPS, DPO_STEPS = 100, 1000, 500, 150
SAMPLE_PROMPTS = 250  # per task: weak samples for (b)-type training pairs
PAIR_PROMPTS = 2000  # per task: (a)-type training pairs (no decoding needed)
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


def pretrain_config(config):
  """`config`'s model as a causal LM on `lm_pretrain_text` for PRETRAIN_STEPS."""
  run = config.copy_and_resolve_references()
  run.data.update(task='lm_pretrain_text', converter='lm')
  # Assigned, not updated: update() would merge and keep the prefix-LM's 'inputs' length.
  run.data.feature_lengths = ml_collections.ConfigDict({'targets': PRETRAIN_LENGTH})
  run.train.update(num_steps=PRETRAIN_STEPS, checkpoint_every=250)
  return run


def finished(workdir, steps):
  step = checkpoints.latest_step(os.path.join(workdir, 'checkpoints'))
  return step is not None and step >= steps


def train(config, workdir):
  if not finished(workdir, config.train.num_steps):
    trainer.train(config, workdir)


def samples(config, workdir, split, count, name):
  """{task: [{"target", "prediction"}]}: greedy decodes of the newest checkpoint on the
  first `count` prompts, kept in <workdir>/samples_<name>.json (a re-run reuses them)."""
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
      out[task] = [{k: row[k] for k in ('target', 'prediction')} for row in map(json.loads, f)]
  with open(cached, 'w', encoding='utf-8') as f:
    json.dump(out, f, ensure_ascii=False)
  return out


def prompt_rows(split, count):
  return {task: posttrain_data.instruction_rows(task, split)[:count] for task in TASKS}


def sample_pairs(rows, decoded):
  """(b)-type pairs: the real answer over the weak checkpoint's sample, where the two
  differ as the task's metric sees them (`posttrain_data.same_answer`)."""
  return [{'prompt': r['prompt'], 'chosen': r['response'], 'rejected': d['prediction'],
           'kind': 'weak_sample'}
          for task in TASKS for r, d in zip(rows[task], decoded[task])
          if d['prediction'].strip()
          and not posttrain_data.same_answer(task, d['prediction'], r['response'])]


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


def validation_loss(config, workdir):
  """Teacher-forced mean cross-entropy per loss token (the response's, for SFT) of the run's
  task on validation (up to 50 batches of 32)."""
  partitioner = eval_commands.make_partitioner(config)
  params, _ = eval_commands.load_params(config, workdir, partitioner)
  model = models.build_model(config_lib.model_config(config))
  batches = pipeline.get_dataset(
      config.data.task, 'validation', config.data.feature_lengths.to_dict(), 32,
      shuffle=False, num_epochs=1, converter=config.data.converter, log_every=0)

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


def task_metrics(decoded):
  """{task: its metrics} of greedy decodes (`samples`) against their targets."""
  return {task: tasks.get(f'sft_{task}').score([d['target'] for d in decoded[task]],
                                               [d['prediction'] for d in decoded[task]])
          for task in TASKS}


def build_pairs(train_rows, held_rows, weak_train, weak_held):
  """{'train', 'held_a', 'held_b'}: preference pairs (module docstring, step 2)."""
  flat = lambda rows: [r for task in TASKS for r in rows[task]]
  return {
      'train': posttrain_data.other_prompt_pairs(flat(train_rows), seed=0)
               + sample_pairs({t: r[:SAMPLE_PROMPTS] for t, r in train_rows.items()},
                              weak_train),
      'held_a': posttrain_data.other_prompt_pairs(flat(held_rows), seed=1),
      'held_b': sample_pairs(held_rows, weak_held)}


def same_task_mask(held_rows, pairs):
  """[held (a) pairs]: whether the rejected answer is one of the prompt's own task's
  answers (e.g. the other sentiment label) rather than another task's (pairs follow the
  rows' order)."""
  answers = {task: {r['response'] for r in held_rows[task]} for task in TASKS}
  prompt_tasks = [task for task in TASKS for _ in held_rows[task]]
  return np.array([p['rejected'] in answers[t] for t, p in zip(prompt_tasks, pairs)])


def judge_duel(rm, rm_dir, held_rows, dpo_decoded, sft_decoded):
  """The RM's win rate of DPO's greedy samples over SFT's (identical samples count 1/2),
  and the share of identical samples."""
  duel = [{'prompt': r['prompt'], 'chosen': d['prediction'] or ' ',
           'rejected': s['prediction'] or ' '}
          for task in TASKS
          for r, d, s in zip(held_rows[task], dpo_decoded[task], sft_decoded[task])]
  _, judged = evaluate(rm, rm_dir, duel)
  same = np.array([d['chosen'] == d['rejected'] for d in duel])
  wins = np.where(same, 0.5, judged['reward_chosen'] > judged['reward_rejected'])
  return float(np.mean(wins)), float(np.mean(same))


def main(argv):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--workdir', default='runs/posttrain')
  args = parser.parse_args(argv)
  root = os.path.abspath(args.workdir)
  os.makedirs(root, exist_ok=True)
  minutes, start = {}, time.time()

  def lap(stage):
    minutes[stage] = (time.time() - start) / 60 - sum(minutes.values())

  config = base_config()
  dirs = {name: os.path.join(root, name) for name in ('pretrain', 'sft', 'rm', 'dpo')}

  # 0. Pre-training; SFT starts from its params (same model, other task and converter).
  pretrain = pretrain_config(config)
  train(pretrain, dirs['pretrain'])
  config.train.init_from = os.path.join(dirs['pretrain'], 'checkpoints')
  lap('pretrain')

  # 1. SFT: a weak early checkpoint first, its samples, then on to the full run.
  weak = config.copy_and_resolve_references()
  weak.train.num_steps = WEAK_STEPS
  train(weak, dirs['sft'])
  train_rows, held_rows = prompt_rows('train', PAIR_PROMPTS), prompt_rows('validation', HELD_OUT)
  weak_train = samples(config, dirs['sft'], 'train', SAMPLE_PROMPTS, 'weak_train')
  weak_held = samples(config, dirs['sft'], 'validation', HELD_OUT, 'weak_validation')
  config.train.num_steps = SFT_STEPS
  train(config, dirs['sft'])
  lap('sft')

  # 2. Preference pairs; 3. reward model; 4. DPO against the frozen SFT model.
  pairs = build_pairs(train_rows, held_rows, weak_train, weak_held)
  paths = {k: write_jsonl(os.path.join(root, f'pairs_{k}.jsonl'), v) for k, v in pairs.items()}
  files = {'train': paths['train'], 'validation': paths['held_a']}
  init = os.path.join(dirs['sft'], 'checkpoints')
  rm = pair_config(config, 'reward', files, num_steps=RM_STEPS, init_from=init)
  rm.optimizer.learning_rate = 1e-3
  train(rm, dirs['rm'])
  lap('rm')
  dpo = pair_config(config, 'dpo', files, num_steps=DPO_STEPS, init_from=init)
  dpo.optimizer.learning_rate = 3e-4
  train(dpo, dirs['dpo'])
  lap('dpo')

  # 5. Held-out evaluation.
  results = {'pretrain_validation_loss': validation_loss(pretrain, dirs['pretrain']),
             'sft_validation_loss': validation_loss(config, dirs['sft']),
             'num_pairs': {k: len(v) for k, v in pairs.items()}}
  for name, run in (('rm', rm), ('dpo', dpo)):
    for kind in ('held_a', 'held_b'):
      results[f'{name}_{kind}'], per_pair = evaluate(run, dirs[name], pairs[kind])
      if kind == 'held_a':
        same = same_task_mask(held_rows, pairs[kind])
        results[f'{name}_held_a_same_task'] = {'accuracy': float(np.mean(per_pair['accuracy'][same])),
                                               'num_pairs': int(same.sum())}
  decoded = {name: samples(config, dirs[name], 'validation', HELD_OUT, f'{name}_validation')
             for name in ('sft', 'dpo')}
  results['dpo_win_rate_by_rm'], results['identical_samples'] = judge_duel(
      rm, dirs['rm'], held_rows, decoded['dpo'], decoded['sft'])
  results['task_metrics'] = {name: task_metrics(decoded[name]) for name in ('sft', 'dpo')}
  lap('evaluation')
  results['wall_time_minutes'] = dict(minutes, total=sum(minutes.values()))
  os.makedirs(RESULTS, exist_ok=True)
  with open(os.path.join(RESULTS, 'results.json'), 'w', encoding='utf-8') as f:
    json.dump(results, f, indent=2, sort_keys=True)
  with open(os.path.join(RESULTS, 'results.md'), 'w', encoding='utf-8') as f:
    f.write(report(results))
  print(report(results))


def report(r):
  """The results table in markdown."""
  t = r['wall_time_minutes']
  lines = [
      '# Post-training at tiny scale (experiments/posttrain.py)', '',
      f'Decoder-only prefix-LM, d_model 64, 2 layers; pre-trained {PRETRAIN_STEPS} steps as a '
      f'causal LM on lm_pretrain_text, SFT {SFT_STEPS} steps from it (weak checkpoint: step '
      f'{WEAK_STEPS}), RM {RM_STEPS} steps, DPO {DPO_STEPS} steps (beta 0.1), batch 32. '
      f'{t["total"]:.0f} minutes: ' + ', '.join(f'{k} {v:.1f}' for k, v in t.items()
                                                  if k != 'total') + '. '
      f'Pairs: {r["num_pairs"]["train"]} train, {r["num_pairs"]["held_a"]} held-out (a) '
      f'other-prompt, {r["num_pairs"]["held_b"]} held-out (b) weak-sample.', '',
      '| stage | metric | held-out (a) other prompt | held-out (b) weak sample |',
      '|---|---|---:|---:|',
      f'| pre-training | validation loss per token | {r["pretrain_validation_loss"]:.3f} | |',
      f'| SFT | validation loss per response token | {r["sft_validation_loss"]:.3f} | |']
  for name, label in (('rm', 'RM'), ('dpo', 'DPO')):
    a, b, same = r[f'{name}_held_a'], r[f'{name}_held_b'], r[f'{name}_held_a_same_task']
    what = 'pairwise accuracy' if name == 'rm' else 'reward accuracy'
    lines.append(f'| {label} | {what} | {a["accuracy"]:.3f} | {b["accuracy"]:.3f} |')
    lines.append(f'| {label} | {what}, (a) rejected from the same task '
                 f'({same["num_pairs"]} pairs) | {same["accuracy"]:.3f} | |')
    lines.append(f'| {label} | mean margin | {a["margin"]:.3f} | {b["margin"]:.3f} |')
  lines += ['', f'DPO vs SFT greedy samples on {len(TASKS) * HELD_OUT} held-out prompts: win '
            f'rate judged by the RM {r["dpo_win_rate_by_rm"]:.3f} (ties = identical samples, '
            f'{r["identical_samples"]:.3f} of them, count 1/2).', '',
            '| task | metric | SFT | DPO |', '|---|---|---:|---:|']
  for task in TASKS:
    for metric, value in sorted(r['task_metrics']['sft'][task].items()):
      lines.append(f'| {task} | {metric} | {value:.3f} | '
                   f'{r["task_metrics"]["dpo"][task][metric]:.3f} |')
  return '\n'.join(lines) + '\n'


if __name__ == '__main__':
  main(sys.argv[1:])
