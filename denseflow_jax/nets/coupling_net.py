"""Coupling networks: they map the conditioning half to per-element (scale, shift).

All of them end in a zero-initialised 1x1 conv, so every coupling starts as the
identity. Output channel 2i is the unconstrained log-scale of element i and
channel 2i+1 its shift (the official `ElementwiseParams2d(2, mode='sequential')`).

DenseAttentionNet (official intra-module coupling network, `DNMH`):
    h = conv1x1_mid(x)
    h = conv1x1_mid(ReLU(BN([NystromAttention(h), DenseBlock(h)])))   (no bias)
    out = conv1x1_out(h)                                              (zero init)
GlowNet (ablation rows 1-3 of the paper's Table 4; not in the official code):
    out = conv3x3_out(ReLU(conv1x1(ReLU(conv3x3(x)))))                (zero init last)
ResidualDenseNet (the dequantization flow's coupling network, official `DenseNet`):
    h = conv1x1_mid(x);  h = h + DenseBlock(h);  out = conv1x1_out(h) (zero init)
"""
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from denseflow_jax.nets.attention import NystromAttention
from denseflow_jax.nets.batchnorm import BatchNorm
from denseflow_jax.nets.dense_block import DenseBlock
from denseflow_jax.nets.layers import conv


class DenseAttentionNet(nn.Module):
  """The official DenseFlow coupling network (dense block || Nystrom attention)."""
  features: int          # output channels (2 x transformed channels)
  mid_channels: int = 48
  depth: int = 7
  growth: int = 64
  num_landmarks: int = 4
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    h = conv(self.mid_channels, 1, name='in_proj', dtype=self.dtype)(x)
    attended = NystromAttention(self.mid_channels // 2, self.num_landmarks, dtype=self.dtype,
                                name='attention')(h)
    dense = DenseBlock(self.mid_channels, self.depth, self.growth, dtype=self.dtype,
                       name='dense')(h)
    h = jnp.concatenate([attended, dense], axis=-1)
    h = nn.relu(BatchNorm(name='mix_norm')(h, train))
    h = conv(self.mid_channels, 1, name='mix_conv', dtype=self.dtype, use_bias=False)(h)
    return conv(self.features, 1, name='out_proj', dtype=self.dtype, zero_init=True)(h)


class GlowNet(nn.Module):
  """Glow's coupling network: 3x3 conv, 1x1 conv, zero-initialised 3x3 conv."""
  features: int
  hidden: int = 256
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train  # no BatchNorm here
    h = nn.relu(conv(self.hidden, 3, name='conv_in', dtype=self.dtype)(x))
    h = nn.relu(conv(self.hidden, 1, name='conv_mid', dtype=self.dtype)(h))
    return conv(self.features, 3, name='out_proj', dtype=self.dtype, zero_init=True)(h)


class ResidualDenseNet(nn.Module):
  """The dequantization flow's coupling network (official `DenseNet`, one block)."""
  features: int
  mid_channels: int = 64
  depth: int = 4
  growth: int = 64
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train
    h = conv(self.mid_channels, 1, name='in_proj', dtype=self.dtype)(x)
    h = h + DenseBlock(self.mid_channels, self.depth, self.growth, dtype=self.dtype,
                       name='dense')(h)
    return conv(self.features, 1, name='out_proj', dtype=self.dtype, zero_init=True)(h)


class ContextNet(nn.Module):
  """Context of the dequantization flow, computed once from the uint8 image:

      c = DenseBlock_ctx(conv2x2/2(DenseBlock_mid(2 x / (2^bits - 1) - 1)))
  (dense blocks of depth 4, growth 16, gated outputs; no zero init).
  """
  num_bits: int
  mid_channels: int = 64
  context_channels: int = 64
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_uint8):  # [B, H, W, C] -> [B, H/2, W/2, context]
    x = 2.0 * x_uint8.astype(jnp.float32) / (2 ** self.num_bits - 1) - 1.0
    h = DenseBlock(self.mid_channels, 4, 16, dtype=self.dtype, name='block_in')(x.astype(self.dtype))
    h = conv(self.mid_channels, 2, stride=2, padding='VALID', name='down', dtype=self.dtype)(h)
    return DenseBlock(self.context_channels, 4, 16, dtype=self.dtype, name='block_out')(h)
