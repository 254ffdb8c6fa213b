"""Hugging Face checkpoint directories: streaming sharded import, export, and the CLI's
`convert` (HF directory -> our workdir) and `export` (our run -> HF directory).

An HF directory holds `config.json`, `model.safetensors` (or `model.safetensors.index.json`
and its shards) and, for T5 and Llama, a SentencePiece `spiece.model` / `tokenizer.model`.
Imports read the safetensors files slice by slice, so a host reads only the shards of the
params its devices hold.
"""

import contextlib
import dataclasses
import json
import os
import re
import shutil
from typing import Any

import jax
import ml_collections
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from t5x_lite import checkpoints, eval_commands, hf, models, partitioning
from t5x_lite import config as config_lib
from t5x_lite.data import tasks, vocabularies

_SINGLE = 'model.safetensors'
_INDEX = 'model.safetensors.index.json'
_TOKENIZER_FILES = ('spiece.model', 'tokenizer.model')  # T5's and Llama's names
# safetensors dtype codes ('BF16', 'I64', 'F8_E4M3', 'BOOL') -> numpy's names.
_DTYPE_KINDS = {'BF': 'bfloat', 'F': 'float', 'I': 'int', 'U': 'uint'}


class SafetensorsSource(hf.TensorSource):
  """The tensors of an HF directory, read by slice from its safetensors files (memory-mapped,
  never loaded whole). Use as a context manager: it holds the files open."""

  def __init__(self, path: str):  # pylint: disable=super-init-not-called
    if os.path.exists(os.path.join(path, _SINGLE)):
      files = [_SINGLE]
    elif os.path.exists(os.path.join(path, _INDEX)):
      with open(os.path.join(path, _INDEX), encoding='utf-8') as f:
        files = sorted(set(json.load(f)['weight_map'].values()))
    else:
      raise FileNotFoundError(f'No {_SINGLE} or {_INDEX} in {path}.')
    self._files = contextlib.ExitStack()
    self._handle_of = {}
    for file in files:
      try:
        handle = self._files.enter_context(safe_open(os.path.join(path, file),
                                                     framework='numpy'))
      except Exception as e:  # SafetensorError (a truncated or corrupt file), OSError
        raise ValueError(f'cannot read {os.path.join(path, file)} ({e}); re-save or '
                         're-download it') from None
      self._handle_of.update({name: handle for name in handle.keys()})

  def names(self) -> set[str]:
    return set(self._handle_of)

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._handle_of[name].get_slice(name).get_shape())

  def dtype(self, name: str) -> str:
    code = self._handle_of[name].get_slice(name).get_dtype()
    match = re.fullmatch(r'([A-Z]+?)(\d.*)', code)
    return _DTYPE_KINDS.get(match[1], match[1].lower()) + match[2] if match else code.lower()

  def read(self, name: str, index: hf.Index) -> np.ndarray:
    return self._handle_of[name].get_slice(name)[index]

  def __enter__(self) -> 'SafetensorsSource':
    return self

  def __exit__(self, *exc_info):
    self._files.close()


def _read_hf_config(path: str) -> dict[str, Any]:
  config_path = os.path.join(path, 'config.json')
  if not os.path.isfile(config_path):
    raise FileNotFoundError(f'No config.json in {path}: not a Hugging Face model directory.')
  with open(config_path, encoding='utf-8') as f:
    try:
      return json.load(f)
    except ValueError as e:
      raise ValueError(f'{config_path} is not valid JSON ({e}); fix or re-save it') from None


def load_hf_checkpoint(path: str, partitioner: partitioning.Partitioner | None = None,
                       **overrides: Any) -> tuple[models.ModelConfig, hf.Params]:
  """Our config and params from an HF checkpoint directory (`config.json` + safetensors).

  Args:
    path: the checkpoint directory, as written by `save_pretrained`.
    partitioner: given, the params are `jax.Array`s in its shardings, each device's shard
      read from the files on its own; None gives float32 numpy arrays.
    **overrides: our config fields to set, as in `hf.config_from_hf`.
  """
  hf_config = _read_hf_config(path)
  with SafetensorsSource(path) as source:
    config = hf.config_from_hf(hf_config, hf.has_output_layer(source), **overrides)
    shardings = None
    if partitioner:
      shardings = partitioner.boxed_shardings(models.boxed_param_shapes(config),
                                              replicate_indivisible=True)
    return config, hf.params_from_source(source, config, shardings)


def _tokenizer(path: str) -> str | None:
  """The SentencePiece model in an HF directory, if any."""
  found = [os.path.join(path, name) for name in _TOKENIZER_FILES
           if os.path.isfile(os.path.join(path, name))]
  return found[0] if found else None


def _check_vocabulary(vocabulary: vocabularies.Vocabulary, config: models.ModelConfig):
  if vocabulary.vocab_size > config.vocab_size:
    raise ValueError(f'{vocabulary!r} has {vocabulary.vocab_size} ids but the model only '
                     f'{config.vocab_size}.')


def _config_file(config: models.ModelConfig, model_type: str, hf_dir: str, workdir: str,
                 tokenizer: str | None) -> str:
  """The text of a runnable config file for a converted model."""
  fields = ''.join(f'    {name}={value!r},\n' for name, value in dataclasses.asdict(config).items())
  imports, vocabulary = '', ''
  if config.architecture == 'decoder_only':
    # A causal LM (as HF runs it): eval/score attend causally over the prompt too.
    vocabulary = "  config.data.converter = 'lm'\n"
  if tokenizer:
    imports = 'import os\n\n'
    vocabulary += ('  # The tokenizer that came with the model.\n'
                   f'  config.data.vocabulary = os.path.join(os.path.dirname(__file__), '
                   f'{tokenizer!r})\n')
  else:
    vocabulary += ('  # The HF directory had no tokenizer: pass the model\'s own with\n'
                   '  # --config.data.vocabulary=PATH to evaluate or fine-tune it.\n'
                   f'  config.data.vocabulary = {tasks.NO_VOCABULARY!r}\n')
  return f'''"""HF {model_type} model converted from {os.path.abspath(hf_dir)}
by `python -m t5x_lite.main convert`.

Evaluate:  python -m t5x_lite.main eval --config={workdir}/config.py --workdir={workdir}
Fine-tune: python -m t5x_lite.main train --config={workdir}/config.py \\
    --config.train.init_from={workdir}/checkpoints --workdir=runs/finetune
"""

{imports}from t5x_lite import config as base

MODEL = dict(
{fields})


def get_config():
  config = base.base_config({{}}, **MODEL)
{vocabulary}  return config
'''


def _check_new(path: str, what: str) -> None:
  """Refuses a directory that already has files: nothing is overwritten."""
  if os.path.isdir(path) and os.listdir(path):
    raise ValueError(f'{what} {path!r} already exists and is not empty; choose a new one.')


def _new_directory(path: str, what: str) -> None:
  _check_new(path, what)
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    raise ValueError(f'cannot create {what} {path!r} ({e.strerror}).') from None


def convert(hf_dir: str, workdir: str,
            mesh_shape: tuple[int, ...] = (1, -1, 1)) -> models.ModelConfig:
  """HF directory -> `workdir/config.py`, `workdir/checkpoints/0` (params) and its tokenizer.

  The params are read sharded over `mesh_shape` (by default every local device on the fsdp
  axis), so each device reads only its slice of every tensor; a dim the mesh does not divide
  is read replicated, with a warning. Everything is checked before anything is written.

  Returns:
    The model config written.
  """
  _check_new(workdir, 'workdir')
  model_type = _read_hf_config(hf_dir).get('model_type')
  partitioner = partitioning.Partitioner(partitioning.make_mesh(mesh_shape))
  config, params = load_hf_checkpoint(hf_dir, partitioner)
  tokenizer = _tokenizer(hf_dir)
  if tokenizer:
    _check_vocabulary(vocabularies.SentencePieceVocabulary(tokenizer), config)
  _new_directory(workdir, 'workdir')
  checkpointer = checkpoints.Checkpointer(os.path.join(workdir, 'checkpoints'), save_every=1,
                                          async_save=False)
  checkpointer.save(0, {'params': params}, {}, force=True)
  checkpointer.wait()
  checkpointer.close()
  name = None
  if tokenizer:
    name = os.path.basename(tokenizer)
    shutil.copyfile(tokenizer, os.path.join(workdir, name))
  with open(os.path.join(workdir, 'config.py'), 'w', encoding='utf-8') as f:
    f.write(_config_file(config, model_type, hf_dir, workdir, name))
  return config


def save_hf(params: hf.Params, config: models.ModelConfig, hf_dir: str,
            vocabulary: vocabularies.Vocabulary | None = None) -> dict[str, Any]:
  """Writes our params as an HF directory that `from_pretrained(hf_dir)` loads offline.

  Args:
    params: our params (numpy, or jax arrays this process can read whole).
    config: their model config.
    hf_dir: a new or empty directory for `config.json`, `model.safetensors` and, for a
      SentencePiece vocabulary, the tokenizer model (`spiece.model` / `tokenizer.model`).
    vocabulary: the run's vocabulary; its EOS id goes into the config.

  Returns:
    The HF config written.
  """
  hf_config = hf.config_to_hf(config)
  state_dict = hf.params_to_hf(jax.device_get(params), config)
  if vocabulary is not None:
    _check_vocabulary(vocabulary, config)
    hf_config['eos_token_id'] = vocabulary.eos_id
  _new_directory(hf_dir, 'hf_dir')
  # HF refuses safetensors files without a 'format' it knows; 'pt' is what torch writes.
  save_file(state_dict, os.path.join(hf_dir, _SINGLE), metadata={'format': 'pt'})
  with open(os.path.join(hf_dir, 'config.json'), 'w', encoding='utf-8') as f:
    json.dump(hf_config, f, indent=2, sort_keys=True)
  if isinstance(vocabulary, vocabularies.SentencePieceVocabulary):
    shutil.copyfile(vocabulary.model_file, os.path.join(hf_dir, hf.tokenizer_file(config)))
  return hf_config


def export(config: ml_collections.ConfigDict, workdir: str, hf_dir: str,
           tokenizer: bool = True) -> int:
  """The newest checkpoint of a run -> an HF directory (see `save_hf`); returns its step.

  The run's vocabulary (`data.vocabulary`, or its task's) is written as the tokenizer unless
  `tokenizer` is False or the run has none (a model converted without one).
  """
  model_config = config_lib.model_config(config)
  hf.config_to_hf(model_config)  # an inexpressible model fails before any loading
  _check_new(hf_dir, 'hf_dir')
  vocabulary = None
  if tokenizer and config.data.vocabulary != tasks.NO_VOCABULARY:
    vocabulary = tasks.from_config(config.data).output_features['targets'].vocabulary
  params, step = eval_commands.load_params(config, workdir, eval_commands.make_partitioner(config))
  save_hf(params, model_config, hf_dir, vocabulary)
  return step
