"""Evaluation batches: every example of a split once, in order, padded to full batches.

Every batch has the same shape (one compiled step); a boolean mask marks the
real rows. With several processes, each gets its rows of every global batch.
"""
from __future__ import annotations

from typing import Iterator

import grain
import numpy as np

from denseflow_jax.data.read_options import read_options
from denseflow_jax.errors import DataError
from denseflow_jax.sharding import BatchSplit


def eval_examples(source, num_examples: int, split: str = 'test') -> int:
  """How many examples an evaluation covers: the first ``num_examples`` of ``source``
  (-1: all); DataError if the split holds fewer."""
  total = len(source)
  if num_examples < 0:
    return total
  if num_examples > total:
    raise DataError(
        f"eval.num_examples = {num_examples} but split '{split}' has only "
        f'{total} examples; set --config.eval.num_examples={total} or -1 '
        '(whole split)')
  return int(num_examples)


def eval_num_batches(source, batch_size: int, num_examples: int = -1,
                     split: str = 'test') -> int:
  """Number of batches :func:`iterate_eval` yields (same on every process)."""
  return -(-eval_examples(source, num_examples, split) // int(batch_size))


class _EvalBatch:
  """Builds local eval batch k (picklable; used by grain's threads)."""

  def __init__(self, source, num_examples, batch: BatchSplit):
    self.source = source
    self.num_examples = num_examples
    self.global_batch = batch.size
    self.local_batch = batch.local_size
    self.batch_start = batch.start
    self.image_shape = tuple(source[0].shape)

  def __call__(self, k: int) -> tuple[np.ndarray, np.ndarray]:
    start = k * self.global_batch + self.batch_start
    images = np.zeros((self.local_batch,) + self.image_shape, np.uint8)
    mask = np.zeros((self.local_batch,), bool)
    for row in range(self.local_batch):
      if start + row < self.num_examples:
        images[row] = self.source[start + row]
        mask[row] = True
    return images, mask


def iterate_eval(source, batch: BatchSplit, num_examples: int = -1, *, prefetch: int = 1,
                 split: str = 'test') -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Batches ``(images, mask)`` covering each example once, in order.

  Every batch has the full size (uint8 ``[b, H, W, C]``, so a jitted step sees
  one shape); rows past the end of the data are zeros with ``mask`` False.
  ``batch`` is the global batch and this process's share: process ``p`` gets rows
  ``[p * b, (p + 1) * b)`` of each global batch; all processes yield the same number
  of batches.

  Args:
    source: the split (``load_split``).
    batch: e.g. ``BatchSplit(eval.batch_size, 'eval.batch_size')`` for one process.
    num_examples: the first this many examples; -1 all.
    prefetch: ``data.prefetch``.
    split: its name, for the error.

  Returns:
    An iterator of (uint8 ``[b, H, W, C]``, bool ``[b]``) with ``b = batch.local_size``.

  Raises:
    DataError: at the call (not at the first batch) for a split that is too small.
  """
  num_examples = eval_examples(source, num_examples, split)
  num_batches = -(-num_examples // batch.size)
  ds = (grain.MapDataset.range(num_batches).map(_EvalBatch(source, num_examples, batch))
        .to_iter_dataset(read_options(prefetch)))
  return iter(ds)
