"""Checks of images and split names against the config, with messages that name the fix."""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from denseflow_jax.errors import DataError

SPLITS = ('train', 'test')


def validate_image_shape(actual: Sequence[int], image_shape: Sequence[int],
                         where: str) -> None:
  """Raises DataError unless images of shape ``actual`` match ``image_shape``.

  Args:
    actual: (H, W, C) of the images found.
    image_shape: the expected (H, W, C), i.e. ``config.model.image_shape``.
    where: what holds the images, for the message (e.g. "data.source x.npz
      'train'").
  """
  actual = tuple(int(s) for s in actual)
  expected = tuple(int(s) for s in image_shape)
  if len(expected) != 3:
    raise DataError(
        f'config.model.image_shape = {expected} is not (H, W, C); set it to '
        'three integers, e.g. --config.model.image_shape="(32, 32, 3)"')
  if actual == expected:
    return
  problems = []
  if len(actual) != 3:
    problems.append(f'rank {len(actual)} instead of 3 (H, W, C)')
  else:
    if actual[2] != expected[2]:
      problems.append(f'{actual[2]} channel(s) instead of {expected[2]}')
    if actual[:2] != expected[:2]:
      problems.append(f'height x width {actual[0]}x{actual[1]} instead of '
                      f'{expected[0]}x{expected[1]}')
  raise DataError(
      f'{where} holds images of shape {actual} but config.model.image_shape = '
      f'{expected} ({"; ".join(problems)}). Fix: set '
      f'--config.model.image_shape="{actual}" if these are the images you '
      f'want, or use images of shape {expected}.')


def validate_images(images: np.ndarray, image_shape: Sequence[int] | None,
                    num_bits: int | None, where: str) -> None:
  """Checks an in-memory image array: dtype, rank, shape and value range.

  Args:
    images: the array, expected uint8 ``[N, H, W, C]``.
    image_shape: expected (H, W, C) (``config.model.image_shape``), or None to
      skip the shape check.
    num_bits: ``config.model.num_bits``; values must be below ``2**num_bits``.
      None skips the range check.
    where: what holds the images, for the message.
  """
  if not isinstance(images, np.ndarray):
    raise DataError(f'{where} is a {type(images).__name__}, not a numpy array; '
                    'store uint8 arrays [N, H, W, C]')
  if images.dtype != np.uint8:
    found = ''
    if images.size and np.issubdtype(images.dtype, np.number):
      found = f' (values {images.min():g} .. {images.max():g})'
    raise DataError(
        f'{where} has dtype {images.dtype}{found}, expected uint8 [N, H, W, C] with values '
        '0..255; convert it: np.clip(np.round(x * 255), 0, 255).astype(np.uint8) for data in '
        '0..1, np.clip(np.round(x), 0, 255).astype(np.uint8) for data in 0..255')
  if images.ndim != 4:
    hint = (' (add a channel axis: x[..., None])' if images.ndim == 3 else '')
    raise DataError(
        f'{where} has rank {images.ndim} (shape {images.shape}), expected '
        f'uint8 [N, H, W, C]{hint}')
  if images.shape[0] == 0:
    raise DataError(f'{where} holds no images (shape {images.shape}); '
                    'store at least one image [N, H, W, C] with N > 0')
  if image_shape is not None:
    validate_image_shape(images.shape[1:], image_shape, where)
  if num_bits is not None:
    top = int(images.max())
    if top >= 2**int(num_bits):
      raise DataError(
          f'{where} has values up to {top} but config.model.num_bits = '
          f'{num_bits} allows only 0..{2**int(num_bits) - 1}; set '
          f'--config.model.num_bits={max(1, math.ceil(math.log2(top + 1)))} '
          'or larger, or quantise the images')


def check_split(split: str, dataset: str) -> None:
  """Raises DataError unless ``split`` is one of :data:`SPLITS`."""
  if split not in SPLITS:
    raise DataError(
        f"split '{split}' is not available for data.dataset='{dataset}'; "
        f"use one of {SPLITS}")
