"""TFDS builders for the bundled corpora, so `tfds.data_source('t5x_lite_<corpus>')` works.

Importing this module registers one builder per corpus in `sources.CORPORA` (e.g.
`t5x_lite_sentiment_rt`). It builds array_record files from the shipped jsonl.gz splits,
offline and without TensorFlow (TFDS reads array_record through its numpy-only path):

  prepare('t5x_lite_sentiment_rt', data_dir)   # optional: `tfds.data_source` builds on demand
  TfdsSource('t5x_lite_sentiment_rt', 'train', data_dir)      # a grain source over it

This module imports `sources` (which owns `CORPORA` and `SPLITS`), never the other way round.
"""

from typing import Any

import tensorflow_datasets as tfds

from t5x_lite.data import sources

PREFIX = 't5x_lite_'


def offline_config() -> tfds.download.DownloadConfig:
  """Download settings that never touch the network (no GCS mirror lookup)."""
  return tfds.download.DownloadConfig(try_download_gcs=False)


class _CorpusBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Builds one bundled corpus; subclasses set `corpus`."""

  VERSION = tfds.core.Version('1.0.0')
  corpus: str

  # TFDS looks for a checksums file beside a builder's code, and that lookup fails on Python
  # >= 3.9 unless `importlib_resources` is installed (an undeclared TFDS dependency,
  # tensorflow/datasets#11212). These builders download nothing, so they need no checksums.
  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> None:
    return None

  def _info(self) -> tfds.core.DatasetInfo:
    # DatasetInfo directly, not dataset_info_from_configs: the latter reads metadata files
    # (README, checksums) from a per-dataset package directory, which this module has none of.
    return tfds.core.DatasetInfo(
        builder=self,
        description=f'The bundled {self.corpus} corpus; see t5x_lite/data/corpora/README.md.',
        features=tfds.features.FeaturesDict(
            {field: tfds.features.Text() for field in sources.CORPORA[self.corpus]}))

  def _split_generators(self, dl_manager):
    del dl_manager  # the data ships with the package
    return {split: self._generate_examples(split) for split in sources.SPLITS}

  def _generate_examples(self, split):
    for row in sources.corpus_source(self.corpus, split):
      yield row['id'], row


BUILDERS = {
    f'{PREFIX}{corpus}': type(f'T5xLite_{corpus}', (_CorpusBuilder,),
                              {'name': f'{PREFIX}{corpus}', 'corpus': corpus,
                               '__module__': __name__})
    for corpus in sources.CORPORA
}


def prepare(name: str, data_dir: str | None = None) -> tfds.core.DatasetBuilder:
  """Builds dataset `name` (e.g. 't5x_lite_sentiment_rt') in `data_dir` unless already built."""
  if name not in BUILDERS:
    raise KeyError(f'unknown bundled TFDS dataset {name!r}; known: {", ".join(BUILDERS)}')
  builder = BUILDERS[name](data_dir=data_dir, file_format='array_record')
  builder.download_and_prepare(download_config=offline_config())
  return builder


def _to_text(value: Any) -> Any:
  return value.decode('utf-8') if isinstance(value, bytes) else value


class TfdsSource:
  """A split of a TFDS dataset stored as array_record, via `tfds.data_source` (no TensorFlow).

  The bundled corpora are TFDS datasets `t5x_lite_<corpus>` (see `BUILDERS`), built in
  `data_dir` on first use from the shipped files. Text features come back as `str`.
  """

  def __init__(self, name: str, split: str, data_dir: str | None = None):
    self._source = tfds.data_source(
        name, split=split, data_dir=data_dir,
        download_and_prepare_kwargs={'download_config': offline_config()})

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> sources.Example:
    return {key: _to_text(value) for key, value in self._source[index].items()}
