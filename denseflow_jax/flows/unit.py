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

With the official 'full' 1x1 convolutions, the unit takes the N log-determinants
(forward) or inverses (inverse) of its stacked 1x1 weights in one batched call
(conv1x1.py) rather than one per module; only the initialising pass, where the
weights do not exist before the modules run, lets each module compute its own.
"""
from typing import Callable

import flax.linen as nn
import jax.numpy as jnp

from denseflow_jax.precision import flow_float

from denseflow_jax.flows.actnorm import ActNorm
from denseflow_jax.flows.channel_switch import switch_forward, switch_inverse
from denseflow_jax.flows.conv1x1 import Invertible1x1Conv, stacked_inverse, stacked_logdet
from denseflow_jax.flows.coupling import AffineCoupling


class GlowModule(nn.Module):
  """One module as a scan body: carry (x, logdet) forward, x inverse."""
  make_net: Callable[..., nn.Module]
  conv1x1: str = 'full'
  inverse: bool = False
  train: bool = False
  conv_logdet: bool = True        # False: the unit adds the 1x1 convolutions' log-dets

  @nn.compact
  def __call__(self, carry, conv_inverse):
    actnorm = ActNorm(name='actnorm')
    conv = Invertible1x1Conv(self.conv1x1, logdet=self.conv_logdet, name='conv1x1')
    coupling = AffineCoupling(self.make_net, name='coupling')
    if self.inverse:
      x = switch_inverse(carry)
      x = coupling(x, inverse=True)
      x = conv(x, inverse=True, w_inverse=conv_inverse)
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
    # The stacked 1x1 weights [N, C, C], where they exist already (not while initialising).
    batched = self.conv1x1 == 'full' and not self.is_initializing()
    weights = self.variables['params']['modules']['conv1x1']['weight'] if batched else None
    scanned = nn.scan(GlowModule,
                      variable_axes={'params': 0, 'batch_stats': 0},
                      split_rngs={'params': True},
                      length=self.num_modules,
                      reverse=inverse,
                      unroll=max(1, min(self.unroll, self.num_modules)))
    modules = scanned(self.make_net, self.conv1x1, inverse=inverse, train=train,
                      conv_logdet=not batched, name='modules')
    if inverse:
      x, _ = modules(x, stacked_inverse(weights) if batched else None)
      return x
    x = flow_float(x)
    (z, logdet), _ = modules((x, jnp.zeros(x.shape[:1], x.dtype)), None)
    if batched:
      logdet += jnp.sum(stacked_logdet(weights)) * (x.shape[1] * x.shape[2])
    return z, logdet

  def forward(self, x, train: bool = False):
    return self(x, train=train)

  def inverse(self, z):
    return self(z, inverse=True)
