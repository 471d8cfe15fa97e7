"""Tests of denseflow_jax.evaluate: bounds, dataset evaluation, files, samples (CPU)."""
import dataclasses
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest
from scipy.special import logsumexp

from denseflow_jax import data, evaluate, files, outputs, sampling
from denseflow_jax.model import DenseFlow, bits_per_dim, draw_noise, init_variables, make_model
from denseflow_jax.settings import EvalSettings
from helpers import model_spec, split_of, tiny_config

SPEC = model_spec(image_shape=(8, 8, 1), num_bits=5, block_config=(2,), layers_config=(1,),
                 mid_channels=(8,), growth_rate=2, coupling_net='glow', glow_channels=8,
                 dequantization='uniform')
BATCH = 8


def eval_config(batch_size=64, k=1, k_chunk=50):
  return tiny_config({'eval.batch_size': batch_size, 'eval.k': k, 'eval.k_chunk': k_chunk,
                      'eval.use_ema': True, 'eval.num_examples': -1})


def digits_images(num):
  source = data.load_split(eval_config().data, 'test', SPEC.image_shape, SPEC.num_bits)
  return np.stack([source[i] for i in range(num)])


def fake_log_prob_fn(variables, x, keys):
  """Known per-sample values: a pixel-sum term plus N(0, 9) noise from each row's key,
  around -8000 nats (where exp underflows in float32, as real bounds do)."""
  del variables
  noise = jax.vmap(lambda k: jax.random.normal(k, ()))(keys)
  return -8000.0 - jnp.sum(x.reshape(x.shape[0], -1).astype(jnp.float32), -1) / 10 + 3.0 * noise


# ---------------------------------------------------------------- IWBO maths (fake model)

@pytest.mark.parametrize('k,k_chunk', [(1, 1), (1, 50), (5, 1), (5, 2), (5, 5), (6, 4), (7, 50)])
def test_chunked_iwbo_equals_closed_form(k, k_chunk):
  x = jnp.asarray(digits_images(3))
  key = jax.random.key(7)
  bound, elbo = evaluate.iwbo_and_elbo(fake_log_prob_fn, None, x, key, k, k_chunk)
  # All k samples in one pass, combined in float64.
  keys = evaluate.sample_keys(key, jnp.arange(k), 3)
  values = fake_log_prob_fn(None, jnp.tile(x, (k, 1, 1, 1)), keys)
  values = np.asarray(values, np.float64).reshape(k, 3)
  assert np.ptp(values, axis=0).max() > (1.0 if k > 1 else -1.0)   # the samples differ
  np.testing.assert_allclose(bound, logsumexp(values, axis=0) - math.log(k), rtol=0, atol=2e-3)
  np.testing.assert_allclose(elbo, values.mean(axis=0), rtol=0, atol=2e-3)
  np.testing.assert_allclose(evaluate.iwbo(fake_log_prob_fn, None, x, key, k, k_chunk), bound)


def test_iwbo_is_at_least_the_mean_elbo_of_its_samples():
  bound, elbo = evaluate.iwbo_and_elbo(fake_log_prob_fn, None, digits_images(4), jax.random.key(1),
                                       9, 4)
  assert np.all(np.asarray(bound) >= np.asarray(elbo))
  assert np.all(np.asarray(bound) > np.asarray(elbo) + 0.1)   # strictly, with noise of std 3


@pytest.mark.parametrize('k,k_chunk', [(0, 5), (5, 0), (-1, 1)])
def test_iwbo_rejects_non_positive_k(k, k_chunk):
  with pytest.raises(ValueError, match='positive'):
    evaluate.iwbo(fake_log_prob_fn, None, digits_images(2), jax.random.key(0), k, k_chunk)


def test_evaluate_dataset_excludes_padded_rows():
  """297 test digits in batches of 64: the last batch has 23 zero rows that a
  wrong mask would count (their fake bound, 0, is far from the others)."""
  config = eval_config(batch_size=64)
  def log_prob_fn(variables, x, keys):
    del variables, keys
    return -jnp.sum(x.reshape(x.shape[0], -1).astype(jnp.float32), -1)
  images = digits_images(297)
  expected = bits_per_dim(-images.reshape(297, -1).sum(-1).mean(), SPEC)
  for k in (1, 3):
    settings = dataclasses.replace(EvalSettings.from_config(config), k=k)
    result = evaluate.evaluate_dataset(make_model(SPEC), None, split_of(config, 'test'),
                                       jax.random.key(0), settings, log_prob_fn=log_prob_fn,
                                       progress=False)
    assert result['num_examples'] == 297 and result['num_batches'] == 5
    assert result['num_nonfinite'] == 0
    np.testing.assert_allclose(result['elbo_bpd'], expected, rtol=1e-6)
    if k == 1:
      assert 'iwbo_bpd' not in result
    else:   # identical samples: the IWBO is the ELBO
      np.testing.assert_allclose(result['iwbo_bpd'], expected, rtol=1e-6)
    assert result['seconds'] > 0 and result['images_per_second'] > 0
    json.dumps(result)


# ---------------------------------------------------------------- a tiny real model

@pytest.fixture(scope='module')
def tiny():
  """Model, initialised variables with perturbed parameters (non-identity couplings),
  a batch of digits and the jitted log_prob_fn."""
  model = make_model(SPEC)
  x = jnp.asarray(digits_images(BATCH))
  variables = jax.jit(lambda rng, x: init_variables(model, rng, x))(jax.random.key(0), x)
  leaves, tree = jax.tree.flatten(variables['params'])
  keys = jax.random.split(jax.random.key(1), len(leaves))
  params = tree.unflatten([p + 0.1 * jax.random.normal(k, p.shape, p.dtype)
                           for p, k in zip(leaves, keys)])
  variables = {**variables, 'params': params}
  return model, variables, x, evaluate.make_log_prob_fn(model)


def test_iwbo_with_k1_is_the_elbo(tiny):
  model, variables, x, log_prob_fn = tiny
  key = jax.random.key(3)
  elbo = np.asarray(log_prob_fn(variables, x, key))
  assert np.all(np.isfinite(elbo))
  np.testing.assert_allclose(evaluate.iwbo(log_prob_fn, variables, x, key, 1, 50), elbo, rtol=1e-6)
  # The same bounds one example at a time with model.log_prob and draw_noise: row
  # noise does not depend on the rest of the batch.
  one = jax.jit(lambda v, x, noise: model.apply(v, x, noise, method=DenseFlow.log_prob))
  row_keys = evaluate.sample_keys(key, jnp.arange(1), BATCH)
  singles = [one(variables, x[b:b + 1], draw_noise(SPEC, row_keys[b], 1))[0] for b in range(BATCH)]
  np.testing.assert_allclose(singles, elbo, rtol=1e-5)


def test_iwbo_does_not_depend_on_k_chunk(tiny):
  _, variables, x, log_prob_fn = tiny
  key = jax.random.key(4)
  results = [evaluate.iwbo_and_elbo(log_prob_fn, variables, x, key, 3, k_chunk)
             for k_chunk in (1, 2, 3)]
  for bound, elbo in results[1:]:
    np.testing.assert_allclose(bound, results[0][0], rtol=1e-5)
    np.testing.assert_allclose(elbo, results[0][1], rtol=1e-5)
  bound, elbo = results[0]
  assert np.all(np.asarray(bound) >= np.asarray(elbo))
  assert not np.allclose(bound, elbo)


def test_evaluate_dataset_with_the_model(tiny):
  model, variables, _, _ = tiny
  config = eval_config(batch_size=BATCH, k=2, k_chunk=2)
  settings = dataclasses.replace(EvalSettings.from_config(config), num_examples=20)
  result = evaluate.evaluate_dataset(model, variables, split_of(config, 'test'),
                                     jax.random.key(5), settings, progress=False)
  assert (result['num_examples'], result['num_batches'], result['k']) == (20, 3, 2)
  assert result['num_nonfinite'] == 0
  assert 0 < result['iwbo_bpd'] <= result['elbo_bpd'] < 2 * SPEC.num_bits


def test_reconstruction_error_is_small(tiny):
  model, variables, x, _ = tiny
  error = evaluate.reconstruction_error(model, variables, x, jax.random.key(6))
  assert 0 <= error < 1e-4


def test_samples_are_deterministic_in_range_and_batch_size_free(tiny):
  model, variables, _, _ = tiny
  key = jax.random.key(8)
  def draw(num, key=key, batch_size=4):
    return sampling.sample_images(model, variables, key, num, 1.0, batch_size)
  images = draw(10)
  assert images.shape == (10, 8, 8, 1) and images.dtype == np.uint8
  assert images.max() <= 2 ** SPEC.num_bits - 1
  assert len(np.unique(images.reshape(10, -1), axis=0)) == 10
  np.testing.assert_array_equal(draw(10), images)
  np.testing.assert_array_equal(draw(3), images[:3])   # batch of 3: another compile
  assert not np.array_equal(draw(10, key=jax.random.key(9)), images)
  cold = sampling.sample_images(model, variables, key, 4, 0.0, batch_size=4)
  assert all(np.array_equal(cold[0], c) for c in cold)   # temperature 0: every draw is the mode


def test_temperature_sweep_and_its_grid(tiny, tmp_path):
  model, variables, _, _ = tiny
  key = jax.random.key(8)
  path = tmp_path / 'sweep.png'
  images = sampling.temperature_sweep(model, variables, key, temperatures=(0.0, 0.5, 1.0),
                                      num_per_row=4, batch_size=4)
  outputs.save_sample_grid(path, images, SPEC.num_bits, ncols=4)
  assert images.shape == (12, 8, 8, 1)
  assert all(np.array_equal(images[0], image) for image in images[:4])
  hot = sampling.sample_images(model, variables, key, 4, 1.0, batch_size=4)
  np.testing.assert_array_equal(images[8:], hot)
  assert Image.open(path).size == (14 * (4 * 9 + 1), 14 * (3 * 9 + 1))   # 37 px, enlarged 14x


# ---------------------------------------------------------------- files

def test_write_eval_json_round_trip(tmp_path):
  result = {'elbo_bpd': np.float32(3.5), 'k': np.int64(1000), 'n': jnp.asarray(2), 'split': 'test'}
  path = outputs.write_eval_json(tmp_path / 'run', result, name='test')
  assert path == os.path.join(tmp_path / 'run', 'eval_test.json')
  assert json.load(open(path)) == {'elbo_bpd': 3.5, 'k': 1000, 'n': 2, 'split': 'test'}
  assert os.listdir(tmp_path / 'run') == ['eval_test.json']


def test_failed_writes_keep_the_old_result(tmp_path, monkeypatch):
  path = outputs.write_eval_json(tmp_path, {'elbo_bpd': 3.0})
  old = open(path).read()
  with pytest.raises(TypeError):
    outputs.write_eval_json(tmp_path, {'elbo_bpd': object()})
  def broken_writer(f):
    f.write(b'{"elbo_bp')
    raise OSError('disk full')
  with pytest.raises(OSError, match='disk full'):
    files.atomic_write(path, broken_writer)
  def failing_replace(src, dst):
    raise OSError('replace failed')
  monkeypatch.setattr(os, 'replace', failing_replace)
  with pytest.raises(OSError, match='replace failed'):
    outputs.write_eval_json(tmp_path, {'elbo_bpd': 2.0})
  assert open(path).read() == old
  assert os.listdir(tmp_path) == ['eval_eval.json']   # no temporary files left


def test_save_samples_npz(tmp_path):
  images = np.arange(2 * 4 * 4 * 3, dtype=np.uint8).reshape(2, 4, 4, 3)
  outputs.save_samples_npz(tmp_path / 's.npz', images, 0.7, 12.5)
  with np.load(tmp_path / 's.npz') as f:
    np.testing.assert_array_equal(f['images'], images)
    assert float(f['temperature']) == 0.7 and float(f['seconds']) == 12.5


@pytest.mark.parametrize('channels,num_bits', [(1, 8), (3, 5)])
def test_sample_grid_layout(tmp_path, channels, num_bits):
  n, h, w = 5, 3, 2
  top = 2 ** num_bits - 1
  values = np.array([0, 1, 7, 16, top])   # one value per image
  images = np.broadcast_to(values[:, None, None, None], (n, h, w, channels)).astype(np.uint8).copy()
  images[:, 0, 0, :] = top // 2   # a marker in each image's top-left pixel
  path = tmp_path / 'grid.png'
  outputs.save_sample_grid(path, images, num_bits=num_bits, min_width=1)
  picture = Image.open(path)
  assert picture.mode == ('L' if channels == 1 else 'RGB')
  assert picture.size == (3 * (w + 1) + 1, 2 * (h + 1) + 1)   # 3 columns, 2 rows, 1-pixel padding
  grid = np.asarray(picture).reshape(picture.size[1], picture.size[0], channels)
  display = np.round(np.array([0, 1, 7, 16, top, top // 2]) * 255 / top).astype(int)
  mask = np.ones(grid.shape[:2], bool)
  for i in range(n):
    r, c = 1 + (i // 3) * (h + 1), 1 + (i % 3) * (w + 1)
    tile = grid[r:r + h, c:c + w].astype(int)
    assert np.all(tile[0, 0] == display[5])
    assert np.all(tile.reshape(-1, channels)[1:] == display[i])
    mask[r:r + h, c:c + w] = False
  assert np.all(grid[mask] == 255)   # padding and the empty sixth cell


def test_grids_show_the_data_top_level_as_white(tmp_path):
  """top=16 (the digits): level 16 -> 255, levels above saturate; top None: 2^bits - 1."""
  levels = np.array([0, 8, 16, 17, 31], np.uint8).reshape(5, 1, 1, 1)
  np.testing.assert_array_equal(outputs.to_display(levels, 5, top=16).ravel(),
                                [0, 128, 255, 255, 255])
  np.testing.assert_array_equal(outputs.to_display(levels, 5).ravel(),   # 31 is white
                                [0, 66, 132, 140, 255])
  outputs.save_sample_grid(tmp_path / 'g16.png', levels, num_bits=5, ncols=5, padding=0,
                           min_width=1, top=16)
  picture = np.asarray(Image.open(tmp_path / 'g16.png'))
  assert picture.tolist() == [[0, 128, 255, 255, 255]]
  outputs.save_sample_grid(tmp_path / 'g.png', levels[:3], num_bits=5, ncols=3, padding=0,
                           min_width=1)
  assert np.asarray(Image.open(tmp_path / 'g.png')).tolist() == [[0, 66, 132]]
  eight_bit = np.array([0, 100, 200, 255], np.uint8).reshape(4, 1, 1, 1)
  np.testing.assert_array_equal(outputs.to_display(eight_bit, 8), eight_bit)
  np.testing.assert_array_equal(outputs.to_display(eight_bit, 8, top=200).ravel(),
                                [0, 128, 255, 255])
  for bad in (0, 32):
    with pytest.raises(ValueError, match='not in 1..31'):
      outputs.to_display(levels, 5, top=bad)


def test_small_grids_are_enlarged_by_a_whole_factor(tmp_path):
  """A 3x3 grid of 8x8 images (28 px wide) becomes 19x larger (532 >= 512 px): each pixel a
  19x19 block of the same value."""
  rng = np.random.default_rng(0)
  images = rng.integers(0, 17, (9, 8, 8, 1)).astype(np.uint8)
  small = outputs.make_grid(images, num_bits=5)
  written = outputs.save_sample_grid(tmp_path / 'g.png', images, num_bits=5)
  picture = np.asarray(Image.open(tmp_path / 'g.png'))
  assert small.shape[:2] == (28, 28) and picture.shape == (28 * 19, 28 * 19)
  np.testing.assert_array_equal(picture, written[:, :, 0])
  np.testing.assert_array_equal(picture[::19, ::19], small[:, :, 0])
  np.testing.assert_array_equal(picture[18::19, 18::19], small[:, :, 0])
  wide = rng.integers(0, 256, (4, 300, 300, 3)).astype(np.uint8)   # 603 px: left as it is
  assert outputs.save_sample_grid(tmp_path / 'w.png', wide).shape == (603, 603, 3)
