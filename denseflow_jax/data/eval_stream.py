"""Evaluation batches: every example of a split once, in order, padded to full batches.

Every batch has the same shape (one compiled step); a boolean mask marks the
real rows. With several processes, each gets its rows of every global batch.
"""
from __future__ import annotations

from typing import Iterator

import grain
import numpy as np

from denseflow_jax.data.sources import load_split
from denseflow_jax.data.train_stream import local_batch_size, read_options
from denseflow_jax.errors import DataError
from denseflow_jax.settings import DataSettings


def _eval_sizes(config, split, batch_size, num_examples, source):
  if batch_size is None:
    batch_size = config.eval.batch_size
  if num_examples is None:
    num_examples = config.eval.num_examples
  if source is None:
    source = load_split(config, split)
  total = len(source)
  if num_examples is None or num_examples < 0:
    num_examples = total
  elif num_examples > total:
    raise DataError(
        f"eval.num_examples = {num_examples} but split '{split}' has only "
        f'{total} examples; set --config.eval.num_examples={total} or -1 '
        '(whole split)')
  return int(batch_size), int(num_examples), source


def eval_num_batches(config, split: str = 'test', batch_size: int | None = None,
                     num_examples: int | None = None, source=None) -> int:
  """Number of batches :func:`iterate_eval` yields (same on every process)."""
  batch_size, num_examples, _ = _eval_sizes(config, split, batch_size,
                                            num_examples, source)
  return -(-num_examples // batch_size)


class _EvalBatch:
  """Builds local eval batch k (picklable; used by grain's threads)."""

  def __init__(self, source, num_examples, global_batch, local_batch,
               process_index, image_shape):
    self.source = source
    self.num_examples = num_examples
    self.global_batch = global_batch
    self.local_batch = local_batch
    self.process_index = process_index
    self.image_shape = tuple(image_shape)

  def __call__(self, k: int) -> tuple[np.ndarray, np.ndarray]:
    start = k * self.global_batch + self.process_index * self.local_batch
    images = np.zeros((self.local_batch,) + self.image_shape, np.uint8)
    mask = np.zeros((self.local_batch,), bool)
    for row in range(self.local_batch):
      if start + row < self.num_examples:
        images[row] = self.source[start + row]
        mask[row] = True
    return images, mask


def iterate_eval(config, split: str = 'test', batch_size: int | None = None,
                 num_examples: int | None = None, *, process_index: int = 0,
                 process_count: int = 1,
                 source=None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Batches ``(images, mask)`` covering each example once, in order.

  Every batch has the full size (uint8 ``[b, H, W, C]``, so a jitted step sees
  one shape); rows past the end of the data are zeros with ``mask`` False.
  With several processes, ``batch_size`` is the global batch and process ``p``
  gets rows ``[p * b, (p + 1) * b)`` of each global batch; all processes yield
  the same number of batches.

  Args:
    config: the full config.
    split: 'train' or 'test'.
    batch_size: global batch; None uses ``config.eval.batch_size``.
    num_examples: the first this many examples; -1 all; None uses
      ``config.eval.num_examples``.
    process_index: this process.
    process_count: number of processes.
    source: the split's source if already loaded.

  Returns:
    An iterator of (uint8 ``[b, H, W, C]``, bool ``[b]``) with
    ``b = batch_size // process_count``.

  Raises:
    DataError: at the call (not at the first batch) for bad settings.
  """
  batch_size, num_examples, source = _eval_sizes(config, split, batch_size,
                                                 num_examples, source)
  local_batch = local_batch_size(batch_size, process_count)
  if not 0 <= process_index < process_count:
    raise DataError(f'process_index {process_index} is not in '
                    f'[0, {process_count})')
  num_batches = -(-num_examples // batch_size)
  make = _EvalBatch(source, num_examples, batch_size, local_batch,
                    process_index, config.model.image_shape)
  ds = (grain.MapDataset.range(num_batches).map(make)
        .to_iter_dataset(read_options(DataSettings.from_config(config).prefetch)))
  return iter(ds)
