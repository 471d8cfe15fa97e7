"""The resumable training stream: shuffled, augmented batches for one process.

Each epoch of :func:`make_train_iterator` is a fresh
permutation of the training split (grain's stateless index shuffle) cut into
``steps_per_epoch = len(train) // global_batch`` global batches; the last
``len(train) % global_batch`` examples of each epoch's permutation are left out
of that epoch. Process ``p`` of ``P`` gets rows ``[p * b, (p + 1) * b)`` of each
global batch (``b = global_batch // P``), so concatenating the processes'
batches in process order gives the global batch, and each example's
augmentation is seeded by its position in the global stream: the global batches
are the same whatever the number of processes or grain workers.

:class:`TrainIterator` can save its position (``get_state``, JSON via
:func:`state_to_json`) and continue from it; the state format string is stored
in checkpoints. The position is global: batch ``n`` of every process is its rows of
global batch ``n``, whatever the process or grain-worker count, so the saved step alone
places any layout (another slice size, ``data.worker_count``) in the stream.
"""
from __future__ import annotations

import functools
import json
from typing import Callable

from absl import flags
import grain
import numpy as np

from denseflow_jax.data.augment import augment_image
from denseflow_jax.data.read_options import read_options
from denseflow_jax.errors import DataError
from denseflow_jax.settings import DataSettings
from denseflow_jax.sharding import BatchSplit

# Stored in checkpoints with the iterator state. /1 also held grain's own iterator state,
# which is per process and per worker count; /2 holds the step alone (the global position),
# so that a checkpoint written by /2 is refused, not misplaced, by code that read 'grain'.
# Both are read: a /1 state's step is its position as well.
_STATE_FORMAT = 'denseflow_jax.data.train_iterator/2'
_READABLE_FORMATS = ('denseflow_jax.data.train_iterator/1', _STATE_FORMAT)


def steps_per_epoch(num_examples: int, global_batch: int) -> int:
  """Training steps per epoch: ``num_examples // global_batch`` (DataError if none)."""
  steps = int(num_examples) // int(global_batch)
  if steps == 0:
    raise DataError(
        f'the training split has {num_examples} examples, fewer than one '
        f'global batch of {global_batch}; lower --config.train.batch_size')
  return steps


def _derived_seeds(seed: int) -> tuple[int, int]:
  """Independent (shuffle, augmentation) seeds in [0, 2**32) from a seed."""
  a, b = np.random.SeedSequence(int(seed) % 2**63).generate_state(2)
  return int(a), int(b)


class _TrainExample:
  """Maps a process-local stream index to an augmented image (picklable)."""

  def __init__(self, source, num_examples, steps, batch: BatchSplit, shuffle_seed,
               augment_seed, augmentation):
    self.source = source
    self.num_examples = num_examples
    self.steps = steps
    self.global_batch = batch.size
    self.local_batch = batch.local_size
    self.batch_start = batch.start
    self.augment_seed = augment_seed
    self.augmentation = augmentation
    # Stateless permutation; index e * n + i gives position i of epoch e's
    # permutation (grain reseeds each epoch with shuffle_seed + e).
    self.permutation = grain.MapDataset.range(num_examples).shuffle(
        seed=shuffle_seed)

  def global_position(self, index: int) -> tuple[int, int]:
    """(epoch, position within the epoch's global stream) of a local index."""
    epoch, rest = divmod(index, self.steps * self.local_batch)
    step, row = divmod(rest, self.local_batch)
    return epoch, step * self.global_batch + self.batch_start + row

  def __call__(self, index: int, unused_element) -> np.ndarray:
    epoch, position = self.global_position(index)
    example = self.permutation[epoch * self.num_examples + position]
    image = self.source[example]
    stream_index = epoch * self.steps * self.global_batch + position
    return augment_image(image, self.augmentation, (self.augment_seed, stream_index))


class TrainIterator:
  """Endless iterator of uint8 batches ``[local_batch, H, W, C]``.

  ``get_state()`` returns a JSON-serialisable dict; ``set_state(state)`` on an
  iterator built from the same data settings continues with exactly the
  batches that would have followed. The state also records the data settings
  and raises DataError when they differ. The position is the number of batches
  returned, which is the same on every process (checkpoints store process 0's
  state): ``set_state`` rebuilds the stream at that batch, so a state applies to any
  process count (another slice size) and any grain worker count. The layout that wrote
  the state is recorded in it, for the reader.
  """

  def __init__(self, stream: Callable[[int], grain.IterDataset], pipeline: dict,
               layout: dict, local_batch: int, steps: int):
    self._stream = stream         # first batch -> the stream from that batch on
    self._iterator = iter(stream(0))
    self._pipeline = _json_normalise(pipeline)
    self._layout = _json_normalise(layout)
    self._step = 0
    self.local_batch = local_batch
    self.steps_per_epoch = steps

  @property
  def step(self) -> int:
    """Number of batches returned so far (restored by set_state)."""
    return self._step

  @property
  def epoch(self) -> int:
    """Epoch of the next batch."""
    return self._step // self.steps_per_epoch

  def __iter__(self) -> 'TrainIterator':
    return self

  def __next__(self) -> np.ndarray:
    batch = next(self._iterator)
    if type(batch) is not np.ndarray:  # pylint: disable=unidiomatic-typecheck
      batch = np.array(batch)         # e.g. grain's SharedMemoryArray
    self._step += 1
    return batch

  def get_state(self) -> dict:
    """The position in the stream, as a JSON-serialisable dict."""
    return {
        'format': _STATE_FORMAT,
        'step': self._step,
        'pipeline': self._pipeline,
        'layout': self._layout,
    }

  def set_state(self, state: dict) -> None:
    """Continues from ``state`` (from get_state, possibly via JSON, of any layout)."""
    if not isinstance(state, dict) or state.get('format') not in _READABLE_FORMATS:
      raise DataError(
          'the data iterator state is not one written by '
          f'denseflow_jax.data (format {_STATE_FORMAT}); restore a checkpoint '
          'written by this version, or start the data stream afresh')
    saved = _json_normalise(state['pipeline'])
    if saved != self._pipeline:
      diff = {k: (saved.get(k), self._pipeline.get(k))
              for k in sorted(set(saved) | set(self._pipeline))
              if saved.get(k) != self._pipeline.get(k)}
      raise DataError(
          'the data iterator state was written with other data settings '
          f'(field: (checkpoint, now)) {diff}; resume with the settings of the '
          'checkpoint, or start the data stream afresh')
    # Batch n of the stream is a pure function of n (and the pipeline above), so starting
    # the stream at the saved step continues it exactly. grain's own iterator state would
    # not: it counts this process's elements per worker, and a checkpoint holds process
    # 0's only.
    step = int(state['step'])
    self.close()
    self._iterator = iter(self._stream(step))
    self._step = step

  def close(self) -> None:
    """Stops background workers (grain multiprocessing), if any."""
    close = getattr(self._iterator, 'close', None)
    if close is not None:
      close()


def _json_normalise(value):
  return json.loads(json.dumps(value))


def state_to_json(state: dict) -> str:
  """Serialises a TrainIterator state."""
  return json.dumps(state, sort_keys=True)


def state_from_json(text: str) -> dict:
  """Parses a TrainIterator state written by :func:`state_to_json`."""
  return json.loads(text)


def make_train_iterator(data: DataSettings, source, image_shape, batch: BatchSplit,
                        seed: int) -> TrainIterator:
  """Endless, shuffled, augmented training batches for one process.

  Args:
    data: the data settings (augmentation, workers, prefetch; the data set's name and
      source are recorded in the iterator state).
    source: the training split (``load_split(data, 'train', image_shape, num_bits)``).
    image_shape: (H, W, C) of its images (recorded in the state).
    batch: the global batch and this process's share (``sharding.split_batch``).
    seed: the run's seed (shuffling and augmentation derive from it).

  Returns:
    A :class:`TrainIterator` of uint8 ``[batch.local_size, H, W, C]``; its batches,
    concatenated over processes in process order, are the global batches, the same for
    any process count.
  """
  steps = steps_per_epoch(len(source), batch.size)
  shuffle_seed, augment_seed = _derived_seeds(seed)
  example = _TrainExample(source, len(source), steps, batch, shuffle_seed, augment_seed,
                          data.augmentation)
  batches = (grain.MapDataset.range(steps * batch.local_size)
             .repeat()
             .map_with_index(example)
             .batch(batch.local_size, drop_remainder=True))
  pipeline = {
      'dataset': data.dataset,
      'source': data.source,
      'num_examples': len(source),
      'image_shape': list(image_shape),
      'global_batch': batch.size,
      'seed': int(seed),
      'augmentation': data.augmentation,
  }
  layout = {'process_index': batch.process_index, 'process_count': batch.process_count,
            'worker_count': data.worker_count}
  return TrainIterator(functools.partial(_stream_from, batches, data), pipeline, layout,
                       batch.local_size, steps)


def _stream_from(batches: grain.MapDataset, data: DataSettings, start: int) -> grain.IterDataset:
  """The batches from batch ``start`` on, read ahead (by grain workers where configured)."""
  ds = batches[start:].to_iter_dataset(read_options(data.prefetch))
  if data.worker_count > 0:
    if not flags.FLAGS.is_parsed():   # grain reads flags in its workers
      flags.FLAGS.mark_as_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=data.worker_count, per_worker_buffer_size=data.prefetch))
  return ds
