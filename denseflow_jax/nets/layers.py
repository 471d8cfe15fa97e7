"""Convolutions with PyTorch's default initialisation and an explicit compute dtype.

The official model is PyTorch, and training from scratch starts where its
`nn.Conv2d` starts (kaiming-uniform with a = sqrt(5) for the kernel, and the
bias rule of `nn.Conv2d.reset_parameters`):

    kernel ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in))     fan_in = kh * kw * in_channels
    bias   ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in))     (same bound)
    zero_init=True: kernel = bias = 0  (the official zero-initialised output heads)

The invertible 1x1 convolutions start as Haar-random rotations
(`torch.nn.init.orthogonal_`: Q of a Gaussian matrix's QR, columns signed by diag R).
Parameters are always float32; `dtype` is the compute dtype.

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


def torch_uniform_init(fan_in: int):
  """U(-1/sqrt(fan_in), 1/sqrt(fan_in)): PyTorch's default for conv kernels and biases."""
  bound = 1.0 / math.sqrt(fan_in)
  return host_initializer(lambda rng, shape: rng.uniform(-bound, bound, size=shape))


def _orthogonal(rng, shape):
  q, r = np.linalg.qr(rng.standard_normal(shape))
  return q * np.sign(np.diag(r))            # Haar-distributed rotation/reflection


orthogonal_init = host_initializer(_orthogonal)


class Conv2d(nn.Module):
  """A 2-D convolution on NHWC inputs with `nn.Conv2d`'s initialisation (module docstring).

  Parameters `kernel` [kh, kw, in, out] and `bias` [out], as `flax.linen.Conv` names them.
  'SAME' padding equals PyTorch's padding = k // 2 for odd k.
  """
  features: int
  kernel_size: int
  stride: int = 1
  padding: str = 'SAME'
  use_bias: bool = True
  zero_init: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    k = self.kernel_size
    fan_in = k * k * x.shape[-1]
    init = nn.initializers.zeros if self.zero_init else torch_uniform_init(fan_in)
    kernel = self.param('kernel', init, (k, k, x.shape[-1], self.features), jnp.float32)
    y = jax.lax.conv_general_dilated(
        x.astype(self.dtype), kernel.astype(self.dtype), (self.stride, self.stride),
        self.padding, dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    if self.use_bias:
      # The barrier keeps the bias out of the cuDNN call (XLA would fuse conv + bias into
      # one): a DenseFlow unit's biases are stacked [N, C] (nn.scan), and a bias inside the
      # cuDNN call must first be copied out of its stack by a kernel of its own, while an
      # add outside fuses with the ReLU / concatenation that follows and reads its slice
      # there (one kernel less per convolution on a GPU: experiments/RESULTS.md). It
      # changes nothing in the values.
      y = jax.lax.optimization_barrier(y)
      y = y + self.param('bias', init, (self.features,), jnp.float32).astype(self.dtype)
    return y


def conv(features: int, kernel: int, *, name: str, dtype: Any = jnp.float32,
         zero_init: bool = False, use_bias: bool = True, stride: int = 1,
         padding: str = 'SAME') -> Conv2d:
  return Conv2d(features, kernel, stride=stride, padding=padding, use_bias=use_bias,
                zero_init=zero_init, dtype=dtype, name=name)
