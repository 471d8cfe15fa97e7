"""Fréchet Inception Distance of model samples against a data split (paper Table 3).

    FID = ||mu_1 - mu_2||^2 + Tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2))

with (mu, S) the mean and covariance (ddof = 1, as `np.cov`) of the 2048-d
Inception pool3 features (`denseflow_jax.inception`) of the samples and of the
data. As in pytorch-fid / TTUR: float64, `scipy.linalg.sqrtm`; if the product
is singular (non-finite root) eps * I is added to both covariances; an
imaginary part of the root (rounding) is dropped if its diagonal is below 1e-3
and an error otherwise.

Statistics are accumulated in float64 batch by batch (Chan et al.'s pairwise
update), so no feature matrix is kept: batch b with n_b rows, mean m_b and
scatter M_b = sum (x - m_b)(x - m_b)^T joins the running (n, m, M) as

    n' = n + n_b,   m' = m + (m_b - m) n_b / n',
    M' = M + M_b + (m_b - m)(m_b - m)^T n n_b / n',    S = M / (n - 1),

which is exact for any order and split of the rows, up to float64 rounding.

`run_fid` draws `fid.num_samples` samples (image n from fold_in(key, n),
the same images as `--mode sample` with that seed), features them batch by
batch and reports the FID against each split in `fid.splits`. The
statistics of a split are computed once and cached in `fid.stats_dir`
(default WORKDIR/fid_stats) under a name made of the data set, split, image
shape, bits and the Inception weights' digest. The paper reports 34.9 on
CIFAR-10 with 50k samples at temperature 1 against the training split.
"""
import hashlib
import os
import re
import time
from typing import Any, Callable, Dict, Iterable, Optional, Tuple

import jax
import numpy as np
import scipy.linalg
import tqdm

from denseflow_jax import data as data_lib
from denseflow_jax import inception
from denseflow_jax.errors import ConfigError, FIDError
from denseflow_jax.files import as_path, unused_stem, write_json_atomic, write_npz_atomic
from denseflow_jax.loading import loaded_label
from denseflow_jax.outputs import to_display
from denseflow_jax.sampling import iterate_samples
from denseflow_jax.settings import DataSettings, FidSettings
from denseflow_jax.sharding import BatchSplit
from denseflow_jax.spec import ModelSpec

SINGULAR_EPS = 1e-6
IMAGINARY_ATOL = 1e-3

FeatureFn = Callable[[np.ndarray], Any]   # uint8 [B, H, W, C] in 0..255 -> [B, D]


# ---------------------------------------------------------------- the distance

def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = SINGULAR_EPS) -> float:
  """||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 sqrtm(sigma1 sigma2)), in float64."""
  mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
  sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
  sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
  if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
    raise FIDError(f'statistics do not match: means {mu1.shape} and {mu2.shape}, covariances '
                   f'{sigma1.shape} and {sigma2.shape}')
  diff = mu1 - mu2
  covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
  if not np.isfinite(covmean).all():
    # A singular product (e.g. fewer samples than dimensions): regularise both sides.
    print(f'FID: the covariance product is singular; adding {eps} to the diagonals')
    offset = np.eye(sigma1.shape[0]) * eps
    covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
  if np.iscomplexobj(covmean):
    if not np.allclose(np.diagonal(covmean).imag, 0, atol=IMAGINARY_ATOL):
      raise FIDError(f'the square root of the covariance product has an imaginary component of '
                     f'up to {np.max(np.abs(covmean.imag)):.3g}: the statistics are not valid '
                     'covariances, or come from too few samples; use more samples')
    covmean = covmean.real
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


class ActivationStats:
  """Streaming mean and covariance (float64) of feature rows; see the module docstring."""

  def __init__(self, dim: int):
    self.count = 0
    self.mean = np.zeros(dim, np.float64)
    self.scatter = np.zeros((dim, dim), np.float64)   # sum of centred outer products

  def update(self, features) -> 'ActivationStats':
    x = np.atleast_2d(np.asarray(features, np.float64))   # one row [D] or rows [N, D]
    if x.ndim != 2 or x.shape[1] != self.mean.shape[0]:
      raise FIDError(f'features must be [N, {self.mean.shape[0]}], got shape {x.shape}')
    n_b = x.shape[0]
    if n_b == 0:
      return self
    mean_b = x.mean(axis=0)
    centred = x - mean_b
    total = self.count + n_b
    delta = mean_b - self.mean
    self.scatter += centred.T @ centred + np.outer(delta, delta) * (self.count * n_b / total)
    self.mean += delta * (n_b / total)
    self.count = total
    return self

  @property
  def covariance(self) -> np.ndarray:
    if self.count < 2:
      raise FIDError(f'a covariance needs at least 2 feature rows, got {self.count}')
    return self.scatter / (self.count - 1)


# ---------------------------------------------------------------- config

def require_inception_weights(settings: FidSettings) -> str:
  """fid.inception_weights, which must name an existing file (settings.FidSettings checks
  the other fields); ConfigError with how to get it otherwise."""
  weights = settings.inception_weights
  get = (f'download {inception.WEIGHTS_URL}, convert it once with {inception.CONVERT_COMMAND} '
         'and pass --config.fid.inception_weights=inception_fid.npz')
  if not weights:
    raise ConfigError(f'--mode fid needs the FID Inception weights, but fid.inception_weights '
                      f'is empty; {get}')
  if not os.path.isfile(weights):
    raise ConfigError(f'fid.inception_weights = {weights} does not exist; {get}')
  return weights


# ---------------------------------------------------------------- statistics

def _feature_stats(batches: Iterable[Tuple[np.ndarray, np.ndarray]], feature_fn: FeatureFn,
                   num_bits: int, bar) -> ActivationStats:
  """Stats of feature_fn(images[mask]) over (uint8 images, bool mask) batches. Batch i's
  features are dispatched before batch i-1's are summed, so the accelerator runs while
  the host accumulates."""
  stats, pending = None, None
  for images, mask in batches:
    features = feature_fn(to_display(images, num_bits))
    if pending is not None:
      stats = _add(stats, *pending, bar)
    pending = (features, mask)
  if pending is not None:
    stats = _add(stats, *pending, bar)
  if stats is None:
    raise FIDError('no images to compute FID statistics from')
  return stats


def _add(stats, features, mask, bar):
  features = np.asarray(features, np.float64)
  stats = ActivationStats(features.shape[-1]) if stats is None else stats
  stats.update(features[np.asarray(mask, bool)])
  bar.update(int(np.sum(mask)))
  return stats


def stats_cache_path(stats_dir, data: DataSettings, split: str, image_shape, num_bits: int,
                     feature_id: str) -> str:
  """`stats_dir/<dataset>_<split>_<H>x<W>x<C>[_<bits>bit]_<feature_id>.npz`; a file data set
  ('npz', 'folder') adds a digest of its path, size and modification time, so that
  statistics of a replaced file are never reused."""
  name, source = data.dataset, data.source
  if source:
    path = os.path.abspath(source)
    stat = os.stat(path) if os.path.exists(path) else None
    identity = f'{path}|{stat.st_size}|{stat.st_mtime_ns}' if stat else path
    name += '-' + hashlib.sha256(identity.encode()).hexdigest()[:8]
  parts = [name, split, 'x'.join(str(int(d)) for d in image_shape)]
  if int(num_bits) != 8:
    parts.append(f'{int(num_bits)}bit')
  parts.append(feature_id)
  stem = re.sub(r'[^A-Za-z0-9._-]+', '-', '_'.join(parts))
  return os.path.join(os.fspath(stats_dir), stem + '.npz')


def dataset_stats(data: DataSettings, spec: ModelSpec, split: str, feature_fn: FeatureFn,
                  feature_id: str, stats_dir, batch_size: int, progress: bool = True):
  """(mean, covariance, count, cache path, cache hit) of the features of a whole split of
  `data` (images of `spec`'s shape and bits); read from the cache when present, else
  computed and written there atomically."""
  num_bits = spec.num_bits
  path = stats_cache_path(stats_dir, data, split, spec.image_shape, num_bits, feature_id)
  if as_path(path).is_file():
    try:
      with as_path(path).open('rb') as f, np.load(f) as cached:
        mu, sigma, count = cached['mu'], cached['sigma'], int(cached['count'])
      print(f'FID statistics of {split!r}: cache hit {path} ({count} images)')
      return mu, sigma, count, path, True
    except Exception as e:   # writes are atomic, so only a foreign file lands here
      print(f'FID statistics of {split!r}: cannot read {path} ({e}); computing them again')
  source = data_lib.load_split(data, split, model=spec)
  batches = data_lib.iterate_eval(source, BatchSplit(batch_size, 'fid.batch_size'),
                                  prefetch=data.prefetch, split=split)
  with tqdm.tqdm(total=len(source), desc=f'FID stats {split}', unit='img',
                 disable=not progress) as bar:
    stats = _feature_stats(batches, feature_fn, num_bits, bar)
  mu, sigma = stats.mean, stats.covariance
  write_npz_atomic(path, mu=mu, sigma=sigma, count=np.int64(stats.count), split=split,
                   feature_id=feature_id)
  print(f'FID statistics of {split!r}: {stats.count} images -> {path}')
  return mu, sigma, stats.count, path, False


def sample_stats(model, variables, key, num: int, temperature: float, batch_size: int,
                 feature_fn: FeatureFn, progress: bool = True) -> ActivationStats:
  """Stats of the features of `num` samples; sample n uses fold_in(key, n) like
  `sampling.sample_images`, and only one batch of images exists at a time."""
  batches = iterate_samples(model, variables, key, num, temperature, batch_size)
  with tqdm.tqdm(total=num, desc=f'FID samples T={temperature:g}', unit='img',
                 disable=not progress) as bar:
    return _feature_stats(batches, feature_fn, model.spec.num_bits, bar)


def run_fid(settings: FidSettings, data: DataSettings, seed: int, workdir,
            load_model: Callable, *, feature_fn: Optional[FeatureFn] = None,
            feature_id: Optional[str] = None, progress: bool = True) -> Dict[str, Any]:
  """FID of fid.num_samples samples (keys from `seed`) against each of fid.splits of `data`;
  writes WORKDIR/fid_T<temperature>_n<num>_<loaded>.json and returns its contents.

  load_model() -> (model, variables, loaded) (loading.load_model) runs after the
  Inception weights are checked (modes passes the loader `--mode eval` uses); feature_fn
  (uint8 [B, H, W, C] in 0..255 -> [B, D]) defaults to the FID Inception of
  fid.inception_weights, and feature_id (part of the cache names) to its digest.
  """
  start_time = time.perf_counter()
  if feature_fn is None:
    weights = require_inception_weights(settings)
    feature_fn = inception.make_feature_fn(weights)
    feature_id = f'inception-{inception.weights_digest(weights)}'
  else:
    feature_id = feature_id or 'custom'
  model, variables, loaded = load_model()
  stats_dir = settings.stats_dir or os.path.join(os.fspath(workdir), 'fid_stats')
  num, temperature = settings.num_samples, settings.temperature

  references = {}
  for split in settings.splits:
    references[split] = dataset_stats(data, model.spec, split, feature_fn, feature_id,
                                      stats_dir, settings.batch_size, progress)
  stats = sample_stats(model, variables, jax.random.PRNGKey(seed), num, temperature,
                       settings.batch_size, feature_fn, progress)
  mu, sigma = stats.mean, stats.covariance
  # sqrtm of a 2048x2048 product: seconds on a many-core host, about a minute per split
  # on two cores.
  print(f'FID: matrix square roots against {len(references)} split(s)...', flush=True)
  result = {
      'fid': {split: frechet_distance(mu, sigma, r[0], r[1]) for split, r in references.items()},
      'num_samples': num,
      'temperature': temperature,
      **loaded,
      'reference': {split: {'num_images': r[2], 'stats': r[3], 'cache_hit': r[4]}
                    for split, r in references.items()},
      'feature_id': feature_id,
      'seed': int(seed),
      'seconds': time.perf_counter() - start_time,
  }
  name = f'fid_T{temperature:g}_n{num}_{loaded_label(loaded)}'
  path = unused_stem(os.path.join(os.fspath(workdir), name), ('.json',)) + '.json'
  write_json_atomic(path, result)
  for split, value in result['fid'].items():
    print(f'FID vs {split}: {value:.3f} ({num} samples at temperature {temperature:g})')
  print(f'wrote {path}')
  return result
