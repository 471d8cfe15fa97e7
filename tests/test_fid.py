"""Tests of denseflow_jax.fid and denseflow_jax.inception (CPU).

Truths: closed forms of the Fréchet distance (commuting covariances, 1-d), an
eigendecomposition route that never calls sqrtm, np.mean / np.cov, torchvision's
published InceptionV3 parameter count, and a PyTorch functional re-implementation
of pytorch-fid's network fed the same (synthetic) state dict. The Inception forward
runs at 75x75 (the smallest input size) to keep its compilation short.
"""
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from denseflow_jax import errors
from denseflow_jax import data, fid, inception, modes, sampling
from denseflow_jax.model import init_variables, make_model
from denseflow_jax.errors import ConfigError
from denseflow_jax.settings import DataSettings, FidSettings
from helpers import GLOW


def random_spd(rng, d):
  a = rng.normal(size=(d, d))
  return a @ a.T / d + 0.1 * np.eye(d)


# ---------------------------------------------------------------- Fréchet distance

def test_frechet_distance_of_commuting_covariances_has_closed_form():
  """S1 = Q diag(a) Q^T, S2 = Q diag(b) Q^T commute: FID = |mu1-mu2|^2 + sum (sqrt a - sqrt b)^2."""
  rng = np.random.default_rng(0)
  d = 8
  q, _ = np.linalg.qr(rng.normal(size=(d, d)))
  a, b = rng.uniform(0.1, 3.0, d), rng.uniform(0.1, 3.0, d)
  mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
  expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
  for s1, s2 in [(np.diag(a), np.diag(b)), (q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T)]:
    assert fid.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)
  # 1-d Gaussians: (m1 - m2)^2 + (s1 - s2)^2 with standard deviations s.
  assert fid.frechet_distance([1.0], [[4.0]], [-2.0], [[9.0]]) == pytest.approx(9.0 + 1.0)


def test_frechet_distance_of_generic_covariances_matches_eigen_route():
  """Tr sqrt(S1 S2) = Tr sqrt(S1^1/2 S2 S1^1/2) (similar matrices), from eigh alone."""
  rng = np.random.default_rng(1)
  d = 12
  s1, s2 = random_spd(rng, d), random_spd(rng, d)
  mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
  w, v = scipy.linalg.eigh(s1)
  root1 = v @ np.diag(np.sqrt(w)) @ v.T
  tr_covmean = np.sum(np.sqrt(scipy.linalg.eigvalsh(root1 @ s2 @ root1)))
  expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_covmean
  assert fid.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)
  assert fid.frechet_distance(mu1, s1, mu2, s2) > 0


def test_frechet_distance_of_a_set_with_itself_is_zero():
  x = np.random.default_rng(2).normal(size=(400, 16)) @ np.diag(np.linspace(0.1, 5, 16))
  mu, sigma = x.mean(0), np.cov(x, rowvar=False)
  assert abs(fid.frechet_distance(mu, sigma, mu, sigma)) < 1e-8 * np.trace(sigma)


def test_frechet_distance_rejects_invalid_statistics():
  with pytest.raises(errors.FIDError, match='do not match'):
    fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
  # Not a covariance: the product has a negative eigenvalue, its root is imaginary.
  with pytest.raises(errors.FIDError, match='imaginary component'):
    fid.frechet_distance(np.zeros(2), np.diag([1.0, 1.0]), np.zeros(2), np.diag([-1.0, 1.0]))


# ---------------------------------------------------------------- streaming statistics

def test_streaming_stats_equal_numpy_for_any_order_and_batching():
  rng = np.random.default_rng(3)
  # A large common offset: a naive sum-of-squares covariance would lose digits here.
  x = 1000.0 + rng.normal(size=(1003, 9)) @ rng.normal(size=(9, 9))

  def stream(rows, cuts):
    stats = fid.ActivationStats(9)
    for part in np.split(rows, cuts):
      stats.update(part)
    return stats

  a = stream(x, [1, 2, 50, 50, 700])           # includes an empty batch
  b = stream(x[rng.permutation(len(x))], [500])
  c = stream(x[::-1], np.arange(7, 1003, 7))
  for s in (a, b, c):
    assert s.count == len(x)
    np.testing.assert_allclose(s.mean, x.mean(0), rtol=1e-13)
    np.testing.assert_allclose(s.covariance, np.cov(x, rowvar=False), rtol=1e-9, atol=1e-12)
  np.testing.assert_allclose(a.covariance, b.covariance, rtol=1e-10)
  with pytest.raises(errors.FIDError, match='at least 2'):
    _ = fid.ActivationStats(9).update(x[:1]).covariance


# ---------------------------------------------------------------- Inception network

def test_inception_shapes_and_parameter_count():
  features = jax.eval_shape(lambda v, x: inception.InceptionV3().apply(v, x),
                            inception.variable_shapes(),
                            jax.ShapeDtypeStruct((3, 32, 32, 1), jnp.uint8))
  assert features.shape == (3, inception.FEATURE_DIM) and features.dtype == jnp.float32
  shapes = inception.expected_shapes()
  # torchvision's inception_v3 has 27,161,264 parameters (its model card), of which the
  # aux classifier holds 3,326,696 (conv0 98,560 + conv1 2,459,136 + fc 769,000) and fc
  # 2,049,000: pool3 needs the rest.
  count = sum(math.prod(s) for k, s in shapes.items() if k.startswith('params/'))
  assert count == 27_161_264 - 3_326_696 - 2_049_000
  assert shapes['params/Mixed_7c/branch_pool/conv/kernel'] == (1, 1, 2048, 192)
  assert shapes['params/Mixed_6b/branch7x7_2/conv/kernel'] == (1, 7, 128, 128)
  assert shapes['batch_stats/Mixed_5b/branch_pool/bn/var'] == (32,)


def _bilinear_half_pixel(images, size):
  """Bilinear resize with half-pixel centres and edge clamping (torch
  F.interpolate(mode='bilinear', align_corners=False) when upsampling), float64 numpy."""
  def axis_weights(n_in):
    src = np.clip((np.arange(size) + 0.5) * n_in / size - 0.5, 0, n_in - 1)
    lo = np.floor(src).astype(int)
    hi = np.minimum(lo + 1, n_in - 1)
    w = np.zeros((size, n_in))
    np.add.at(w, (np.arange(size), lo), 1 - (src - lo))
    np.add.at(w, (np.arange(size), hi), src - lo)
    return w
  x = np.asarray(images, np.float64)
  return np.einsum('ph,qw,bhwc->bpqc', axis_weights(x.shape[1]), axis_weights(x.shape[2]), x)


def test_preprocess_is_half_pixel_bilinear_to_minus_one_one_and_tiles_grey():
  preprocess = jax.jit(inception.preprocess)   # one compile beats ~100 ops run eagerly
  images = np.random.default_rng(4).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
  ours = np.asarray(preprocess(images))
  np.testing.assert_allclose(ours, _bilinear_half_pixel(images / 255, 299) * 2 - 1, atol=1e-5)
  grey = images[..., :1]
  np.testing.assert_array_equal(preprocess(grey), preprocess(np.repeat(grey, 3, axis=-1)))
  try:
    import torch
  except ImportError:
    return   # the closed form above is the check; torch is a second opinion
  x = torch.from_numpy(images).permute(0, 3, 1, 2).double() / 255
  x = torch.nn.functional.interpolate(x, size=(299, 299), mode='bilinear', align_corners=False)
  np.testing.assert_allclose(ours, (2 * x - 1).permute(0, 2, 3, 1).numpy(), atol=1e-5)


def torch_fid_inception(sd, images, size):
  """pytorch-fid's InceptionV3 (fid_inception_v3, pool3 output), functional, NCHW."""
  import torch
  import torch.nn.functional as F

  def conv(name, x, stride=1, padding=0):
    x = F.conv2d(x, sd[f'{name}.conv.weight'], stride=stride, padding=padding)
    x = F.batch_norm(x, sd[f'{name}.bn.running_mean'], sd[f'{name}.bn.running_var'],
                     sd[f'{name}.bn.weight'], sd[f'{name}.bn.bias'], training=False, eps=1e-3)
    return F.relu(x)

  def avg(x):
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)

  def block_a(n, x):
    b5 = conv(f'{n}.branch5x5_2', conv(f'{n}.branch5x5_1', x), padding=2)
    b3 = conv(f'{n}.branch3x3dbl_2', conv(f'{n}.branch3x3dbl_1', x), padding=1)
    b3 = conv(f'{n}.branch3x3dbl_3', b3, padding=1)
    return torch.cat([conv(f'{n}.branch1x1', x), b5, b3, conv(f'{n}.branch_pool', avg(x))], 1)

  def block_c(n, x):
    b7 = conv(f'{n}.branch7x7_1', x)
    b7 = conv(f'{n}.branch7x7_3', conv(f'{n}.branch7x7_2', b7, padding=(0, 3)), padding=(3, 0))
    bd = conv(f'{n}.branch7x7dbl_1', x)
    for i, pad in zip(range(2, 6), [(3, 0), (0, 3), (3, 0), (0, 3)]):
      bd = conv(f'{n}.branch7x7dbl_{i}', bd, padding=pad)
    return torch.cat([conv(f'{n}.branch1x1', x), b7, bd, conv(f'{n}.branch_pool', avg(x))], 1)

  def block_e(n, x, pool):
    b3 = conv(f'{n}.branch3x3_1', x)
    b3 = torch.cat([conv(f'{n}.branch3x3_2a', b3, padding=(0, 1)),
                    conv(f'{n}.branch3x3_2b', b3, padding=(1, 0))], 1)
    bd = conv(f'{n}.branch3x3dbl_2', conv(f'{n}.branch3x3dbl_1', x), padding=1)
    bd = torch.cat([conv(f'{n}.branch3x3dbl_3a', bd, padding=(0, 1)),
                    conv(f'{n}.branch3x3dbl_3b', bd, padding=(1, 0))], 1)
    pooled = F.max_pool2d(x, 3, stride=1, padding=1) if pool == 'max' else avg(x)
    return torch.cat([conv(f'{n}.branch1x1', x), b3, bd, conv(f'{n}.branch_pool', pooled)], 1)

  x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
  x = F.interpolate(x, size=(size, size), mode='bilinear', align_corners=False) * 2 - 1
  x = conv('Conv2d_2b_3x3', conv('Conv2d_2a_3x3', conv('Conv2d_1a_3x3', x, stride=2)), padding=1)
  x = conv('Conv2d_4a_3x3', conv('Conv2d_3b_1x1', F.max_pool2d(x, 3, stride=2)))
  x = F.max_pool2d(x, 3, stride=2)
  for n in ('Mixed_5b', 'Mixed_5c', 'Mixed_5d'):
    x = block_a(n, x)
  bd = conv('Mixed_6a.branch3x3dbl_2', conv('Mixed_6a.branch3x3dbl_1', x), padding=1)
  x = torch.cat([conv('Mixed_6a.branch3x3', x, stride=2),
                 conv('Mixed_6a.branch3x3dbl_3', bd, stride=2), F.max_pool2d(x, 3, stride=2)], 1)
  for n in ('Mixed_6b', 'Mixed_6c', 'Mixed_6d', 'Mixed_6e'):
    x = block_c(n, x)
  b3 = conv('Mixed_7a.branch3x3_2', conv('Mixed_7a.branch3x3_1', x), stride=2)
  b7 = conv('Mixed_7a.branch7x7x3_2', conv('Mixed_7a.branch7x7x3_1', x), padding=(0, 3))
  b7 = conv('Mixed_7a.branch7x7x3_4', conv('Mixed_7a.branch7x7x3_3', b7, padding=(3, 0)), stride=2)
  x = torch.cat([b3, b7, F.max_pool2d(x, 3, stride=2)], 1)
  x = block_e('Mixed_7c', block_e('Mixed_7b', x, 'avg'), 'max')
  return x.mean(dim=(2, 3)).numpy()


@pytest.fixture(scope='module')
def converted(tmp_path_factory):
  """A synthetic pytorch-fid state dict (torch layout, random values, the extra keys the
  release has) and its conversion by the CLI: from a .pth where PyTorch is installed,
  else from the .npz form the converter also reads (so CI without torch still checks
  the conversion and the loader's errors)."""
  rng = np.random.default_rng(5)
  sd = {}
  for key, shape in inception.expected_shapes().items():
    collection, *module, leaf = key.split('/')
    name = '.'.join(module)
    if leaf == 'kernel':       # [kh, kw, I, O] -> torch [O, I, kh, kw], He-scaled
      value = rng.normal(0, math.sqrt(2 / math.prod(shape[:3])), (shape[3], shape[2], *shape[:2]))
      sd[f'{name}.weight'] = value
    else:
      torch_leaf = {'scale': 'weight', 'bias': 'bias', 'mean': 'running_mean',
                    'var': 'running_var'}[leaf]
      value = {'scale': rng.uniform(0.5, 1.5, shape), 'bias': rng.normal(0, 0.1, shape),
               'mean': rng.normal(0, 0.1, shape), 'var': rng.uniform(0.5, 1.5, shape)}[leaf]
      sd[f'{name}.{torch_leaf}'] = value
      if leaf == 'var':
        sd[f'{name}.num_batches_tracked'] = np.array(0)
  sd['fc.weight'], sd['fc.bias'] = rng.normal(size=(1008, 2048)), np.zeros(1008)
  sd = {k: np.asarray(v, np.float32 if v.dtype.kind == 'f' else np.int64) for k, v in sd.items()}
  folder = tmp_path_factory.mktemp('inception')
  try:
    import torch
    source = folder / inception.WEIGHTS_FILE
    torch.save({k: torch.from_numpy(v) for k, v in sd.items()}, source)
  except ImportError:
    source = folder / 'state_dict.npz'
    np.savez(source, **sd)
  inception.main(['--convert', str(source), '--out', str(folder / 'inception_fid.npz')])
  return sd, folder / 'inception_fid.npz'


def test_converted_weights_round_trip(converted):
  sd, npz = converted
  variables = inception.load_inception_params(npz)
  kernel = variables['params']['Mixed_6b']['branch7x7_2']['conv']['kernel']   # [1, 7, 128, 128]
  np.testing.assert_array_equal(kernel[0, 5, 3, 9], sd['Mixed_6b.branch7x7_2.conv.weight'][9, 3, 0, 5])
  bn = variables['batch_stats']['Conv2d_1a_3x3']['bn']
  np.testing.assert_array_equal(bn['var'], sd['Conv2d_1a_3x3.bn.running_var'])
  np.testing.assert_array_equal(variables['params']['Mixed_7c']['branch_pool']['bn']['scale'],
                                sd['Mixed_7c.branch_pool.bn.weight'])


def test_inception_features_match_torch_reference(converted):
  torch = pytest.importorskip('torch')
  sd, npz = converted
  sd = {k: torch.from_numpy(v) for k, v in sd.items()}
  images = np.random.default_rng(6).integers(0, 256, (2, 40, 40, 3), dtype=np.uint8)
  ours = np.asarray(inception.make_feature_fn(npz, input_size=75)(images))
  theirs = torch_fid_inception(sd, images, 75)
  assert ours.shape == (2, 2048) and np.std(theirs) > 1e-3
  np.testing.assert_allclose(ours, theirs, rtol=1e-3, atol=1e-4 * np.abs(theirs).max())


def test_weights_errors_name_the_file_and_the_fix(converted, tmp_path):
  sd, npz = converted
  with np.load(npz) as full:
    arrays = {k: full[k] for k in full.files}
  arrays.pop('params/Mixed_6e/branch7x7dbl_3/conv/kernel')
  np.savez(tmp_path / 'partial.npz', **arrays)
  with pytest.raises(errors.InceptionWeightsError,
                     match=r'(?s)partial\.npz is not a converted FID Inception.*'
                           r'python -m denseflow_jax\.inception --convert.*'
                           r'missing params/Mixed_6e/branch7x7dbl_3/conv/kernel'):
    inception.load_inception_params(tmp_path / 'partial.npz')
  with pytest.raises(errors.InceptionWeightsError, match=r'nowhere\.npz does not exist.*'
                     r'pytorch-fid/releases/download/fid_weights'):
    inception.load_inception_params(tmp_path / 'nowhere.npz')
  (npz.parent / 'raw.pth').write_bytes(b'not read')
  with pytest.raises(errors.InceptionWeightsError, match='PyTorch file; convert it first'):
    inception.load_inception_params(npz.parent / 'raw.pth')
  # torchvision's ImageNet InceptionV3 (1000 classes) is a different network.
  state = dict(sd)
  state['fc.weight'] = np.zeros((1000, 2048), np.float32)
  with pytest.raises(errors.InceptionWeightsError, match="torchvision's ImageNet"):
    inception.convert_state_dict(state)
  with pytest.raises(SystemExit, match=r'error: --convert .*absent\.pth does not exist'):
    inception.main(['--convert', str(tmp_path / 'absent.pth'), '--out', str(tmp_path / 'x.npz')])


# ---------------------------------------------------------------- --mode fid

def fid_config(make_config, tmp_path):
  return make_config({**GLOW, 'fid.num_samples': 21, 'fid.batch_size': 8,
                      'fid.temperature': 0.8, 'fid.stats_dir': str(tmp_path / 'stats')},
                     base='digits')


def test_mode_fid_without_weights_is_a_config_error(make_config, tmp_path):
  config = fid_config(make_config, tmp_path)
  with pytest.raises(ConfigError, match=r'fid\.inception_weights is empty.*'
                     r'python -m denseflow_jax\.inception --convert'):
    modes.run('fid', config, str(tmp_path / 'run'))
  config.fid.inception_weights = str(tmp_path / 'missing.npz')
  with pytest.raises(ConfigError, match='missing.npz does not exist'):
    modes.run('fid', config, str(tmp_path / 'run'))
  config.fid.inception_weights, config.fid.num_samples = str(tmp_path / 'missing.npz'), 1
  with pytest.raises(ConfigError, match='num_samples must be an integer >= 2'):
    modes.run('fid', config, str(tmp_path / 'run'))


def row_features(images):
  """A cheap stand-in for Inception: the mean of each image row, in 0..255 units."""
  return np.asarray(images, np.float64).mean(axis=(2, 3))


def test_run_fid_end_to_end_on_a_tiny_model(make_config, tmp_path, capsys):
  """21 samples (batches 8 + 8 + 5) and the digits splits through run_fid, against
  features computed here from sample_images and the raw split, with np.mean / np.cov."""
  config = fid_config(make_config, tmp_path)
  model = make_model(config.model)
  source = data.load_split(config.data, 'test', (8, 8, 1), 5)
  x = np.stack([source[i] for i in range(8)])
  # jit: one compile is ~4x faster than running the initialisation op by op.
  variables = jax.jit(lambda r, x: init_variables(model, r, x))(jax.random.PRNGKey(0), x)
  variables = {'params': variables['params'], 'batch_stats': variables.get('batch_stats', {})}
  workdir = tmp_path / 'run'

  loaded = {'checkpoint': 'ckpt', 'which': 'best', 'step': 7, 'parameters': 'raw'}
  load_model = lambda: (model, variables, loaded)   # noqa: E731
  settings = FidSettings.from_config(config)
  data_settings = DataSettings.from_config(config)
  result = fid.run_fid(settings, data_settings, config.seed, workdir, load_model,
                       feature_fn=row_features, progress=False)
  first = workdir / 'fid_T0.8_n21_best_raw.json'      # named after what was loaded
  written = json.loads(first.read_text())
  assert written['fid'] == pytest.approx(result['fid'])
  assert written['num_samples'] == 21 and written['temperature'] == 0.8
  assert {k: written[k] for k in loaded} == loaded and written['seconds'] > 0

  samples = sampling.sample_images(model, variables, jax.random.PRNGKey(config.seed), 21, 0.8, 8)
  to_255 = lambda images: np.round(np.asarray(images, np.float64) * 255 / 31)
  fs = row_features(to_255(samples))
  for split, size in [('train', 1500), ('test', 297)]:
    images = data.load_split(config.data, split, (8, 8, 1), 5)
    fd = row_features(to_255(np.stack([images[i] for i in range(len(images))])))
    assert len(fd) == size and result['reference'][split]['num_images'] == size
    expected = fid.frechet_distance(fs.mean(0), np.cov(fs, rowvar=False),
                                    fd.mean(0), np.cov(fd, rowvar=False))
    assert result['fid'][split] == pytest.approx(expected, rel=1e-6)
    assert not result['reference'][split]['cache_hit']

  capsys.readouterr()
  again = fid.run_fid(settings, data_settings, config.seed, workdir, load_model,
                      feature_fn=row_features, progress=False)
  out = capsys.readouterr().out
  assert out.count('cache hit') == 2
  assert all(again['reference'][s]['cache_hit'] for s in ('train', 'test'))
  assert again['fid'] == pytest.approx(result['fid'], rel=1e-12)
  # The second result is numbered; the first stays as it was.
  assert json.loads(first.read_text()) == written
  second = json.loads((workdir / 'fid_T0.8_n21_best_raw-2.json').read_text())
  assert second['fid'] == again['fid']
