"""Prepares a TFDS data set as ArrayRecord files for denseflow_jax.data.

    pip install "denseflow-jax[prepare]"
    python -m denseflow_jax.prepare_data --dataset cifar10 [--data_dir DIR]

Preparing (download + conversion) needs TensorFlow, hence the ``prepare``
extra; training and evaluation then read the files without TensorFlow. Use the
same ``--data_dir`` as ``config.data.tfds_data_dir`` (default: TFDS's own,
``~/tensorflow_datasets`` or ``$TFDS_DATA_DIR``).
"""
from __future__ import annotations

import argparse
import importlib.util
import sys

from denseflow_jax import data as data_lib


def prepare(dataset: str, data_dir: str = '') -> str:
  """Downloads and prepares ``dataset``; returns the folder it was written to.

  Raises:
    SystemExit: TensorFlow is missing, or the name is not a TFDS data set.
  """
  if dataset in data_lib.LOCAL_DATASETS:
    raise SystemExit(f"data set '{dataset}' is read directly by "
                     'denseflow_jax.data; there is nothing to prepare')
  if importlib.util.find_spec('tensorflow') is None:
    raise SystemExit(
        'preparing a TFDS data set needs TensorFlow, which is not installed. '
        'Install it with: pip install "denseflow-jax[prepare]" (training '
        'itself does not need TensorFlow)')
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  try:
    builder = tfds.builder(dataset, data_dir=data_dir or None)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise SystemExit(f"'{dataset}' is not a TFDS data set; known here: "
                     f'{sorted(data_lib.TFDS_SPLITS)}') from e
  builder.download_and_prepare(file_format='array_record')
  return str(builder.data_dir)


def main(argv: list[str] | None = None) -> None:
  """Command-line entry point."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--dataset', required=True,
                      help='TFDS name, e.g. ' + ', '.join(data_lib.TFDS_SPLITS))
  parser.add_argument('--data_dir', default='',
                      help='TFDS data_dir (default: TFDS default)')
  args = parser.parse_args(argv)
  where = prepare(args.dataset, args.data_dir)
  print(f'prepared {args.dataset} in {where}')


if __name__ == '__main__':
  main(sys.argv[1:])
