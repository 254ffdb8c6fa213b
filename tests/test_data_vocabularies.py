"""Tests of t5x_lite.data.vocabularies on the real bundled corpora and the shipped models.

A 600-piece model is trained once per module on a slice of the English/German and
English/Chinese train splits (about a second); round trips use the validation splits.
"""

import copy
import gzip
import itertools
import json

import numpy as np
import pytest
import sentencepiece as spm

from t5x_lite.data import vocabularies
from t5x_lite.data.vocabularies import ByteVocabulary, Feature, SentencePieceVocabulary

TINY_PIECES = 600  # zh needs ~300 character pieces on top of the 259 byte/special ones


def _rows(corpus, split):
  path = vocabularies.CORPORA_DIR / corpus / f'{split}.jsonl.gz'
  with gzip.open(path, 'rt', encoding='utf-8') as f:
    return [json.loads(line) for line in f]


def _tiny_training_texts():
  texts = vocabularies.corpus_texts(['translate_en_de', 'translate_en_zh'])
  return list(itertools.islice(texts, 6000))


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
  prefix = tmp_path_factory.mktemp('spm') / 'tiny'
  path = vocabularies.train_sentencepiece(
      _tiny_training_texts(), str(prefix), TINY_PIECES, character_coverage=0.98)
  return SentencePieceVocabulary(path)


@pytest.fixture(scope='module')
def validation_texts():
  de = [row['de'] for row in _rows('translate_en_de', 'validation')[:100]]
  zh = [row['zh'] for row in _rows('translate_en_zh', 'validation')[:100]]
  return de + zh


def test_t5_layout(tiny):
  assert [tiny.id_to_piece(i) for i in range(4)] == ['<pad>', '</s>', '<unk>', '<0x00>']
  assert (tiny.pad_id, tiny.eos_id, tiny.unk_id) == (0, 1, 2)
  assert tiny.base_vocab_size == TINY_PIECES
  assert tiny.vocab_size == TINY_PIECES + 100
  assert tiny.sentinel_id(0) == TINY_PIECES + 99  # the last id
  assert tiny.sentinel_id(99) == TINY_PIECES  # the first id after the pieces
  with pytest.raises(ValueError, match='sentinel 100 out of range'):
    tiny.sentinel_id(100)


def test_training_is_deterministic(tiny, tmp_path):
  path = vocabularies.train_sentencepiece(
      _tiny_training_texts(), str(tmp_path / 'again'), TINY_PIECES, character_coverage=0.98)
  with open(path, 'rb') as f, open(tiny.model_file, 'rb') as g:
    assert f.read() == g.read()


def test_round_trip_real_german_and_chinese(tiny, validation_texts):
  for text in validation_texts:
    ids = tiny.encode(text)
    assert tiny.unk_id not in ids  # byte fallback spells unseen characters
    assert max(ids) < tiny.base_vocab_size
    assert tiny.decode(ids) == tiny.normalize(text)
  assert tiny.normalize('A … B，C') == 'A ... B,C'  # NFKC, as T5's models


def test_sentinel_markers_encode_and_decode(tiny):
  ids = tiny.encode('Die <extra_id_0> ist <extra_id_1>')
  assert ids.count(tiny.sentinel_id(0)) == 1 and ids[-1] == tiny.sentinel_id(1)
  assert tiny.decode(ids) == 'Die <extra_id_0> ist <extra_id_1>'
  assert tiny.decode([tiny.sentinel_id(5)]) == '<extra_id_5>'
  assert tiny.sentinel_id(0) not in tiny.encode('<extra_id_100>')  # beyond extra_ids: text


def test_decode_stops_at_eos_and_skips_padding(tiny):
  hello, rest = tiny.encode('Hallo Welt'), tiny.encode('nicht mehr')
  assert tiny.decode([0] + hello[:1] + [0] + hello[1:] + [1] + rest) == 'Hallo Welt'
  assert tiny.decode(np.array([1, *rest], np.int32)) == ''


def test_batch_encode_decode(tiny, validation_texts):
  texts = validation_texts[:3] + validation_texts[-3:]
  batch = tiny.encode_batch(texts)
  assert batch == [tiny.encode(text) for text in texts]
  padded = np.zeros((len(batch), max(map(len, batch)) + 1), np.int32)
  for row, ids in zip(padded, batch):
    row[:len(ids) + 1] = ids + [tiny.eos_id]
  assert tiny.decode_batch(padded) == [tiny.normalize(text) for text in texts]


def test_decode_rejects_bad_ids(tiny):
  with pytest.raises(ValueError, match=f'id {tiny.vocab_size} out of range'):
    tiny.decode([5, tiny.vocab_size])
  with pytest.raises(ValueError, match='id -1 out of range'):
    tiny.decode([-1])
  with pytest.raises(ValueError, match='decode_batch'):
    tiny.decode([[5, 6]])


def test_load_errors(tmp_path):
  missing = tmp_path / 'nope.model'
  with pytest.raises(FileNotFoundError, match=str(missing)):
    SentencePieceVocabulary(missing)
  garbage = tmp_path / 'garbage.model'
  garbage.write_bytes(b'not a model')
  with pytest.raises(ValueError, match='is not a SentencePiece model'):
    SentencePieceVocabulary(garbage)
  # Id 0 must be padding or a piece text never becomes: here it is an ordinary piece.
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(_tiny_training_texts()[:500]), vocab_size=300,
      model_prefix=str(tmp_path / 'zero_is_text'), minloglevel=2, unk_id=1, bos_id=2,
      eos_id=3, control_symbols=[], user_defined_symbols=['x'])
  with pytest.raises(ValueError, match='id 0 must be padding'):
    SentencePieceVocabulary(tmp_path / 'zero_is_text.model')


def test_llama_layout_keeps_its_special_ids(tmp_path):
  # SentencePiece's default layout is Llama's: unk 0, bos 1, eos 2, no pad.
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(_tiny_training_texts()[:500]), vocab_size=400,
      model_prefix=str(tmp_path / 'llama'), byte_fallback=True, character_coverage=0.98,
      minloglevel=2)
  vocab = SentencePieceVocabulary(tmp_path / 'llama.model')
  assert (vocab.pad_id, vocab.eos_id, vocab.unk_id) == (0, 2, 0)
  assert (vocab.extra_ids, vocab.vocab_size) == (0, 400)
  ids = vocab.encode('Hallo Welt')
  assert 0 not in ids and 1 not in ids  # no unk (byte fallback), no BOS
  assert vocab.decode([0] + ids + [2] + ids) == 'Hallo Welt'
  assert SentencePieceVocabulary(tmp_path / 'llama.model', extra_ids=5).vocab_size == 405


def test_training_error_is_clear(tmp_path):
  with pytest.raises(ValueError, match='Vocabulary size is smaller than required_chars'):
    vocabularies.train_sentencepiece(_tiny_training_texts(), str(tmp_path / 'x'), 300)


def test_equality_hash_and_copy(tiny):
  same = SentencePieceVocabulary(tiny.model_file)
  assert same == tiny and hash(same) == hash(tiny)
  assert SentencePieceVocabulary(tiny.model_file, extra_ids=10) != tiny
  clone = copy.deepcopy(tiny)  # what worker processes do: reload from model_file
  assert clone == tiny and clone.encode('Haus') == tiny.encode('Haus')


def test_shipped_models():
  ende = vocabularies.default_vocabulary()
  assert ende.model_file.endswith('ende_8k.model')
  assert (ende.base_vocab_size, ende.vocab_size, ende.sentinel_id(0)) == (8000, 8100, 8099)
  assert [ende.id_to_piece(i) for i in range(3)] == ['<pad>', '</s>', '<unk>']
  bundled = SentencePieceVocabulary(vocabularies.VOCABS_DIR / 'bundled_32k.model')
  assert bundled.vocab_size == 32100
  row = _rows('translate_en_zh', 'validation')[0]
  for vocab, text in [(ende, _rows('translate_en_de', 'validation')[0]['de']),
                      (bundled, row['zh']), (bundled, row['en'])]:
    ids = vocab.encode(text)
    assert vocab.decode(ids) == vocab.normalize(text)
    assert len(ids) < len(text.encode('utf-8')) / 2  # pieces, not bytes


def test_cli_trains_from_bundled_corpus(tmp_path, capsys):
  vocabularies._main(['--corpora', 'sentiment_rt', '--split', 'validation',
                      '--vocab_size', '500', '--out', str(tmp_path / 'rt')])
  assert SentencePieceVocabulary(tmp_path / 'rt.model').vocab_size == 600
  assert '500 pieces (vocab_size 600 with 100 extra ids)' in capsys.readouterr().out
  with pytest.raises(FileNotFoundError, match="known corpora: .*'translate_en_de'"):
    vocabularies._main(['--corpora', 'nope', '--out', str(tmp_path / 'x')])


def test_byte_vocabulary_layout_and_round_trip():
  vocab = ByteVocabulary()
  assert (vocab.vocab_size, vocab.extra_ids, vocab.sentinel_id(0)) == (384, 125, 383)
  assert vocab.encode('aä') == [ord('a') + 3, 0xC3 + 3, 0xA4 + 3]
  zh = _rows('translate_en_zh', 'validation')[0]['zh']
  assert vocab.decode(vocab.encode(zh)) == zh  # no normalization
  assert vocab.decode_batch([vocab.encode('x <extra_id_2> y') + [1, 50], [0, 0]]) == [
      'x <extra_id_2> y', '']
  assert vocab.encode('<extra_id_124><extra_id_125>')[0] == 259


def test_byte_vocabulary_invalid_bytes_become_replacement_characters():
  vocab = ByteVocabulary()
  assert vocab.decode([0xFF + 3, ord('a') + 3]) == '\ufffda'
  assert vocab.decode(vocab.encode('中')[:2]) == '\ufffd'  # a truncated 3-byte character
  assert vocab.decode([vocab.unk_id, ord('b') + 3]) == '\ufffdb'


def test_feature_defaults():
  feature = Feature(ByteVocabulary())
  assert (feature.add_eos, feature.required) == (True, True)
  with pytest.raises(AttributeError):
    feature.add_eos = False
