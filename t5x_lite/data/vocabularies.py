"""Vocabularies: SentencePiece models and ByT5's bytes.

T5's layout: ids 0, 1 and 2 are pad, EOS and unk; `extra_ids` sentinel ids sit at the very
end of the vocabulary, `<extra_id_0>` being the last id (T5's span-corruption convention).
Sentinels are written `<extra_id_i>` in text: `encode` maps such markers to their ids and
`decode` renders them back, so corrupted spans stay readable. A SentencePiece model with
another layout, such as Llama's (unk 0, BOS 1, EOS 2, no pad), keeps its own special ids and
gets no extra ids by default; batches are padded with id 0 all the same, so there id 0 (unk,
which byte fallback never emits) doubles as padding.

Rebuild the shipped models (see t5x_lite/data/vocabs/README.md):

    python -m t5x_lite.data.vocabularies --corpora translate_en_de --vocab_size 8000 \
        --out t5x_lite/data/vocabs/ende_8k
"""

import abc
import argparse
import dataclasses
import functools
import gzip
import hashlib
import io
import json
import os
import pathlib
import re
import time
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import sentencepiece as spm

VOCABS_DIR = pathlib.Path(__file__).parent / 'vocabs'
CORPORA_DIR = pathlib.Path(__file__).parent / 'corpora'
DEFAULT_MODEL = VOCABS_DIR / 'ende_8k.model'
_SENTINEL = re.compile(r'<extra_id_(\d+)>')

Ids = Sequence[int] | np.ndarray


class Vocabulary(abc.ABC):
  """Maps text to ids and back; subclasses supply the ids below the extra ids."""

  pad_id = 0
  eos_id = 1
  unk_id = 2
  # Joins decoded text around a sentinel; SentencePiece drops the space before a segment.
  _sentinel_separator = ''

  def __init__(self, extra_ids: int):
    if extra_ids < 0:
      raise ValueError(f'extra_ids must be >= 0, got {extra_ids}')
    self.extra_ids = extra_ids

  @property
  @abc.abstractmethod
  def base_vocab_size(self) -> int:
    """Number of ids before the extra ids."""

  @abc.abstractmethod
  def _encode_segment(self, text: str) -> list[int]:
    """Encodes text that holds no sentinel marker."""

  @abc.abstractmethod
  def _decode_segment(self, ids: list[int]) -> str:
    """Decodes ids in [pad_id + 1, base_vocab_size) other than EOS."""

  @property
  def vocab_size(self) -> int:
    """All ids, extra ids included (the model's embedding size)."""
    return self.base_vocab_size + self.extra_ids

  def sentinel_id(self, i: int) -> int:
    """The id of `<extra_id_i>`: vocab_size - 1 - i."""
    if not 0 <= i < self.extra_ids:
      raise ValueError(f'sentinel {i} out of range: {self!r} has {self.extra_ids} extra ids')
    return self.vocab_size - 1 - i

  def encode(self, text: str) -> list[int]:
    """Text -> ids, without EOS; `<extra_id_i>` (i < extra_ids) becomes `sentinel_id(i)`."""
    ids, start = [], 0
    for match in _SENTINEL.finditer(text):
      i = int(match.group(1))
      if i < self.extra_ids:
        ids += self._encode_segment(text[start:match.start()])
        ids.append(self.sentinel_id(i))
        start = match.end()
    return ids + self._encode_segment(text[start:])

  def decode(self, ids: Ids) -> str:
    """Ids -> text, stopping at the first EOS and skipping padding."""
    ids = np.asarray(ids)
    if ids.ndim != 1:
      raise ValueError(f'decode takes one 1-D id sequence, got shape {ids.shape}; '
                       'use decode_batch for a batch')
    parts, segment = [], []
    for i in ids.tolist():
      if i == self.eos_id:
        break
      if not 0 <= i < self.vocab_size:
        raise ValueError(f'id {i} out of range [0, {self.vocab_size}) of {self!r}')
      if i >= self.base_vocab_size:
        parts += [self._decode_segment(segment), f'<extra_id_{self.vocab_size - 1 - i}>']
        segment = []
      elif i != self.pad_id:
        segment.append(i)
    parts.append(self._decode_segment(segment))
    return self._sentinel_separator.join(part for part in parts if part)

  def encode_batch(self, texts: Iterable[str]) -> list[list[int]]:
    """Encodes each text (no EOS)."""
    return [self.encode(text) for text in texts]

  def decode_batch(self, batch_ids: Iterable[Ids]) -> list[str]:
    """Decodes each row of a [batch, length] array or a list of id lists."""
    return [self.decode(ids) for ids in batch_ids]


class SentencePieceVocabulary(Vocabulary):
  """A SentencePiece model; vocab_size = pieces + extra_ids.

  Its EOS and unk ids are the model's own. `extra_ids` defaults to T5's 100 for a model with
  T5's layout (pad 0) and to 0 otherwise (e.g. Llama's tokenizer.model).
  """

  _sentinel_separator = ' '

  def __init__(self, model_file: str | os.PathLike, extra_ids: int | None = None):
    self.model_file = os.fspath(model_file)
    self._sp, self._digest = _load_sentencepiece(self.model_file)
    self.eos_id, self.unk_id = self._sp.eos_id(), self._sp.unk_id()
    if extra_ids is None:
      extra_ids = 100 if self._sp.pad_id() == 0 else 0
    super().__init__(extra_ids)

  @property
  def base_vocab_size(self) -> int:
    return self._sp.get_piece_size()

  def _encode_segment(self, text: str) -> list[int]:
    return self._sp.encode(text)

  def _decode_segment(self, ids: list[int]) -> str:
    return self._sp.decode(ids)

  def normalize(self, text: str) -> str:
    """The model's normalization (NFKC, collapsed spaces): what decode(encode(text)) gives."""
    # normalize() writes spaces as the meta symbol U+2581 and prefixes one.
    return self._sp.normalize(text).replace('\u2581', ' ').lstrip(' ')

  def id_to_piece(self, i: int) -> str:
    """The piece of a non-sentinel id, e.g. '▁the' or '<0x0A>' (a byte-fallback piece)."""
    return self._sp.id_to_piece(i)

  def __repr__(self) -> str:
    return f'SentencePieceVocabulary({self.model_file!r}, extra_ids={self.extra_ids})'

  def __eq__(self, other) -> bool:
    return (isinstance(other, SentencePieceVocabulary) and self._digest == other._digest
            and self.extra_ids == other.extra_ids)

  def __hash__(self) -> int:
    return hash((self._digest, self.extra_ids))

  # Worker processes (grain's multiprocessing) reload the model instead of copying it.
  def __getstate__(self) -> dict:
    return {'model_file': self.model_file, 'extra_ids': self.extra_ids}

  def __setstate__(self, state: dict):
    self.__init__(state['model_file'], state['extra_ids'])


def _load_sentencepiece(path: str) -> tuple[spm.SentencePieceProcessor, str]:
  """Loads a .model file and checks its special ids suit padding with 0 (T5's layout, or
  Llama's with unk at 0); returns it and its sha256."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f'SentencePiece model not found: {path} (shipped models are in '
                            f'{VOCABS_DIR}; train one with train_sentencepiece)')
  with open(path, 'rb') as f:
    proto = f.read()
  try:
    sp = spm.SentencePieceProcessor(model_proto=proto)
  except RuntimeError as e:
    raise ValueError(f'{path} is not a SentencePiece model: {e}') from None
  layout = {'pad_id': sp.pad_id(), 'eos_id': sp.eos_id(), 'unk_id': sp.unk_id()}
  # Batches are padded with id 0 and loss weights drop it: it must never be real text.
  zero_is_padding = sp.pad_id() == 0 or (
      sp.pad_id() == -1 and (sp.is_unknown(0) or sp.is_control(0)))
  if not zero_is_padding or sp.eos_id() <= 0:
    raise ValueError(f'{path} has {layout}; id 0 must be padding (pad_id=0) or, with no pad '
                     'piece, unk or a control piece, and EOS must exist: T5 uses pad_id=0, '
                     'eos_id=1, unk_id=2 (what train_sentencepiece writes)')
  return sp, hashlib.sha256(proto).hexdigest()


class ByteVocabulary(Vocabulary):
  """ByT5's vocabulary: byte b is id b + 3, 125 extra ids, vocab_size 384."""

  _num_special_ids = 3  # pad, eos, unk

  def __init__(self, extra_ids: int = 125):
    super().__init__(extra_ids)

  @property
  def base_vocab_size(self) -> int:
    return self._num_special_ids + 256

  def _encode_segment(self, text: str) -> list[int]:
    return [b + self._num_special_ids for b in text.encode('utf-8')]

  def _decode_segment(self, ids: list[int]) -> str:
    replacement = '\ufffd'.encode('utf-8')  # unk is never encoded; show it like a bad byte
    data = b''.join(replacement if i == self.unk_id else bytes([i - self._num_special_ids])
                    for i in ids)
    return data.decode('utf-8', errors='replace')

  def __repr__(self) -> str:
    return f'ByteVocabulary(extra_ids={self.extra_ids})'

  def __eq__(self, other) -> bool:
    return isinstance(other, ByteVocabulary) and self.extra_ids == other.extra_ids

  def __hash__(self) -> int:
    return hash(('bytes', self.extra_ids))


@dataclasses.dataclass(frozen=True)
class Feature:
  """How a task feature is tokenized: its vocabulary, whether EOS is appended, if required."""

  vocabulary: Vocabulary
  add_eos: bool = True
  required: bool = True


@functools.cache
def default_vocabulary() -> SentencePieceVocabulary:
  """The shipped 8k English/German model used by the quickstart (8,100 ids)."""
  return SentencePieceVocabulary(DEFAULT_MODEL)


def train_sentencepiece(texts: Iterable[str], model_prefix: str, vocab_size: int = 32000, *,
                        character_coverage: float = 0.9995, num_threads: int = 2,
                        seed: int = 0, max_sentence_length: int = 16384) -> str:
  """Trains a unigram SentencePiece model with T5's layout and writes `<model_prefix>.model`.

  pad 0, eos 1, unk 2, no BOS, byte fallback (no text is ever unk). Each line of each text
  is one training sentence, taken in order; every sentence is used (no sampling), so the
  model is a function of the texts, the vocab size, the seed and `num_threads`.

  Args:
    texts: training text; empty lines are skipped.
    model_prefix: output path without the `.model` suffix.
    vocab_size: number of pieces, 256 byte pieces and the 3 special ones included (the
      vocabulary adds its extra ids on top).
    character_coverage: share of characters covered by their own piece; rarer characters
      are spelt with byte pieces.
    num_threads: trainer threads; a different count may change the model slightly.
    seed: SentencePiece's random seed.
    max_sentence_length: longer lines (in bytes) are skipped by the trainer.

  Returns:
    The path of the written model.
  """
  lines = (line for text in texts for line in text.splitlines() if line.strip())
  model = io.BytesIO()
  spm.set_random_generator_seed(seed)
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=lines, model_writer=model, vocab_size=vocab_size,
        model_type='unigram', byte_fallback=True, character_coverage=character_coverage,
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, pad_piece='<pad>', eos_piece='</s>',
        unk_piece='<unk>', input_sentence_size=0, shuffle_input_sentence=False,
        max_sentence_length=max_sentence_length, num_threads=num_threads, minloglevel=2)
  except RuntimeError as e:  # e.g. vocab_size too small for the characters to cover
    most = re.search(r'Vocabulary size too high .*<= (\d+)', str(e))
    if most:
      raise ValueError(f'vocab_size {vocab_size} is more than this text supports (at most '
                       f'{most.group(1)} pieces); choose a smaller size') from None
    raise ValueError(f'training {model_prefix}.model failed: {e}') from None
  path = f'{model_prefix}.model'
  with open(path, 'wb') as f:
    f.write(model.getvalue())
  return path


def corpus_texts(corpora: Sequence[str], split: str = 'train',
                 corpora_dir: str | os.PathLike = CORPORA_DIR) -> Iterator[str]:
  """Every text field (all but `id`) of bundled corpora, each distinct text once, in order."""
  seen = set()
  for corpus in corpora:
    path = pathlib.Path(corpora_dir) / corpus / f'{split}.jsonl.gz'
    if not path.is_file():
      known = sorted(p.name for p in pathlib.Path(corpora_dir).glob('*') if p.is_dir())
      raise FileNotFoundError(f'no corpus file {path}; known corpora: {known}')
    with gzip.open(path, 'rt', encoding='utf-8') as f:
      for line in f:
        for key, text in json.loads(line).items():
          if key != 'id' and text not in seen:
            seen.add(text)
            yield text


def _main(argv: Sequence[str] | None = None):
  parser = argparse.ArgumentParser(
      description='Train a T5-layout SentencePiece model on bundled corpora.')
  parser.add_argument('--corpora', required=True,
                      help='comma-separated corpus names under --corpora_dir, or "all"')
  parser.add_argument('--split', default='train')
  parser.add_argument('--vocab_size', type=int, default=32000)
  parser.add_argument('--out', required=True, help='output path without .model')
  parser.add_argument('--corpora_dir', default=str(CORPORA_DIR))
  args = parser.parse_args(argv)
  corpora = args.corpora.split(',')
  if corpora == ['all']:
    corpora = sorted(p.name for p in pathlib.Path(args.corpora_dir).iterdir() if p.is_dir())
  start = time.perf_counter()
  path = train_sentencepiece(corpus_texts(corpora, args.split, args.corpora_dir),
                             args.out, args.vocab_size)
  vocab = SentencePieceVocabulary(path)
  print(f'wrote {path}: {vocab.base_vocab_size} pieces (vocab_size {vocab.vocab_size} with '
        f'{vocab.extra_ids} extra ids) from {corpora} in {time.perf_counter() - start:.0f} s')


if __name__ == '__main__':
  _main()
