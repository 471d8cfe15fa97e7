"""What the modes write besides checkpoints: PNG grids of images (scaled for display),
samples as .npz and evaluation results as JSON; every file written atomically
(files.py), and none replaced: a name in use gets -2, -3, ... (`files.unused_stem`).

Display scaling: a model of `num_bits` bits stores levels 0 .. 2^bits - 1; a grid maps
the top level `top` (by default 2^bits - 1) to 255:  pixel = round(level * 255 / top).
"""
import math
import os
from typing import Any, Dict, Optional

import numpy as np
from PIL import Image

from denseflow_jax.files import atomic_write, unused_stem, write_json_atomic, write_npz_atomic

GRID_MIN_WIDTH = 512           # PNG grids are enlarged (whole factor) to at least this width


def to_display(images, num_bits: int) -> np.ndarray:
  """uint8 images with values 0..2^bits-1 -> 0..255 (rounded), for viewing."""
  images = np.asarray(images)
  top = 2 ** num_bits - 1
  if num_bits == 8:
    return images.astype(np.uint8)
  return np.round(images.astype(np.float64) * (255.0 / top)).clip(0, 255).astype(np.uint8)


def make_grid(images, num_bits: int = 8, ncols: Optional[int] = None, padding: int = 1,
              pad_value: int = 255) -> np.ndarray:
  """[N, H, W, C] -> one uint8 image [rows*(H+p)+p, ncols*(W+p)+p, C], row-major;
  ncols defaults to ceil(sqrt(N)) (near-square)."""
  images = to_display(images, num_bits)
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ValueError(f'expected images [N, H, W, 1 or 3], got shape {images.shape}')
  n, h, w, c = images.shape
  ncols = int(math.ceil(math.sqrt(n))) if ncols is None else int(ncols)
  nrows = -(-n // ncols)
  grid = np.full((nrows * (h + padding) + padding, ncols * (w + padding) + padding, c),
                 pad_value, np.uint8)
  for i, image in enumerate(images):
    top = padding + (i // ncols) * (h + padding)
    left = padding + (i % ncols) * (w + padding)
    grid[top:top + h, left:left + w] = image
  return grid


def save_sample_grid(path_png, images, num_bits: int = 8, ncols: Optional[int] = None,
                     padding: int = 1, pad_value: int = 255,
                     min_width: int = GRID_MIN_WIDTH) -> np.ndarray:
  """Writes `make_grid(...)` as a PNG (grey for one channel, RGB for three), enlarged by the
  smallest whole factor that makes it at least `min_width` pixels wide (each pixel a
  square block: 8x8 digits stay readable); returns the grid as written."""
  grid = make_grid(images, num_bits, ncols, padding, pad_value)
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
