"""A DenseFlow unit: N identical glow-like modules, scanned (`nn.scan`).

One module (official `SequentialTransform([ActNorm, Conv1x1, coupling, switch])`):

    forward  x -> ActNorm -> 1x1 conv -> affine coupling -> channel switch
             logdet = sum of the three log-dets (the switch has none)
    inverse  the same layers inverted, in reverse order

The modules' parameters are stacked along a leading axis of length N and the
unit is one `lax.scan`, so compile time does not grow with N. `unroll` > 1
unrolls that many modules per loop iteration: on XLA:CPU a convolution's
backward pass inside a loop body ran ~12x slower than unrolled (measured on the
dense-block coupling network), so CPU runs trade compile time for step time.
"""
from typing import Callable

import flax.linen as nn
import jax.numpy as jnp

from denseflow_jax.precision import flow_float

from denseflow_jax.flows.actnorm import ActNorm
from denseflow_jax.flows.channel_switch import switch_forward, switch_inverse
from denseflow_jax.flows.conv1x1 import Invertible1x1Conv
from denseflow_jax.flows.coupling import AffineCoupling


class GlowModule(nn.Module):
  """One module as a scan body: carry (x, logdet) forward, x inverse."""
  make_net: Callable[..., nn.Module]
  conv1x1: str = 'full'
  inverse: bool = False
  train: bool = False

  @nn.compact
  def __call__(self, carry, _):
    actnorm = ActNorm(name='actnorm')
    conv = Invertible1x1Conv(self.conv1x1, name='conv1x1')
    coupling = AffineCoupling(self.make_net, name='coupling')
    if self.inverse:
      x = switch_inverse(carry)
      x = coupling(x, inverse=True)
      x = conv(x, inverse=True)
      return actnorm(x, inverse=True), None
    x, logdet = carry
    x, ld_actnorm = actnorm(x)
    x, ld_conv = conv(x)
    x, ld_coupling = coupling(x, train=self.train)
    x, _ = switch_forward(x)
    return (x, logdet + ld_actnorm + ld_conv + ld_coupling), None


class Unit(nn.Module):
  num_modules: int
  make_net: Callable[..., nn.Module]
  conv1x1: str = 'full'
  unroll: int = 1

  @nn.compact
  def __call__(self, x, inverse: bool = False, train: bool = False):
    scanned = nn.scan(GlowModule,
                      variable_axes={'params': 0, 'batch_stats': 0},
                      split_rngs={'params': True},
                      length=self.num_modules,
                      reverse=inverse,
                      unroll=max(1, min(self.unroll, self.num_modules)))
    modules = scanned(self.make_net, self.conv1x1, inverse=inverse, train=train, name='modules')
    if inverse:
      x, _ = modules(x, None)
      return x
    (x, logdet), _ = modules((flow_float(x), jnp.zeros(x.shape[:1], flow_float(x).dtype)), None)
    return x, logdet

  def forward(self, x, train: bool = False):
    return self(x, train=train)

  def inverse(self, z):
    return self(z, inverse=True)
