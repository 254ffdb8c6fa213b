"""The input pipeline on grain: a task or mixture -> batches of model features.

Stages, in order (the example stages are index-based, so they are deterministic for a seed
and their position is a small checkpointable state):

  task.source(split) -> shard [shard_index::shard_count] -> shuffle (reshuffled each epoch)
  -> repeat -> task.preprocess (its rng is fixed by seed, example and epoch)
  -> mixture: interleave the tasks by rate
  -> converter.prepare (trim or drop over-long examples, counted) -> pack or pad -> batch
  -> model features; all of this in `num_workers` processes, each on its own slice
  -> token counts / packing efficiency -> background prefetch of `prefetch` batches

The converter warns (with counts) about over-long examples; `Pipeline.converter.stats` and
`Pipeline.batch_stats.packing_efficiency()` expose the counters. Iterating the dataset
gives a grain iterator with `get_state()` / `set_state()` (a JSON-able dict): restoring a
saved state resumes exactly, mid-epoch, with shuffling, packing and workers.
"""

import dataclasses
import time
from collections.abc import Mapping

import grain
import numpy as np
from absl import flags, logging

from t5x_lite.data import feature_converters, tasks

Batch = dict[str, np.ndarray]
TaskLike = str | tasks.Task | tasks.Mixture


def _task_examples(task: tasks.Task, split: str, *, seed: int, shuffle: bool,
                   num_epochs: int | None, shard_index: int, shard_count: int
                   ) -> grain.MapDataset:
  source = task.source(split)
  if len(source) < shard_count:
    raise ValueError(f'Split {split!r} of task {task.name!r} has {len(source)} examples, '
                     f'fewer than shard_count={shard_count}; use fewer shards (hosts).')
  # Shard before shuffling: every host permutes only its own disjoint slice.
  dataset = grain.MapDataset.source(source)[shard_index::shard_count].seed(seed)
  if shuffle:
    dataset = dataset.shuffle()
  return dataset.repeat(num_epochs).random_map(task.preprocess)


def example_dataset(task: TaskLike, split: str, *, seed: int = 0, shuffle: bool = True,
                    num_epochs: int | None = 1, shard_index: int = 0, shard_count: int = 1
                    ) -> grain.MapDataset:
  """Preprocessed (tokenized) examples of a task or mixture, before conversion.

  Args:
    task: a Task or Mixture, or its registered name (t5x_lite.data.tasks).
    split: e.g. 'train' or 'validation'.
    seed: fixes the shuffle order and every preprocessor's rng.
    shuffle: shuffle each epoch (a new order per epoch).
    num_epochs: passes over the data; None repeats forever.
    shard_index, shard_count: this host's shard (e.g. jax.process_index() / process_count());
      shards are disjoint and together cover the split.

  Returns:
    A MapDataset; examples a preprocessor dropped are None there (grain skips them when
    iterating). A mixture interleaves its tasks by rate and ends with its shortest task.
  """
  if not 0 <= shard_index < shard_count:
    raise ValueError(f'Need 0 <= shard_index < shard_count, got shard_index={shard_index}, '
                     f'shard_count={shard_count}.')
  if num_epochs is not None and num_epochs < 1:
    raise ValueError(f'num_epochs must be None (repeat forever) or >= 1, got {num_epochs}.')
  task = tasks.get(task) if isinstance(task, str) else task
  options = dict(shuffle=shuffle, num_epochs=num_epochs, shard_index=shard_index,
                 shard_count=shard_count)
  if not isinstance(task, tasks.Mixture):
    return _task_examples(task, split, seed=seed, **options)
  members = task.tasks
  # A distinct seed per member, so equally long members are not shuffled alike.
  seeds = np.random.SeedSequence(seed).generate_state(len(members))
  return grain.MapDataset.mix(
      [_task_examples(t, split, seed=int(s), **options) for t, s in zip(members, seeds)],
      weights=list(task.rates))


@dataclasses.dataclass
class BatchStats:
  """Running token counts of a pipeline's batches; logs a summary every `log_every` batches.

  Counts start when the dataset is built (they are not part of the iterator state) and run
  ahead of the consumer by the batches being prefetched.
  """

  log_every: int = 1000
  batches: int = 0
  tokens: dict[str, list[int]] = dataclasses.field(default_factory=dict)

  def __call__(self, batch: Batch) -> Batch:
    for key, (used, total) in feature_converters.token_counts(batch).items():
      counts = self.tokens.setdefault(key, [0, 0])
      counts[0] += used
      counts[1] += total
    self.batches += 1
    if self.log_every and self.batches % self.log_every == 0:
      efficiency = ', '.join(f'{k} {v:.3f}' for k, v in self.packing_efficiency().items())
      logging.info('data: %d batches, packing efficiency %s', self.batches, efficiency)
    return batch

  def packing_efficiency(self) -> dict[str, float]:
    """Non-padding share of the token slots so far, per token feature and 'all'."""
    used, total = (sum(c[i] for c in self.tokens.values()) for i in (0, 1))
    shares = {k: c[0] / max(c[1], 1) for k, c in self.tokens.items()}
    return {**shares, 'all': used / max(total, 1)}


class Pipeline(grain.IterDataset):
  """The batched dataset, with its `converter` and `batch_stats` for inspection.

  `converter.stats` counts the examples converted in this process: all of them when
  num_workers=0; with workers each worker counts (and warns about) its own.
  """

  def __init__(self, parent: grain.IterDataset, converter: feature_converters.FeatureConverter,
               batch_stats: BatchStats):
    super().__init__(parent)
    self.converter = converter
    self.batch_stats = batch_stats

  def __iter__(self) -> grain.DatasetIterator:
    return self._parent.__iter__()


def _allow_unparsed_absl_flags():
  # grain 0.2.18's worker start-up reads an absl flag, which fails when no absl app parsed
  # the command line (e.g. under pytest): google/grain#1355. The defaults are what we want.
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def get_dataset(task: TaskLike, split: str, task_feature_lengths: Mapping[str, int],
                batch_size: int, *, seed: int = 0, shuffle: bool = True,
                num_epochs: int | None = None, shard_index: int = 0, shard_count: int = 1,
                pack: bool = True, converter: str = 'enc_dec', truncate: bool = True,
                num_packing_bins: int | None = None, drop_remainder: bool = True,
                num_workers: int = 0, read_threads: int = 0, prefetch: int = 2,
                log_every: int = 1000, start_id: int = 0) -> Pipeline:
  """Batches of model features for a task or mixture, e.g. for training.

  Args:
    task, split, seed, shuffle, num_epochs, shard_index, shard_count: as `example_dataset`
      (num_epochs defaults to None here: repeat forever).
    task_feature_lengths: e.g. {'inputs': 512, 'targets': 114}; the converter's lengths.
    batch_size: rows per batch (per host).
    pack: pack several examples per row (with *_segment_ids / *_positions) or pad one each.
    converter: 'enc_dec', 'lm' or 'prefix_lm' (feature_converters.CONVERTERS).
    truncate: trim over-long examples to their first tokens, or drop them; both counted.
    num_packing_bins: rows filled at once by first-fit packing (default: batch_size); more
      bins, less padding.
    drop_remainder: drop a last partial batch (only reached with finite num_epochs).
    num_workers: worker processes, each producing whole batches from its own slice of the
      examples (0: all in this process). Output depends on num_workers, so keep it fixed
      when resuming from a saved state.
    read_threads: threads reading and preprocessing examples in each process. Preprocessing
      holds the GIL, so threads only pay off for sources with slow I/O (e.g. TFDS on remote
      storage); for the bundled corpora they cost throughput.
    prefetch: batches prepared ahead in a background thread (0: none).
    log_every: log the packing efficiency so far every this many batches (0: never).
    start_id: the decoder's first input token (the model's `decoder_start_token_id`).

  Returns:
    A Pipeline (a grain IterDataset); its iterator yields dicts of int32 [batch_size, length]
    arrays and has get_state() / set_state() for exact resumption.
  """
  if batch_size < 1:
    raise ValueError(f'batch_size must be >= 1, got {batch_size}.')
  feature_converter = feature_converters.get_converter(
      converter, task_feature_lengths, truncate=truncate, start_id=start_id)
  examples = example_dataset(task, split, seed=seed, shuffle=shuffle, num_epochs=num_epochs,
                             shard_index=shard_index, shard_count=shard_count)
  dataset = examples.to_iter_dataset(grain.ReadOptions(num_threads=read_threads))
  dataset = dataset.map(feature_converter.prepare).filter(lambda x: x is not None)
  if pack:
    dataset = feature_converter.pack_dataset(dataset, num_packing_bins or batch_size)
  else:
    dataset = dataset.map(feature_converter.pad)
  dataset = (dataset.batch(batch_size, drop_remainder=drop_remainder)
             .map(feature_converter.model_features))
  if num_workers:
    # Workers hand over whole batches: shipping single examples between processes costs
    # more than tokenizing them.
    _allow_unparsed_absl_flags()
    dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=num_workers, per_worker_buffer_size=max(prefetch, 1)))
  batch_stats = BatchStats(log_every)
  dataset = dataset.map(batch_stats)
  if prefetch:
    dataset = grain.experimental.ThreadPrefetchIterDataset(
        dataset, prefetch_buffer_size=prefetch)
  return Pipeline(dataset, feature_converter, batch_stats)


def measure_throughput(dataset: grain.IterDataset, num_batches: int, warmup: int = 2
                       ) -> dict[str, float]:
  """Tokens/s of a dataset of model batches, timed over `num_batches` after `warmup`.

  'tokens_per_s' counts real (non-padding) tokens of the token features (encoder inputs plus
  decoder targets); 'slots_per_s' counts all positions including padding.
  """
  iterator = iter(dataset)
  for _ in range(warmup):
    next(iterator)
  used = total = 0
  start = time.perf_counter()
  for _ in range(num_batches):
    for batch_used, batch_total in feature_converters.token_counts(next(iterator)).values():
      used += batch_used
      total += batch_total
  seconds = time.perf_counter() - start
  iterator.close()
  return {'tokens_per_s': used / seconds, 'slots_per_s': total / seconds,
          'batches_per_s': num_batches / seconds, 'packing_efficiency': used / max(total, 1)}
