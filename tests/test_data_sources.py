"""Tests for t5x_lite.data.sources and tfds_builders: file formats, bad input, bundled corpora."""

import gzip
import hashlib
import json
import sys

import pytest

from t5x_lite.data import sources


def _write(path, text, compress=False):
  data = text.encode('utf-8') if isinstance(text, str) else text
  path.write_bytes(gzip.compress(data) if compress else data)
  return str(path)


def _manifest_rows(corpus, split):
  manifest = json.loads((sources.CORPORA_DIR / 'manifest.json').read_text())
  return manifest['corpora'][corpus][split]['rows']


# ----------------------------------------------------------------------------------------
# FileSource and InMemorySource
# ----------------------------------------------------------------------------------------


def test_tsv_glob_gz_and_blank_lines(tmp_path):
  _write(tmp_path / 'a.tsv', 'hello\tHallo\n\nthanks\tDanke\r\n')
  _write(tmp_path / 'b.tsv.gz', 'yes\tja \n', compress=True)
  source = sources.FileSource(str(tmp_path / '*.tsv*'), 'tsv', columns=('en', 'de'))
  assert len(source) == 3
  assert [source[i] for i in range(3)] == [
      {'en': 'hello', 'de': 'Hallo'}, {'en': 'thanks', 'de': 'Danke'}, {'en': 'yes', 'de': 'ja '}]


def test_jsonl_and_text(tmp_path):
  path = _write(tmp_path / 'x.jsonl', '{"q": "1+1", "a": "2", "n": 3}\n{"q": "2+2", "a": "4"}\n')
  source = sources.FileSource(path, 'jsonl', columns=('q', 'a'))
  assert source[0] == {'q': '1+1', 'a': '2', 'n': 3}
  text = sources.FileSource([_write(tmp_path / 'x.txt', 'one line\n\n two \n')], 'text')
  assert [text[0], text[1]] == [{'text': 'one line'}, {'text': ' two '}]


def test_rows_are_copies(tmp_path):
  source = sources.InMemorySource(lambda: [{'x': '1'}])
  source[0]['x'] = 'changed'
  assert source[0] == {'x': '1'}


def test_header_names_the_columns_of_tsv_and_csv(tmp_path):
  tsv = sources.FileSource(_write(tmp_path / 'p.tsv', 'en\tes\nhello\thola\n\nbye\tadiós\n'),
                           'tsv')
  assert [tsv[0], tsv[1]] == [{'en': 'hello', 'es': 'hola'}, {'en': 'bye', 'es': 'adiós'}]
  # RFC 4180: quoted commas, doubled quotes and a quoted line break; then a line number.
  csv_text = 'en,es\n"Hello, world","Hola, mundo"\n"say ""hi""","di\n""hola"""\nx,y,z\n'
  path = _write(tmp_path / 'p.csv', csv_text)
  with pytest.raises(ValueError, match=r'p\.csv:5: 3 comma-separated fields, expected 2 '
                     r'\(en, es\)'):
    sources.FileSource(path, 'csv')
  rows = sources.FileSource(path, 'csv', bad_rows='skip')
  assert rows.skipped == 1
  assert [rows[0], rows[1]] == [{'en': 'Hello, world', 'es': 'Hola, mundo'},
                                {'en': 'say "hi"', 'es': 'di\n"hola"'}]


def test_header_must_hold_the_required_columns(tmp_path):
  path = _write(tmp_path / 'p.tsv', 'en\tde\nhello\thallo\n')
  with pytest.raises(ValueError, match=r'p\.tsv:1: the header has no column es .*; columns '
                     r'found: en, de'):
    sources.FileSource(path, 'tsv', required=('en', 'es'))
  assert sources.header_columns(path, 'tsv', ('en',)) == ('en', 'de')


def test_bad_rows_error_or_skip_and_count(tmp_path):
  path = _write(tmp_path / 'p.tsv', 'en\tes\na\tb\nc\n\t  \nd\te\n')
  with pytest.raises(ValueError, match=r'p\.tsv:3: 1 tab-separated fields, expected 2'):
    sources.FileSource(path, 'tsv', required=('en', 'es'))
  empty = _write(tmp_path / 'q.tsv', 'en\tes\nx\t \n')
  with pytest.raises(ValueError, match=r'q\.tsv:2: empty field\(s\) es'):
    sources.FileSource(empty, 'tsv', required=('en', 'es'))
  source = sources.FileSource(path, 'tsv', required=('en', 'es'), bad_rows='skip')
  assert (len(source), source.skipped) == (2, 2)
  assert [source[0], source[1]] == [{'en': 'a', 'es': 'b'}, {'en': 'd', 'es': 'e'}]


@pytest.mark.parametrize('name, format', [('a.tsv', 'tsv'), ('b.csv.gz', 'csv'),
                                          ('c.jsonl', 'jsonl'), ('d.json', 'jsonl'),
                                          ('e.txt', 'text')])
def test_format_of_file_names(name, format):
  assert sources.format_of(f'dir/{name}') == format


def test_format_of_unknown_name():
  with pytest.raises(ValueError, match=r'data\.xml: cannot tell the format'):
    sources.format_of('data.xml')


def test_content_bucket_by_hand():
  digest = hashlib.sha256('translate me'.encode('utf-8')).digest()
  assert sources.content_bucket('translate me', 10_000) == int.from_bytes(digest[:8],
                                                                          'big') % 10_000


@pytest.mark.parametrize('name, content, format, columns, message', [
    ('empty.tsv', '\n  \n', 'tsv', ('a', 'b'), r'empty\.tsv: file is empty'),
    ('latin1.tsv', b'ok\tfine\ncaf\xe9\tx\n', 'tsv', ('a', 'b'),
     r'latin1\.tsv:2: not valid UTF-8'),
    ('cols.tsv', 'a\tb\na\tb\tc\n', 'tsv', ('a', 'b'),
     r'cols\.tsv:2: 3 tab-separated fields, expected 2 \(a, b\)'),
    ('key.jsonl', '{"en": "x", "de": "y"}\n\n{"en": "z"}\n', 'jsonl', ('en', 'de'),
     r'key\.jsonl:3: missing key\(s\) de; the line has en'),
    ('bad.jsonl', '{"en": "x"\n', 'jsonl', (), r'bad\.jsonl:1: invalid JSON'),
    ('list.jsonl', '["en"]\n', 'jsonl', (), r'list\.jsonl:1: expected a JSON object, got list'),
])
def test_bad_files_name_file_and_line(tmp_path, name, content, format, columns, message):
  path = _write(tmp_path / name, content)
  with pytest.raises(ValueError, match=message):
    sources.FileSource(path, format, columns)


def test_bad_arguments(tmp_path):
  with pytest.raises(FileNotFoundError, match=r'nothing\*\.tsv: no such file'):
    sources.FileSource(str(tmp_path / 'nothing*.tsv'), 'tsv', ('a',))
  with pytest.raises(ValueError, match='a tsv file without a header line needs columns'):
    sources.FileSource(str(tmp_path / 'a.tsv'), 'tsv', header=False)
  with pytest.raises(ValueError, match='unknown file format .xml.; use one of tsv, csv, jsonl'):
    sources.FileSource(str(tmp_path / 'a.xml'), 'xml')
  with pytest.raises(ValueError, match='no rows'):
    sources.InMemorySource([])
  with pytest.raises(TypeError, match='row 1 is a str'):
    sources.InMemorySource([{'a': 1}, 'b'])


# ----------------------------------------------------------------------------------------
# Bundled corpora, directly and through TFDS
# ----------------------------------------------------------------------------------------


def test_corpus_source_reads_bundled_files():
  source = sources.corpus_source('sentiment_rt', 'validation')
  assert len(source) == _manifest_rows('sentiment_rt', 'validation')
  assert {row['label'] for row in (source[i] for i in range(len(source)))} == {
      'positive', 'negative'}
  with pytest.raises(KeyError, match='unknown corpus .nope.; bundled corpora: translate_en_de'):
    sources.corpus_source('nope', 'train')
  with pytest.raises(ValueError, match='unknown split .dev. of sentiment_rt'):
    sources.corpus_source('sentiment_rt', 'dev')


def test_tfds_builder_end_to_end_offline(tmp_path):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from t5x_lite.data import tfds_builders  # pylint: disable=g-import-not-at-top
  assert set(tfds_builders.BUILDERS) == {f't5x_lite_{c}' for c in sources.CORPORA}
  builder = tfds_builders.prepare('t5x_lite_sentiment_rt', str(tmp_path))
  assert builder.info.splits['train'].num_examples == _manifest_rows('sentiment_rt', 'train')
  assert list(tmp_path.glob('t5x_lite_sentiment_rt/1.0.0/*.array_record-*'))

  source = tfds_builders.TfdsSource('t5x_lite_sentiment_rt', 'test', data_dir=str(tmp_path))
  expected = sources.corpus_source('sentiment_rt', 'test')
  assert len(source) == len(expected)
  by_id = {row['id']: row for row in (source[i] for i in range(len(source)))}
  assert [by_id[expected[i]['id']] for i in range(len(expected))] == [
      expected[i] for i in range(len(expected))]
  # The plain TFDS API reads the same files; text comes back as bytes there.
  raw = tfds.data_source('t5x_lite_sentiment_rt', split='validation', data_dir=str(tmp_path))
  assert isinstance(raw[0]['text'], bytes)
  assert 'tensorflow' not in sys.modules
  with pytest.raises(KeyError, match='known: t5x_lite_translate_en_de'):
    tfds_builders.prepare('sentiment_rt', str(tmp_path))
