"""Random-access sources of the data sets and their loading.

Every image leaves this package as a ``uint8`` numpy array ``[H, W, C]`` (one
example) or ``[B, H, W, C]`` (a batch), with values in ``[0, 2**num_bits)``;
dequantisation and scaling belong to the model.

Data sets (``config.data.dataset``):

* ``'digits'``: scikit-learn's embedded ``load_digits()`` (1797 images, 8x8,
  1 channel), values 0..16 stored as they are. Use it with
  ``model.image_shape = (8, 8, 1)`` and ``model.num_bits = 5`` (32 levels, of
  which 0..16 occur). Split: ``numpy.random.default_rng(0).permutation(1797)``,
  the first 1500 indices are 'train' and the other 297 'test', in that order.
* ``'npz'``: ``data.source`` is an ``.npz`` with keys 'train' and 'test', each a
  uint8 array ``[N, H, W, C]``; ``model.num_bits`` must cover its largest value.
* ``'folder'``: ``data.source`` is a folder with ``train/`` and ``test/``
  sub-folders of image files (png, jpg, jpeg, bmp, webp; searched
  recursively, sorted by path), decoded with PIL as RGB, or as L when
  ``model.image_shape`` has one channel. All images must have the same size. They are
  8-bit: ``model.num_bits`` must be 8.
* any other name: a prepared TFDS data set read with ``tfds.data_source``
  (ArrayRecord files, no TensorFlow needed). Known names: 'cifar10',
  'imagenet_resized/32x32', 'imagenet_resized/64x64' (our 'test' split is
  TFDS's 'validation') and 'celeb_a' (cropped and resized to 64x64 with
  :func:`celeba_crop_resize`). They are 8-bit: ``model.num_bits`` must be 8.
  Preparing needs TensorFlow once: ``pip install "denseflow-jax[prepare]" &&
  python -m denseflow_jax.prepare_data --dataset cifar10``.

:func:`load_split` is the entry point: a random-access source (``len()`` and
``[i]``) of one split, checked with :mod:`denseflow_jax.data.validation`: images that do
not fit the model config are one DataError listing every mismatch (size, channels, values
against ``model.num_bits``) with the overrides that fix them all.
"""
from __future__ import annotations

import functools
import os
import pathlib
from typing import Sequence

import numpy as np
from PIL import Image

from denseflow_jax.data.validation import check_fit, check_split, validate_images
from denseflow_jax.data.tfds_source import LOCAL_DATASETS, TFDS_SPLITS, load_tfds
from denseflow_jax.errors import DataError
from denseflow_jax.spec import ModelSpec

IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.webp')
GREY_MODES = ('1', 'L', 'LA', 'La', 'I', 'I;16', 'I;16B', 'I;16L', 'I;16N', 'F')  # PIL modes

DIGITS_NUM_TRAIN = 1500
DIGITS_NUM_LEVELS = 17          # values 0..16



# ---------------------------------------------------------------------------
# Random-access sources.
# ---------------------------------------------------------------------------


class ArraySource:
  """Random-access source over an in-memory uint8 array ``[N, H, W, C]``."""

  def __init__(self, images: np.ndarray, description: str = 'array'):
    self.images = images
    self.description = description

  def __len__(self) -> int:
    return int(self.images.shape[0])

  def __getitem__(self, index: int) -> np.ndarray:
    return self.images[index]

  def __repr__(self) -> str:
    return f'ArraySource({self.description}, shape={self.images.shape})'


class FolderSource:
  """Random-access source decoding image files with PIL on each access."""

  def __init__(self, files: Sequence[str], mode: str, size: tuple[int, int]):
    self.files = list(files)
    self.mode = mode        # 'RGB' or 'L'
    self.size = size        # (H, W)

  def __len__(self) -> int:
    return len(self.files)

  def __getitem__(self, index: int) -> np.ndarray:
    path = self.files[index]
    try:
      with Image.open(path) as img:
        array = np.asarray(img.convert(self.mode), dtype=np.uint8)
    except (OSError, ValueError, SyntaxError) as e:
      raise DataError(
          f'cannot decode image file {path}: {e}; replace or delete the file '
          'from the data.source folder') from e
    if array.ndim == 2:
      array = array[:, :, None]
    if array.shape[:2] != self.size:
      raise DataError(
          f'image file {path} is {array.shape[0]}x{array.shape[1]} (HxW) but '
          f'the other images are {self.size[0]}x{self.size[1]}; resize it or '
          'remove it from the data.source folder')
    return array

  def __repr__(self) -> str:
    return f'FolderSource({len(self.files)} files, mode={self.mode})'




# ---------------------------------------------------------------------------
# Loading.
# ---------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _digits_all() -> np.ndarray:
  # Imported here: only the digits set needs scikit-learn.
  from sklearn import datasets  # pylint: disable=g-import-not-at-top
  images = datasets.load_digits().images                # float64 [1797, 8, 8]
  return images.astype(np.uint8)[:, :, :, None]


def digits_split_indices(split: str) -> np.ndarray:
  """Indices into ``load_digits().images`` forming a digits split, in order."""
  check_split(split, 'digits')
  perm = np.random.default_rng(0).permutation(len(_digits_all()))
  if split == 'train':
    return perm[:DIGITS_NUM_TRAIN]
  return perm[DIGITS_NUM_TRAIN:]


def _load_digits(split, image_shape, num_bits, spec) -> ArraySource:
  images = _digits_all()[digits_split_indices(split)]
  where = f"data.dataset='digits' split '{split}'"
  check_fit(where, images.shape[1:], DIGITS_NUM_LEVELS - 1, image_shape, num_bits, spec)
  return ArraySource(images, where)


def _load_npz(source, split, image_shape, num_bits, spec) -> ArraySource:
  check_split(split, 'npz')
  if not source:
    raise DataError(
        "data.dataset='npz' needs data.source, the path of an .npz with keys "
        "'train' and 'test' holding uint8 arrays [N, H, W, C]; set "
        '--config.data.source=/path/to/data.npz')
  if not os.path.isfile(source):
    raise DataError(
        f'data.source {source} does not exist or is not a file; set '
        '--config.data.source to an .npz with keys \'train\' and \'test\' '
        'holding uint8 arrays [N, H, W, C]')
  try:
    with np.load(source, allow_pickle=False) as npz:
      keys = list(npz.keys())
      if split not in keys:
        raise DataError(
            f"data.source {source} has no key '{split}' (it has {keys}); "
            "expected keys 'train' and 'test' holding uint8 arrays "
            '[N, H, W, C]')
      images = npz[split]
  except DataError:
    raise
  except (OSError, ValueError, EOFError) as e:
    raise DataError(
        f'data.source {source} is not a readable .npz ({e}); write it with '
        'np.savez(path, train=..., test=...) using uint8 arrays '
        '[N, H, W, C]') from e
  where = f"data.source {source} key '{split}'"
  validate_images(images, where)
  check_fit(where, images.shape[1:], images.max(), image_shape, num_bits, spec)
  return ArraySource(images, f"{source}['{split}']")


def _load_folder(source, split, image_shape, num_bits, spec) -> FolderSource:
  check_split(split, 'folder')
  if not source:
    raise DataError(
        "data.dataset='folder' needs data.source, a folder with train/ and "
        'test/ sub-folders of images; set --config.data.source=/path/to/folder')
  folder = pathlib.Path(source) / split
  if not folder.is_dir():
    raise DataError(
        f'data.source {source} has no {split}/ sub-folder; put the images in '
        f'{folder}/ (and the other split beside it)')
  files = sorted(str(p) for p in folder.rglob('*')
                 if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
  if not files:
    raise DataError(
        f'{folder} holds no image files ({", ".join(IMAGE_EXTENSIONS)}); add '
        'images or point data.source at the right folder')
  size = None
  for path in files:
    try:
      with Image.open(path) as img:
        width, height = img.size
        mode = img.mode
    except (OSError, ValueError, SyntaxError) as e:
      raise DataError(
          f'cannot read image file {path}: {e}; replace or delete it') from e
    if size is None:
      size, first, first_mode = (height, width), path, mode
    elif (height, width) != size:
      raise DataError(
          f'image file {path} is {height}x{width} (HxW) but {first} is '
          f'{size[0]}x{size[1]}; all images must have the same size: resize '
          'or remove the odd ones')
  # Decoded with the channels model.image_shape asks for, grey (1) or RGB (3): a channel
  # difference alone fits. Where the size does not (or other channels are asked for), the
  # images' own channels are suggested (RGB images and the 8x8x1 digits config: H,W,3).
  wanted = None if image_shape is None else int(image_shape[2])
  fits = wanted in (1, 3) and tuple(int(s) for s in image_shape[:2]) == size
  own = 1 if first_mode in GREY_MODES else 3
  check_fit(f'data.source {folder}', (*size, wanted if fits else own), 255, image_shape,
            num_bits, spec, levels='folder images are 8-bit (0..255)')
  return FolderSource(files, 'L' if wanted == 1 else 'RGB', size)


def load_split(data, split: str, image_shape: Sequence[int] | None = None,
               num_bits: int | None = None, model: ModelSpec | None = None):
  """Returns a random-access source of uint8 ``[H, W, C]`` images.

  The one way to load a split (training, evaluation, FID and the latent tools):
  ``load_split(settings.data, 'test', spec.image_shape, spec.num_bits)``.

  Args:
    data: the data settings (``settings.DataSettings``, or anything with the fields
      ``dataset``, ``source`` and ``tfds_data_dir``, e.g. ``config.data``).
    split: 'train' or 'test' (TFDS data sets also take TFDS split strings).
    image_shape: expected (H, W, C); a mismatch raises DataError; None skips the
      check. Also picks grey or RGB decoding for 'folder' and the output size for
      'celeb_a'.
    num_bits: values must be below ``2**num_bits`` ('folder' and TFDS data are 8-bit);
      None skips the check.
    model: the run's ModelSpec instead of ``image_shape`` and ``num_bits`` (the modes pass
      ``model=settings.model``): the images are checked against its image_shape and
      num_bits, and the overrides a mismatch suggests against the rest of the model.

  Returns:
    An object with ``len()`` and ``[i]`` returning uint8 ``[H, W, C]``.

  Raises:
    DataError: bad configuration or data; the message names the fix. Images that do not
      fit the model config raise one DataError naming every mismatch.
  """
  if model is not None:
    if image_shape is not None or num_bits is not None:
      raise TypeError('load_split takes image_shape and num_bits, or model, not both')
    image_shape, num_bits = model.image_shape, model.num_bits
  dataset, source = data.dataset, data.source
  if not dataset:
    raise DataError(
        "data.dataset is empty; set --config.data.dataset to 'digits', 'npz', "
        f"'folder' or a TFDS name such as {sorted(TFDS_SPLITS)}")
  # A setting that the chosen data set does not read is a mistake, not something to ignore.
  if source and dataset not in ('npz', 'folder'):
    raise DataError(
        f"data.source={source!r} is only read by data.dataset='npz' or 'folder', but "
        f"data.dataset={dataset!r} ignores it; set --config.data.dataset=npz (an .npz file) "
        "or folder (train/ and test/ image folders), or drop --config.data.source")
  if data.tfds_data_dir and dataset in LOCAL_DATASETS:
    raise DataError(
        f"data.tfds_data_dir is only read for TFDS data sets, but data.dataset={dataset!r} "
        "ignores it; drop --config.data.tfds_data_dir or choose a TFDS data set")
  if dataset == 'digits':
    return _load_digits(split, image_shape, num_bits, model)
  if dataset == 'npz':
    return _load_npz(source, split, image_shape, num_bits, model)
  if dataset == 'folder':
    return _load_folder(source, split, image_shape, num_bits, model)
  return load_tfds(dataset, split, data.tfds_data_dir, image_shape, num_bits, model)
