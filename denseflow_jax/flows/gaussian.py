"""Gaussian densities of the model: the learned per-channel prior and N(0, I).

    log N(z; loc, exp(log_scale)) = sum[-0.5 log 2pi - log_scale - 0.5 ((z - loc) / exp(log_scale))^2]

The sums run over every axis but the batch axis, giving [B].
"""
import math

import flax.linen as nn
import jax.numpy as jnp

from denseflow_jax.precision import flow_float

HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def sum_except_batch(x):
  return jnp.sum(x.reshape(x.shape[0], -1), axis=-1)


def standard_normal_logpdf(x):
  return sum_except_batch(-HALF_LOG_2PI - 0.5 * jnp.square(x))


def diagonal_normal_logpdf(x, loc, log_scale):
  return sum_except_batch(-HALF_LOG_2PI - log_scale
                          - 0.5 * jnp.exp(-2.0 * log_scale) * jnp.square(x - loc))


class ChannelGaussian(nn.Module):
  """Learned per-channel Gaussian (official `ConvNormal2d`); loc, log_scale: [C], zero init."""
  channels: int

  def setup(self):
    self.loc = self.param('loc', nn.initializers.zeros, (self.channels,))
    self.log_scale = self.param('log_scale', nn.initializers.zeros, (self.channels,))

  def log_prob(self, z):
    return diagonal_normal_logpdf(flow_float(z), self.loc, self.log_scale)

  def sample(self, eps):
    """Reparameterised draw loc + exp(log_scale) * eps from standard-normal `eps`."""
    return self.loc + jnp.exp(self.log_scale) * eps
