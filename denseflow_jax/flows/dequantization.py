"""Dequantization: uint8 images -> continuous y in [0, 1)^D, a lower bound on log P(x).

    y = (x + u) / 2^bits,     contribution to log p:  -D log 2^bits - log q(u | x)

Variational (official, Flow++): u = sigmoid(unsqueeze(f(eps; context(x)))) with
eps ~ N(loc, exp(log_scale)) per channel on the squeezed grid [H/2, W/2, 4C], f =
4 x [invertible 1x1 conv, conditional affine coupling] + a final 1x1 conv, and
    log q(u|x) = log N(eps') - sum logdet(f) - sum log sigmoid'(.)
Uniform: u ~ U[0, 1)^D, log q = 0.

Inverse (both): x = clip(floor(2^bits * y), 0, 2^bits - 1).
`eps` is passed in (standard normal for variational, uniform for uniform), so a
test can hand in recorded noise.
"""
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from denseflow_jax.flows.conv1x1 import Invertible1x1Conv
from denseflow_jax.flows.coupling import AffineCoupling
from denseflow_jax.flows.gaussian import ChannelGaussian, sum_except_batch
from denseflow_jax.flows.squeeze import unsqueeze
from denseflow_jax.nets.coupling_net import ContextNet, ResidualDenseNet


def dequantization_inverse(y, num_bits: int):
  bins = 2 ** num_bits
  return jnp.clip(jnp.floor(bins * y), 0, bins - 1).astype(jnp.uint8)


def _quantization_term(x, num_bits):
  dims = math.prod(x.shape[1:])
  return jnp.full(x.shape[:1], -dims * num_bits * math.log(2.0), jnp.float32)


class UniformDequantization(nn.Module):
  num_bits: int = 8

  def __call__(self, x, eps):  # eps ~ U[0, 1), shape of x
    y = (x.astype(jnp.float32) + eps) / 2 ** self.num_bits
    return y, _quantization_term(x, self.num_bits)


class VariationalDequantization(nn.Module):
  num_bits: int = 8
  num_steps: int = 4
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, eps):  # x uint8 [B, H, W, C], eps N(0, I) [B, H/2, W/2, 4C]
    context = ContextNet(self.num_bits, dtype=self.dtype, name='context')(x)
    base = ChannelGaussian(eps.shape[-1], name='base')
    u = base.sample(eps)
    log_q = base.log_prob(u)
    make_net = functools.partial(ResidualDenseNet, dtype=self.dtype)
    for i in range(self.num_steps):
      u, ld = Invertible1x1Conv(name=f'conv1x1_{i}')(u)
      log_q -= ld
      u, ld = AffineCoupling(make_net, name=f'coupling_{i}')(u, context)
      log_q -= ld
    u, ld = Invertible1x1Conv(name='conv1x1_out')(u)
    log_q -= ld
    u = unsqueeze(u)
    # log sigmoid'(u) = -softplus(-u) - softplus(u)
    log_q += sum_except_batch(jax.nn.softplus(-u) + jax.nn.softplus(u))
    u = jax.nn.sigmoid(u)
    y = (x.astype(jnp.float32) + u) / 2 ** self.num_bits
    return y, _quantization_term(x, self.num_bits) - log_q
