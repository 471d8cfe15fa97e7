"""Input pipeline: uint8 NHWC images for training and evaluation.

Every image leaves this package as a ``uint8`` numpy array ``[H, W, C]`` (one
example) or ``[B, H, W, C]`` (a batch), with values in ``[0, 2**num_bits)``;
dequantisation and scaling belong to the model.

* ``sources.py``: the data sets ('digits', 'npz', 'folder', TFDS), their
  random-access sources, the CelebA crop and :func:`load_split`.
* ``validation.py``: checks of image arrays, shapes and split names.
* ``augment.py``: the training augmentations ('none', 'horizontal_flip', 'eta').
* ``train_stream.py``: the resumable, shuffled training iterator.
* ``eval_stream.py``: the padded evaluation batches.

The public names are re-exported here (``data_lib.load_split``, ...). Note that
``denseflow_jax.data.augment`` is the function; the module is reached with
``from denseflow_jax.data.augment import ...``.
"""
from denseflow_jax.data.augment import (
    AUGMENTATIONS, ETA_FRACTION, augment, eta_pad, eta_transform, sample_eta_params)
from denseflow_jax.data.eval_stream import eval_num_batches, iterate_eval
from denseflow_jax.data.sources import (
    CELEBA_CROP, CELEBA_SIZE, DIGITS_NUM_LEVELS, DIGITS_NUM_TRAIN, IMAGE_EXTENSIONS,
    LOCAL_DATASETS, TFDS_SPLITS, ArraySource, FolderSource, TfdsSource, celeba_crop_resize,
    digits_split_indices, load_split, prepare_command, tfds_split_name)
from denseflow_jax.data.train_stream import (
    TrainIterator, local_batch_size, make_train_iterator, state_from_json, state_to_json,
    steps_per_epoch)
from denseflow_jax.data.validation import SPLITS, validate_image_shape, validate_images

__all__ = [
    # sources.py
    'ArraySource', 'CELEBA_CROP', 'CELEBA_SIZE', 'DIGITS_NUM_LEVELS', 'DIGITS_NUM_TRAIN',
    'FolderSource', 'IMAGE_EXTENSIONS', 'LOCAL_DATASETS', 'TFDS_SPLITS', 'TfdsSource',
    'celeba_crop_resize', 'digits_split_indices', 'load_split', 'prepare_command',
    'tfds_split_name',
    # validation.py
    'SPLITS', 'validate_image_shape', 'validate_images',
    # augment.py
    'AUGMENTATIONS', 'ETA_FRACTION', 'augment', 'eta_pad', 'eta_transform',
    'sample_eta_params',
    # train_stream.py
    'TrainIterator', 'local_batch_size', 'make_train_iterator', 'state_from_json',
    'state_to_json', 'steps_per_epoch',
    # eval_stream.py
    'eval_num_batches', 'iterate_eval',
]
