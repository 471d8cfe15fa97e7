"""TFDS data sets: their split names, the CelebA crop and the random-access source.

A prepared TFDS data set is read with ``tfds.data_source`` (ArrayRecord files, no
TensorFlow needed). Known names: 'cifar10', 'imagenet_resized/32x32',
'imagenet_resized/64x64' (our 'test' split is TFDS's 'validation') and 'celeb_a'
(cropped and resized to 64x64 with :func:`celeba_crop_resize`). Their images are 8-bit
(``model.num_bits`` 8). Preparing needs TensorFlow once:
``pip install "denseflow-jax[prepare]" && python -m denseflow_jax.prepare_data --dataset cifar10``.
"""
from __future__ import annotations

import contextlib
import functools
import logging
from typing import Any

import numpy as np
from PIL import Image

from denseflow_jax.data.validation import check_fit
from denseflow_jax.errors import DataError
from denseflow_jax.spec import ModelSpec

LOCAL_DATASETS = ('digits', 'npz', 'folder')   # the others are TFDS names
# TFDS data sets we know, and how our split names map onto theirs.
TFDS_SPLITS = {
    'cifar10': {'train': 'train', 'test': 'test'},
    'imagenet_resized/32x32': {'train': 'train', 'test': 'validation'},
    'imagenet_resized/64x64': {'train': 'train', 'test': 'validation'},
    'celeb_a': {'train': 'train', 'test': 'test'},
}
CELEBA_CROP = 148               # side of the square crop of the 218x178 frame
CELEBA_SIZE = 64                # side after resizing


class TfdsSource:
  """Random-access source over a TFDS data source; yields ``record['image']``.

  ``preprocess`` (picklable, e.g. a ``functools.partial``) maps each uint8
  ``[H, W, C]`` image before it is returned.
  """

  def __init__(self, data_source: Any, preprocess=None, description='tfds'):
    self.data_source = data_source
    self.preprocess = preprocess
    self.description = description

  def __len__(self) -> int:
    return len(self.data_source)

  def __getitem__(self, index: int) -> np.ndarray:
    image = np.asarray(self.data_source[index]['image'], dtype=np.uint8)
    if image.ndim == 2:
      image = image[:, :, None]
    if self.preprocess is not None:
      image = self.preprocess(image)
    return image

  def __repr__(self) -> str:
    return f'TfdsSource({self.description}, {len(self)} examples)'


def tfds_split_name(dataset: str, split: str) -> str:
  """TFDS's name for our split ('test' is 'validation' for imagenet_resized)."""
  return TFDS_SPLITS.get(dataset, {}).get(split, split)


def prepare_command(dataset: str, data_dir: str = '') -> str:
  """The shell command that prepares a TFDS data set for this pipeline."""
  command = ('pip install "denseflow-jax[prepare]" && python -m '
             f'denseflow_jax.prepare_data --dataset {dataset}')
  if data_dir:
    command += f' --data_dir {data_dir}'
  return command


def celeba_crop_resize(image: np.ndarray, size: int = CELEBA_SIZE,
                       crop: int = CELEBA_CROP, top: int | None = None,
                       left: int | None = None) -> np.ndarray:
  """CelebA-64 preprocessing: a ``crop`` x ``crop`` box, then a bicubic resize.

  This is our reading of the common CelebA-64 protocol: from the aligned
  218x178 frame take the centred 148x148 box (top = (218 - 148) // 2 = 35,
  left = (178 - 148) // 2 = 15) and resize it to 64x64 with PIL's BICUBIC
  filter. (The official DenseFlow preprocessing script computes a crop at
  top 40, left 15 but then resizes the uncropped frame bilinearly; pass
  ``top=40`` to get that box.)

  Args:
    image: uint8 ``[H, W, C]``.
    size: side of the output.
    crop: side of the square box.
    top: first row of the box; None centres it.
    left: first column of the box; None centres it.

  Returns:
    uint8 ``[size, size, C]``.
  """
  height, width = image.shape[:2]
  top = (height - crop) // 2 if top is None else top
  left = (width - crop) // 2 if left is None else left
  if top < 0 or left < 0 or top + crop > height or left + crop > width:
    raise DataError(
        f'cannot take a {crop}x{crop} box at (top={top}, left={left}) from a '
        f'{height}x{width} image; celeb_a images should be the aligned '
        '218x178 frames')
  squeeze = image.ndim == 3 and image.shape[2] == 1
  pil = Image.fromarray(image[:, :, 0] if squeeze else image)
  pil = pil.crop((left, top, left + crop, top + crop))
  out = np.asarray(pil.resize((size, size), Image.BICUBIC), dtype=np.uint8)
  return out[:, :, None] if out.ndim == 2 else out


@contextlib.contextmanager
def _absl_logs_held():
  """Holds back what absl logs inside the block; yields the held records.

  TFDS logs 'Variant folder ... has no dataset_info.json' (twice) while it probes a data set
  that is not prepared, before our error says so. The caller replays the records when the
  data set opens (they may then matter) and drops them when it raises its own error.
  """
  logger = logging.getLogger('absl')
  held = []

  def hold(record):
    held.append(record)
    return False

  logger.addFilter(hold)
  try:
    yield held
  finally:
    logger.removeFilter(hold)


def load_tfds(name, split, data_dir, image_shape, num_bits=None,
              spec: ModelSpec | None = None) -> TfdsSource:
  """The source of a split of a prepared TFDS data set, its first image checked against the
  model config (``load_split`` with a TFDS name); DataError names the fix."""
  tfds_split = tfds_split_name(name, split)
  with _absl_logs_held() as held:
    data_source = _open_tfds(name, tfds_split, data_dir)   # a DataError drops what was held
  for record in held:
    logging.getLogger('absl').handle(record)
  preprocess = None
  if name == 'celeb_a':
    size = CELEBA_SIZE if image_shape is None else int(image_shape[0])
    preprocess = functools.partial(celeba_crop_resize, size=size)
  source = TfdsSource(data_source, preprocess, f'{name}:{tfds_split}')
  if len(source) == 0:
    raise DataError(f"split '{tfds_split}' of TFDS data set '{name}' is empty; "
                    f'prepare it again: {prepare_command(name, data_dir)}')
  check_fit(f"TFDS data set '{name}' split '{tfds_split}'", source[0].shape, 255, image_shape,
            num_bits, spec, levels=f'{name} images are 8-bit (0..255)')
  return source


def _open_tfds(name, tfds_split, data_dir):
  # Imported here: importing tensorflow_datasets takes seconds; only TFDS data sets need it.
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  try:
    return tfds.data_source(name, split=tfds_split, data_dir=data_dir or None,
                            download=False)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise DataError(
        f"data.dataset='{name}' is neither one of {LOCAL_DATASETS} nor a TFDS "
        f'data set name; known TFDS data sets: {sorted(TFDS_SPLITS)}. Set '
        '--config.data.dataset accordingly') from e
  except Exception as e:  # pylint: disable=broad-except
    try:
      builder = tfds.builder(name, data_dir=data_dir or None)
      where, prepared = str(builder.data_dir), builder.is_prepared()
    except Exception:  # pylint: disable=broad-except
      where, prepared = data_dir or 'the TFDS default data_dir', False
    if not prepared:
      raise DataError(
          f"TFDS data set '{name}' is not prepared in {where} (split "
          f"'{tfds_split}'). Prepare it once (needs TensorFlow and internet): "
          f'{prepare_command(name, data_dir)} ; or set '
          '--config.data.tfds_data_dir to where it is prepared') from e
    raise DataError(
        f"cannot open split '{tfds_split}' of TFDS data set '{name}' in "
        f'{where}: {type(e).__name__}: {e}. If it was prepared as TFRecord, '
        f'prepare it again as ArrayRecord: {prepare_command(name, data_dir)}'
    ) from e
