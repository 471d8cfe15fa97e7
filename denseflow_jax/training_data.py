"""WORKDIR/training_data.json: what a training run's data looked like, for the modes that
later run its variables without loading any data. Today one number matters: the top level,
the largest value the training images take (16 for the digits in a 5-bit model), which the
grids show as white (outputs.py). `train.train_and_evaluate` writes the record once its
start checks pass; `loading.load_model` reads it back (:func:`read_data_top_level`)."""
from __future__ import annotations

import json
import logging
from typing import Optional

import jax

from denseflow_jax import checkpoint as ckpt_lib
from denseflow_jax.files import as_path, write_json_atomic

DATA_RECORD_FILE = 'training_data.json'   # WORKDIR/training_data.json, by --mode train
# Folders of a training workdir whose variables belong to the workdir's training data.
WORKDIR_PARTS = (ckpt_lib.BEST_DIR, ckpt_lib.PRETRAINED_DIR, ckpt_lib.CHECKPOINTS_DIR)


def write_data_record(workdir, dataset: str, num_bits: int, top_level: Optional[int],
                      how: str) -> str:
  """Writes WORKDIR/training_data.json (process 0 only; replaced on every run, so it
  describes the data of the latest run): the data set, num_bits, its top level (the
  largest value of the training images; None where unusable) and how that is known.
  Returns the path."""
  path = as_path(workdir) / DATA_RECORD_FILE
  if jax.process_index() == 0:
    write_json_atomic(path, {'dataset': dataset, 'num_bits': int(num_bits),
                             'top_level': None if top_level is None else int(top_level),
                             'how': how})
  return str(path)


def read_data_top_level(source, num_bits: int) -> Optional[int]:
  """The top level recorded for the variables in ``source`` (a training workdir, its
  best/, pretrained/ or checkpoints/, or any directory holding training_data.json), or
  None: nothing recorded, or a record that does not fit a ``num_bits`` model (warned)."""
  source = as_path(source)
  candidates = [source / DATA_RECORD_FILE]
  if source.name in WORKDIR_PARTS and not (source / ckpt_lib.CHECKPOINTS_DIR).is_dir():
    candidates.append(source.parent / DATA_RECORD_FILE)
  path = next((p for p in candidates if p.is_file()), None)
  if path is None:
    return None
  try:
    record = json.loads(path.read_text())
    top, bits = record['top_level'], record['num_bits']
  except (OSError, ValueError, KeyError, TypeError) as e:
    logging.warning('ignoring %s (%s: %s); grids show level %d as white', path,
                    type(e).__name__, e, 2 ** num_bits - 1)
    return None
  if top is None:
    return None
  if (bits != num_bits or isinstance(top, bool) or not isinstance(top, int)
      or not 1 <= top < 2 ** num_bits):
    logging.warning('ignoring %s: top level %r of a %r-bit model does not fit this %d-bit '
                    'model; grids show level %d as white', path, top, bits, num_bits,
                    2 ** num_bits - 1)
    return None
  return top
