"""Tests for post-training: the chat template and the paired layout, the response-only SFT
loss, the DPO loss and implicit rewards against numpy, Bradley-Terry gradients against
finite differences, both reference paths of DPO, bitwise resume of a reward-model and a
DPO run on a sharded mesh, and bad input on the command line.

The models are tiny (d_model 16-32) in the shipped 8,100-piece vocabulary (8192 ids).
"""

import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5x_lite import models, posttrain, presets, trainer
from t5x_lite import config as config_lib
from t5x_lite.data import feature_converters, posttrain_data, sources, tasks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = tasks.seq2seq_features()['targets'].vocabulary
LENGTHS = {'inputs': 48, 'targets': 8}


def _model_config(architecture='decoder_only', **fields):
  return models.ModelConfig(**{
      **dict(architecture=architecture, vocab_size=8192, d_model=16, num_heads=2, head_dim=8,
             d_ff=32, num_encoder_layers=1, num_decoder_layers=1), **fields})


def _short_rows(count):
  """Sentiment instructions whose rendered prompt fits LENGTHS['inputs'] with its EOS."""
  rows = posttrain_data.instruction_rows('sentiment_rt', 'validation')
  fits = [r for r in rows if len(VOCAB.encode(posttrain_data.chat_prompt(r['prompt'])))
          < LENGTHS['inputs']]
  return fits[:count]


def _pairs(n=4):
  return posttrain_data.other_prompt_pairs(_short_rows(40), seed=1)[:n]


def _pair_batch(pairs, converter='prefix_lm', lengths=LENGTHS):
  task = posttrain_data.preference_task('t', lambda split: sources.InMemorySource(pairs))
  pair_converter = feature_converters.get_converter(f'pairs_{converter}', lengths)
  prepared = [pair_converter.prepare(task.preprocess(row)) for row in pairs]
  return pair_converter.model_features(
      {k: np.stack([p[k] for p in prepared]) for k in prepared[0]}), task


def test_chat_template_renders_turns_and_ends_with_the_assistant_cue():
  messages = [{'role': 'system', 'content': 'Be brief.'}, {'role': 'user', 'content': 'Hi'},
              {'role': 'assistant', 'content': 'Hello'}, {'role': 'user', 'content': 'Bye?'},
              {'role': 'assistant', 'content': 'Ciao'}]
  assert posttrain_data.render_chat(messages) == (
      'System: Be brief.\nUser: Hi\nAssistant: Hello\nUser: Bye?\nAssistant:', 'Ciao')
  assert posttrain_data.chat_prompt('Hi') == 'User: Hi\nAssistant:'
  with pytest.raises(ValueError, match='last message must be the assistant'):
    posttrain_data.render_chat(messages[:-1])
  with pytest.raises(ValueError, match='message 1 needs a role'):
    posttrain_data.render_chat([messages[1], {'role': 'assistant', 'content': ' '}])


def test_sft_files_take_single_and_multi_turn_lines(tmp_path):
  path = tmp_path / 'sft.jsonl'
  path.write_text(
      '{"prompt": "Hi", "response": "Hello"}\n'
      '{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": '
      '"Hello"}, {"role": "user", "content": "Bye"}, {"role": "assistant", "content": '
      '"Ciao"}]}\n', encoding='utf-8')
  config = presets.get('decoder_tiny')
  config.data.update(format='sft', files={'train': str(path)})
  task = tasks.from_config(config.data)
  texts = [(VOCAB.decode(e['inputs'].tolist()), VOCAB.decode(e['targets'][:-1].tolist()))
           for e in map(task.preprocess, (task.source('train')[i] for i in range(2)))]
  # The shipped SentencePiece model normalises the template's newlines to spaces.
  assert texts == [('User: Hi Assistant:', 'Hello'),
                   ('User: Hi Assistant: Hello User: Bye Assistant:', 'Ciao')]
  path.write_text('{"prompt": "Hi", "response": "Hello"}\n{"prompt": "Hi", "response": ""}\n',
                  encoding='utf-8')
  with pytest.raises(ValueError, match=r'sft.jsonl: row 2: missing or empty response'):
    tasks.from_config(config.data)


def test_instruction_tasks_use_the_corpus_answers_under_several_templates():
  rows = posttrain_data.instruction_rows('classify_debian_section', 'validation')
  corpus = sources.corpus_source('classify_debian_section', 'validation')
  assert [r['response'] for r in rows] == [corpus[i]['section'] for i in range(len(corpus))]
  used = {t for t in posttrain_data.INSTRUCTIONS['classify_debian_section'][2]
          if any(r['prompt'] == t.format(x=corpus[i]['description'])
                 for i, r in enumerate(rows))}
  assert len(used) == 3
  example = tasks.get('sft_classify_debian_section').preprocess(
      tasks.get('sft_classify_debian_section').source('validation')[0])
  assert VOCAB.decode(example['inputs'][:-1].tolist()).endswith('Assistant:')
  assert example['targets'].tolist() == VOCAB.encode(rows[0]['response']) + [VOCAB.eos_id]
  pairs = posttrain_data.other_prompt_pairs(rows[:50])
  assert all(p['chosen'] == r['response'] != p['rejected'] for p, r in zip(pairs, rows))
  assert {p['rejected'] for p in pairs} <= {r['response'] for r in rows[:50]}


def test_pairs_never_prefer_an_answer_to_the_same_answer():
  """(a) pairs redraw a rejected answer equal to the chosen one up to surrounding whitespace
  (which check_pairs would refuse); (b) pairs compare answers as the task's metric does."""
  rows = [{'prompt': p, 'response': r} for p, r in (('p1', 'a'), ('p2', 'a '), ('p3', 'b'))]
  pairs = posttrain_data.other_prompt_pairs(rows, seed=0)
  assert [p['rejected'] for p in pairs[:2]] == ['b', 'b']
  assert pairs[2]['rejected'] in ('a', 'a ')
  posttrain_data.check_pairs(pairs, 'pairs')
  assert posttrain_data.same_answer('sentiment_rt', ' Positive', 'positive')
  assert not posttrain_data.same_answer('sentiment_rt', 'positive', 'negative')
  assert posttrain_data.same_answer('translate_en_de', 'Datei ', 'Datei')
  assert not posttrain_data.same_answer('translate_en_de', 'Datei', 'datei')


def test_pairs_are_interleaved_rows_with_the_response_as_loss():
  pairs = _pairs(3)
  batch, task = _pair_batch(pairs)
  assert batch['decoder_target_tokens'].shape == (6, 56)
  for i, pair in enumerate(pairs):
    prompt = task.preprocess(pair)['inputs']
    for row, key in ((2 * i, 'chosen'), (2 * i + 1, 'rejected')):
      response = VOCAB.encode(pair[key]) + [VOCAB.eos_id]
      tokens = batch['decoder_target_tokens'][row]
      np.testing.assert_array_equal(tokens[:len(prompt) + len(response)],
                                    np.concatenate([prompt, response]))
      np.testing.assert_array_equal(np.nonzero(batch['decoder_loss_weights'][row])[0],
                                    np.arange(len(prompt), len(prompt) + len(response)))


def test_sft_loss_is_the_mean_over_response_tokens_only():
  """The train step's loss on prefix-LM SFT rows equals, by hand, the mean negative
  log-likelihood of the response tokens (prompt and template tokens excluded)."""
  task = tasks.get('sft_sentiment_rt')
  examples = [task.preprocess(task.source('validation')[i]) for i in range(3)]
  converter = feature_converters.get_converter('prefix_lm', {'inputs': 128, 'targets': 8})
  batch = {k: np.stack([converter.convert(e)[k] for e in examples])
           for k in converter.convert(examples[0])}
  model_config = _model_config()
  model, params = models.build_model(model_config), models.init_params(
      model_config, jax.random.key(0))
  options = trainer.StepOptions(z_loss=0.0)
  weights = jax.numpy.asarray(batch['decoder_loss_weights'])
  normalised = dict(batch, decoder_loss_weights=trainer.losses.normalize_weights(
      weights, options.loss_normalizing_factor))
  loss, _ = trainer._microbatch_sums(model, options, params, normalised, jax.random.key(1))

  logits = np.asarray(model.apply({'params': params}, **posttrain.model_inputs(batch)), np.float64)
  nll = []
  for row, example in enumerate(examples):
    start = len(example['inputs'])  # the response starts after prompt + template
    for t in range(start, start + len(example['targets'])):
      log_z = np.log(np.sum(np.exp(logits[row, t])))
      nll.append(log_z - logits[row, t, example['targets'][t - start]])
  np.testing.assert_allclose(float(loss), np.mean(nll), rtol=1e-5)


def _numpy_logps(logits, batch, prompt_lengths, response_lengths):
  """Per row: the sum of log-probs of the response tokens, located from the lengths."""
  out = []
  for row, (start, n) in enumerate(zip(prompt_lengths, response_lengths)):
    values = np.asarray(logits[row], np.float64)
    log_probs = values - np.log(np.sum(np.exp(values), axis=-1, keepdims=True))
    targets = batch['decoder_target_tokens'][row]
    positions = range(start, start + n) if start is not None else range(n)
    out.append(sum(log_probs[t, targets[t]] for t in positions))
  return np.array(out)


@pytest.mark.parametrize('architecture,loss_type,smoothing', [
    ('decoder_only', 'sigmoid', 0.0), ('decoder_only', 'sigmoid', 0.2),
    ('decoder_only', 'ipo', 0.0), ('encoder_decoder', 'sigmoid', 0.0)])
def test_dpo_loss_and_implicit_rewards_match_numpy(architecture, loss_type, smoothing):
  pairs = _pairs(4)
  converter = 'prefix_lm' if architecture == 'decoder_only' else 'enc_dec'
  batch, task = _pair_batch(pairs, converter)
  model_config = _model_config(architecture)
  model = models.build_model(model_config)
  policy = models.init_params(model_config, jax.random.key(0))
  reference = models.init_params(model_config, jax.random.key(1))
  beta = 0.5
  objective = posttrain.Objective('dpo', beta=beta, dpo_loss=loss_type,
                                  label_smoothing=smoothing)
  per_pair, stats = objective.per_pair(model, policy, batch, reference)

  prompts, responses = [], []
  for pair in pairs:
    prompt = len(task.preprocess(pair)['inputs']) if converter == 'prefix_lm' else None
    for key in ('chosen', 'rejected'):
      prompts.append(prompt)
      responses.append(len(VOCAB.encode(pair[key])) + 1)
  inputs = posttrain.model_inputs(batch)
  pi = _numpy_logps(model.apply({'params': policy}, **inputs), batch, prompts, responses)
  ref = _numpy_logps(model.apply({'params': reference}, **inputs), batch, prompts, responses)
  chosen, rejected = beta * (pi[0::2] - ref[0::2]), beta * (pi[1::2] - ref[1::2])
  h = (chosen - rejected) / beta
  sigmoid = lambda x: 1 / (1 + np.exp(-x))
  if loss_type == 'ipo':
    expected = (h - 1 / (2 * beta)) ** 2
  else:
    expected = (-(1 - smoothing) * np.log(sigmoid(beta * h))
                - smoothing * np.log(sigmoid(-beta * h)))
  np.testing.assert_allclose(per_pair, expected, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(stats['reward_chosen'], chosen, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(stats['reward_rejected'], rejected, rtol=1e-4, atol=1e-6)
  np.testing.assert_array_equal(stats['accuracy'], (chosen > rejected).astype(np.float32))


def test_precomputed_reference_gives_the_same_losses(tmp_path):
  pairs = _pairs(4)
  model_config = _model_config()
  model = models.build_model(model_config)
  policy = models.init_params(model_config, jax.random.key(0))
  reference = models.init_params(model_config, jax.random.key(1))
  config = presets.get('decoder_tiny')
  config.data.feature_lengths.update(LENGTHS)
  path = str(tmp_path / 'pairs.jsonl')
  assert posttrain.precompute_reference(model, reference, pairs, config, path,
                                        batch_size=3) == 4
  with open(path, encoding='utf-8') as f:
    precomputed = [json.loads(line) for line in f]
  batch, _ = _pair_batch(pairs)
  stored, _ = _pair_batch(precomputed)
  assert stored['reference_logps'].shape == (8,)
  with_params = posttrain.Objective('dpo').per_pair(model, policy, batch, reference)
  with_stored = posttrain.Objective('dpo', reference='precomputed').per_pair(
      model, policy, stored)
  np.testing.assert_allclose(with_stored[0], with_params[0], rtol=1e-5)
  np.testing.assert_allclose(with_stored[1]['margin'], with_params[1]['margin'], rtol=1e-5,
                             atol=1e-6)


@pytest.mark.parametrize('architecture', ['decoder_only', 'encoder_decoder'])
def test_bradley_terry_gradients_match_finite_differences(architecture):
  converter = 'prefix_lm' if architecture == 'decoder_only' else 'enc_dec'
  batch, _ = _pair_batch(_pairs(3), converter)
  model_config = _model_config(architecture, reward_head=True)
  model = models.build_model(model_config)
  params = models.init_params(model_config, jax.random.key(2))
  objective = posttrain.Objective('reward')
  loss = jax.jit(lambda p: jnp.mean(objective.per_pair(model, p, batch)[0]))
  grads = jax.grad(loss)(params)
  # Per parameter (but the 8192-row embedding and output tables): the derivative along a
  # random unit direction, by central differences, against the gradient's projection.
  leaves, treedef = jax.tree.flatten(params)
  checked = 0
  for index, leaf in enumerate(leaves):
    if leaf.size > 4096:
      continue
    direction = jax.random.normal(jax.random.key(index), leaf.shape)
    direction = direction / jnp.linalg.norm(direction)
    eps = 1e-2
    shifted = lambda sign: jax.tree.unflatten(treedef, [
        x + sign * eps * direction if i == index else x for i, x in enumerate(leaves)])
    numeric = (float(loss(shifted(1))) - float(loss(shifted(-1)))) / (2 * eps)
    analytic = float(jnp.sum(jax.tree.leaves(grads)[index] * direction))
    np.testing.assert_allclose(analytic, numeric, rtol=2e-2, atol=2e-4)
    checked += abs(analytic) > 1e-3
  assert checked >= 3  # the check is not vacuous
  # The loss's derivative in the rewards themselves: -sigmoid(-(c - r)) for the chosen.
  c, r = jnp.array([0.3, -1.0]), jnp.array([0.1, 2.0])
  d_c = jax.grad(lambda c: jnp.sum(posttrain.bradley_terry(c, r)[0]))(c)
  np.testing.assert_allclose(d_c, -1 / (1 + np.exp(np.array([0.3, -1.0]) - [0.1, 2.0])),
                             rtol=1e-6)


# --- Whole runs through trainer.train: SFT -> RM / DPO, resumed bitwise --------------------


def _write_jsonl(path, rows):
  with open(path, 'w', encoding='utf-8') as f:
    f.writelines(json.dumps(row) + '\n' for row in rows)
  return str(path)


def _run_config(**train_fields):
  config = presets.get('decoder_tiny')
  config.model.update(vocab_size=8192, d_model=32, num_heads=4, num_kv_heads=2, d_ff=64,
                      num_decoder_layers=1)
  config.data.feature_lengths.update(LENGTHS)
  config.mesh_shape = (2, 2, 2)
  config.train.update(batch_size=4, num_steps=4, log_every=1, checkpoint_every=2,
                      async_checkpointing=False)
  config.train.update(train_fields)
  return config


def _losses(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
    return [(r['step'], r['loss'], r['accuracy']) for r in map(json.loads, f)]


@pytest.fixture(scope='module')
def sft_run(tmp_path_factory):
  root = tmp_path_factory.mktemp('posttrain')
  rows = _short_rows(64)
  sft = _write_jsonl(root / 'sft.jsonl', [{'prompt': r['prompt'], 'response': r['response']}
                                          for r in rows])
  pairs = _write_jsonl(root / 'pairs.jsonl', posttrain_data.other_prompt_pairs(rows))
  config = _run_config(num_steps=2)
  config.data.update(format='sft', files={'train': sft})
  trainer.train(config, str(root / 'sft'))
  return root, pairs


@pytest.mark.parametrize('objective', ['reward', 'dpo'])
def test_resume_is_bitwise_exact(sft_run, objective):
  root, pairs = sft_run
  config = _run_config(objective=objective,
                       init_from=str(root / 'sft' / 'checkpoints'))
  config.model.reward_head = objective == 'reward'
  config.data.update(format='preference', files={'train': pairs})
  straight, resumed = root / f'{objective}_a', root / f'{objective}_b'
  trainer.train(config, str(straight))
  first = config.copy_and_resolve_references()
  first.train.num_steps = 2
  trainer.train(first, str(resumed))
  trainer.train(config, str(resumed))  # resumes from step 2's checkpoint
  expected = _losses(straight)
  assert [s for s, _, _ in expected] == [1, 2, 3, 4]
  assert _losses(resumed) == expected  # bitwise
  assert len({loss for _, loss, _ in expected}) > 1  # it trains

  # `score` on the held-out pairs: one row per pair, accuracy the share of chosen ahead.
  config.data.files.validation = pairs
  path, means = posttrain.run_score_pairs(config, str(straight))
  with open(path, encoding='utf-8') as f:
    rows = [json.loads(line) for line in f]
  with open(pairs, encoding='utf-8') as f:
    assert [r['chosen'] for r in rows] == [json.loads(line)['chosen'] for line in f]
  assert means['num_pairs'] == len(rows) == 64
  wins = np.mean([r['reward_chosen'] > r['reward_rejected'] for r in rows])
  assert means['accuracy'] == pytest.approx(wins)


def _cli(*args, cwd):
  env = dict(os.environ, PYTHONPATH=ROOT)
  return subprocess.run([sys.executable, '-m', 't5x_lite.main', *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize('lines,fragment', [
    (['{"prompt": "a", "chosen": "b", "rejected": "c"}', '{"prompt": "a", "chosen": '],
     'pairs.jsonl:2: invalid JSON'),
    (['{"prompt": "a", "chosen": "b"}'], 'pairs.jsonl:1: missing key(s) rejected'),
    (['{"prompt": "a", "chosen": " ", "rejected": "c"}'], 'pairs.jsonl:1: empty field(s) chosen'),
    (['{"prompt": "a", "chosen": "b", "rejected": "c"}', '{"prompt": "a", "chosen": "b", '
      '"rejected": "b"}'], 'row 2 has chosen == rejected'),
    (['{"prompt": "a", "chosen": "b", "rejected": "c"}'], 'has shape'),
])
def test_bad_preference_input_fails_in_one_line(tmp_path, sft_run, lines, fragment):
  root, _ = sft_run
  path = tmp_path / 'pairs.jsonl'
  path.write_text('\n'.join(lines) + '\n', encoding='utf-8')
  wider = 'has shape' in fragment  # a policy wider than the reference checkpoint
  result = _cli('train', '--config=configs/decoder_tiny.py', f'--workdir={tmp_path / "run"}',
                '--config.data.format=preference', f'--config.data.files.train={path}',
                '--config.train.objective=dpo', '--config.model.vocab_size=8192',
                f'--config.model.d_model={64 if wider else 32}', '--config.model.num_heads=4',
                '--config.model.num_kv_heads=2', '--config.model.d_ff=64',
                '--config.model.num_decoder_layers=1',
                f'--config.train.init_from={root / "sft" / "checkpoints"}', cwd=ROOT)
  assert result.returncode == 2, result.stderr
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('error: ') and fragment in lines[0], lines
  assert not (tmp_path / 'run').exists()


@pytest.mark.parametrize('data_format, long_row, fragment', [
    ('preference', {'prompt': 'word ' * 300, 'chosen': 'b', 'rejected': 'c'},
     'row 2: the prompt is'),
    ('preference', {'prompt': 'a', 'chosen': 'b', 'rejected': 'word ' * 300},
     'row 2: the rejected response is'),
    ('sft', {'prompt': 'a', 'response': 'word ' * 300}, 'row 2: the response is'),
])
def test_an_overlong_row_with_truncate_false_fails_in_one_line(tmp_path, data_format, long_row,
                                                               fragment):
  short = ({'prompt': 'a', 'chosen': 'b', 'rejected': 'c'} if data_format == 'preference'
           else {'prompt': 'a', 'response': 'b'})
  path = tmp_path / 'rows.jsonl'
  path.write_text(''.join(json.dumps(r) + '\n' for r in (short, long_row)), encoding='utf-8')
  objective = (['--config.train.objective=reward', '--config.model.reward_head=True']
               if data_format == 'preference' else [])
  result = _cli('train', '--config=configs/decoder_tiny.py', f'--workdir={tmp_path / "run"}',
                f'--config.data.format={data_format}', f'--config.data.files.train={path}',
                '--config.data.truncate=False', *objective, cwd=ROOT)
  assert result.returncode == 2, result.stderr
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('error: ') and fragment in lines[0], lines
  assert 'data.truncate=True' in lines[0]
  assert not (tmp_path / 'run').exists()
