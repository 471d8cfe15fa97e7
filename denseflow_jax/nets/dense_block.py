"""DenseNet blocks of the official coupling networks (Huang et al. 2017 style).

DenseLayer:  h = ReLU(conv3x3_growth(ReLU(conv1x1_in(x)))),  out = [x, h]
GatedConv:   [a, b, c] = conv1x1(x),  out = a + b * sigmoid(c)
DenseBlock:  `depth` DenseLayers (width in + i*growth), then a (gated) 1x1 conv.
"""
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from denseflow_jax.nets.layers import conv


class DenseLayer(nn.Module):
  growth: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):  # [B, H, W, C] -> [B, H, W, C + growth]
    h = nn.relu(conv(x.shape[-1], 1, name='conv1x1', dtype=self.dtype)(x))
    h = nn.relu(conv(self.growth, 3, name='conv3x3', dtype=self.dtype)(h))
    return jnp.concatenate([x, h.astype(x.dtype)], axis=-1)


class GatedConv(nn.Module):
  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    h = conv(3 * self.features, 1, name='conv', dtype=self.dtype)(x)
    a, b, c = jnp.split(h, 3, axis=-1)
    return a + b * nn.sigmoid(c)


class DenseBlock(nn.Module):
  """`depth` densely connected layers followed by a gated 1x1 output convolution."""
  features: int
  depth: int
  growth: int
  gated: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    for i in range(self.depth):
      x = DenseLayer(self.growth, dtype=self.dtype, name=f'layer_{i}')(x)
    if self.gated:
      return GatedConv(self.features, dtype=self.dtype, name='gate')(x)
    return conv(self.features, 1, name='gate', dtype=self.dtype)(x)
