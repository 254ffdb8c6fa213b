"""Random-access data sources (`len(source)`, `source[i] -> dict`) that grain reads directly.

File data is small here, so file sources parse every row at construction and any bad line
fails at once, with its `file:line`, instead of midway through training. TFDS datasets are
read by `tfds_builders.TfdsSource`.
"""

import csv
import functools
import glob
import gzip
import hashlib
import json
import pathlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

from absl import logging

CORPORA_DIR = pathlib.Path(__file__).parent / 'corpora'
SPLITS = ('train', 'validation', 'test')
# Fields of the bundled corpora (t5x_lite/data/corpora/README.md); every value is a string.
CORPORA = {
    'translate_en_de': ('id', 'en', 'de'),
    'translate_en_fr': ('id', 'en', 'fr'),
    'translate_en_zh': ('id', 'en', 'zh'),
    'summarize_debian': ('id', 'description', 'synopsis'),
    'classify_debian_section': ('id', 'description', 'section'),
    'sentiment_rt': ('id', 'text', 'label'),
    'pretrain_text': ('id', 'text'),
}
FORMATS = ('tsv', 'csv', 'jsonl', 'text')
# File name endings -> format, for `format_of` ('.gz' is looked through).
_EXTENSIONS = {'.tsv': 'tsv', '.csv': 'csv', '.jsonl': 'jsonl', '.json': 'jsonl',
               '.txt': 'text'}
BAD_ROWS = ('error', 'skip')

Example = dict[str, Any]


class DataSource(Protocol):
  """What grain needs from a source: its length and random access to examples."""

  def __len__(self) -> int: ...

  def __getitem__(self, index: int) -> Example: ...


class InMemorySource:
  """A source over a list of dicts, or over a function returning them."""

  def __init__(self, rows: Sequence[Example] | Callable[[], Sequence[Example]]):
    self._rows = list(rows() if callable(rows) else rows)
    if not self._rows:
      raise ValueError('InMemorySource got no rows; pass a non-empty list of dicts')
    for index, row in enumerate(self._rows):
      if not isinstance(row, dict):
        raise TypeError(f'InMemorySource row {index} is a {type(row).__name__}, not a dict')

  def __len__(self) -> int:
    return len(self._rows)

  def __getitem__(self, index: int) -> Example:
    # A copy, so a preprocessor that edits its input cannot change later epochs.
    return dict(self._rows[index])


def expand(patterns: str | Sequence[str]) -> list[str]:
  """Sorted files matching each glob; a pattern matching nothing is an error."""
  files = []
  for pattern in [patterns] if isinstance(patterns, str) else patterns:
    matches = sorted(glob.glob(str(pattern), recursive=True))
    if not matches:
      raise FileNotFoundError(f'{pattern}: no such file (or no file matches this glob)')
    files.extend(matches)
  return files


def format_of(path: str) -> str:
  """The format a file name implies ('pairs.tsv.gz' -> 'tsv')."""
  suffix = pathlib.Path(path.removesuffix('.gz')).suffix
  if suffix not in _EXTENSIONS:
    raise ValueError(f'{path}: cannot tell the format from the file name; set it to one of '
                     f'{", ".join(FORMATS)}')
  return _EXTENSIONS[suffix]


def _lines(path: str) -> Iterator[tuple[int, str]]:
  """(line number, text with its newline) of every line of a plain or .gz UTF-8 file."""
  opener = gzip.open if path.endswith('.gz') else open
  with opener(path, 'rb') as f:
    for number, raw in enumerate(f, start=1):
      try:
        line = raw.decode('utf-8')
      except UnicodeDecodeError as e:
        raise ValueError(f'{path}:{number}: not valid UTF-8 ({e.reason} at byte {e.start}); '
                         're-encode the file as UTF-8') from None
      yield number, line.removesuffix('\n').removesuffix('\r') + '\n'


def content_bucket(text: str, buckets: int = 100) -> int:
  """A stable bucket in [0, buckets) from the SHA-256 of `text`: how splits are assigned
  by content, here and in the bundled corpora."""
  return int.from_bytes(hashlib.sha256(text.encode('utf-8')).digest()[:8], 'big') % buckets


class BadRow(ValueError):
  """A row that cannot become an example (wrong field count, invalid JSON, empty field)."""


def _records(path: str, format: str) -> Iterator[tuple[int, list[str] | str]]:
  """(first line number, fields) per record: a list for tsv/csv, the line otherwise.

  Blank lines (spaces at most) are skipped, but a line of empty fields is a row; csv fields
  may be quoted and span lines (RFC 4180); tsv fields are split at every tab, with no
  quoting (the TSV convention, as in seqio).
  """
  lines = _lines(path)
  if format != 'csv':
    for number, line in lines:
      if line.strip(' \r\n'):
        line = line.removesuffix('\n')
        yield number, line.split('\t') if format == 'tsv' else line
    return
  numbers = []  # the line number of each line the csv reader has taken
  def feed():
    for number, line in lines:
      numbers.append(number)
      yield line
  reader = csv.reader(feed())
  while True:
    first = len(numbers)  # the index of the record's first line
    try:
      fields = next(reader)
    except StopIteration:
      return
    except csv.Error as e:
      raise ValueError(f'{path}:{numbers[-1]}: invalid CSV ({e})') from None
    if len(fields) > 1 or fields and fields[0].strip(' '):
      yield numbers[first], fields


def _row(record: list[str] | str, format: str, columns: Sequence[str], where: str) -> Example:
  """One row from one record; `columns` name the tsv/csv fields or the required JSON keys."""
  if format == 'text':
    return {columns[0]: record}
  if format in ('tsv', 'csv'):
    if len(record) != len(columns):
      kind = 'tab-separated' if format == 'tsv' else 'comma-separated'
      raise BadRow(f'{where}: {len(record)} {kind} fields, expected {len(columns)} '
                   f'({", ".join(columns)})')
    return dict(zip(columns, record))
  try:
    row = json.loads(record)
  except json.JSONDecodeError as e:
    raise BadRow(f'{where}: invalid JSON ({e.msg} at column {e.colno})') from None
  if not isinstance(row, dict):
    raise BadRow(f'{where}: expected a JSON object, got {type(row).__name__}')
  missing = [c for c in columns if c not in row]
  if missing:
    raise BadRow(f'{where}: missing key(s) {", ".join(missing)}; '
                 f'the line has {", ".join(row) or "no keys"}')
  return row


def _check_filled(row: Example, required: Sequence[str], where: str) -> Example:
  empty = [key for key in required if isinstance(row[key], str) and not row[key].strip()]
  if empty:
    raise BadRow(f'{where}: empty field(s) {", ".join(empty)}')
  return row


class FileSource(InMemorySource):
  """Rows of TSV, CSV, JSON-lines or plain-text files (globs and .gz allowed).

  Blank lines are skipped. A bad row (wrong field count, invalid JSON, a missing or empty
  required field) stops with its `file:line`, or with bad_rows='skip' is skipped and
  counted (`skipped`, and one warning per file naming the first).

  Args:
    patterns: a path or glob, or a list of them; files are read in sorted order per pattern.
    format: 'tsv' (tab-separated, no quoting), 'csv' (RFC 4180 quoting), 'jsonl' (one
      object per line) or 'text' (each line becomes one example).
    columns: tsv/csv field names, in order, of files without a header line; for jsonl the
      keys every object must have; for text the one field name (default 'text').
    header: tsv/csv: the first line of each file names its columns. Default: True unless
      `columns` are given.
    required: fields every row must have, non-empty (e.g. those a template uses); a header
      without one of them is an error naming it and the columns found.
    bad_rows: 'error' or 'skip'.
  """

  def __init__(self, patterns: str | Sequence[str], format: str = 'jsonl',
               columns: Sequence[str] | None = None, *, header: bool | None = None,
               required: Sequence[str] = (), bad_rows: str = 'error'):
    if format not in FORMATS:
      raise ValueError(f'unknown file format {format!r}; use one of {", ".join(FORMATS)}')
    if bad_rows not in BAD_ROWS:
      raise ValueError(f'bad_rows must be one of {", ".join(BAD_ROWS)}, got {bad_rows!r}')
    header = format in ('tsv', 'csv') and (not columns if header is None else header)
    if format in ('tsv', 'csv') and not header and not columns:
      raise ValueError(f'a {format} file without a header line needs columns=(the names of '
                       'its fields, in order)')
    columns = tuple(columns or (('text',) if format == 'text' else ()))
    self.skipped = 0
    rows = []
    for path in expand(patterns):
      records = _records(path, format)
      file_columns = _header(path, next(records, None), required) if header else columns
      count, skipped = len(rows), []
      for number, record in records:
        where = f'{path}:{number}'
        try:
          rows.append(_check_filled(_row(record, format, file_columns, where), required, where))
        except BadRow as e:
          if bad_rows == 'error':
            raise
          skipped.append(str(e))
      if skipped:
        logging.warning('%s: skipped %d bad row(s) (bad_rows=skip); the first: %s', path,
                        len(skipped), skipped[0])
        self.skipped += len(skipped)
      if len(rows) == count and not skipped:
        raise ValueError(f'{path}: file is empty (no rows)')
    if not rows:
      raise ValueError(f'{patterns}: every row was bad and skipped ({self.skipped})')
    super().__init__(rows)


def _header(path: str, first: tuple[int, Any] | None, required: Sequence[str]
            ) -> tuple[str, ...]:
  """The column names on a file's first line, checked to hold every required field."""
  if first is None:
    raise ValueError(f'{path}: file is empty (not even a header line)')
  columns = tuple(name.strip() for name in first[1])
  missing = [name for name in required if name not in columns]
  if missing:
    raise ValueError(f'{path}:{first[0]}: the header has no column {", ".join(missing)} '
                     '(a template or the columns setting names it); columns found: '
                     + ', '.join(columns))
  return columns


def header_columns(path: str, format: str, required: Sequence[str] = ()) -> tuple[str, ...]:
  """The columns a tsv/csv file's header line names, checked to hold `required`."""
  return _header(path, next(_records(path, format), None), required)


@functools.cache
def corpus_source(corpus: str, split: str) -> FileSource:
  """A split ('train', 'validation', 'test') of a bundled corpus (see `CORPORA`), read once
  per process (rows are copied on access, so sharing it is safe)."""
  if corpus not in CORPORA:
    raise KeyError(f'unknown corpus {corpus!r}; bundled corpora: {", ".join(CORPORA)}')
  if split not in SPLITS:
    raise ValueError(f'unknown split {split!r} of {corpus}; use one of {", ".join(SPLITS)}')
  return FileSource(str(CORPORA_DIR / corpus / f'{split}.jsonl.gz'), 'jsonl', CORPORA[corpus])
