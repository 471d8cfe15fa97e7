"""Checks of images and split names against the config, with messages that name the fix.

One check per question:

* :func:`validate_images`: an in-memory array is uint8 ``[N, H, W, C]`` with an image in it.
* :func:`check_fit`: the images fit the model config: their (H, W, C) against
  ``model.image_shape`` and their largest value against ``model.num_bits``. Every mismatch
  goes into one DataError with the overrides that fix them all, e.g.
  ``--config.model.image_shape=16,16,3 --config.model.num_bits=8``; given the ModelSpec,
  those overrides are first checked against the rest of the model (the multi-scale
  architecture and attention put conditions on the image size), so that an override that
  would fail next is not suggested.
* :func:`check_split`: the split names.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from denseflow_jax.errors import ConfigError, DataError
from denseflow_jax.spec import ModelSpec, spec_from_config

SPLITS = ('train', 'test')


def validate_images(images: np.ndarray, where: str) -> None:
  """Raises DataError unless ``images`` is a non-empty uint8 array ``[N, H, W, C]``.

  Args:
    images: the array.
    where: what holds the images, for the message (e.g. "data.source x.npz key 'train'").
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


def override(field: str, value) -> str:
  """The command-line override that sets ``model.<field>`` to ``value``, in a form the
  command line takes as it is (no quotes, no spaces): ``--config.model.image_shape=16,16,3``."""
  if isinstance(value, (tuple, list)):
    value = ','.join(str(int(v)) for v in value)
  return f'--config.model.{field}={value}'


def check_fit(where: str, shape: Sequence[int], top: int,
              image_shape: Sequence[int] | None, num_bits: int | None,
              spec: ModelSpec | None = None, levels: str = '') -> None:
  """Raises one DataError listing every way the images do not fit the model config.

  Args:
    where: what holds the images, for the message.
    shape: (H, W, C) of the images.
    top: their largest value (255 for data that is 8-bit by nature).
    image_shape: ``model.image_shape``; None skips the shape check.
    num_bits: ``model.num_bits``: values must be below ``2**num_bits``; None skips the check.
    spec: the ModelSpec of the run; given, the suggested overrides are checked against the
      rest of the model and the message says when they would not be enough.
    levels: what the message says of the values (default ``values reach <top>``).
  """
  shape = tuple(int(s) for s in shape)
  problems, fixes = [], {}
  if image_shape is not None and shape != tuple(int(s) for s in image_shape):
    problems.append(f'images are {"x".join(map(str, shape))} but model.image_shape = '
                    f'{tuple(int(s) for s in image_shape)}')
    fixes['image_shape'] = shape
  if num_bits is not None and int(top) >= 2 ** int(num_bits):
    problems.append(f'{levels or f"values reach {int(top)}"} but model.num_bits = {num_bits} '
                    f'allows 0..{2 ** int(num_bits) - 1}')
    fixes['num_bits'] = max(1, int(top).bit_length())
  if not problems:
    return
  flags = ' '.join(override(field, value) for field, value in fixes.items())
  message = f'{where} does not fit the model config: {"; ".join(problems)}. '
  still = _still_fails(spec, fixes)
  if still:
    raise DataError(f'{message}{flags} would not be enough: {still}')
  raise DataError(f'{message}Add: {flags}')


def _still_fails(spec: ModelSpec | None, fixes: dict) -> str:
  """The ConfigError the model would raise with ``fixes`` applied ('' if none or no spec)."""
  if spec is None:
    return ''
  try:
    spec_from_config({**dataclasses.asdict(spec), **fixes})
  except ConfigError as e:
    return str(e)
  return ''


def check_split(split: str, dataset: str) -> None:
  """Raises DataError unless ``split`` is one of :data:`SPLITS`."""
  if split not in SPLITS:
    raise DataError(
        f"split '{split}' is not available for data.dataset='{dataset}'; "
        f"use one of {SPLITS}")
