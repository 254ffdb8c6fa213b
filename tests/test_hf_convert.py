"""Hugging Face interop end to end: export parity, bit-exact round trips, sharded streaming
import, tokenizers as vocabularies, fine-tuning from a converted model, bad input, the CLI.

Models are tiny and random (tests/test_hf.py builds the HF ones), saved to tmp dirs; nothing
comes from the hub. The sharded import runs on the 8 fake CPU devices of tests/conftest.py.
"""

import collections
import dataclasses
import importlib.util
import itertools
import json
import os
import shutil

import jax
import numpy as np
import pytest
import sentencepiece as spm
import torch
import transformers
from flax import traverse_util
from safetensors.numpy import load_file, save_file
from test_hf import HF_MODELS, VOCAB, check_logits, hf_llama, hf_t5, right_padded
from test_main import Run, assert_one_error_line

from t5x_lite import config as config_lib
from t5x_lite import eval_commands, hf, hf_io, models, partitioning, trainer
from t5x_lite.data import tasks, vocabularies

TINY = dict(vocab_size=VOCAB, d_model=32, num_heads=4, head_dim=8, d_ff=64,
            num_encoder_layers=2, num_decoder_layers=3, relative_attention_num_buckets=16,
            relative_attention_max_distance=20)
# Our models exported to HF: name -> (preset, fields, HF class).
OURS = {
    't5_1_0': (config_lib.T5_1_0, {}, transformers.T5ForConditionalGeneration),
    't5_1_1': (config_lib.T5_1_1, {}, transformers.T5ForConditionalGeneration),
    'llama_gqa': (config_lib.LLAMA, dict(num_kv_heads=2, rope_theta=5e5),
                  transformers.LlamaForCausalLM),
    'llama_tied': (config_lib.LLAMA, dict(logits_via_embedding=True, num_decoder_layers=2),
                   transformers.LlamaForCausalLM),
}


def _our_model(name: str, seed: int = 0):
  """A random config and params; every param gets noise (norm scales start at ones)."""
  preset, fields, _ = OURS[name]
  config = models.ModelConfig.from_dict({**preset, **TINY, **fields})
  params = models.init_params(config, jax.random.key(seed))
  rng = np.random.default_rng(seed)
  return config, jax.tree.map(
      lambda x: np.asarray(x) + 0.2 * rng.standard_normal(x.shape).astype(np.float32), params)


def _hf_dir(tmp_path, name: str, **save_kwargs) -> tuple[torch.nn.Module, str]:
  model = HF_MODELS[name]()
  path = str(tmp_path / f'hf_{name}')
  model.save_pretrained(path, **save_kwargs)
  return model, path


def _files(path: str) -> dict[str, np.ndarray]:
  with hf_io.SafetensorsSource(path) as source:
    return {name: source.read(name, ()) for name in source.names()}


# ---------------------------------------------------------------------------- ours -> HF


@pytest.mark.parametrize('name', sorted(OURS))
def test_export_loads_in_hf_with_equal_logits(tmp_path, name):
  config, params = _our_model(name)
  hf_io.save_hf(params, config, str(tmp_path / 'hf'))
  theirs = OURS[name][2].from_pretrained(str(tmp_path / 'hf')).eval()
  check_logits(theirs, config, params)
  head = theirs.get_output_embeddings().weight
  assert (head.data_ptr() == theirs.get_input_embeddings().weight.data_ptr()) == (
      config.logits_via_embedding)
  if config.architecture == 'encoder_decoder':
    assert theirs.config.scale_decoder_outputs == config.logits_via_embedding


def test_export_refuses_what_hf_cannot_express(tmp_path):
  config, params = _our_model('t5_1_1')
  with pytest.raises(ValueError, match=r'Cannot export to HF t5: scale_attention_logits=True'):
    hf_io.save_hf(params, dataclasses.replace(config, scale_attention_logits=True),
                  str(tmp_path / 'a'))
  llama, llama_params = _our_model('llama_tied')
  with pytest.raises(ValueError, match=r'scale_tied_logits=True \(HF llama has False\)'):
    hf_io.save_hf(llama_params, dataclasses.replace(llama, scale_tied_logits=True),
                  str(tmp_path / 'b'))
  with pytest.raises(ValueError, match=r"activations=\('silu', 'linear'\)"):
    hf.config_to_hf(dataclasses.replace(config, activations=('silu', 'linear')))
  assert not os.path.exists(tmp_path / 'a') and not os.path.exists(tmp_path / 'b')


@pytest.mark.parametrize('name', sorted(HF_MODELS))
@pytest.mark.parametrize('scan_layers', [False, True])
def test_round_trip_is_bit_exact(tmp_path, name, scan_layers):
  _, path = _hf_dir(tmp_path, name)
  config, params = hf_io.load_hf_checkpoint(path, scan_layers=scan_layers)
  hf_io.save_hf(params, config, str(tmp_path / 'back'))
  before, after = _files(path), _files(str(tmp_path / 'back'))
  assert before.keys() == after.keys()
  for key in before:
    assert before[key].dtype == after[key].dtype
    np.testing.assert_array_equal(before[key], after[key], err_msg=key)
  with open(tmp_path / 'back' / 'config.json', encoding='utf-8') as f:
    assert hf.config_from_hf(json.load(f), scan_layers=scan_layers) == config


# ------------------------------------------------- T5 heads as transformers 4 and 5 save them


def test_t5_1_1_saved_by_transformers_5_is_tied_and_unscaled(tmp_path):
  """transformers 5 ties T5's lm_head at construction even with tie_word_embeddings=False and
  saves no lm_head.weight; it runs such a model with tied, unscaled logits, and so do we."""
  torch.manual_seed(0)
  model = transformers.T5ForConditionalGeneration(transformers.T5Config(
      vocab_size=300, d_model=48, num_heads=3, d_kv=16, d_ff=80, num_layers=3,
      num_decoder_layers=2, feed_forward_proj='gated-gelu', tie_word_embeddings=False,
      dropout_rate=0.0))
  model.save_pretrained(tmp_path)
  with open(tmp_path / 'config.json', encoding='utf-8') as f:
    saved = json.load(f)
  assert (saved['tie_word_embeddings'], saved['scale_decoder_outputs']) == (True, False)
  assert 'lm_head.weight' not in _files(str(tmp_path))
  config, params = hf_io.load_hf_checkpoint(str(tmp_path))
  assert config.logits_via_embedding and not config.scale_tied_logits
  reloaded = transformers.T5ForConditionalGeneration.from_pretrained(str(tmp_path)).eval()
  check_logits(reloaded, config, params)


def _write_transformers_4_dir(path, model: torch.nn.Module, hf_config: dict) -> None:
  """`model` as transformers 4 saved it: its config fields (no `scale_decoder_outputs`) and
  a safetensors file without the embedding's tied copies."""
  os.makedirs(path)
  with open(os.path.join(path, 'config.json'), 'w', encoding='utf-8') as f:
    json.dump({**hf_config, 'transformers_version': '4.46.3'}, f)
  tensors = {name: t.detach().numpy() for name, t in model.state_dict().items()
             if name not in ('encoder.embed_tokens.weight', 'decoder.embed_tokens.weight')}
  save_file(tensors, os.path.join(path, 'model.safetensors'), metadata={'format': 'pt'})


_T5_4X_FIELDS = dict(
    model_type='t5', architectures=['T5ForConditionalGeneration'], vocab_size=VOCAB,
    d_model=32, d_kv=8, d_ff=64, num_heads=4, num_layers=2, num_decoder_layers=3,
    relative_attention_num_buckets=16, relative_attention_max_distance=20, dropout_rate=0.0,
    layer_norm_epsilon=1e-6, is_encoder_decoder=True, decoder_start_token_id=0,
    pad_token_id=0, eos_token_id=1)


@pytest.mark.parametrize('version', ['1.1', '1.0'])
def test_t5_saved_by_transformers_4_converts(tmp_path, version):
  """T5.1.1 in transformers 4: tie_word_embeddings=false and its own lm_head.weight; T5 1.0:
  no tie flag (True by default), no lm_head.weight, logits scaled by d_model**-0.5."""
  if version == '1.1':
    model = hf_t5('gated-gelu', tied=False)
    fields = dict(feed_forward_proj='gated-gelu', tie_word_embeddings=False)
  else:
    model = hf_t5('relu', tied=True)
    fields = dict(feed_forward_proj='relu')
  path = str(tmp_path / 'hf')
  state = model.state_dict()
  if version == '1.0':  # transformers 4 drops the tied head from the files
    model.lm_head.weight = torch.nn.Parameter(state['shared.weight'].clone())
  _write_transformers_4_dir(path, model, {**_T5_4X_FIELDS, **fields})
  if version == '1.0':
    os.remove(os.path.join(path, 'model.safetensors'))
    save_file({k: v.numpy() for k, v in state.items() if 'embed_tokens' not in k
               and k != 'lm_head.weight'}, os.path.join(path, 'model.safetensors'),
              metadata={'format': 'pt'})
  assert ('lm_head.weight' in _files(path)) == (version == '1.1')
  config, params = hf_io.load_hf_checkpoint(path)
  assert config.logits_via_embedding == config.scale_tied_logits == (version == '1.0')
  check_logits(model, config, params)  # against the model that was saved
  reloaded = transformers.T5ForConditionalGeneration.from_pretrained(path).eval()
  check_logits(reloaded, config, params)  # and against transformers 5 reading the files


def test_tied_unscaled_t5_exports_as_transformers_5_writes_it(tmp_path):
  config, params = _our_model('t5_1_1')
  config = dataclasses.replace(config, logits_via_embedding=True, scale_tied_logits=False)
  del params['logits_dense']
  # An unscaled tied head: embeddings of norm ~1, so logits are O(1) as the tolerance assumes.
  params['token_embedder']['embedding'] *= config.d_model**-0.5
  hf_config = hf_io.save_hf(params, config, str(tmp_path / 'hf'))
  assert (hf_config['tie_word_embeddings'], hf_config['scale_decoder_outputs']) == (True, False)
  theirs = transformers.T5ForConditionalGeneration.from_pretrained(str(tmp_path / 'hf')).eval()
  check_logits(theirs, config, params)
  assert hf_io.load_hf_checkpoint(str(tmp_path / 'hf'))[0] == config


def test_cli_convert_on_five_devices_of_a_model_without_tokenizer(tmp_path):
  """d_model 48 on a 5-device host: `embed` dims are read replicated, with one warning. The
  directory has no tokenizer: eval asks for one, export writes none (never a substitute)."""
  torch.manual_seed(0)
  model = transformers.T5ForConditionalGeneration(transformers.T5Config(
      vocab_size=300, d_model=48, num_heads=3, d_kv=16, d_ff=80, num_layers=3,
      num_decoder_layers=2, feed_forward_proj='gated-gelu', tie_word_embeddings=False,
      dropout_rate=0.0)).eval()
  model.save_pretrained(tmp_path / 'hf')
  out = tmp_path / 'ours'
  run = Run(['convert', f'--hf_dir={tmp_path / "hf"}', f'--workdir={out}'],
            str(tmp_path / 'logs'), 'convert', devices=5).check()
  warnings = [line for line in run.stderr.splitlines() if 'replicated along' in line]
  assert len(warnings) == 1 and "logical axis 'embed' (size 48) 5 ways" in warnings[0]
  config = _load_config(str(out / 'config.py'))
  model_config = config_lib.model_config(config)
  params, _ = eval_commands.load_params(config, str(out), eval_commands.make_partitioner(config))
  check_logits(model, model_config, jax.device_get(params))
  assert config.data.vocabulary == tasks.NO_VOCABULARY
  logs = str(tmp_path / 'logs')
  no_vocabulary = Run(['eval', f'--config={out / "config.py"}', f'--workdir={out}'], logs,
                      'eval', devices=5).wait()
  assert_one_error_line(no_vocabulary, 'has no tokenizer', '--config.data.vocabulary=')
  Run(['export', f'--config={out / "config.py"}', f'--workdir={out}',
       f'--hf_dir={tmp_path / "back"}'], logs, 'export', devices=5).check()
  assert sorted(os.listdir(tmp_path / 'back')) == ['config.json', 'model.safetensors']
  bad = Run(['convert', f'--hf_dir={tmp_path / "hf"}', f'--workdir={tmp_path / "x"}',
             '--mesh_shape=1,two,1'], str(tmp_path / 'logs'), 'bad_mesh', devices=5).wait()
  assert_one_error_line(bad, '--mesh_shape=1,two,1', 'three integers')
  assert not (tmp_path / 'x').exists()


# ---------------------------------------------------------------- sharded streaming import


@pytest.fixture(name='reads')
def _reads(monkeypatch):
  """Every (HF tensor, elements) read from safetensors files."""
  reads = []
  read = hf_io.SafetensorsSource.read

  def recording(self, name, index):
    array = read(self, name, index)
    reads.append((name, array.size))
    return array

  monkeypatch.setattr(hf_io.SafetensorsSource, 'read', recording)
  return reads


@pytest.mark.parametrize('name, scan_layers', [('t5', False), ('llama', True)])
def test_sharded_import_reads_only_each_shard(tmp_path, reads, name, scan_layers):
  model = (hf_t5('gated-gelu', tied=False) if name == 't5'
           else hf_llama(tied=False, num_heads=8, num_kv_heads=4))
  model.save_pretrained(tmp_path, max_shard_size='40KB')
  assert (tmp_path / 'model.safetensors.index.json').exists()
  partitioner = partitioning.Partitioner(partitioning.make_mesh((1, 2, 4)))
  config, params = hf_io.load_hf_checkpoint(str(tmp_path), partitioner, scan_layers=scan_layers)
  check_logits(model, config, params)

  sizes = {key: value.size for key, value in load_file_all(tmp_path).items()}
  flat = traverse_util.flatten_dict(params, sep='/')
  split = {}
  for path, tensors in hf._leaf_rules(config).items():  # pylint: disable=protected-access
    indices = flat[path].sharding.devices_indices_map(flat[path].shape).values()
    distinct = len({tuple((s.start, s.stop) for s in index) for index in indices})
    for tensor in tensors:
      split[tensor.hf_name] = distinct
  # Each tensor is read once per distinct shard (devices holding the same slice share a
  # read), each read exactly that shard: no one reads a whole sharded tensor.
  per_tensor = collections.defaultdict(list)
  for key, size in reads:
    per_tensor[key].append(size)
  assert per_tensor.keys() == sizes.keys()
  for key, got in per_tensor.items():
    assert got == [sizes[key] // split[key]] * split[key], key
  assert split[hf._family(config).embedding] == 8  # pylint: disable=protected-access
  assert sum(n > 1 for n in split.values()) == len(split)  # every tensor is split


def load_file_all(path) -> dict[str, np.ndarray]:
  """All tensors of a sharded HF checkpoint directory."""
  with open(os.path.join(path, 'model.safetensors.index.json'), encoding='utf-8') as f:
    shards = sorted(set(json.load(f)['weight_map'].values()))
  return {k: v for shard in shards for k, v in load_file(os.path.join(path, shard)).items()}


# -------------------------------------------------------------------------------- bad input


def _break(path: str, kind: str) -> str:
  """Spoils one thing in an HF Llama directory; returns the error fragment expected."""
  weights = os.path.join(path, 'model.safetensors')
  state = load_file(weights)
  if kind == 'model_type':
    with open(os.path.join(path, 'config.json'), encoding='utf-8') as f:
      hf_config = json.load(f)
    with open(os.path.join(path, 'config.json'), 'w', encoding='utf-8') as f:
      json.dump({**hf_config, 'model_type': 'bert'}, f)
    return "Unsupported HF model_type 'bert'"
  if kind == 'missing':
    del state['model.layers.1.mlp.up_proj.weight']
    fragment = "Missing HF tensor(s) 'model.layers.1.mlp.up_proj.weight' (shape (64, 32))"
  elif kind == 'shape':
    state['model.layers.0.self_attn.k_proj.weight'] = np.zeros((32, 32), np.float32)
    fragment = "'model.layers.0.self_attn.k_proj.weight' has shape (32, 32); expected (16, 32)"
  else:
    state['model.layers.0.mlp.down_proj.weight'] = np.zeros((32, 64), np.int32)
    fragment = ("'model.layers.0.mlp.down_proj.weight' has dtype int32; expected floats "
                '(float16/bfloat16/float32/float64) of shape (32, 64)')
  save_file(state, weights, metadata={'format': 'pt'})
  return fragment


BAD = ('model_type', 'missing', 'shape', 'dtype')


@pytest.mark.parametrize('kind', BAD)
def test_bad_checkpoint_is_one_clear_error(tmp_path, kind):
  _, path = _hf_dir(tmp_path, 'llama')
  fragment = _break(path, kind)
  with pytest.raises(ValueError) as error:
    hf_io.load_hf_checkpoint(path)
  assert fragment in str(error.value)


# ---------------------------------------------------------------------- tokenizers


@pytest.fixture(scope='module')
def tokenizers(tmp_path_factory):
  """A T5-layout spiece.model and a Llama-layout tokenizer.model, 400 pieces each."""
  root = tmp_path_factory.mktemp('tokenizers')
  texts = list(itertools.islice(vocabularies.corpus_texts(['translate_en_de']), 400))
  t5 = vocabularies.train_sentencepiece(texts, str(root / 'spiece'), 400)
  spm.SentencePieceTrainer.train(  # SentencePiece's defaults are Llama's: unk 0, bos 1, eos 2
      sentence_iterator=iter(texts), model_prefix=str(root / 'tokenizer'), vocab_size=400,
      byte_fallback=True, minloglevel=2)
  return {'t5': t5, 'llama': str(root / 'tokenizer.model'), 'text': texts[0]}


def test_llama_tokenizer_is_a_vocabulary_with_its_own_eos(tokenizers):
  config = config_lib.base_config(config_lib.LLAMA, num_heads=4, d_model=32)
  config.data.update(task='translate_en_de', vocabulary=tokenizers['llama'])
  task = eval_commands.eval_task(config)
  vocabulary = task.output_features['targets'].vocabulary
  assert (vocabulary.eos_id, vocabulary.unk_id, vocabulary.extra_ids) == (2, 0, 0)
  assert vocabulary.vocab_size == 400
  assert all(f.vocabulary == vocabulary for f in task.output_features.values())
  example = task.preprocess(task.source('validation')[0])
  assert example['targets'][-1] == 2 and 0 not in example['targets']
  config.eval.num_examples = 2
  evaluator = eval_commands.evaluator_from_config(config)
  assert evaluator.decode_config.eos_id == 2 and evaluator.vocabulary == vocabulary
  mixture = tasks.with_vocabulary(tasks.get('pretrain_span_corruption'), tokenizers['t5'])
  assert {f.vocabulary.model_file for t in mixture.tasks
          for f in t.output_features.values()} == {tokenizers['t5']}


# ---------------------------------------------------------------- CLI: convert and export


def _load_config(path: str):
  spec = importlib.util.spec_from_file_location('converted_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def test_cli_score_of_a_converted_llama_equals_hf_with_its_bos(tmp_path, tokenizers):
  """HF runs Llama on BOS + text; the converted model's start token is that BOS (1), so
  `score` gives HF's log-likelihood of the targets after BOS + input."""
  model = hf_llama(tied=False, vocab_size=400)
  assert model.config.bos_token_id == 1
  hf_dir, out = tmp_path / 'hf', tmp_path / 'ours'
  model.save_pretrained(hf_dir)
  shutil.copyfile(tokenizers['llama'], hf_dir / 'tokenizer.model')
  logs = str(tmp_path / 'logs')
  Run(['convert', f'--hf_dir={hf_dir}', f'--workdir={out}'], logs, 'convert', devices=1).check()
  config = _load_config(str(out / 'config.py'))
  assert config.model.decoder_start_token_id == 1 and config.data.converter == 'lm'
  Run(['score', f'--config={out / "config.py"}', f'--workdir={out}',
       '--config.eval.num_examples=3', '--config.mesh_shape=(1,1,1)',
       '--config.data.feature_lengths.inputs=256', '--config.data.feature_lengths.targets=256'],
      logs, 'score', devices=1).check()
  with open(out / 'score_translate_en_de_validation.jsonl', encoding='utf-8') as f:
    rows = [json.loads(line) for line in f]
  tokenizer = spm.SentencePieceProcessor(model_file=tokenizers['llama'])
  for row in rows:
    prompt = [tokenizer.bos_id()] + tokenizer.encode(row['input']) + [tokenizer.eos_id()]
    target = tokenizer.encode(row['target']) + [tokenizer.eos_id()]
    with torch.no_grad():
      logits = model(torch.tensor([prompt + target])).logits[0].double()
    log_probs = torch.log_softmax(logits, -1)[len(prompt) - 1:-1]
    theirs = log_probs[torch.arange(len(target)), torch.tensor(target)].sum().item()
    assert row['log_likelihood'] == pytest.approx(theirs, abs=1e-3), row


def test_cli_convert_then_export_round_trips_with_tokenizer(tmp_path, tokenizers):
  model = hf_t5('gated-gelu', tied=False, vocab_size=512)  # spiece: 400 pieces + 100 extra
  hf_dir, out, back = tmp_path / 'hf', tmp_path / 'ours', tmp_path / 'back'
  model.save_pretrained(hf_dir)
  shutil.copyfile(tokenizers['t5'], hf_dir / 'spiece.model')
  bad_dirs = {}
  for kind in ('model_type', 'dtype'):  # the library test covers every kind
    _, bad_dirs[kind] = _hf_dir(tmp_path / kind, 'llama')
  bad = {kind: (Run(['convert', f'--hf_dir={path}', f'--workdir={tmp_path / kind / "out"}'],
                    str(tmp_path / 'logs'), kind, devices=8), _break(path, kind))
         for kind, path in bad_dirs.items()}
  run = Run(['convert', f'--hf_dir={hf_dir}', f'--workdir={out}'], str(tmp_path / 'logs'),
            'convert', devices=8).wait()
  assert run.returncode == 0, run.stderr[-3000:]
  assert 'config.py' in run.stdout and 'spiece.model' in run.stdout
  assert sorted(os.listdir(out)) == ['checkpoints', 'config.py', 'spiece.model']
  config = _load_config(str(out / 'config.py'))
  assert config.data.vocabulary == str(out / 'spiece.model')
  assert config_lib.model_config(config) == hf.config_from_hf(model.config.to_dict())

  runs = {
      'export': Run(['export', f'--config={out}/config.py', f'--workdir={out}',
                     f'--hf_dir={back}'], str(tmp_path / 'logs'), 'export'),
      'again': Run(['convert', f'--hf_dir={hf_dir}', f'--workdir={out}'],
                   str(tmp_path / 'logs'), 'again'),
      'no_tokenizer': Run(['export', f'--config={out}/config.py', f'--workdir={out}',
                           f'--hf_dir={tmp_path / "bare"}', '--no_tokenizer'],
                          str(tmp_path / 'logs'), 'no_tokenizer'),
  }
  for kind, (bad_run, fragment) in bad.items():
    assert_one_error_line(bad_run.wait(), fragment)
    assert not os.path.exists(tmp_path / kind / 'out'), kind
  assert_one_error_line(runs['again'].wait(), 'already exists and is not empty')
  assert runs['export'].wait().returncode == 0, runs['export'].stderr[-3000:]
  assert sorted(os.listdir(back)) == ['config.json', 'model.safetensors', 'spiece.model']
  runs['no_tokenizer'].check()
  assert sorted(os.listdir(tmp_path / 'bare')) == ['config.json', 'model.safetensors']
  original = load_file(hf_dir / 'model.safetensors')
  exported = load_file(back / 'model.safetensors')
  assert original.keys() == exported.keys()
  assert all(np.array_equal(original[k], exported[k]) for k in original)
  ours = vocabularies.SentencePieceVocabulary(back / 'spiece.model')
  theirs = transformers.AutoTokenizer.from_pretrained(str(back))
  text = tokenizers['text']
  assert theirs(text)['input_ids'] == ours.encode(text) + [ours.eos_id]


# ------------------------------------------------------------------------ fine-tuning


class _Batches:
  """The same in-memory batch every step, with the data-state API the trainer expects."""

  def __init__(self, batch):
    self.batch = batch

  def __next__(self):
    return dict(self.batch)

  def get_state(self):
    return {}

  def set_state(self, state):
    del state


def test_fine_tune_starts_from_the_imported_weights(tmp_path, monkeypatch):
  model = HF_MODELS['t5_1_1']()
  model.save_pretrained(tmp_path / 'hf')
  hf_io.convert(str(tmp_path / 'hf'), str(tmp_path / 'ours'))
  config = _load_config(str(tmp_path / 'ours' / 'config.py'))
  config.train.update(num_steps=2, batch_size=8, log_every=1, checkpoint_every=1000,
                      z_loss=0.0, init_from=str(tmp_path / 'ours' / 'checkpoints'))
  inputs, targets = right_padded([9, 5] * 4, seed=4), right_padded([6, 3] * 4, seed=5)
  batch = {'encoder_input_tokens': inputs, 'decoder_target_tokens': targets,
           'decoder_input_tokens': np.pad(targets, ((0, 0), (1, 0)))[:, :-1],
           'decoder_loss_weights': (targets > 0).astype(np.float32)}
  batch = {k: v.astype(np.float32 if k == 'decoder_loss_weights' else np.int32)
           for k, v in batch.items()}
  initial = {}
  init_state = trainer.init_state

  def recording_init_state(*args, **kwargs):
    state = init_state(*args, **kwargs)
    initial['params'] = jax.device_get(state.params)
    return state

  monkeypatch.setattr(trainer, 'init_state', recording_init_state)
  trainer.train(config, str(tmp_path / 'run'), make_batches=lambda *_: _Batches(batch))

  imported = hf.params_from_hf({k: v.detach().numpy() for k, v in model.state_dict().items()},
                               config_lib.model_config(config))
  jax.tree.map(np.testing.assert_array_equal, initial['params'], imported)
  with open(tmp_path / 'run' / 'metrics.jsonl', encoding='utf-8') as f:
    first = json.loads(f.readline())
  labels = torch.tensor(np.where(targets > 0, targets, -100))
  with torch.no_grad():
    theirs = model(input_ids=torch.tensor(inputs), attention_mask=torch.tensor(inputs > 0),
                   labels=labels).loss.item()
  print(f'step-1 loss {first["loss"]:.6f}, HF loss {theirs:.6f}')
  assert first['step'] == 1 and abs(first['loss'] - theirs) <= 1e-4
