"""Convolutions with PyTorch's default initialisation and an explicit compute dtype.

The official model is PyTorch; matching its initial scale (kaiming-uniform with
a=sqrt(5), i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in))) keeps training from scratch
comparable. Parameters are always float32; `dtype` is the compute dtype.

Random initial values are drawn on the host with NumPy, seeded from the JAX key
(`host_initializer`). The result is just as deterministic, but XLA's CPU backend
spends ~0.2 s compiling each `jax.random` draw, which made initialising even a
tiny DenseFlow take minutes; a host callback compiles in no time.
"""
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def host_initializer(draw: Callable[[np.random.Generator, tuple], np.ndarray]):
  """A Flax initializer computing `draw(numpy_rng, shape)` on the host, seeded by the key."""
  def init(key, shape, dtype=jnp.float32):
    seed = jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key
    out = jax.ShapeDtypeStruct(tuple(shape), dtype)

    def host_draw(seed_words):
      rng = np.random.default_rng(np.asarray(seed_words, np.uint32).ravel().tolist())
      return np.asarray(draw(rng, tuple(shape)), dtype=dtype)

    return jax.pure_callback(host_draw, out, seed)
  return init


def _torch_conv_uniform(rng, shape):
  fan_in = math.prod(shape[:-1])            # kh * kw * in for a Flax kernel [kh, kw, in, out]
  bound = 1.0 / math.sqrt(fan_in)
  return rng.uniform(-bound, bound, size=shape)


def _orthogonal(rng, shape):
  q, r = np.linalg.qr(rng.standard_normal(shape))
  return q * np.sign(np.diag(r))            # Haar-distributed rotation/reflection


torch_default_kernel_init = host_initializer(_torch_conv_uniform)
orthogonal_init = host_initializer(_orthogonal)


def conv(features: int, kernel: int, *, name: str, dtype: Any = jnp.float32,
         zero_init: bool = False, use_bias: bool = True, stride: int = 1,
         padding: str = 'SAME') -> nn.Conv:
  """A 2-D convolution on NHWC inputs; 'SAME' equals PyTorch's padding=k//2 for odd k."""
  kernel_init = nn.initializers.zeros if zero_init else torch_default_kernel_init
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=padding,
                 use_bias=use_bias, kernel_init=kernel_init, bias_init=nn.initializers.zeros,
                 dtype=dtype, param_dtype=jnp.float32, name=name)
