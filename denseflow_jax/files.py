"""Writing files so that a failure never destroys what was there before."""
import json
import os
import tempfile
from typing import Any, Callable

import numpy as np


def _current_umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


def atomic_write(path, write: Callable[[Any], None]):
  """`write(binary file)` into a temporary file beside `path`, then os.replace: an
  existing `path` survives any failure. The file gets the mode a plain `open()` would
  give it (0666 minus the umask; `mkstemp` alone makes it 0600, unreadable to colleagues
  sharing a workdir)."""
  path = os.fspath(path)
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=folder, prefix=f'.{os.path.basename(path)}.', suffix='.tmp')
  try:
    os.fchmod(fd, 0o666 & ~_current_umask())
    with os.fdopen(fd, 'wb') as f:
      write(f)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def _json_default(value):
  """NumPy / JAX scalars and arrays (anything with `__array__`) -> Python numbers / lists."""
  if hasattr(value, '__array__'):
    array = np.asarray(value)
    return array.item() if array.ndim == 0 else array.tolist()
  raise TypeError(f'{type(value).__name__} is not JSON serialisable')


def write_json_atomic(path, data) -> None:
  """`data` as indented JSON at `path`, atomically (see `atomic_write`); NumPy and JAX
  scalars and arrays are written as numbers and lists."""
  text = json.dumps(data, indent=2, sort_keys=True, default=_json_default) + '\n'
  atomic_write(path, lambda f: f.write(text.encode('utf-8')))


def write_npz_atomic(path, **arrays) -> None:
  """`np.savez(path, **arrays)`, atomically (see `atomic_write`)."""
  atomic_write(path, lambda f: np.savez(f, **arrays))


def unused_stem(stem, suffixes=('',)) -> str:
  """``stem``, or ``stem-2``, ``stem-3``, ...: the first for which no ``stem + suffix`` exists,
  so that a new result never replaces an earlier one (a file set such as .png + .npz
  takes one number together)."""
  stem, number = os.fspath(stem), 1
  candidate = stem
  while any(os.path.exists(candidate + suffix) for suffix in suffixes):
    number += 1
    candidate = f'{stem}-{number}'
  return candidate
