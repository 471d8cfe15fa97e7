"""What the modes write besides checkpoints: PNG grids of images (scaled for display),
samples as .npz and evaluation results as JSON; every file written atomically
(files.py), and none replaced: a name in use gets -2, -3, ... (`files.unused_stem`).

Display scaling: a model of `num_bits` bits stores levels 0 .. 2^bits - 1; a grid maps
the top level `top` to 255:

    pixel = min(255, round(level * 255 / top))

`top` is the data's own top level where training recorded it (the largest value of the
training images: 16 for the digits, which use 17 of a 5-bit model's 32 levels; the
largest value of the train array for 'npz'; 2^bits - 1 for image files and TFDS data;
`loading.load_model` returns it as ``loaded['data_top_level']``), so that the data's white
is white in a grid. Where nothing was recorded (runs before the record existed, converted
official models) `top` is 2^bits - 1. A sample above the data's top level (possible: the
model spans all 2^bits levels) saturates to white. Only the PNG grids are scaled: the
.npz files keep the raw levels.
"""
import math
import os
from typing import Any, Dict, Optional

import numpy as np
from PIL import Image

from denseflow_jax.files import atomic_write, unused_stem, write_json_atomic, write_npz_atomic

GRID_MIN_WIDTH = 512           # PNG grids are enlarged (whole factor) to at least this width


def display_top(num_bits: int, top: Optional[int] = None) -> int:
  """The level shown as white: `top` (the data's top level, where known) or 2^bits - 1.
  ValueError for a `top` outside 1 .. 2^bits - 1."""
  full = 2 ** int(num_bits) - 1
  if top is None:
    return full
  if not 1 <= int(top) <= full:
    raise ValueError(f'top level {top} is not in 1..{full} (num_bits = {num_bits})')
  return int(top)


def to_display(images, num_bits: int, top: Optional[int] = None) -> np.ndarray:
  """uint8 images with values 0..2^bits-1 -> 0..255, for viewing: level `top` (default
  2^bits - 1) becomes 255, pixel = min(255, round(level * 255 / top)); levels above `top`
  saturate to white (module docstring)."""
  images = np.asarray(images)
  top = display_top(num_bits, top)
  if top == 255:
    return images.astype(np.uint8)
  return np.round(images.astype(np.float64) * 255.0 / top).clip(0, 255).astype(np.uint8)


def make_grid(images, num_bits: int = 8, ncols: Optional[int] = None, padding: int = 1,
              pad_value: int = 255, top: Optional[int] = None) -> np.ndarray:
  """[N, H, W, C] -> one uint8 image [rows*(H+p)+p, ncols*(W+p)+p, C], row-major, scaled
  by `to_display(images, num_bits, top)`; ncols defaults to ceil(sqrt(N)) (near-square)."""
  images = to_display(images, num_bits, top)
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ValueError(f'expected images [N, H, W, 1 or 3], got shape {images.shape}')
  n, h, w, c = images.shape
  ncols = int(math.ceil(math.sqrt(n))) if ncols is None else int(ncols)
  nrows = -(-n // ncols)
  grid = np.full((nrows * (h + padding) + padding, ncols * (w + padding) + padding, c),
                 pad_value, np.uint8)
  for i, image in enumerate(images):
    row = padding + (i // ncols) * (h + padding)
    left = padding + (i % ncols) * (w + padding)
    grid[row:row + h, left:left + w] = image
  return grid


def save_sample_grid(path_png, images, num_bits: int = 8, ncols: Optional[int] = None,
                     padding: int = 1, pad_value: int = 255,
                     min_width: int = GRID_MIN_WIDTH, top: Optional[int] = None) -> np.ndarray:
  """Writes `make_grid(...)` as a PNG (grey for one channel, RGB for three), enlarged by the
  smallest whole factor that makes it at least `min_width` pixels wide (each pixel a
  square block: 8x8 digits stay readable); returns the grid as written. `top`: the data's
  top level, shown as white (None: 2^bits - 1; module docstring)."""
  grid = make_grid(images, num_bits, ncols, padding, pad_value, top)
  scale = max(1, -(-int(min_width) // grid.shape[1]))
  grid = grid.repeat(scale, axis=0).repeat(scale, axis=1)
  picture = Image.fromarray(grid[:, :, 0] if grid.shape[-1] == 1 else grid)
  atomic_write(path_png, lambda f: picture.save(f, format='PNG'))
  return grid


def save_samples_npz(path, images, temperature: float, seconds: float):
  """Writes `images` (uint8 [N, H, W, C]), `temperature` and `seconds` to an .npz."""
  write_npz_atomic(path, images=np.asarray(images), temperature=np.float64(temperature),
                   seconds=np.float64(seconds))


def write_eval_json(workdir, result: Dict[str, Any], name: str = 'eval') -> str:
  """Writes `workdir/eval_<name>.json` atomically (`eval_<name>-2.json`, ... where it
  exists: an earlier result is never replaced); returns its path."""
  path = unused_stem(os.path.join(os.fspath(workdir), f'eval_{name}'), ('.json',)) + '.json'
  write_json_atomic(path, result)
  return path
