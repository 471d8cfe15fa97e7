"""Latent tools: interpolation between test images, reconstructions, temperature sweeps.

Encoding uint8 images x with one noise draw (`DenseFlow.encode`):

    y = dequantize(x, u)                          continuous image in [0, 1)
    (z, d_1, ..., d_{n-1}) = flow(y, e)           final latent, dropped halves (data side first)

The cross-unit noise e is appended inside the blocks and `DenseFlow.inverse` drops it
again, so the latent alone determines the image:

    y = inverse(z, d),      x = clip(floor(2^bits y), 0, 2^bits - 1)   (dequantization_inverse)

Row r of a batch is encoded with noise `draw_noise(spec, fold_in(fold_in(key, 0), r), 1)`
(`evaluate.row_noise` of `evaluate.sample_keys(key, [0], B)`), key = PRNGKey(seed).

Interpolation between images a and b at t_j = j / (steps - 1), j = 0 .. steps - 1, with
weights (w_a, w_b) applied to the final latent AND every dropped half:

    linear:  w_a = 1 - t,                    w_b = t
    slerp:   w_a = sin((1 - t) W) / sin W,   w_b = sin(t W) / sin W,
             cos W = <s_a, s_b> / (|s_a| |s_b|)

s is the whole latent standardised by the prior, s = [(z - loc) / exp(log_scale), d_1, ...]
(the dropped halves are N(0, I) already), so slerp runs on N(0, I) vectors; back in
latent units

    z_t = w_a z_a + w_b z_b + (1 - w_a - w_b) loc,      d_t = w_a d_a + w_b d_b

(for linear weights the loc term vanishes: both are the same interpolation). At t = 0
and t = 1 the weights are exactly (1, 0) and (0, 1), so the end points decode to the
encoded images up to the flow's float32 reconstruction error.
"""
import hashlib
import os
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from denseflow_jax import evaluate, outputs, sampling
from denseflow_jax.files import as_path, unused_stem, write_json_atomic, write_npz_atomic
from denseflow_jax.loading import loaded_label
from denseflow_jax.flows.dequantization import dequantization_inverse
from denseflow_jax.model import DenseFlow
from denseflow_jax.errors import ConfigError
from denseflow_jax.settings import LATENT_METHODS as METHODS, LatentSettings

LATENT_DIR = 'latent'
# Below this sin W the two latents are (anti)parallel: slerp is then linear or undefined.
SLERP_MIN_SIN = 1e-6

LoadModel = Callable   # () -> (model, variables, loaded): loading.load_model


# ---------------------------------------------------------------- settings
# Every field is checked by settings.LatentSettings; what needs the test split's size is
# checked here, once the split is loaded (before the model is).


def _check_indices(indices, size, what, fix):
  bad = [i for i in indices if not 0 <= i < size]
  if bad:
    raise ConfigError(f'{what}: indices {bad} are not in the test split, which has {size} '
                      f'images (valid: 0..{size - 1}); {fix}')


def interpolation_pairs(settings: LatentSettings, num_test: int) -> np.ndarray:
  """Pairs [P, 2] of test indices: latent.indices when set ((i0, i1), (i2, i3), ...;
  latent.num_pairs is then not used), else the first 2 * latent.num_pairs test images.
  ConfigError if they are not in a test split of `num_test` images."""
  indices = settings.indices
  if indices:
    _check_indices(indices, num_test, 'latent.indices', 'choose indices in that range')
  else:
    num_pairs = settings.num_pairs
    if 2 * num_pairs > num_test:
      raise ConfigError(f'latent.num_pairs = {num_pairs} needs {2 * num_pairs} test images but '
                        f'the test split has {num_test}; set --config.latent.num_pairs='
                        f'{num_test // 2} or fewer')
    indices = tuple(range(2 * num_pairs))
  return np.asarray(indices, np.int64).reshape(-1, 2)


def check_num_images(settings: LatentSettings, num_test: int) -> None:
  """ConfigError unless the test split (`num_test` images) holds latent.num_images."""
  if settings.num_images > num_test:
    raise ConfigError(f'latent.num_images = {settings.num_images} but the test split has '
                      f'{num_test} images; set --config.latent.num_images={num_test} or fewer')


# ---------------------------------------------------------------- encode / decode

def encode(model: DenseFlow, variables, x, key):
  """uint8 [B, H, W, C] -> (y [B, H, W, C], z, [dropped halves]) as float64 numpy,
  row r with the noise of key fold_in(fold_in(key, 0), r) (module docstring)."""
  y, z, dropped = evaluate.encode_batch(model, variables, jnp.asarray(x), key)
  return (np.asarray(y, np.float64), np.asarray(z, np.float64),
          [np.asarray(d, np.float64) for d in dropped])


def decode(model: DenseFlow, variables, z, dropped):
  """Latent and dropped halves -> (continuous images float32, uint8 images) as numpy."""
  y = evaluate.decode_batch(model, variables, jnp.asarray(z, jnp.float32),
                            [jnp.asarray(d, jnp.float32) for d in dropped])
  return np.asarray(y), np.asarray(dequantization_inverse(y, model.spec.num_bits))


def prior_loc_scale(model: DenseFlow, variables):
  """(loc, exp(log_scale)) [C] of the learned prior on the final latent, float64."""
  loc, log_scale = model.apply(variables, method=lambda m: (m.prior.loc, m.prior.log_scale))
  return np.asarray(loc, np.float64), np.exp(np.asarray(log_scale, np.float64))


# ---------------------------------------------------------------- interpolation maths

def interpolation_weights(a, b, steps: int, method: str):
  """(w_a, w_b) [steps], float64, for standardised latents a, b (any shape).

  Linear: (1 - t, t). Slerp: sin((1 - t) W) / sin W, sin(t W) / sin W with W the angle
  between a and b; linear where sin W < SLERP_MIN_SIN ((anti)parallel latents)."""
  t = np.linspace(0.0, 1.0, steps)
  if method not in METHODS:
    raise ValueError(f'method must be one of {METHODS}, got {method!r}')
  a, b = np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64)
  if method == 'slerp':
    cos = np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b))
    omega = np.arccos(np.clip(cos, -1.0, 1.0))
    if np.sin(omega) >= SLERP_MIN_SIN:
      return np.sin((1.0 - t) * omega) / np.sin(omega), np.sin(t * omega) / np.sin(omega)
  return 1.0 - t, t


def interpolate_latents(z, dropped, pairs, steps: int, method: str, loc, scale):
  """Latents [P * steps, ...] (pair-major) between rows pairs[p, 0] and pairs[p, 1] of
  (z, dropped), and the weights [P, steps, 2] (module docstring)."""
  zs, ds, weights = [], [[] for _ in dropped], []
  for a, b in pairs:
    def standard(r):
      return np.concatenate([((z[r] - loc) / scale).ravel()] + [d[r].ravel() for d in dropped])
    w_a, w_b = interpolation_weights(standard(a), standard(b), steps, method)
    weights.append(np.stack([w_a, w_b], -1))
    w_a, w_b = w_a[:, None, None, None], w_b[:, None, None, None]
    # w_a z_a + w_b z_b + (1 - w_a - w_b) loc: exactly z_a at (1, 0) and z_b at (0, 1).
    zs.append(w_a * z[a] + w_b * z[b] + (1.0 - w_a - w_b) * loc)
    for out, d in zip(ds, dropped):
      out.append(w_a * d[a] + w_b * d[b])
  return np.concatenate(zs), [np.concatenate(d) for d in ds], np.stack(weights)


# ---------------------------------------------------------------- files

def _out_dir(workdir) -> str:
  return str(as_path(workdir) / LATENT_DIR)


# ---------------------------------------------------------------- modes

def interpolate(test, settings: LatentSettings, seed: int, workdir, load_model: LoadModel):
  """Interpolates between pairs of images of the test split `test` -> WORKDIR/latent/
  interpolate_<method>_<pairs>_<loaded>.png (pairs '0-1_2-3': test images 0 with 1, 2
  with 3; one row per pair, `steps` columns from image a to image b) and .npz with images
  (uint8 [P, steps, H, W, C]), continuous ([0, 1) float32, same shape), originals
  ([P, 2, H, W, C]), indices [P, 2], t [steps], weights [P, steps, 2] and method.
  Returns the uint8 images."""
  pairs = interpolation_pairs(settings, len(test))
  steps, method = settings.steps, settings.method
  model, variables, loaded = load_model()
  originals = np.stack([test[int(i)] for i in pairs.ravel()])
  start = time.perf_counter()
  _, z, dropped = encode(model, variables, originals, jax.random.PRNGKey(seed))
  loc, scale = prior_loc_scale(model, variables)
  z_t, dropped_t, weights = interpolate_latents(z, dropped, np.arange(pairs.size).reshape(-1, 2),
                                                steps, method, loc, scale)
  continuous, images = decode(model, variables, z_t, dropped_t)
  seconds = time.perf_counter() - start
  shape = (len(pairs), steps, *images.shape[1:])
  images, continuous = images.reshape(shape), continuous.reshape(shape)
  originals = originals.reshape(len(pairs), 2, *originals.shape[1:])

  pairs_name = _list_name([f'{a}-{b}' for a, b in pairs.tolist()], '_', 'pairs')
  stem = unused_stem(os.path.join(
      _out_dir(workdir), f'interpolate_{method}_{pairs_name}_{loaded_label(loaded)}'),
      ('.png', '.npz'))
  outputs.save_sample_grid(stem + '.png', images.reshape(-1, *shape[2:]), model.spec.num_bits,
                           ncols=steps, top=loaded.get('data_top_level'))
  write_npz_atomic(stem + '.npz', images=images, continuous=continuous, originals=originals,
                   indices=pairs, t=np.linspace(0.0, 1.0, steps), weights=weights,
                   method=np.array(method))
  ends = np.abs(images[:, [0, -1]].astype(np.int64) - originals.astype(np.int64))
  print(f'{len(pairs)} pairs x {steps} steps ({method}) in {seconds:.2f} s (including '
        f'compilation); end points vs originals: max {int(ends.max())} levels, '
        f'{int(np.count_nonzero(ends))} values differ -> {stem}.png, {stem}.npz')
  return images


NAME_LIST_CHARS = 40   # longer lists of settings go into a file name as count + digest


def _list_name(parts, separator: str, what: str) -> str:
  """Settings in a file name: the parts joined ('0-1_2-3', '0-0.25-0.5-0.75-1') up to
  NAME_LIST_CHARS characters; longer, their count and a digest ('50pairs-1a2b3c4d'), so
  that a name stays short (the .npz holds the values)."""
  joined = separator.join(parts)
  if len(joined) <= NAME_LIST_CHARS:
    return joined
  return f'{len(parts)}{what}-' + hashlib.sha1(joined.encode()).hexdigest()[:8]


def _alternating_rows(originals, reconstructions, per_row: int, num_bits: int):
  """Tiles for a grid of `per_row` columns: row 2r = originals r*n..(r+1)*n-1, row 2r+1
  their reconstructions; a short last chunk is filled with white (blank) tiles."""
  blank = np.full((1, *originals.shape[1:]), 2 ** num_bits - 1, np.uint8)
  tiles = []
  for start in range(0, len(originals), per_row):
    for images in (originals, reconstructions):
      chunk = images[start:start + per_row]
      tiles += [chunk, np.repeat(blank, per_row - len(chunk), axis=0)]
  return np.concatenate(tiles)


def reconstruct(test, settings: LatentSettings, seed: int, workdir, load_model: LoadModel):
  """The first latent.num_images images of the test split `test` and inverse(encode(x))
  -> WORKDIR/latent/
  reconstruct_n<num_images>_<loaded>.png (rows alternate: originals, then their
  reconstructions below them, latent.num_per_row per row), .npz (originals, reconstructions uint8;
  continuous, continuous_reconstructed float32 [0, 1)) and .json with the maximum absolute
  error in uint8 levels and in continuous units, how many values (and pixels: any channel)
  differ, and what was loaded. Returns the JSON dict."""
  check_num_images(settings, len(test))
  num_images, per_row = settings.num_images, settings.num_per_row
  model, variables, loaded = load_model()
  originals = np.stack([test[i] for i in range(num_images)])
  y, z, dropped = encode(model, variables, originals, jax.random.PRNGKey(seed))
  y_rec, reconstructions = decode(model, variables, z, dropped)
  diff = np.abs(originals.astype(np.int64) - reconstructions.astype(np.int64))
  result = {
      'num_images': num_images,
      'max_abs_error_levels': int(diff.max()),
      'max_abs_error_continuous': float(np.max(np.abs(y_rec.astype(np.float64) - y))),
      'num_values_differ': int(np.count_nonzero(diff)),
      'num_values': int(diff.size),
      'num_pixels_differ': int(np.count_nonzero(diff.max(axis=-1))),
      'num_pixels': int(diff[..., 0].size),
      **loaded,
  }
  stem = unused_stem(os.path.join(
      _out_dir(workdir), f'reconstruct_n{num_images}_{loaded_label(loaded)}'),
      ('.png', '.npz', '.json'))
  ncols = min(per_row, num_images)
  outputs.save_sample_grid(
      stem + '.png',
      _alternating_rows(originals, reconstructions, ncols, model.spec.num_bits),
      model.spec.num_bits, ncols=ncols, top=loaded.get('data_top_level'))
  write_npz_atomic(stem + '.npz', originals=originals,
                   reconstructions=reconstructions, continuous=y.astype(np.float32),
                   continuous_reconstructed=y_rec)
  write_json_atomic(stem + '.json', result)
  print(f'reconstruction of {num_images} test images: max error {result["max_abs_error_levels"]} '
        f'levels, {result["max_abs_error_continuous"]:.3g} continuous; '
        f'{result["num_pixels_differ"]} of {result["num_pixels"]} pixels differ -> '
        f'{stem}.png, .npz, .json')
  return result


def sweep(settings: LatentSettings, seed: int, workdir, load_model: LoadModel,
          batch_size: int):
  """`sampling.temperature_sweep`: row t at latent.temperatures[t] (0 = the mode of
  every latent, so that row is one image repeated), column n with the noise of
  fold_in(PRNGKey(seed), n) in every row (the row at T = 1 is `--mode sample`'s first
  images) -> WORKDIR/latent/temperature_sweep_T<t1-t2-...>_n<n>_<loaded>.png and .npz
  (images [T, n, H, W, C], temperatures), sampled `batch_size` (sample.batch_size) at a
  time. Returns the images [T * n, H, W, C]."""
  temperatures, per_row = settings.temperatures, settings.num_per_row
  model, variables, loaded = load_model()
  temps = _list_name([f'{t:g}' for t in temperatures], '-', 'temps')
  stem = unused_stem(os.path.join(
      _out_dir(workdir), f'temperature_sweep_T{temps}_n{per_row}_{loaded_label(loaded)}'),
      ('.png', '.npz'))
  images = sampling.temperature_sweep(model, variables, jax.random.PRNGKey(seed),
                                     temperatures, per_row, batch_size)
  outputs.save_sample_grid(stem + '.png', images, model.spec.num_bits, ncols=per_row,
                           top=loaded.get('data_top_level'))
  write_npz_atomic(stem + '.npz',
                   images=images.reshape(len(temperatures), per_row, *images.shape[1:]),
                   temperatures=np.asarray(temperatures))
  print(f'temperatures {temperatures} x {per_row} samples -> {stem}.png, {stem}.npz')
  return images
