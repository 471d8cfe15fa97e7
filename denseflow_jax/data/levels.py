"""The top level of a data set: the largest value its training images take, which the
grids show as white (outputs.py). Training records it in the workdir (training_data.py).

* 'digits': 16 (``DIGITS_NUM_LEVELS - 1``), known without loading anything.
* 'npz': the largest value of the 'train' array (the split is loaded: in memory).
* 'folder' and TFDS data sets: 8-bit image files, taken as ``2**num_bits - 1``.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np

from denseflow_jax.data.sources import DIGITS_NUM_LEVELS, load_split


def train_top_level(data, image_shape: Optional[Sequence[int]],
                    num_bits: int) -> Tuple[Optional[int], str]:
  """(top, how): the largest value of the training images of ``data`` (the data settings,
  as for :func:`load_split`) and how it is known. ``top`` is None where it would not be a
  usable top level (an 'npz' train array that is empty or all zero)."""
  if data.dataset == 'digits':
    return DIGITS_NUM_LEVELS - 1, 'digits: values 0..16'
  if data.dataset == 'npz':
    images = load_split(data, 'train', image_shape, num_bits).images
    top = int(np.max(images)) if images.size else 0
    return (top if top >= 1 else None), 'the largest value of the npz train array'
  return 2 ** int(num_bits) - 1, f'taken as 2**num_bits - 1 (8-bit images, {data.dataset})'
