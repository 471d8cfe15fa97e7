"""Input pipeline: uint8 NHWC images for training and evaluation.

Every image leaves this package as a ``uint8`` numpy array ``[H, W, C]`` (one
example) or ``[B, H, W, C]`` (a batch), with values in ``[0, 2**num_bits)``;
dequantisation and scaling belong to the model.

* ``sources.py``: the local data sets ('digits', 'npz', 'folder'), their
  random-access sources and :func:`load_split`.
* ``tfds_source.py``: TFDS data sets, their split names and the CelebA crop.
* ``validation.py``: checks of image arrays, of images against the model config (every
  mismatch in one error, with the overrides that fix them) and of split names.
* ``augment.py``: the training augmentations ('none', 'horizontal_flip', 'eta').
* ``train_stream.py``: the resumable, shuffled training iterator.
* ``eval_stream.py``: the padded evaluation batches.
* ``read_options.py``: grain's read options, shared by both streams.
* ``levels.py``: the top level of the training images (what grids show as white).

Functions take explicit arguments (the data settings, the split's source, image shape,
bits, the global batch as a ``sharding.BatchSplit``, the seed), not the config, as
flax's ``input_pipeline.create_split`` does.

The public names are re-exported here (``data_lib.load_split``, ...).
"""
from denseflow_jax.data.augment import (
    AUGMENTATIONS, ETA_FRACTION, augment_image, eta_pad, eta_transform, sample_eta_params)
from denseflow_jax.data.eval_stream import eval_examples, eval_num_batches, iterate_eval
from denseflow_jax.data.levels import train_top_level
from denseflow_jax.data.sources import (
    DIGITS_NUM_LEVELS, DIGITS_NUM_TRAIN, IMAGE_EXTENSIONS, ArraySource, FolderSource,
    digits_split_indices, load_split)
from denseflow_jax.data.tfds_source import (
    CELEBA_CROP, CELEBA_SIZE, LOCAL_DATASETS, TFDS_SPLITS, TfdsSource, celeba_crop_resize,
    prepare_command, tfds_split_name)
from denseflow_jax.data.train_stream import (
    TrainIterator, make_train_iterator, state_from_json, state_to_json, steps_per_epoch)
from denseflow_jax.data.validation import SPLITS, check_fit, override, validate_images

__all__ = [
    # sources.py
    'ArraySource', 'DIGITS_NUM_LEVELS', 'DIGITS_NUM_TRAIN', 'FolderSource',
    'IMAGE_EXTENSIONS', 'digits_split_indices', 'load_split',
    # tfds_source.py
    'CELEBA_CROP', 'CELEBA_SIZE', 'LOCAL_DATASETS', 'TFDS_SPLITS', 'TfdsSource',
    'celeba_crop_resize', 'prepare_command', 'tfds_split_name',
    # validation.py
    'SPLITS', 'check_fit', 'override', 'validate_images',
    # augment.py
    'AUGMENTATIONS', 'ETA_FRACTION', 'augment_image', 'eta_pad', 'eta_transform',
    'sample_eta_params',
    # train_stream.py
    'TrainIterator', 'make_train_iterator', 'state_from_json', 'state_to_json',
    'steps_per_epoch',
    # eval_stream.py
    'eval_examples', 'eval_num_batches', 'iterate_eval',
    # levels.py
    'train_top_level',
]
