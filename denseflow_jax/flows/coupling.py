"""Affine coupling (RealNVP/Glow) with the official DenseFlow scale bound.

Split x = [x1, x2] with x1 the first ceil(C/2) channels; (s, t) = NN([x1, context]):

    forward  z2 = t + exp(log_s) * x2,   log_s = 2 tanh(s / 2)   logdet = sum log_s
    inverse  x2 = (z2 - t) * exp(-log_s)
    z = [x1, z2]

The network's output channel 2i is s_i and channel 2i+1 is t_i (official
`ElementwiseParams2d(2, mode='sequential')`). `context` is only used by the
dequantization flow (official `ConditionalAffineCouplingBijection`): it is
concatenated to x1 before the network. Flow maths runs in float32; the network
runs in its own compute dtype.
"""
from typing import Any, Callable, Optional

import flax.linen as nn
import jax.numpy as jnp

from denseflow_jax.flows.gaussian import sum_except_batch


def _scale_and_shift(raw):
  return 2.0 * jnp.tanh(raw[..., 0::2] / 2.0), raw[..., 1::2]


def affine_forward(x2, raw):
  log_scale, shift = _scale_and_shift(raw)
  return shift + jnp.exp(log_scale) * x2, sum_except_batch(log_scale)


def affine_inverse(z2, raw):
  log_scale, shift = _scale_and_shift(raw)
  return (z2 - shift) * jnp.exp(-log_scale)


class AffineCoupling(nn.Module):
  """`make_net(features, name=...)` builds the coupling network, called as net(h, train)."""
  make_net: Callable[..., nn.Module]

  @nn.compact
  def __call__(self, x, context: Optional[Any] = None, inverse: bool = False, train: bool = False):
    channels = x.shape[-1]
    half = (channels + 1) // 2
    x1, x2 = x[..., :half], x[..., half:]
    h = x1 if context is None else jnp.concatenate([x1, context.astype(x1.dtype)], axis=-1)
    raw = self.make_net(2 * (channels - half), name='net')(h, train)
    raw = raw.astype(jnp.promote_types(raw.dtype, x.dtype))
    if inverse:
      return jnp.concatenate([x1, affine_inverse(x2, raw)], axis=-1)
    z2, logdet = affine_forward(x2, raw)
    return jnp.concatenate([x1, z2], axis=-1), logdet

  def forward(self, x, context=None, train: bool = False):
    return self(x, context, train=train)

  def inverse(self, z, context=None):
    return self(z, context, inverse=True)
