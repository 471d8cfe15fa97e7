"""Training augmentations of single uint8 ``[H, W, C]`` images.

'none'; 'horizontal_flip' (p = 0.5); 'eta', the official recipe: random
horizontal flip, edge pad, shift and centre crop (:func:`sample_eta_params`,
:func:`eta_transform`). :func:`augment` draws one, deterministic given its seed.
"""
from __future__ import annotations

import math

import numpy as np

from denseflow_jax.errors import DataError
from denseflow_jax.settings import AUGMENTATIONS
ETA_FRACTION = 0.04             # pad and maximal translation, relative to size


def eta_pad(size: int) -> int:
  """Edge padding of the 'eta' augmentation: ceil(4% of size), at least 1."""
  return max(1, math.ceil(size * ETA_FRACTION))


def sample_eta_params(rng: np.random.Generator, height: int,
                      width: int) -> tuple[bool, int, int]:
  """Draws (flip, dy, dx) for :func:`eta_transform`.

  Follows the official torchvision recipe: ``RandomHorizontalFlip()``,
  ``Pad(ceil(0.04 * H), padding_mode='edge')``,
  ``RandomAffine(degrees=0, translate=(0.04, 0.04))``, ``CenterCrop(H)``; the
  affine shift is ``round(U(-0.04 * P, 0.04 * P))`` pixels where P is the
  padded size (so |shift| <= 1 for 32x32, <= 3 for 64x64, 0 for 8x8).
  """
  flip = bool(rng.random() < 0.5)
  max_dx = ETA_FRACTION * (width + 2 * eta_pad(width))
  max_dy = ETA_FRACTION * (height + 2 * eta_pad(height))
  dx = int(round(rng.uniform(-max_dx, max_dx)))
  dy = int(round(rng.uniform(-max_dy, max_dy)))
  return flip, dy, dx


def eta_transform(image: np.ndarray, flip: bool = False, dy: int = 0,
                  dx: int = 0) -> np.ndarray:
  """The deterministic part of 'eta': flip, edge pad, shift, centre crop.

  ``out[i, j] = padded[p_h + i - dy, p_w + j - dx]`` where ``padded`` is the
  (optionally flipped) image edge-padded by ``eta_pad`` pixels; pixels shifted
  in from beyond the padding are 0, as in torchvision's RandomAffine.

  Args:
    image: uint8 ``[H, W, C]``.
    flip: mirror left-right first.
    dy: shift down by this many pixels (negative: up).
    dx: shift right by this many pixels (negative: left).

  Returns:
    Array of the same shape and dtype.
  """
  height, width = image.shape[:2]
  if flip:
    image = image[:, ::-1]
  if dy == 0 and dx == 0:
    return np.ascontiguousarray(image)
  ph, pw = eta_pad(height), eta_pad(width)
  pad_rest = ((0, 0),) * (image.ndim - 2)
  padded = np.pad(image, ((ph, ph), (pw, pw)) + pad_rest, mode='edge')
  ey, ex = abs(dy), abs(dx)
  canvas = np.pad(padded, ((ey, ey), (ex, ex)) + pad_rest, mode='constant')
  top, left = ph + ey - dy, pw + ex - dx
  return np.ascontiguousarray(canvas[top:top + height, left:left + width])


def augment_image(image: np.ndarray, augmentation: str, seed) -> np.ndarray:
  """Applies a random augmentation, deterministic given ``seed``.

  Args:
    image: uint8 ``[H, W, C]``.
    augmentation: 'none', 'horizontal_flip' (p = 0.5) or 'eta' (see
      :func:`sample_eta_params`).
    seed: anything ``numpy.random.default_rng`` takes (int or int sequence).

  Returns:
    uint8 ``[H, W, C]``.
  """
  if augmentation == 'none':
    return image
  rng = np.random.default_rng(seed)
  if augmentation == 'horizontal_flip':
    return np.ascontiguousarray(image[:, ::-1]) if rng.random() < 0.5 else image
  if augmentation == 'eta':
    flip, dy, dx = sample_eta_params(rng, image.shape[0], image.shape[1])
    return eta_transform(image, flip, dy, dx)
  raise DataError(f"data.augmentation='{augmentation}' is unknown; use one of "
                  f'{AUGMENTATIONS}')
