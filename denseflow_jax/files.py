"""Paths of a workdir, local or in a Cloud Storage bucket, and writing files so that a
failure never destroys what was there before.

One path type for every file a run writes: ``etils.epath.Path`` (:func:`as_path`), the
one orbax uses for its checkpoints. A local path is made absolute; a ``gs://`` path goes
to Cloud Storage through fsspec's gcsfs (or ``tf.io.gfile`` where TensorFlow is
installed: epath picks it). Nothing here opens a file with ``open()`` or ``os``
functions, so every writer works on either.
"""
import io
import json
import os
import tempfile
from typing import Any, Callable

import numpy as np
from etils import epath

BUCKET_SCHEME = 'gs://'


def is_bucket(path) -> bool:
  """True for a Cloud Storage URL (``gs://bucket/...``)."""
  return os.fspath(path).startswith(BUCKET_SCHEME)


def as_path(path) -> epath.Path:
  """``path`` as the one path type of the package: a ``gs://`` URL as given (without a
  trailing slash), a local path made absolute with its symbolic links resolved (what
  the messages print, whatever the working directory)."""
  if is_bucket(path):
    return epath.Path(os.fspath(path).rstrip('/'))
  return epath.Path(os.path.realpath(os.fspath(path)))


def _current_umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


def atomic_write(path, write: Callable[[Any], None]):
  """`write(binary file)` so that an existing `path` survives any failure.

  Local: into a temporary file beside `path`, then os.replace; the file gets the mode a
  plain `open()` would give it (0666 minus the umask; `mkstemp` alone makes it 0600,
  unreadable to colleagues sharing a workdir). Bucket: into memory, then one upload: an
  object upload is atomic (readers see the old object or the complete new one, never a
  part), and a failure in `write` uploads nothing.
  """
  if is_bucket(path):
    buffer = io.BytesIO()
    write(buffer)
    as_path(path).write_bytes(buffer.getvalue())
    return
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
  write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True, default=_json_default)
                    + '\n')


def write_npz_atomic(path, **arrays) -> None:
  """`np.savez(path, **arrays)`, atomically (see `atomic_write`)."""
  atomic_write(path, lambda f: np.savez(f, **arrays))


def unused_stem(stem, suffixes=('',)) -> str:
  """``stem``, or ``stem-2``, ``stem-3``, ...: the first for which no ``stem + suffix`` exists,
  so that a new result never replaces an earlier one (a file set such as .png + .npz
  takes one number together)."""
  stem, number = os.fspath(stem), 1
  candidate = stem
  while any(as_path(candidate + suffix).exists() for suffix in suffixes):
    number += 1
    candidate = f'{stem}-{number}'
  return candidate


def write_text_atomic(path, text: str) -> None:
  """``text`` (UTF-8) at ``path``, atomically (see `atomic_write`)."""
  atomic_write(path, lambda f: f.write(text.encode('utf-8')))


def append_text(path, text: str) -> None:
  """Appends ``text`` to the file at ``path`` (created if missing). An object in a bucket
  cannot be appended to: it is replaced by one upload of its old content plus ``text``
  (atomic, so a reader never meets half a line; fine for the small logs this serves)."""
  path = as_path(path)
  if is_bucket(path):
    write_text_atomic(path, (path.read_text() if path.exists() else '') + text)
    return
  with path.open('a') as f:
    f.write(text)
