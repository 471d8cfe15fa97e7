"""Input pipeline: uint8 NHWC images for training and evaluation.

Every image leaves this module as a ``uint8`` numpy array ``[H, W, C]`` (one
example) or ``[B, H, W, C]`` (a batch), with values in ``[0, 2**num_bits)``;
dequantisation and scaling belong to the model.

Data sets (``config.data.dataset``):

* ``'digits'``: scikit-learn's embedded ``load_digits()`` (1797 images, 8x8,
  1 channel), values 0..16 stored as they are. Use it with
  ``model.image_shape = (8, 8, 1)`` and ``model.num_bits = 5`` (32 levels, of
  which 0..16 occur). Split: ``numpy.random.default_rng(0).permutation(1797)``,
  the first 1500 indices are 'train' and the other 297 'test', in that order.
* ``'npz'``: ``data.source`` is an ``.npz`` with keys 'train' and 'test', each a
  uint8 array ``[N, H, W, C]``.
* ``'folder'``: ``data.source`` is a folder with ``train/`` and ``test/``
  sub-folders of image files (png, jpg, jpeg, bmp, webp; searched
  recursively, sorted by path), decoded with PIL as RGB, or as L when
  ``model.image_shape`` has one channel. All images must have the same size.
* any other name: a prepared TFDS data set read with ``tfds.data_source``
  (ArrayRecord files, no TensorFlow needed). Known names: 'cifar10',
  'imagenet_resized/32x32', 'imagenet_resized/64x64' (our 'test' split is
  TFDS's 'validation') and 'celeb_a' (cropped and resized to 64x64 with
  :func:`celeba_crop_resize`). Preparing needs TensorFlow once:
  ``pip install "denseflow-jax[prepare]" &&
  python -m denseflow_jax.prepare_data --dataset cifar10``.

Training stream (:func:`make_train_iterator`): every epoch is a fresh
permutation of the training split (grain's stateless index shuffle) cut into
``steps_per_epoch = len(train) // global_batch`` global batches; the last
``len(train) % global_batch`` examples of each epoch's permutation are left out
of that epoch. Process ``p`` of ``P`` gets rows ``[p * b, (p + 1) * b)`` of each
global batch (``b = global_batch // P``), so concatenating the processes'
batches in process order gives the global batch, and each example's
augmentation is seeded by its position in the global stream: the global batches
are the same whatever the number of processes or grain workers.
"""
from __future__ import annotations

import functools
import json
import math
import os
import pathlib
from typing import Any, Iterator, Sequence

import grain
import numpy as np
from PIL import Image

from denseflow_jax.errors import DataError

SPLITS = ('train', 'test')
AUGMENTATIONS = ('none', 'horizontal_flip', 'eta')
IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.webp')
LOCAL_DATASETS = ('digits', 'npz', 'folder')

# TFDS data sets we know, and how our split names map onto theirs.
TFDS_SPLITS = {
    'cifar10': {'train': 'train', 'test': 'test'},
    'imagenet_resized/32x32': {'train': 'train', 'test': 'validation'},
    'imagenet_resized/64x64': {'train': 'train', 'test': 'validation'},
    'celeb_a': {'train': 'train', 'test': 'test'},
}

DIGITS_NUM_TRAIN = 1500
DIGITS_NUM_LEVELS = 17          # values 0..16
CELEBA_CROP = 148               # side of the square crop of the 218x178 frame
CELEBA_SIZE = 64                # side after resizing
ETA_FRACTION = 0.04             # pad and maximal translation, relative to size

_STATE_FORMAT = 'denseflow_jax.data.train_iterator/1'


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


# ---------------------------------------------------------------------------
# Validation.
# ---------------------------------------------------------------------------


def validate_image_shape(actual: Sequence[int], image_shape: Sequence[int],
                         where: str) -> None:
  """Raises DataError unless images of shape ``actual`` match ``image_shape``.

  Args:
    actual: (H, W, C) of the images found.
    image_shape: the expected (H, W, C), i.e. ``config.model.image_shape``.
    where: what holds the images, for the message (e.g. "data.source x.npz
      'train'").
  """
  actual = tuple(int(s) for s in actual)
  expected = tuple(int(s) for s in image_shape)
  if len(expected) != 3:
    raise DataError(
        f'config.model.image_shape = {expected} is not (H, W, C); set it to '
        'three integers, e.g. --config.model.image_shape="(32, 32, 3)"')
  if actual == expected:
    return
  problems = []
  if len(actual) != 3:
    problems.append(f'rank {len(actual)} instead of 3 (H, W, C)')
  else:
    if actual[2] != expected[2]:
      problems.append(f'{actual[2]} channel(s) instead of {expected[2]}')
    if actual[:2] != expected[:2]:
      problems.append(f'height x width {actual[0]}x{actual[1]} instead of '
                      f'{expected[0]}x{expected[1]}')
  raise DataError(
      f'{where} holds images of shape {actual} but config.model.image_shape = '
      f'{expected} ({"; ".join(problems)}). Fix: set '
      f'--config.model.image_shape="{actual}" if these are the images you '
      f'want, or use images of shape {expected}.')


def validate_images(images: np.ndarray, image_shape: Sequence[int] | None,
                    num_bits: int | None, where: str) -> None:
  """Checks an in-memory image array: dtype, rank, shape and value range.

  Args:
    images: the array, expected uint8 ``[N, H, W, C]``.
    image_shape: expected (H, W, C) (``config.model.image_shape``), or None to
      skip the shape check.
    num_bits: ``config.model.num_bits``; values must be below ``2**num_bits``.
      None skips the range check.
    where: what holds the images, for the message.
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
  if image_shape is not None:
    validate_image_shape(images.shape[1:], image_shape, where)
  if num_bits is not None:
    top = int(images.max())
    if top >= 2**int(num_bits):
      raise DataError(
          f'{where} has values up to {top} but config.model.num_bits = '
          f'{num_bits} allows only 0..{2**int(num_bits) - 1}; set '
          f'--config.model.num_bits={max(1, math.ceil(math.log2(top + 1)))} '
          'or larger, or quantise the images')


def _check_split(split: str, dataset: str) -> None:
  if split not in SPLITS:
    raise DataError(
        f"split '{split}' is not available for data.dataset='{dataset}'; "
        f"use one of {SPLITS}")


# ---------------------------------------------------------------------------
# Loading.
# ---------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _digits_all() -> np.ndarray:
  from sklearn import datasets  # pylint: disable=g-import-not-at-top
  images = datasets.load_digits().images                # float64 [1797, 8, 8]
  return images.astype(np.uint8)[:, :, :, None]


def digits_split_indices(split: str) -> np.ndarray:
  """Indices into ``load_digits().images`` forming a digits split, in order."""
  _check_split(split, 'digits')
  perm = np.random.default_rng(0).permutation(len(_digits_all()))
  if split == 'train':
    return perm[:DIGITS_NUM_TRAIN]
  return perm[DIGITS_NUM_TRAIN:]


def _load_digits(split, image_shape, num_bits) -> ArraySource:
  images = _digits_all()[digits_split_indices(split)]
  where = f"data.dataset='digits' split '{split}'"
  if num_bits is not None and 2**int(num_bits) < DIGITS_NUM_LEVELS:
    raise DataError(
        f'{where} has values 0..16 but config.model.num_bits = {num_bits} '
        'allows fewer levels; set --config.model.num_bits=5')
  validate_images(images, image_shape, num_bits, where)
  return ArraySource(images, where)


def _load_npz(source, split, image_shape, num_bits) -> ArraySource:
  _check_split(split, 'npz')
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
  validate_images(images, image_shape, num_bits,
                  f"data.source {source} key '{split}'")
  return ArraySource(images, f"{source}['{split}']")


def _load_folder(source, split, image_shape) -> FolderSource:
  _check_split(split, 'folder')
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
  channels = 3 if image_shape is None else int(image_shape[2])
  if channels not in (1, 3):
    raise DataError(
        f'config.model.image_shape = {tuple(image_shape)} asks for {channels} '
        "channels but data.dataset='folder' decodes RGB (3) or grey (1); set "
        'the last entry of --config.model.image_shape to 3 or 1')
  size = None
  for path in files:
    try:
      with Image.open(path) as img:
        width, height = img.size
    except (OSError, ValueError, SyntaxError) as e:
      raise DataError(
          f'cannot read image file {path}: {e}; replace or delete it') from e
    if size is None:
      size, first = (height, width), path
    elif (height, width) != size:
      raise DataError(
          f'image file {path} is {height}x{width} (HxW) but {first} is '
          f'{size[0]}x{size[1]}; all images must have the same size: resize '
          'or remove the odd ones')
  if image_shape is not None:
    validate_image_shape((size[0], size[1], channels), image_shape,
                         f'data.source {folder}')
  return FolderSource(files, 'L' if channels == 1 else 'RGB', size)


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


def _load_tfds(name, split, data_dir, image_shape) -> TfdsSource:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  tfds_split = tfds_split_name(name, split)
  try:
    data_source = tfds.data_source(name, split=tfds_split,
                                   data_dir=data_dir or None, download=False)
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
  preprocess = None
  if name == 'celeb_a':
    size = CELEBA_SIZE if image_shape is None else int(image_shape[0])
    preprocess = functools.partial(celeba_crop_resize, size=size)
  source = TfdsSource(data_source, preprocess, f'{name}:{tfds_split}')
  if len(source) == 0:
    raise DataError(f"split '{tfds_split}' of TFDS data set '{name}' is empty; "
                    f'prepare it again: {prepare_command(name, data_dir)}')
  if image_shape is not None:
    validate_image_shape(source[0].shape, image_shape,
                         f"TFDS data set '{name}' split '{tfds_split}'")
  return source


def load_split(data_config, split: str,
               image_shape: Sequence[int] | None = None,
               num_bits: int | None = None):
  """Returns a random-access source of uint8 ``[H, W, C]`` images.

  Args:
    data_config: ``config.data`` (fields ``dataset``, ``source``,
      ``tfds_data_dir``).
    split: 'train' or 'test' (TFDS data sets also take TFDS split strings).
    image_shape: expected (H, W, C), normally ``config.model.image_shape``;
      a mismatch raises DataError. Also picks grey or RGB decoding for
      'folder' and the output size for 'celeb_a'. None skips the checks.
    num_bits: ``config.model.num_bits``; for in-memory data sets ('digits',
      'npz') values must be below ``2**num_bits``. None skips the check.

  Returns:
    An object with ``len()`` and ``[i]`` returning uint8 ``[H, W, C]``.

  Raises:
    DataError: bad configuration or data; the message names the fix.
  """
  dataset = data_config.get('dataset', '')
  source = data_config.get('source', '')
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
  if data_config.get('tfds_data_dir', '') and dataset in ('digits', 'npz', 'folder'):
    raise DataError(
        f"data.tfds_data_dir is only read for TFDS data sets, but data.dataset={dataset!r} "
        "ignores it; drop --config.data.tfds_data_dir or choose a TFDS data set")
  if dataset == 'digits':
    return _load_digits(split, image_shape, num_bits)
  if dataset == 'npz':
    return _load_npz(source, split, image_shape, num_bits)
  if dataset == 'folder':
    return _load_folder(source, split, image_shape)
  return _load_tfds(dataset, split, data_config.get('tfds_data_dir', ''),
                    image_shape)


def _load_config_split(config, split: str):
  return load_split(config.data, split, image_shape=config.model.image_shape,
                    num_bits=config.model.get('num_bits', None))


# ---------------------------------------------------------------------------
# Augmentation.
# ---------------------------------------------------------------------------


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


def augment(image: np.ndarray, augmentation: str, seed) -> np.ndarray:
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


# ---------------------------------------------------------------------------
# Training stream.
# ---------------------------------------------------------------------------


def local_batch_size(global_batch: int, process_count: int = 1) -> int:
  """``global_batch // process_count``; DataError unless it divides evenly."""
  if global_batch <= 0:
    raise DataError(f'batch size {global_batch} must be positive; set '
                    '--config.train.batch_size (or eval.batch_size) > 0')
  if process_count <= 0 or global_batch % process_count:
    raise DataError(
        f'global batch size {global_batch} does not divide over '
        f'{process_count} processes; set the batch size to a multiple of '
        f'{process_count}')
  return global_batch // process_count


def steps_per_epoch(config, process_count: int = 1, source=None) -> int:
  """Training steps per epoch: ``len(train) // config.train.batch_size``.

  Args:
    config: the full config.
    process_count: checked to divide the global batch.
    source: the training source if already loaded (saves loading it again).
  """
  global_batch = config.train.batch_size
  local_batch_size(global_batch, process_count)
  if source is None:
    source = _load_config_split(config, 'train')
  steps = len(source) // global_batch
  if steps == 0:
    raise DataError(
        f'the training split has {len(source)} examples, fewer than one '
        f'global batch of {global_batch}; lower --config.train.batch_size')
  return steps


def _derived_seeds(seed: int) -> tuple[int, int]:
  """Independent (shuffle, augmentation) seeds in [0, 2**32) from a seed."""
  a, b = np.random.SeedSequence(int(seed) % 2**63).generate_state(2)
  return int(a), int(b)


class _TrainExample:
  """Maps a process-local stream index to an augmented image (picklable)."""

  def __init__(self, source, num_examples, steps, global_batch, local_batch,
               process_index, shuffle_seed, augment_seed, augmentation):
    self.source = source
    self.num_examples = num_examples
    self.steps = steps
    self.global_batch = global_batch
    self.local_batch = local_batch
    self.process_index = process_index
    self.augment_seed = augment_seed
    self.augmentation = augmentation
    # Stateless permutation; index e * n + i gives position i of epoch e's
    # permutation (grain reseeds each epoch with shuffle_seed + e).
    self.permutation = grain.MapDataset.range(num_examples).shuffle(
        seed=shuffle_seed)

  def global_position(self, index: int) -> tuple[int, int]:
    """(epoch, position within the epoch's global stream) of a local index."""
    epoch, rest = divmod(index, self.steps * self.local_batch)
    step, row = divmod(rest, self.local_batch)
    return epoch, (step * self.global_batch
                   + self.process_index * self.local_batch + row)

  def __call__(self, index: int, unused_element) -> np.ndarray:
    epoch, position = self.global_position(index)
    example = self.permutation[epoch * self.num_examples + position]
    image = self.source[example]
    stream_index = epoch * self.steps * self.global_batch + position
    return augment(image, self.augmentation, (self.augment_seed, stream_index))


class TrainIterator:
  """Endless iterator of uint8 batches ``[local_batch, H, W, C]``.

  ``get_state()`` returns a JSON-serialisable dict; ``set_state(state)`` on an
  iterator built from the same data settings continues with exactly the
  batches that would have followed. The state also records the data settings
  and raises DataError when they differ. A state from another process of the
  same layout applies as it is (multi-host checkpoints store process 0's). If
  the process or worker count changed, the state is applied by step count,
  which needs ``data.worker_count = 0`` on the resuming side.
  """

  def __init__(self, dataset: grain.IterDataset, pipeline: dict, layout: dict,
               local_batch: int, steps: int):
    self._dataset = dataset
    self._iterator = iter(dataset)
    self._pipeline = _json_normalise(pipeline)
    self._layout = _json_normalise(layout)
    self._step = 0
    self.local_batch = local_batch
    self.steps_per_epoch = steps

  @property
  def step(self) -> int:
    """Number of batches returned so far (restored by set_state)."""
    return self._step

  @property
  def epoch(self) -> int:
    """Epoch of the next batch."""
    return self._step // self.steps_per_epoch

  def __iter__(self) -> 'TrainIterator':
    return self

  def __next__(self) -> np.ndarray:
    batch = next(self._iterator)
    if type(batch) is not np.ndarray:  # pylint: disable=unidiomatic-typecheck
      batch = np.array(batch)         # e.g. grain's SharedMemoryArray
    self._step += 1
    return batch

  def get_state(self) -> dict:
    """The position in the stream, as a JSON-serialisable dict."""
    return {
        'format': _STATE_FORMAT,
        'step': self._step,
        'pipeline': self._pipeline,
        'layout': self._layout,
        'grain': self._iterator.get_state(),
    }

  def set_state(self, state: dict) -> None:
    """Continues from ``state`` (from get_state, possibly via JSON)."""
    if not isinstance(state, dict) or state.get('format') != _STATE_FORMAT:
      raise DataError(
          'the data iterator state is not one written by '
          f'denseflow_jax.data (format {_STATE_FORMAT}); restore a checkpoint '
          'written by this version, or start the data stream afresh')
    saved = _json_normalise(state['pipeline'])
    if saved != self._pipeline:
      diff = {k: (saved.get(k), self._pipeline.get(k))
              for k in sorted(set(saved) | set(self._pipeline))
              if saved.get(k) != self._pipeline.get(k)}
      raise DataError(
          'the data iterator state was written with other data settings '
          f'(field: (checkpoint, now)) {diff}; resume with the settings of the '
          'checkpoint, or start the data stream afresh')
    step = int(state['step'])
    # Checkpoints hold process 0's state only (orbax writes JSON items on the primary
    # host). Every process runs the same pipeline structure in lockstep, so its grain
    # state equals process 0's whenever process and worker counts match.
    if _same_layout_but_process(state['layout'], self._layout):
      self._iterator.set_state(state['grain'])
    elif self._layout['worker_count'] == 0:
      self._iterator.set_state({'next_index': step})
    else:
      raise DataError(
          f"the data iterator state was written with layout {state['layout']}"
          f' but this run has {self._layout}; with a different process or '
          'worker count resume with --config.data.worker_count=0')
    self._step = step

  def close(self) -> None:
    """Stops background workers (grain multiprocessing), if any."""
    close = getattr(self._iterator, 'close', None)
    if close is not None:
      close()


def _json_normalise(value):
  return json.loads(json.dumps(value))


def _same_layout_but_process(a: dict, b: dict) -> bool:
  """Layouts equal apart from process_index."""
  a, b = _json_normalise(a), _json_normalise(b)
  a.pop('process_index', None)
  b.pop('process_index', None)
  return a == b


def state_to_json(state: dict) -> str:
  """Serialises a TrainIterator state."""
  return json.dumps(state, sort_keys=True)


def state_from_json(text: str) -> dict:
  """Parses a TrainIterator state written by :func:`state_to_json`."""
  return json.loads(text)


def _read_options(data_config) -> grain.ReadOptions:
  prefetch = max(1, int(data_config.get('prefetch', 2)))
  return grain.ReadOptions(num_threads=prefetch, prefetch_buffer_size=prefetch)


def make_train_iterator(config, process_index: int = 0, process_count: int = 1,
                        source=None) -> TrainIterator:
  """Endless, shuffled, augmented training batches for one process.

  Args:
    config: the full config (``data``, ``model.image_shape``,
      ``model.num_bits``, ``train.batch_size`` = global batch, ``seed``).
    process_index: this process (``jax.process_index()``).
    process_count: number of processes (``jax.process_count()``).
    source: the training source if already loaded.

  Returns:
    A :class:`TrainIterator` of uint8 ``[global_batch // process_count, H, W,
    C]``; its batches, concatenated over processes in process order, are the
    global batches, the same for any process_count.
  """
  data = config.data
  augmentation = data.get('augmentation', 'none')
  if augmentation not in AUGMENTATIONS:
    raise DataError(f"data.augmentation='{augmentation}' is unknown; use one "
                    f'of {AUGMENTATIONS}')
  global_batch = int(config.train.batch_size)
  local_batch = local_batch_size(global_batch, process_count)
  if not 0 <= process_index < process_count:
    raise DataError(f'process_index {process_index} is not in '
                    f'[0, {process_count})')
  if source is None:
    source = _load_config_split(config, 'train')
  steps = steps_per_epoch(config, process_count, source=source)
  shuffle_seed, augment_seed = _derived_seeds(config.seed)
  example = _TrainExample(source, len(source), steps, global_batch,
                          local_batch, process_index, shuffle_seed,
                          augment_seed, augmentation)
  ds = (grain.MapDataset.range(steps * local_batch)
        .repeat()
        .map_with_index(example)
        .batch(local_batch, drop_remainder=True)
        .to_iter_dataset(_read_options(data)))
  worker_count = int(data.get('worker_count', 0))
  if worker_count > 0:
    from absl import flags  # pylint: disable=g-import-not-at-top
    if not flags.FLAGS.is_parsed():   # grain reads flags in its workers
      flags.FLAGS.mark_as_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=worker_count,
        per_worker_buffer_size=max(1, int(data.get('prefetch', 2)))))
  pipeline = {
      'dataset': data.get('dataset', ''),
      'source': data.get('source', ''),
      'num_examples': len(source),
      'image_shape': list(config.model.image_shape),
      'global_batch': global_batch,
      'seed': int(config.seed),
      'augmentation': augmentation,
  }
  layout = {'process_index': process_index, 'process_count': process_count,
            'worker_count': worker_count}
  return TrainIterator(ds, pipeline, layout, local_batch, steps)


# ---------------------------------------------------------------------------
# Evaluation.
# ---------------------------------------------------------------------------


def _eval_sizes(config, split, batch_size, num_examples, source):
  if batch_size is None:
    batch_size = config.eval.batch_size
  if num_examples is None:
    num_examples = config.eval.get('num_examples', -1)
  if source is None:
    source = _load_config_split(config, split)
  total = len(source)
  if num_examples is None or num_examples < 0:
    num_examples = total
  elif num_examples > total:
    raise DataError(
        f"eval.num_examples = {num_examples} but split '{split}' has only "
        f'{total} examples; set --config.eval.num_examples={total} or -1 '
        '(whole split)')
  return int(batch_size), int(num_examples), source


def eval_num_batches(config, split: str = 'test', batch_size: int | None = None,
                     num_examples: int | None = None, source=None) -> int:
  """Number of batches :func:`iterate_eval` yields (same on every process)."""
  batch_size, num_examples, _ = _eval_sizes(config, split, batch_size,
                                            num_examples, source)
  return -(-num_examples // batch_size)


class _EvalBatch:
  """Builds local eval batch k (picklable; used by grain's threads)."""

  def __init__(self, source, num_examples, global_batch, local_batch,
               process_index, image_shape):
    self.source = source
    self.num_examples = num_examples
    self.global_batch = global_batch
    self.local_batch = local_batch
    self.process_index = process_index
    self.image_shape = tuple(image_shape)

  def __call__(self, k: int) -> tuple[np.ndarray, np.ndarray]:
    start = k * self.global_batch + self.process_index * self.local_batch
    images = np.zeros((self.local_batch,) + self.image_shape, np.uint8)
    mask = np.zeros((self.local_batch,), bool)
    for row in range(self.local_batch):
      if start + row < self.num_examples:
        images[row] = self.source[start + row]
        mask[row] = True
    return images, mask


def iterate_eval(config, split: str = 'test', batch_size: int | None = None,
                 num_examples: int | None = None, *, process_index: int = 0,
                 process_count: int = 1,
                 source=None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Batches ``(images, mask)`` covering each example once, in order.

  Every batch has the full size (uint8 ``[b, H, W, C]``, so a jitted step sees
  one shape); rows past the end of the data are zeros with ``mask`` False.
  With several processes, ``batch_size`` is the global batch and process ``p``
  gets rows ``[p * b, (p + 1) * b)`` of each global batch; all processes yield
  the same number of batches.

  Args:
    config: the full config.
    split: 'train' or 'test'.
    batch_size: global batch; None uses ``config.eval.batch_size``.
    num_examples: the first this many examples; -1 all; None uses
      ``config.eval.num_examples``.
    process_index: this process.
    process_count: number of processes.
    source: the split's source if already loaded.

  Returns:
    An iterator of (uint8 ``[b, H, W, C]``, bool ``[b]``) with
    ``b = batch_size // process_count``.

  Raises:
    DataError: at the call (not at the first batch) for bad settings.
  """
  batch_size, num_examples, source = _eval_sizes(config, split, batch_size,
                                                 num_examples, source)
  local_batch = local_batch_size(batch_size, process_count)
  if not 0 <= process_index < process_count:
    raise DataError(f'process_index {process_index} is not in '
                    f'[0, {process_count})')
  num_batches = -(-num_examples // batch_size)
  make = _EvalBatch(source, num_examples, batch_size, local_batch,
                    process_index, config.model.image_shape)
  ds = (grain.MapDataset.range(num_batches).map(make)
        .to_iter_dataset(_read_options(config.data)))
  return iter(ds)
