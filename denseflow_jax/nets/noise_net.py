"""The noise network g of cross-unit coupling (official `_BNReLUConv`; despite the
name it has no BatchNorm):

    [mu, s] = conv1x1_{2 growth}(ReLU(conv3x3_{4 C_in}(h))),   log_sigma = 2 tanh(s / 2)

The last conv is zero-initialised, so the injected noise starts as N(0, I).
"""
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from denseflow_jax.precision import flow_float

from denseflow_jax.nets.layers import conv


class NoiseNet(nn.Module):
  growth: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, h):  # [B, H, W, C_in] -> mu, log_sigma: [B, H, W, growth] each
    y = nn.relu(conv(4 * h.shape[-1], 3, name='conv3x3', dtype=self.dtype)(h))
    y = conv(2 * self.growth, 1, name='conv1x1', dtype=self.dtype, zero_init=True)(y)
    mu, s = jnp.split(flow_float(y), 2, axis=-1)
    return mu, 2.0 * jnp.tanh(s / 2.0)
