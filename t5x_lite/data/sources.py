"""Random-access data sources (`len(source)`, `source[i] -> dict`) that grain reads directly.

File data is small here, so file sources parse every row at construction and any bad line
fails at once, with its `file:line`, instead of midway through training.
"""

from collections.abc import Callable, Iterator, Sequence
import glob
import gzip
import json
import pathlib
from typing import Any, Protocol

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
FORMATS = ('tsv', 'jsonl', 'text')

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


def _expand(patterns: str | Sequence[str]) -> list[str]:
  """Sorted files matching each glob; a pattern matching nothing is an error."""
  files = []
  for pattern in [patterns] if isinstance(patterns, str) else patterns:
    matches = sorted(glob.glob(str(pattern), recursive=True))
    if not matches:
      raise FileNotFoundError(f'{pattern}: no such file (or no file matches this glob)')
    files.extend(matches)
  return files


def _lines(path: str) -> Iterator[tuple[int, str]]:
  """(line number, text) of the non-blank lines of a plain or .gz UTF-8 file."""
  opener = gzip.open if path.endswith('.gz') else open
  with opener(path, 'rb') as f:
    for number, raw in enumerate(f, start=1):
      try:
        line = raw.decode('utf-8').rstrip('\r\n')
      except UnicodeDecodeError as e:
        raise ValueError(f'{path}:{number}: not valid UTF-8 ({e.reason} at byte {e.start}); '
                         're-encode the file as UTF-8') from None
      if line.strip():
        yield number, line


def _parse(line: str, format: str, columns: Sequence[str], where: str) -> Example:
  """One row from one line; `columns` are TSV field names or required JSON keys."""
  if format == 'text':
    return {columns[0]: line}
  if format == 'tsv':
    fields = line.split('\t')
    if len(fields) != len(columns):
      raise ValueError(f'{where}: {len(fields)} tab-separated fields, expected '
                       f'{len(columns)} ({", ".join(columns)})')
    return dict(zip(columns, fields))
  try:
    row = json.loads(line)
  except json.JSONDecodeError as e:
    raise ValueError(f'{where}: invalid JSON ({e.msg} at column {e.colno})') from None
  if not isinstance(row, dict):
    raise ValueError(f'{where}: expected a JSON object, got {type(row).__name__}')
  missing = [c for c in columns if c not in row]
  if missing:
    raise ValueError(f'{where}: missing key(s) {", ".join(missing)}; '
                     f'the line has {", ".join(row) or "no keys"}')
  return row


class FileSource(InMemorySource):
  """Rows of TSV, JSON-lines or plain-text files (globs and .gz allowed), blank lines skipped.

  Args:
    patterns: a path or glob, or a list of them; files are read in sorted order per pattern.
    format: 'tsv' (tab-separated, no header, no quoting), 'jsonl' (one object per line) or
      'text' (each line becomes one example).
    columns: the TSV field names (required); for jsonl the keys every object must have
      (optional); for text the one field name (default 'text').
  """

  def __init__(self, patterns: str | Sequence[str], format: str = 'jsonl',
               columns: Sequence[str] | None = None):
    if format not in FORMATS:
      raise ValueError(f'unknown file format {format!r}; use one of {", ".join(FORMATS)}')
    if format == 'tsv' and not columns:
      raise ValueError('a TSV source needs columns=(names of its tab-separated fields)')
    columns = tuple(columns or (('text',) if format == 'text' else ()))
    rows = []
    for path in _expand(patterns):
      count = len(rows)
      rows.extend(_parse(line, format, columns, f'{path}:{number}')
                  for number, line in _lines(path))
      if len(rows) == count:
        raise ValueError(f'{path}: file is empty (no non-blank lines)')
    super().__init__(rows)


def corpus_source(corpus: str, split: str) -> FileSource:
  """A split ('train', 'validation', 'test') of a bundled corpus (see `CORPORA`)."""
  if corpus not in CORPORA:
    raise KeyError(f'unknown corpus {corpus!r}; bundled corpora: {", ".join(CORPORA)}')
  if split not in SPLITS:
    raise ValueError(f'unknown split {split!r} of {corpus}; use one of {", ".join(SPLITS)}')
  return FileSource(str(CORPORA_DIR / corpus / f'{split}.jsonl.gz'), 'jsonl', CORPORA[corpus])


def _to_text(value: Any) -> Any:
  return value.decode('utf-8') if isinstance(value, bytes) else value


class TfdsSource:
  """A split of a TFDS dataset stored as array_record, via `tfds.data_source` (no TensorFlow).

  The bundled corpora are TFDS datasets `t5x_lite_<corpus>` (see tfds_builders.py), built in
  `data_dir` on first use from the shipped files. Text features come back as `str`.
  """

  def __init__(self, name: str, split: str, data_dir: str | None = None):
    # Imported here: tensorflow_datasets is slow to import and only this source needs it.
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    from t5x_lite.data import tfds_builders  # pylint: disable=g-import-not-at-top
    self._source = tfds.data_source(
        name, split=split, data_dir=data_dir,
        download_and_prepare_kwargs={'download_config': tfds_builders.offline_config()})

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> Example:
    return {key: _to_text(value) for key, value in self._source[index].items()}
