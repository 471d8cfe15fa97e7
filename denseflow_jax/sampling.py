"""Sampling: images from the model at a temperature, in batches of a fixed size.

Image n of a draw uses the key `fold_in(key, n)`, so samples do not depend on the
sampling batch size, and the same key at several temperatures gives the same noise
(`temperature_sweep`): at temperature T the latent noise is scaled by T,

    eps ~ N(0, T^2 I),   y = inverse(eps, dropped),   x = floor(2^bits y)

(`DenseFlow.sample_continuous`, then `dequantization_inverse`).
"""
from typing import Iterator, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from denseflow_jax.evaluate import unbatch_rows
from denseflow_jax.flows.dequantization import dequantization_inverse
from denseflow_jax.model import DenseFlow, draw_sample_noise


@jax.jit(static_argnums=0)
def sample_batch(model: DenseFlow, variables, keys, temperature):
  """The jitted sampler: uint8 images [B, H, W, C], image b drawn with keys[b]."""
  eps, dropped = unbatch_rows(jax.vmap(lambda k: draw_sample_noise(model.spec, k, 1))(keys))
  y = model.apply(variables, eps, dropped, temperature, method=DenseFlow.sample_continuous)
  return dequantization_inverse(y, model.spec.num_bits)


def iterate_samples(model: DenseFlow, variables, key, num: int, temperature: float,
                    batch_size: int) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
  """Batches (uint8 images [b, H, W, C], valid [b]) of `num` samples; image n uses
  fold_in(key, n). Every batch has the same size, so one compiled sampler serves them
  all: the last one is filled up with extra draws that `valid` marks False.
  `temperature` is traced, so changing it does not recompile."""
  if num < 1 or batch_size < 1:
    raise ValueError(f'num and batch_size must be positive, got {num}, {batch_size}')
  size = min(int(batch_size), int(num))
  for start in range(0, num, size):
    keys = jax.vmap(lambda n: jax.random.fold_in(key, n))(start + jnp.arange(size))
    images = np.asarray(sample_batch(model, variables, keys, jnp.float32(temperature)))
    yield images, start + np.arange(size) < num


def sample_images(model: DenseFlow, variables, key, num: int, temperature: float,
                  batch_size: int) -> np.ndarray:
  """`num` samples, uint8 [num, H, W, C] in 0..2^bits-1; image n uses fold_in(key, n)."""
  batches = iterate_samples(model, variables, key, num, temperature, batch_size)
  return np.concatenate([images[valid] for images, valid in batches])


def temperature_sweep(model: DenseFlow, variables, key, temperatures: Sequence[float],
                      num_per_row: int, batch_size: int) -> np.ndarray:
  """Samples [len(temperatures) * num_per_row, H, W, C]: row t at temperatures[t], the
  same noise in every row (column n uses fold_in(key, n))."""
  return np.concatenate([sample_images(model, variables, key, num_per_row, t, batch_size)
                         for t in temperatures])
