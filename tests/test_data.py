"""Tests of denseflow_jax.data (CPU only, no downloads)."""
import json
import os

import ml_collections
import numpy as np
from PIL import Image
import pytest
from sklearn.datasets import load_digits
import tensorflow_datasets as tfds

from denseflow_jax import errors
from denseflow_jax import data
from denseflow_jax.sharding import BatchSplit
from helpers import split_of, tiny_config, train_iterator


def data_config(dataset='digits', source='', image_shape=(8, 8, 1), num_bits=5,
                batch_size=16, augmentation='none', seed=0, worker_count=0,
                eval_batch_size=32):
  """helpers.tiny_config with the fields the data pipeline reads set as given."""
  return tiny_config({
      'seed': seed, 'model.image_shape': image_shape, 'model.num_bits': num_bits,
      'data.dataset': dataset, 'data.source': source, 'data.augmentation': augmentation,
      'data.worker_count': worker_count, 'data.prefetch': 2, 'train.batch_size': batch_size,
      'eval.batch_size': eval_batch_size, 'eval.num_examples': -1})


def eval_batches(config, split='test', batch_size=None, num_examples=-1, process_index=0,
                 process_count=1):
  """data.iterate_eval with the arguments `config` gives."""
  batch = BatchSplit(batch_size or config.eval.batch_size, 'eval.batch_size', process_index,
                     process_count)
  return data.iterate_eval(split_of(config, split), batch, num_examples,
                           prefetch=config.data.prefetch, split=split)


def id_images(n, shape=(4, 4, 1)):
  """Images whose every pixel is the example's index (n <= 256)."""
  return np.broadcast_to(np.arange(n, dtype=np.uint8)[:, None, None, None],
                         (n,) + shape).copy()


def ids(batch):
  return batch[:, 0, 0, 0].astype(int)


@pytest.fixture
def id_npz(tmp_path):
  """An npz with 50 'train' and 13 'test' identifiable 4x4x1 images."""
  path = tmp_path / 'ids.npz'
  np.savez(path, train=id_images(50), test=id_images(13) + 100)
  return str(path)


@pytest.fixture
def random_npz(tmp_path):
  rng = np.random.default_rng(1)
  path = tmp_path / 'random.npz'
  np.savez(path, train=rng.integers(0, 256, (40, 8, 8, 3), dtype=np.uint8),
           test=rng.integers(0, 256, (10, 8, 8, 3), dtype=np.uint8))
  return str(path)


# ---- digits ----------------------------------------------------------------


def test_digits_splits_follow_the_stated_permutation():
  config = data_config()
  train = data.load_split(config.data, 'train', (8, 8, 1), 5)
  test = data.load_split(config.data, 'test', (8, 8, 1), 5)
  assert (len(train), len(test)) == (1500, 297)
  perm = np.random.default_rng(0).permutation(1797)
  reference = load_digits().images
  train_images = np.stack([train[i] for i in range(len(train))])
  test_images = np.stack([test[i] for i in range(len(test))])
  assert train_images.dtype == np.uint8
  assert train_images.shape == (1500, 8, 8, 1)
  assert train_images.min() == 0 and train_images.max() == 16
  np.testing.assert_array_equal(train_images[..., 0], reference[perm[:1500]])
  np.testing.assert_array_equal(test_images[..., 0], reference[perm[1500:]])


def test_digits_rejects_too_few_bits_and_unknown_split():
  config = data_config()
  with pytest.raises(errors.DataError, match='num_bits=5'):
    data.load_split(config.data, 'train', (8, 8, 1), num_bits=4)
  with pytest.raises(errors.DataError, match="'validation'"):
    data.load_split(config.data, 'validation')


# ---- npz -------------------------------------------------------------------


def test_npz_happy_path(id_npz):
  config = data_config('npz', id_npz, image_shape=(4, 4, 1), num_bits=8)
  train = data.load_split(config.data, 'train', (4, 4, 1), 8)
  test = data.load_split(config.data, 'test', (4, 4, 1), 8)
  assert (len(train), len(test)) == (50, 13)
  assert train[7].shape == (4, 4, 1) and train[7].dtype == np.uint8
  assert int(train[7][0, 0, 0]) == 7 and int(test[2][0, 0, 0]) == 102



def test_train_top_level_of_each_kind_of_data(id_npz, tmp_path):
  """The largest value of the training images (what grids show as white): 16 for the
  digits without loading them, the train array's maximum for 'npz' (not the test
  split's), 2**num_bits - 1 for image files and TFDS; None for an all-zero array."""
  assert data.train_top_level(data_config().data, (8, 8, 1), 5)[0] == 16
  npz = data_config('npz', id_npz, image_shape=(4, 4, 1), num_bits=7)
  assert data.train_top_level(npz.data, (4, 4, 1), 7)[0] == 49     # train 0..49, test 100..
  for dataset, source in (('folder', str(tmp_path)), ('cifar10', '')):
    config = data_config(dataset, source, image_shape=(4, 4, 1), num_bits=5)
    assert data.train_top_level(config.data, (4, 4, 1), 5)[0] == 31
  np.savez(tmp_path / 'zeros.npz', train=np.zeros((3, 4, 4, 1), np.uint8),
           test=np.zeros((1, 4, 4, 1), np.uint8))
  zeros = data_config('npz', str(tmp_path / 'zeros.npz'), image_shape=(4, 4, 1), num_bits=5)
  assert data.train_top_level(zeros.data, (4, 4, 1), 5)[0] is None


def test_load_split_checks_what_the_call_asks_for(id_npz):
  """The image shape and bits passed are checked; None skips that check."""
  config = data_config('npz', id_npz, image_shape=(4, 4, 1), num_bits=8)
  full = data.load_split(config.data, 'test', (4, 4, 1), 8)
  part = data.load_split(config.data, 'test')
  assert len(full) == len(part) == 13
  np.testing.assert_array_equal(full[3], part[3])
  with pytest.raises(errors.DataError, match=r'images are 4x4x1 but model.image_shape = '
                                             r'\(4, 4, 3\)'):
    data.load_split(config.data, 'test', (4, 4, 3))
  assert len(data.load_split(config.data, 'test', num_bits=8)) == 13
  with pytest.raises(errors.DataError, match='--config.model.num_bits=7'):   # 100..112
    data.load_split(config.data, 'test', (4, 4, 1), 6)


def _save(path, **arrays):
  np.savez(path, **arrays)
  return str(path)


@pytest.mark.parametrize('arrays,image_shape,num_bits,expected', [
    ({'train': np.zeros((2, 4, 4, 1), np.uint8)}, (4, 4, 1), 8,
     r"no key 'test'.*expected keys 'train' and 'test'"),
    ({'train': np.zeros((2, 4, 4, 1), np.float32),
      'test': np.full((2, 4, 4, 1), 0.75, np.float32)}, (4, 4, 1), 8,
     r'dtype float32 \(values 0.75 .. 0.75\), expected uint8.*np.round\(x \* 255\).* for data '
     r'in 0..1'),
    ({'train': np.zeros((2, 4, 4), np.uint8),
      'test': np.zeros((2, 4, 4), np.uint8)}, (4, 4, 1), 8,
     r'rank 3 .*x\[\.\.\., None\]'),
    ({'train': np.zeros((2, 4, 4, 3), np.uint8),
      'test': np.zeros((2, 4, 4, 3), np.uint8)}, (4, 4, 1), 8,
     r'images are 4x4x3 but model\.image_shape = \(4, 4, 1\)\. '
     r'Add: --config\.model\.image_shape=4,4,3$'),
    ({'train': np.zeros((2, 5, 4, 1), np.uint8),
      'test': np.zeros((2, 5, 4, 1), np.uint8)}, (4, 4, 1), 8,
     r'images are 5x4x1 but model\.image_shape = \(4, 4, 1\)'),
    ({'train': np.full((2, 4, 4, 1), 40, np.uint8),
      'test': np.full((2, 4, 4, 1), 40, np.uint8)}, (4, 4, 1), 5,
     r'values reach 40 but model\.num_bits = 5 allows 0\.\.31\. '
     r'Add: --config\.model\.num_bits=6$'),
    ({'train': np.zeros((0, 4, 4, 1), np.uint8),
      'test': np.zeros((0, 4, 4, 1), np.uint8)}, (4, 4, 1), 8,
     'holds no images'),
])
def test_npz_errors(tmp_path, arrays, image_shape, num_bits, expected):
  path = _save(tmp_path / 'bad.npz', **arrays)
  config = data_config('npz', path)
  with pytest.raises(errors.DataError, match=expected):
    data.load_split(config.data, 'test', image_shape, num_bits)


def test_npz_missing_file_and_missing_source(tmp_path):
  config = data_config('npz', str(tmp_path / 'nope.npz'))
  with pytest.raises(errors.DataError, match='does not exist.*data.source'):
    data.load_split(config.data, 'train')
  with pytest.raises(errors.DataError, match='needs data.source'):
    data.load_split(data_config('npz', '').data, 'train')


# ---- folder ----------------------------------------------------------------


def _write_pngs(folder, images):
  folder.mkdir(parents=True, exist_ok=True)
  for i, image in enumerate(images):
    Image.fromarray(image.squeeze()).save(folder / f'img_{i:03d}.png')


def test_folder_happy_path_rgb_and_grey(tmp_path):
  rng = np.random.default_rng(0)
  train = rng.integers(0, 256, (3, 6, 5, 3), dtype=np.uint8)
  test = rng.integers(0, 256, (2, 6, 5, 3), dtype=np.uint8)
  _write_pngs(tmp_path / 'train', train)
  _write_pngs(tmp_path / 'test' / 'class_a', test)    # nested folders too
  (tmp_path / 'train' / 'README.txt').write_text('not an image')
  config = data_config('folder', str(tmp_path))
  src = data.load_split(config.data, 'train', (6, 5, 3), 8)
  assert len(src) == 3
  np.testing.assert_array_equal(np.stack([src[i] for i in range(3)]), train)
  src = data.load_split(config.data, 'test', (6, 5, 3))
  np.testing.assert_array_equal(np.stack([src[i] for i in range(2)]), test)
  grey = data.load_split(config.data, 'train', (6, 5, 1), 8)    # RGB files read as grey
  expected = np.asarray(Image.fromarray(train[1]).convert('L'))[:, :, None]
  assert grey[1].shape == (6, 5, 1)
  np.testing.assert_array_equal(grey[1], expected)
  with pytest.raises(errors.DataError, match=r'images are 6x5x3 but model.image_shape = '
                                             r'\(5, 5, 3\)'):
    data.load_split(config.data, 'train', (5, 5, 3))


def test_folder_size_channels_and_bits_in_one_error(tmp_path):
  """Folder images are 8-bit; a size that does not fit suggests the files' own channels
  (RGB here, though model.image_shape asks for grey); other channels than 1 or 3 do not fit."""
  _write_pngs(tmp_path / 'rgb' / 'train', np.zeros((2, 16, 16, 3), np.uint8))
  rgb = data_config('folder', str(tmp_path / 'rgb')).data
  with pytest.raises(errors.DataError) as info:
    data.load_split(rgb, 'train', (8, 8, 1), 5)
  assert str(info.value).endswith(
      'does not fit the model config: images are 16x16x3 but model.image_shape = (8, 8, 1); '
      'folder images are 8-bit (0..255) but model.num_bits = 5 allows 0..31. '
      'Add: --config.model.image_shape=16,16,3 --config.model.num_bits=8')
  with pytest.raises(errors.DataError, match=r'16x16x3 but model.image_shape = \(16, 16, 4\)'):
    data.load_split(rgb, 'train', (16, 16, 4), 8)
  _write_pngs(tmp_path / 'grey' / 'train', np.zeros((2, 16, 16, 1), np.uint8))
  with pytest.raises(errors.DataError, match=r'images are 16x16x1 .*image_shape=16,16,1$'):
    data.load_split(data_config('folder', str(tmp_path / 'grey')).data, 'train', (8, 8, 3))


def test_folder_unreadable_file_and_mixed_sizes(tmp_path):
  _write_pngs(tmp_path / 'a' / 'train', np.zeros((2, 6, 6, 3), np.uint8))
  (tmp_path / 'a' / 'train' / 'broken.png').write_bytes(b'not a png at all')
  with pytest.raises(errors.DataError, match='broken.png'):
    data.load_split(data_config('folder', str(tmp_path / 'a')).data, 'train')

  _write_pngs(tmp_path / 'b' / 'train', np.zeros((2, 6, 6, 3), np.uint8))
  Image.fromarray(np.zeros((7, 6, 3), np.uint8)).save(
      tmp_path / 'b' / 'train' / 'odd.png')
  with pytest.raises(errors.DataError, match=r'odd.png is 7x6.*same size'):
    data.load_split(data_config('folder', str(tmp_path / 'b')).data, 'train')

  with pytest.raises(errors.DataError, match='no test/ sub-folder'):
    data.load_split(data_config('folder', str(tmp_path / 'b')).data, 'test')


def test_folder_truncated_file_fails_on_read_naming_it(tmp_path):
  _write_pngs(tmp_path / 'train', np.full((1, 16, 16, 3), 7, np.uint8))
  path = tmp_path / 'train' / 'img_000.png'
  path.write_bytes(path.read_bytes()[:60])     # header intact, data cut
  src = data.load_split(data_config('folder', str(tmp_path)).data, 'train')
  with pytest.raises(errors.DataError, match='img_000.png'):
    src[0]


# ---- TFDS ------------------------------------------------------------------


def test_tfds_cifar10_with_mock_data():
  config = data_config('cifar10', image_shape=(32, 32, 3), num_bits=8,
                       batch_size=4, augmentation='eta', eval_batch_size=4)
  with tfds.testing.mock_data(num_examples=10):
    train = data.load_split(config.data, 'train', (32, 32, 3))
    assert len(train) == 10
    assert train[3].shape == (32, 32, 3) and train[3].dtype == np.uint8
    batch = next(train_iterator(config))
    assert batch.shape == (4, 32, 32, 3) and batch.dtype == np.uint8
    masks = [mask for _, mask in eval_batches(config)]
    assert [m.sum() for m in masks] == [4, 4, 2]
    with pytest.raises(errors.DataError) as info:
      data.load_split(config.data, 'train', (64, 64, 1), 5)
    assert str(info.value) == (
        "TFDS data set 'cifar10' split 'train' does not fit the model config: images are "
        '32x32x3 but model.image_shape = (64, 64, 1); cifar10 images are 8-bit (0..255) but '
        'model.num_bits = 5 allows 0..31. Add: --config.model.image_shape=32,32,3 '
        '--config.model.num_bits=8')


def test_tfds_celeba_is_cropped_and_resized():
  config = data_config('celeb_a', image_shape=(64, 64, 3))
  with tfds.testing.mock_data(num_examples=3):
    test = data.load_split(config.data, 'test', (64, 64, 3))
    assert test[0].shape == (64, 64, 3) and test[0].dtype == np.uint8


def test_celeba_crop_box_is_the_centred_148_square():
  image = np.zeros((218, 178, 3), np.uint8)
  image[35:35 + 148, 15:15 + 148] = 200          # only the box is bright
  out = data.celeba_crop_resize(image)
  assert out.shape == (64, 64, 3) and out.dtype == np.uint8
  assert (out == 200).all()
  shifted = data.celeba_crop_resize(image, top=40)
  assert (shifted[-1] < 200).all()               # box left the bright area
  noise = np.random.default_rng(0).integers(0, 256, (218, 178, 3), np.uint8)
  expected = Image.fromarray(noise[35:183, 15:163]).resize((64, 64),
                                                           Image.BICUBIC)
  np.testing.assert_array_equal(data.celeba_crop_resize(noise),
                                np.asarray(expected))


def test_tfds_split_names():
  assert data.tfds_split_name('imagenet_resized/32x32', 'test') == 'validation'
  assert data.tfds_split_name('imagenet_resized/64x64', 'test') == 'validation'
  assert data.tfds_split_name('imagenet_resized/64x64', 'train') == 'train'
  assert data.tfds_split_name('cifar10', 'test') == 'test'
  assert data.tfds_split_name('celeb_a', 'test') == 'test'


def test_unprepared_tfds_dataset_names_the_prepare_command(tmp_path,
                                                          monkeypatch):
  calls = []
  data_source = tfds.data_source

  def spy(*args, **kwargs):
    calls.append(kwargs)
    return data_source(*args, **kwargs)

  monkeypatch.setattr(tfds, 'data_source', spy)
  config = data_config('cifar10', image_shape=(32, 32, 3))
  config.data.tfds_data_dir = str(tmp_path)
  with pytest.raises(errors.DataError) as info:
    data.load_split(config.data, 'train')
  assert calls and calls[0]['download'] is False     # never downloads
  message = str(info.value)
  assert 'not prepared' in message
  assert ('pip install "denseflow-jax[prepare]" && python -m '
          'denseflow_jax.prepare_data --dataset cifar10') in message
  assert f'--data_dir {tmp_path}' in message
  assert not any(tmp_path.iterdir())             # nothing was downloaded


def test_unknown_dataset_name():
  config = data_config('no_such_dataset_xyz')
  with pytest.raises(errors.DataError, match='neither one of'):
    data.load_split(config.data, 'train')


def test_prepare_data_without_tensorflow_says_how_to_install(tmp_path,
                                                             monkeypatch):
  from denseflow_jax import prepare_data  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(prepare_data.importlib.util, 'find_spec',
                      lambda name: None)
  with pytest.raises(SystemExit, match=r'denseflow-jax\[prepare\]'):
    prepare_data.main(['--dataset', 'cifar10', '--data_dir', str(tmp_path)])
  with pytest.raises(SystemExit, match='nothing to prepare'):
    prepare_data.main(['--dataset', 'digits'])


# ---- augmentation ----------------------------------------------------------


def test_eta_transform_closed_form():
  image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), np.uint8)
  np.testing.assert_array_equal(data.eta_transform(image), image)
  np.testing.assert_array_equal(data.eta_transform(image, flip=True),
                                image[:, ::-1])
  down = data.eta_transform(image, dy=1)
  np.testing.assert_array_equal(down[1:], image[:-1])
  np.testing.assert_array_equal(down[0], image[0])      # edge replicated
  left = data.eta_transform(image, dx=-1)
  np.testing.assert_array_equal(left[:, :-1], image[:, 1:])
  np.testing.assert_array_equal(left[:, -1], image[:, -1])
  both = data.eta_transform(image, flip=True, dy=-2, dx=2)  # pad is 2
  np.testing.assert_array_equal(both[:-2, 2:], image[2:, ::-1][:, :-2])
  np.testing.assert_array_equal(both[-1], both[-3])     # rows from the edge
  beyond = data.eta_transform(image, dy=3)    # past the 2-pixel padding: 0
  assert (beyond[0] == 0).all()
  np.testing.assert_array_equal(beyond[1], image[0])


def test_eta_params_follow_the_official_ranges():
  assert (data.eta_pad(8), data.eta_pad(32), data.eta_pad(64)) == (1, 2, 3)
  rng = np.random.default_rng(0)
  for size, bound in ((8, 0), (32, 1), (64, 3)):
    draws = np.array([data.sample_eta_params(rng, size, size)
                      for _ in range(2000)])
    assert np.abs(draws[:, 1:]).max() == bound
    assert 0.4 < draws[:, 0].mean() < 0.6               # flip probability


def test_augment_is_deterministic_and_changes_images():
  image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), np.uint8)
  for kind in data.AUGMENTATIONS:
    out = data.augment_image(image, kind, (5, 7))
    assert out.shape == image.shape and out.dtype == np.uint8
    np.testing.assert_array_equal(out, data.augment_image(image, kind, (5, 7)))
  changed = [not np.array_equal(data.augment_image(image, 'eta', s), image)
             for s in range(20)]
  assert 10 < sum(changed) < 20        # most seeds move the image, not all
  flips = [np.array_equal(data.augment_image(image, 'horizontal_flip', s),
                          image[:, ::-1]) for s in range(40)]
  assert 5 < sum(flips) < 35
  np.testing.assert_array_equal(data.augment_image(image, 'none', 3), image)
  with pytest.raises(errors.DataError, match='augmentation'):
    data.augment_image(image, 'rotate', 0)


# ---- training stream -------------------------------------------------------


def test_train_iterator_is_deterministic_and_resumes_exactly():
  config = data_config(batch_size=64, augmentation='eta')   # 23 steps/epoch
  source = data.load_split(config.data, 'train', (8, 8, 1), 5)
  first = train_iterator(config, source=source)
  second = train_iterator(config, source=source)
  head = [next(first) for _ in range(5)]
  for a in head:
    b = next(second)
    assert a.shape == (64, 8, 8, 1) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
  state = json.loads(json.dumps(first.get_state()))          # via JSON
  assert data.state_from_json(data.state_to_json(state)) == state
  reference = [next(first) for _ in range(25)]               # crosses epoch 1
  resumed = train_iterator(config, source=source)
  resumed.set_state(state)
  assert resumed.step == 5
  for a in reference:
    np.testing.assert_array_equal(a, next(resumed))
  assert resumed.step == 30 and resumed.epoch == 1
  other_seed = train_iterator(data_config(
      batch_size=64, augmentation='eta', seed=1), source=source)
  assert not np.array_equal(next(other_seed), head[0])


def test_each_epoch_is_a_new_permutation_without_repeats(id_npz):
  config = data_config('npz', id_npz, (4, 4, 1), 8, batch_size=8)
  iterator = train_iterator(config)
  steps = data.steps_per_epoch(50, 8)
  assert steps == iterator.steps_per_epoch == 50 // 8
  epochs = [np.concatenate([ids(next(iterator)) for _ in range(steps)])
            for _ in range(3)]
  for epoch in epochs:
    assert len(set(epoch.tolist())) == steps * 8        # no repeats
    assert set(epoch.tolist()) <= set(range(50))
  assert not np.array_equal(epochs[0], epochs[1])
  assert not np.array_equal(epochs[1], epochs[2])


def test_processes_get_disjoint_rows_of_the_same_global_batches():
  config = data_config(batch_size=32, augmentation='eta')
  source = data.load_split(config.data, 'train', (8, 8, 1), 5)
  single = train_iterator(config, source=source)
  procs = [train_iterator(config, p, 2, source=source)
           for p in range(2)]
  for _ in range(50):                           # > 1 epoch (46 steps)
    parts = [next(it) for it in procs]
    assert parts[0].shape == (16, 8, 8, 1)
    np.testing.assert_array_equal(np.concatenate(parts), next(single))


def test_process_shards_are_disjoint_examples(id_npz):
  config = data_config('npz', id_npz, (4, 4, 1), 8, batch_size=8)
  procs = [train_iterator(config, p, 2) for p in range(2)]
  seen = [np.concatenate([ids(next(it)) for _ in range(6)]) for it in procs]
  assert not set(seen[0].tolist()) & set(seen[1].tolist())
  assert len(seen[0]) == len(seen[1]) == 24


def test_resume_with_other_process_count_and_mismatched_settings():
  """A state is a global position: process 0's state (all a checkpoint holds) places every
  process of any layout, from 1 process to 2 and from 2 to 1 (a slice of another size)."""
  config = data_config(batch_size=32)
  source = data.load_split(config.data, 'train', (8, 8, 1), 5)
  single = train_iterator(config, source=source)
  for _ in range(3):
    next(single)
  state = single.get_state()
  half = train_iterator(config, 1, 2, source=source)
  half.set_state(state)
  np.testing.assert_array_equal(next(half), next(single)[16:])

  procs = [train_iterator(config, p, 2, source=source) for p in range(2)]
  for _ in range(5):
    for it in procs:
      next(it)
  whole = train_iterator(config, source=source)
  whole.set_state(json.loads(json.dumps(procs[0].get_state())))
  assert whole.step == 5
  np.testing.assert_array_equal(next(whole), np.concatenate([next(it) for it in procs]))
  # A state of the first format (it also held grain's per-process state) resumes by step.
  old = dict(state, format='denseflow_jax.data.train_iterator/1', grain={'next_index': 99},
             layout={'process_index': 0, 'process_count': 2, 'worker_count': 1})
  resumed, reference = (train_iterator(config, source=source) for _ in range(2))
  resumed.set_state(old)
  for _ in range(3):
    next(reference)
  np.testing.assert_array_equal(next(resumed), next(reference))

  bigger = train_iterator(data_config(batch_size=64), source=source)
  with pytest.raises(errors.DataError, match='global_batch'):
    bigger.set_state(state)
  with pytest.raises(errors.DataError, match='format'):
    bigger.set_state({'next_index': 3})
  # Grain workers (here: not started; test_grain_workers... pulls their batches) take a
  # state of another layout as well.
  workers = train_iterator(data_config(batch_size=32, worker_count=1), 1, 2, source=source)
  workers.set_state(state)
  assert workers.step == 3 and workers.epoch == 0
  workers.close()


@pytest.mark.skipif(not os.environ.get('DENSEFLOW_SLOW_TESTS'),
                    reason='starts grain worker processes (~15 s); set '
                    'DENSEFLOW_SLOW_TESTS=1')
def test_grain_workers_give_the_same_batches_and_resume():
  config = data_config(batch_size=32, augmentation='eta')
  source = data.load_split(config.data, 'train', (8, 8, 1), 5)
  reference = train_iterator(config, source=source)
  expected = [next(reference) for _ in range(6)]
  workers = data_config(batch_size=32, augmentation='eta', worker_count=2)
  first = train_iterator(workers, source=source)
  got = [next(first) for _ in range(2)]
  state = data.state_from_json(data.state_to_json(first.get_state()))
  got += [next(first) for _ in range(4)]
  first.close()
  for a, b in zip(expected, got):
    np.testing.assert_array_equal(a, b)
  resumed = train_iterator(workers, source=source)
  resumed.set_state(state)
  for a in expected[2:]:
    np.testing.assert_array_equal(a, next(resumed))
  resumed.close()
  # The same state on process 1 of 2 with one worker (another slice, other workers).
  other = train_iterator(data_config(batch_size=32, augmentation='eta', worker_count=1), 1, 2,
                         source=source)
  other.set_state(state)
  for a in expected[2:4]:
    np.testing.assert_array_equal(a[16:], next(other))
  other.close()


def test_batch_size_checks():
  config = data_config(batch_size=30)
  with pytest.raises(errors.ConfigError, match='multiple of 4'):
    train_iterator(config, 0, 4)
  assert data.steps_per_epoch(1500, 30) == 1500 // 30
  with pytest.raises(errors.DataError, match='fewer than one global batch'):
    train_iterator(data_config(batch_size=2048))


# ---- evaluation ------------------------------------------------------------


def test_eval_covers_each_example_once_in_order(id_npz):
  config = data_config('npz', id_npz, (4, 4, 1), 8)
  batches = list(eval_batches(config, 'train', batch_size=8))
  assert len(batches) == data.eval_num_batches(split_of(config, 'train'), 8) == 7
  for images, mask in batches:
    assert images.shape == (8, 4, 4, 1) and mask.shape == (8,)
    assert mask.dtype == bool
  assert batches[-1][1].tolist() == [True, True] + [False] * 6
  valid = np.concatenate([ids(x)[m] for x, m in batches])
  np.testing.assert_array_equal(valid, np.arange(50))
  assert (batches[-1][0][2:] == 0).all()

  first = list(eval_batches(config, 'test', batch_size=4, num_examples=6))
  assert np.concatenate([ids(x)[m] for x, m in first]).tolist() == list(
      range(100, 106))
  with pytest.raises(errors.DataError, match='num_examples'):
    eval_batches(config, 'test', batch_size=4, num_examples=14)


def test_eval_over_two_processes(id_npz):
  config = data_config('npz', id_npz, (4, 4, 1), 8)
  single = list(eval_batches(config, 'train', batch_size=8))
  parts = [list(eval_batches(config, 'train', batch_size=8,
                                  process_index=p, process_count=2))
           for p in range(2)]
  assert len(parts[0]) == len(parts[1]) == len(single)
  for (x0, m0), (x1, m1), (x, m) in zip(*parts, single):
    np.testing.assert_array_equal(np.concatenate([x0, x1]), x)
    np.testing.assert_array_equal(np.concatenate([m0, m1]), m)


@pytest.mark.parametrize('dataset, field, value, match', [
    ('digits', 'source', 'x.npz', r"data.source='x.npz' is only read by data.dataset='npz' or "
                                  r"'folder'.*--config.data.dataset=npz"),
    ('cifar10', 'source', '/data/imgs', r"data.dataset='cifar10' ignores it"),
    ('npz', 'tfds_data_dir', '/tfds', r'tfds_data_dir is only read for TFDS data sets'),
])
def test_settings_the_dataset_does_not_read_are_refused(dataset, field, value, match):
  config = ml_collections.ConfigDict({'dataset': dataset, 'source': '', 'tfds_data_dir': ''})
  config[field] = value
  with pytest.raises(errors.DataError, match=match):
    data.load_split(config, 'train')
