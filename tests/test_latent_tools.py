"""`--mode interpolate / reconstruct / sweep` (denseflow_jax.latent_tools) on one tiny
two-block model (so there is a dropped half to interpolate), run in-process through
`modes.run` from a checkpoint saved once per module.

The truths are computed here independently: the encoding noise from `draw_noise` with
the documented keys, the flow through our own jitted `model.apply`, the interpolated
latents and slerp weights in numpy, the images straight from the data set.
"""
import copy
import json
import math
import shutil

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

from denseflow_jax import checkpoint, data, latent_tools, modes, training_data
from denseflow_jax.model import DenseFlow, draw_noise, init_variables, make_model
from denseflow_jax.errors import ConfigError
from helpers import tiny_config

NUM_BITS = 5
BATCH = 4          # every batch our own jitted functions see (one compile each)
SLERP_INDICES = (3, 0, 1, 2)   # the slerp run names its pairs: (3, 0) and (1, 2)


def latent_config(checkpoint_dir=''):
  # Two blocks; glow coupling and uniform dequantization are configs/digits.py's own.
  return tiny_config({
      'model.block_config': (2, 1), 'model.layers_config': (1, 1), 'model.mid_channels': (8, 8),
      'model.glow_channels': 8,
      'latent.num_pairs': 2, 'latent.steps': 3,       # t = 0, 0.5, 1
      'latent.num_images': 4, 'latent.num_per_row': 3, 'latent.temperatures': (0.0, 1.0),
      'sample.batch_size': 3, 'checkpoint': str(checkpoint_dir)}, base='digits')


def digits_test_images(num):
  config = latent_config()
  source = data.load_split(config.data, 'test', config.model.image_shape, NUM_BITS)
  return np.stack([source[i] for i in range(num)])


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
  """(config, workdir, model, variables, encode, inverse): the checkpoint holds initialised
  variables with perturbed parameters (couplings far from the identity)."""
  root = tmp_path_factory.mktemp('latent')
  config = latent_config(root / 'ckpt')
  model = make_model(config.model)
  x = jnp.asarray(digits_test_images(BATCH))
  variables = jax.jit(lambda rng, x: init_variables(model, rng, x))(jax.random.key(0), x)
  # Perturbed in numpy: per-leaf jax.random calls cost ~15 s of compilation here.
  rng = np.random.default_rng(1)
  variables = {**variables, 'params': jax.tree.map(
      lambda p: np.asarray(p + 0.1 * rng.standard_normal(p.shape), np.float32),
      variables['params'])}
  checkpoint.save_variables(root / 'ckpt', variables, config)

  # The documented encoding noise: row r from fold_in(fold_in(PRNGKey(seed), 0), r).
  key = jax.random.PRNGKey(config.seed)
  rows = [draw_noise(model.spec, jax.random.fold_in(jax.random.fold_in(key, 0), r), 1)
          for r in range(BATCH)]
  noise = jax.tree.map(lambda *a: jnp.concatenate(a), *rows)
  encode = jax.jit(lambda v, x: model.apply(v, x, noise, method=DenseFlow.encode)[:3])
  inverse = jax.jit(lambda v, z, d: model.apply(v, z, d, method=DenseFlow.inverse))
  return config, root / 'work', model, variables, encode, inverse


def run(tiny, mode, **latent):
  config, workdir = copy.deepcopy(tiny[0]), tiny[1]
  config.latent.update(latent)
  return modes.run(mode, config, str(workdir))


def levels(y):
  """Independent dequantization inverse: floor(2^bits y) clipped to the levels."""
  return np.clip(np.floor(np.asarray(y, np.float64) * 2 ** NUM_BITS), 0, 2 ** NUM_BITS - 1)


def assert_same_levels(images, y):
  """uint8 images equal floor(2^bits y), except where y is within 1e-5 of a level
  boundary (float32 rounding of a different compiled program may cross it)."""
  scaled = np.asarray(y, np.float64) * 2 ** NUM_BITS
  near = np.abs(scaled - np.round(scaled)) < 2 ** NUM_BITS * 1e-5
  differ = images.astype(np.int64) != levels(y)
  assert not np.any(differ & ~near), np.argwhere(differ & ~near)


@pytest.fixture(scope='module')
def linear(tiny):
  images = run(tiny, 'interpolate')
  with np.load(tiny[1] / 'latent' / 'interpolate_linear_0-1_2-3_checkpoint.npz') as f:
    return images, dict(f)


@pytest.fixture(scope='module')
def slerp(tiny):
  run(tiny, 'interpolate', method='slerp', indices=SLERP_INDICES)
  with np.load(tiny[1] / 'latent' / 'interpolate_slerp_3-0_1-2_checkpoint.npz') as f:
    return dict(f)


# ---------------------------------------------------------------- interpolation

def test_interpolation_end_points_are_the_inputs(tiny, linear, slerp):
  _, workdir, _, variables, encode, inverse = tiny
  images, saved = linear
  assert images.shape == (2, 3, 8, 8, 1) and images.dtype == np.uint8
  np.testing.assert_array_equal(saved['images'], images)
  for result, order in ((saved, [0, 1, 2, 3]), (slerp, list(SLERP_INDICES))):
    x = digits_test_images(BATCH)[order]
    np.testing.assert_array_equal(result['originals'], x.reshape(2, 2, 8, 8, 1))
    np.testing.assert_array_equal(result['indices'], np.reshape(order, (2, 2)))
    # Our own encode -> inverse of the four images, with the same noise.
    y, z, dropped = encode(variables, x)
    y_rec = np.asarray(inverse(variables, z, dropped))
    assert np.max(np.abs(y_rec - np.asarray(y))) < 1e-4      # the flow inverts
    ends = result['images'][:, [0, -1]].reshape(BATCH, 8, 8, 1)
    assert_same_levels(ends, y_rec)
    assert np.max(np.abs(ends.astype(int) - x.astype(int))) <= 1
    assert np.count_nonzero(ends != x) <= 2                   # at most the rare boundary pixel
    np.testing.assert_allclose(result['continuous'][:, [0, -1]].reshape(BATCH, 8, 8, 1), y_rec,
                               atol=1e-5)
  for name in ('interpolate_linear_0-1_2-3_checkpoint', 'interpolate_slerp_3-0_1-2_checkpoint'):
    picture = Image.open(workdir / 'latent' / f'{name}.png')
    # steps columns, one row per pair; 28 px wide, so enlarged 19x (to >= 512 px)
    assert picture.size == (19 * (3 * 9 + 1), 19 * (2 * 9 + 1))


def test_midpoints_decode_the_numpy_interpolated_latents(tiny, linear, slerp):
  """Linear: the average of both latents (final and dropped). Slerp: the prior-standardised
  latents at t = 1/2, weight sin(W/2) / sin W = 1 / (2 cos(W/2)) each."""
  _, _, _, variables, encode, inverse = tiny
  _, saved = linear
  x = digits_test_images(BATCH)
  encoded = [encode(variables, x), encode(variables, x[list(SLERP_INDICES)])]
  assert len(encoded[0][2]) == 1                              # two blocks: one dropped half
  (z, d), (zs, ds) = [(np.asarray(z, np.float64), np.asarray(dropped[0], np.float64))
                      for _, z, dropped in encoded]
  loc = np.asarray(variables['params']['prior']['loc'], np.float64)
  scale = np.exp(np.asarray(variables['params']['prior']['log_scale'], np.float64))
  assert np.ptp(loc) > 0.01                                   # perturbed: loc matters to slerp

  mid_z, mid_d, slerp_weights = [], [], []
  for a, b in ((0, 1), (2, 3)):                               # linear
    mid_z.append((z[a] + z[b]) / 2)
    mid_d.append((d[a] + d[b]) / 2)
  z, d = zs, ds
  for a, b in ((0, 1), (2, 3)):                               # slerp, rows of SLERP_INDICES
    sa = np.concatenate([((z[a] - loc) / scale).ravel(), d[a].ravel()])
    sb = np.concatenate([((z[b] - loc) / scale).ravel(), d[b].ravel()])
    omega = math.acos(sa @ sb / np.linalg.norm(sa) / np.linalg.norm(sb))
    w = 1 / (2 * math.cos(omega / 2))
    slerp_weights.append(w)
    mid_z.append(loc + scale * w * (sa + sb)[:z[a].size].reshape(z[a].shape))
    mid_d.append(w * (d[a] + d[b]))
  y_mid = np.asarray(inverse(variables, jnp.asarray(np.stack(mid_z), jnp.float32),
                             [jnp.asarray(np.stack(mid_d), jnp.float32)]))

  np.testing.assert_allclose(slerp['weights'][:, 1], np.stack([slerp_weights] * 2, -1),
                             rtol=1e-9)
  assert min(slerp_weights) > 0.5 + 1e-3                      # slerp is not linear here
  for result, y in ((saved, y_mid[:2]), (slerp, y_mid[2:])):
    np.testing.assert_allclose(result['continuous'][:, 1], y, atol=1e-5)
    assert_same_levels(result['images'][:, 1], y)
    # The midpoint is a new image: neither end point.
    assert np.all(np.abs(result['continuous'][:, 1] - result['continuous'][:, 0]).max((1, 2, 3))
                  > 1e-3)


def test_interpolation_weights_closed_form():
  t = np.linspace(0, 1, 5)
  a, b = np.array([1.0, 0.0, 0.0]), np.array([0.0, 2.0, 0.0])     # 90 degrees
  w_a, w_b = latent_tools.interpolation_weights(a, b, 5, 'slerp')
  np.testing.assert_allclose(w_a, np.cos(t * np.pi / 2), atol=1e-12)
  np.testing.assert_allclose(w_b, np.sin(t * np.pi / 2), atol=1e-12)
  assert (w_a[0], w_b[0], w_a[-1], w_b[-1]) == (1.0, 0.0, 0.0, 1.0)   # exact end points
  for method, other in (('linear', b), ('slerp', 3 * a)):            # slerp of parallel: linear
    w_a, w_b = latent_tools.interpolation_weights(a, other, 5, method)
    np.testing.assert_array_equal(w_a, 1 - t)
    np.testing.assert_array_equal(w_b, t)


# ---------------------------------------------------------------- reconstruct

def test_reconstruct_reports_the_independent_error(tiny):
  _, workdir, _, variables, encode, inverse = tiny
  result = run(tiny, 'reconstruct')
  out = workdir / 'latent'
  assert json.loads((out / 'reconstruct_n4_checkpoint.json').read_text()) == result
  x = digits_test_images(BATCH)
  y, z, dropped = encode(variables, x)
  y, y_rec = np.asarray(y, np.float64), np.asarray(inverse(variables, z, dropped), np.float64)
  with np.load(out / 'reconstruct_n4_checkpoint.npz') as f:
    saved = dict(f)
  np.testing.assert_array_equal(saved['originals'], x)
  np.testing.assert_allclose(saved['continuous'], y, atol=1e-7)
  np.testing.assert_allclose(saved['continuous_reconstructed'], y_rec, atol=1e-5)
  assert_same_levels(saved['reconstructions'], y_rec)
  diff = np.abs(saved['reconstructions'].astype(int) - x.astype(int))
  assert result['max_abs_error_levels'] == diff.max() <= 1
  assert result['num_values_differ'] == np.count_nonzero(diff) == result['num_pixels_differ']
  assert (result['num_values'], result['num_pixels'], result['num_images']) == (256, 256, 4)
  np.testing.assert_allclose(result['max_abs_error_continuous'], np.max(np.abs(y_rec - y)),
                             rtol=0.2, atol=2e-7)
  assert result['max_abs_error_continuous'] == pytest.approx(
      np.max(np.abs(saved['continuous_reconstructed'].astype(np.float64) - saved['continuous'])),
      rel=1e-6)
  assert 0 < result['max_abs_error_continuous'] < 1e-4
  # Rows alternate: originals 0-2, their reconstructions, original 3, its reconstruction
  # (the rest of those two rows blank).
  grid = np.asarray(Image.open(out / 'reconstruct_n4_checkpoint.png'))
  assert grid.shape == (19 * (4 * 9 + 1), 19 * (3 * 9 + 1))    # enlarged 19x to >= 512 px
  grid = grid[::19, ::19]
  def tile(row, col):
    return grid[1 + 9 * row:9 + 9 * row, 1 + 9 * col:9 + 9 * col]
  display = np.round(levels(y_rec)[..., 0] * 255 / 31).astype(np.uint8)
  np.testing.assert_array_equal(tile(0, 2), np.round(x[2, ..., 0].astype(int) * 255 / 31))
  np.testing.assert_array_equal(tile(1, 2), display[2])
  np.testing.assert_array_equal(tile(2, 0), np.round(x[3, ..., 0].astype(int) * 255 / 31))
  np.testing.assert_array_equal(tile(3, 0), display[3])
  assert np.all(tile(2, 1) == 255) and np.all(tile(3, 2) == 255)


def test_latent_grids_use_the_recorded_top_level(tiny, tmp_path):
  """A checkpoint with a training record (top level 16): the reconstruct grid shows level 16
  as white (the test above, without a record, divides by 31); the .npz keeps the levels."""
  config = copy.deepcopy(tiny[0])
  shutil.copytree(config.checkpoint, tmp_path / 'ckpt16')
  training_data.write_data_record(tmp_path / 'ckpt16', 'digits', NUM_BITS, 16, 'digits: values 0..16')
  config.checkpoint = str(tmp_path / 'ckpt16')
  modes.run('reconstruct', config, str(tmp_path / 'work'))
  out = tmp_path / 'work' / 'latent'
  grid = np.asarray(Image.open(out / 'reconstruct_n4_checkpoint.png'))[::19, ::19]
  x = digits_test_images(BATCH)
  tile = grid[1:9, 1 + 9 * 2:9 + 9 * 2]                              # row 0, column 2: x[2]
  np.testing.assert_array_equal(tile, np.round(x[2, ..., 0].astype(int) * 255 / 16))
  assert x[2].max() == 16 and tile.max() == 255
  with np.load(out / 'reconstruct_n4_checkpoint.npz') as f:
    np.testing.assert_array_equal(f['originals'], x)


# ---------------------------------------------------------------- sweep

def test_sweep_temperature_zero_is_the_prior_mode(tiny):
  _, workdir, model, variables, _, inverse = tiny
  images = run(tiny, 'sweep')
  assert images.shape == (6, 8, 8, 1)
  cold, hot = images[:3], images[3:]
  assert all(np.array_equal(cold[0], c) for c in cold)     # noise * 0: one image per row
  assert len({c.tobytes() for c in hot}) == 3                # T = 1: three different samples
  # T = 0 decodes the prior mean: z = loc, every dropped half 0.
  loc = np.asarray(variables['params']['prior']['loc'], np.float32)
  z = np.broadcast_to(loc, (BATCH, *model.spec.latent_shape()))
  dropped = [np.zeros((BATCH, *s), np.float32) for s in model.spec.dropped_shapes()]
  assert_same_levels(cold[:1], np.asarray(inverse(variables, z, dropped))[:1])
  picture = Image.open(workdir / 'latent' / 'temperature_sweep_T0-1_n3_checkpoint.png')
  assert picture.size == (19 * (3 * 9 + 1), 19 * (2 * 9 + 1))   # enlarged 19x to >= 512 px
  with np.load(workdir / 'latent' / 'temperature_sweep_T0-1_n3_checkpoint.npz') as f:
    np.testing.assert_array_equal(f['images'], images.reshape(2, 3, 8, 8, 1))
    np.testing.assert_array_equal(f['temperatures'], [0.0, 1.0])


# ---------------------------------------------------------------- bad settings

@pytest.mark.parametrize('mode,latent,message', [
    ('interpolate', {'steps': 1}, 'latent.steps must be an integer >= 2'),
    ('interpolate', {'method': 'cubic'}, 'latent.method must be one of'),
    ('interpolate', {'num_pairs': 200}, 'needs 400 test images but the test split has 297'),
    ('interpolate', {'num_pairs': 0}, 'latent.num_pairs must be an integer >= 1'),
    ('interpolate', {'indices': (0, 1, 2)}, 'an even number'),
    ('interpolate', {'indices': (0, 297)}, r'indices \[297\] are not in the test split'),
    ('reconstruct', {'num_images': 298}, 'the test split has 297 images'),
    ('reconstruct', {'num_per_row': 0}, 'latent.num_per_row must be'),
    ('sweep', {'temperatures': (0.5, -0.25)}, r'finite and >= 0 .* got \[-0.25\]'),
    ('sweep', {'temperatures': ()}, 'latent.temperatures is empty'),
])
def test_bad_latent_settings_raise_config_errors(tmp_path, mode, latent, message):
  config = latent_config(tmp_path / 'no-checkpoint')   # raised before any checkpoint is read
  config.latent.update(latent)
  with pytest.raises(ConfigError, match=message):
    modes.run(mode, config, str(tmp_path / 'work'))
  assert not (tmp_path / 'work').exists()


def test_file_names_list_a_few_settings_and_digest_many():
  assert latent_tools._list_name(['3-0', '1-2'], '_', 'pairs') == '3-0_1-2'
  temperatures = ['0', '0.25', '0.5', '0.75', '1']      # the default sweep: spelled out
  assert latent_tools._list_name(temperatures, '-', 'temps') == '0-0.25-0.5-0.75-1'
  many = [f'{i}-{i + 1}' for i in range(0, 40, 2)]
  name = latent_tools._list_name(many, '_', 'pairs')
  assert name.startswith('20pairs-') and len(name) == len('20pairs-') + 8
  assert latent_tools._list_name(many[::-1], '_', 'pairs') != name   # other pairs, other name
