"""Evaluation: likelihood bounds in bits/dim and the invertibility check.

Bounds (nats, per example; bits/dim = -bound / (D log 2)):

    ELBO  = log p(x, u) - log q(u | x),                     u ~ q(u | x)   (one sample)
    IWBO  = log (1/k) sum_i p(x, u_i) / q(u_i | x)
          = logsumexp_i(ELBO_i) - log k                     >= mean_i ELBO_i  (Jensen)

The ELBO is the k = 1 case of the IWBO and runs through the same code. The IWBO
is computed in chunks of `k_chunk` samples: the batch is tiled `k_chunk` times
(`k_chunk * B` images per pass) and the chunks are folded into a running
logsumexp, so memory does not grow with k (official: k = 1000 for CIFAR-10,
200 otherwise, kbs = 50). k need not be a multiple of k_chunk: the surplus
samples of the last chunk are masked out.

Noise is drawn per (sample j, example b) from the key
`fold_in(fold_in(key, j), b)` (`sample_keys`), so a bound depends only on the
key, k and the example's row: not on k_chunk nor on the other rows of the batch.
Sampling is in sampling.py; grids and result files in outputs.py.
"""
import math
import time
from typing import Any, Callable, Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np

from denseflow_jax import data
from denseflow_jax.console import Progress
from denseflow_jax.model import DenseFlow, bits_per_dim, draw_noise
from denseflow_jax.settings import EvalSettings
from denseflow_jax.sharding import BatchSplit

LogProbFn = Callable[[Any, Any, Any], jax.Array]


# ---------------------------------------------------------------- keys and noise

def _is_single_key(key) -> bool:
  if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    return key.ndim == 0
  return key.shape == (2,)   # raw uint32 key


def sample_keys(key, samples, batch: int):
  """Keys [len(samples) * batch], sample-major:
  entry (j, b) = fold_in(fold_in(key, samples[j]), b)."""
  rows = jnp.arange(batch)
  per_sample = jax.vmap(lambda j: jax.random.fold_in(key, j))(jnp.asarray(samples))
  keys = jax.vmap(lambda k: jax.vmap(lambda b: jax.random.fold_in(k, b))(rows))(per_sample)
  return keys.reshape(-1, *keys.shape[2:])


def unbatch_rows(tree):
  """[N, 1, ...] leaves of a vmapped batch-1 draw -> [N, ...]."""
  return jax.tree.map(lambda a: a[:, 0], tree)


def row_noise(spec, keys):
  """`log_prob` noise for a batch with one key per row (row r from draw_noise(spec, keys[r], 1))."""
  return unbatch_rows(jax.vmap(lambda k: draw_noise(spec, k, 1))(keys))


def _row_keys(key, batch: int):
  """One key per row: a single key means sample 0 of `sample_keys`."""
  return sample_keys(key, jnp.arange(1), batch) if _is_single_key(key) else key


# ---------------------------------------------------------------- log-likelihood bounds

@jax.jit(static_argnums=0)
def log_prob_batch(model: DenseFlow, variables, x, key):
  """The jitted evaluation program: [B] one-sample bounds in nats (see make_log_prob_fn)."""
  noise = row_noise(model.spec, _row_keys(key, x.shape[0]))
  return model.apply(variables, x, noise, train=False, method=DenseFlow.log_prob)


def make_log_prob_fn(model: DenseFlow) -> LogProbFn:
  """Jitted `log_prob_fn(variables, x, key) -> [B]` one-sample bound in nats, evaluation mode
  (BatchNorm uses its running statistics). `key` is one key or one key per row [B]."""
  return lambda variables, x, key: log_prob_batch(model, variables, x, key)


@jax.jit(static_argnums=(2, 3))
def _chunk_keys(key, start, size: int, batch: int):
  return sample_keys(key, start + jnp.arange(size), batch)


@jax.jit
def _accumulate(running, total, log_p, valid):
  """Fold one chunk [S, B] (rows with valid[s] False ignored) into (logsumexp, sum)."""
  chunk_lse = jax.nn.logsumexp(jnp.where(valid[:, None], log_p, -jnp.inf), axis=0)
  chunk_sum = jnp.sum(jnp.where(valid[:, None], log_p, 0.0), axis=0)
  return jnp.logaddexp(running, chunk_lse), total + chunk_sum


def iwbo_and_elbo(log_prob_fn: LogProbFn, variables, x, key, k: int,
                  k_chunk: int):
  """(IWBO [B], mean of the k one-sample ELBOs [B]) in nats from the same k samples.

  Passes of `min(k_chunk, k) * B` images; sample j of example b uses key
  fold_in(fold_in(key, j), b), so the result does not depend on k_chunk.
  """
  if int(k) < 1 or int(k_chunk) < 1:
    raise ValueError(f'k and k_chunk must be positive integers, got k={k}, k_chunk={k_chunk}')
  k, size = int(k), min(int(k_chunk), int(k))
  x = jnp.asarray(x)
  batch = x.shape[0]
  tiled = jnp.tile(x, (size,) + (1,) * (x.ndim - 1))   # [size * B, H, W, C], sample-major
  running = jnp.full((batch,), -jnp.inf, jnp.float32)
  total = jnp.zeros((batch,), jnp.float32)
  for start in range(0, k, size):
    log_p = log_prob_fn(variables, tiled, _chunk_keys(key, start, size, batch))
    valid = start + jnp.arange(size) < k
    running, total = _accumulate(running, total, log_p.reshape(size, batch), valid)
  return running - math.log(k), total / k


def iwbo(log_prob_fn: LogProbFn, variables, x, key, k: int, k_chunk: int):
  """Importance-weighted bound log (1/k) sum_i p(x, u_i) / q(u_i | x) in nats, [B]."""
  return iwbo_and_elbo(log_prob_fn, variables, x, key, k, k_chunk)[0]


def evaluate_dataset(model: DenseFlow, variables, source, key, settings: EvalSettings,
                     split: str = 'test', *, prefetch: int = 1,
                     log_prob_fn: Optional[LogProbFn] = None,
                     progress: bool = True) -> Dict[str, Any]:
  """Bounds over a data split in bits/dim; padded rows of the eval batches are left out.

  `source` is the split (``data.load_split``; training's periodic evaluation loads the test
  split once and passes it every time). `settings` (``EvalSettings``, or
  ``dataclasses.replace`` of it, e.g. ``k=1``) gives k, k_chunk, batch_size and
  num_examples; `prefetch` is ``data.prefetch``. Each pass evaluates
  `batch_size * min(k_chunk, k)` images. Batch i uses fold_in(key, i). Returns elbo_bpd
  (mean of the k one-sample bounds), iwbo_bpd (when k > 1), k, k_chunk, split,
  num_examples, num_batches, num_nonfinite (examples whose bound is not finite), seconds
  (wall time, including the first batch's compilation), seconds_first_batch and
  images_per_second.
  """
  k, k_chunk = settings.k, settings.k_chunk
  log_prob_fn = make_log_prob_fn(model) if log_prob_fn is None else log_prob_fn
  num_batches = data.eval_num_batches(source, settings.batch_size, settings.num_examples,
                                      split)
  batches = data.iterate_eval(source, BatchSplit(settings.batch_size, 'eval.batch_size'),
                              settings.num_examples, prefetch=prefetch, split=split)

  sum_iwbo = sum_elbo = 0.0
  count = nonfinite = 0
  start_time = time.perf_counter()
  first_batch_seconds = None
  with Progress(num_batches, desc=f'eval {split} k={k}', unit='batch', enabled=progress,
                plain_every=max(1, num_batches // 10)) as bar:
    bar.say(f'eval {split} k={k}: {num_batches} batches; compiling the evaluation program '
            '(the first batch)...')
    for i, (images, mask) in enumerate(batches):
      bound, elbo = iwbo_and_elbo(log_prob_fn, variables, images, jax.random.fold_in(key, i), k,
                                  k_chunk)
      bound, elbo = np.asarray(bound, np.float64)[mask], np.asarray(elbo, np.float64)[mask]
      if first_batch_seconds is None:
        first_batch_seconds = time.perf_counter() - start_time
        bar.start(0)                  # rate and ETA without the compilation
      sum_iwbo += float(bound.sum())
      sum_elbo += float(elbo.sum())
      count += int(mask.sum())
      nonfinite += int((~np.isfinite(bound) | ~np.isfinite(elbo)).sum())
      bar.update(i + 1, elbo_bpd=f'{float(bits_per_dim(sum_elbo / max(count, 1), model.spec)):.4f}')
  seconds = time.perf_counter() - start_time

  result = {
      'split': split,
      'k': k,
      'k_chunk': min(k_chunk, k),
      'num_examples': count,
      'num_batches': num_batches,
      'num_nonfinite': nonfinite,
      'elbo_bpd': float(bits_per_dim(sum_elbo / count, model.spec)),
      'seconds': seconds,
      'seconds_first_batch': first_batch_seconds,
      'images_per_second': count / seconds,
  }
  if k > 1:
    result['iwbo_bpd'] = float(bits_per_dim(sum_iwbo / count, model.spec))
  return result


@jax.jit(static_argnums=0)
def encode_batch(model: DenseFlow, variables, x, key):
  """uint8 [B, H, W, C] -> (dequantized y in [0, 1), final latent z, [dropped halves]),
  evaluation mode; row r with the noise of `log_prob_fn` (key: one key or one per row)."""
  noise = row_noise(model.spec, _row_keys(key, x.shape[0]))
  y, z, dropped, _ = model.apply(variables, x, noise, method=DenseFlow.encode)
  return y, z, dropped


@jax.jit(static_argnums=0)
def decode_batch(model: DenseFlow, variables, z, dropped):
  """Final latent and dropped halves -> continuous images in [0, 1) (`DenseFlow.inverse`)."""
  return model.apply(variables, z, dropped, method=DenseFlow.inverse)


@jax.jit(static_argnums=0)
def _reconstruction_error(model: DenseFlow, variables, x, key):
  y, z, dropped = encode_batch(model, variables, x, key)
  return jnp.max(jnp.abs(decode_batch(model, variables, z, dropped) - y))


def reconstruction_error(model: DenseFlow, variables, x, key) -> float:
  """max |y - inverse(encode(y))| over a batch, y the dequantized input in [0, 1):
  how far the float32 flow is from invertible."""
  return float(_reconstruction_error(model, variables, jnp.asarray(x), key))
