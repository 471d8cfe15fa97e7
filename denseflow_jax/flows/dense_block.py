"""A DenseFlow block (official `InvertibleDenseBlock`): M units joined by cross-unit coupling.

    x_0 = block input;   z_0 = unit_0(x_0)
    for i = 1 .. M-1:
        eta_i = cross_unit_i(h_i, e_i),  h_i = [x_0, z_0, ..., z_{i-2}]
        z_i   = unit_i([z_{i-1}, eta_i])            (width grows by `growth`)
    logdet = sum of the units' log-dets + sum of the cross-unit terms

Official-code detail reproduced on purpose: the noise network of unit i sees
the block input and the outputs of units 0..i-2, not the output of unit i-1
that the noise is appended to. With `cross_unit=False` (ablation) nothing is
appended and the width stays constant.

Inverse: z_{M-1} -> unit_{M-1}^{-1} -> drop the last `growth` channels -> ...
"""
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax.numpy as jnp

from denseflow_jax.flows.cross_unit import CrossUnitCoupling
from denseflow_jax.flows.unit import Unit


class DenseFlowBlock(nn.Module):
  num_units: int
  num_modules: int
  make_net: Callable[..., nn.Module]
  growth: int = 0                 # 0 = no cross-unit augmentation
  noise: str = 'preconditioned'
  conv1x1: str = 'full'
  dtype: Any = jnp.float32
  unroll: int = 1                 # modules per scan iteration (see unit.py)

  def _unit(self, i):
    return Unit(self.num_modules, self.make_net, self.conv1x1, self.unroll, name=f'unit_{i}')

  @nn.compact
  def __call__(self, x, noise: Sequence[Any] = (), inverse: bool = False, train: bool = False):
    if inverse:
      for i in reversed(range(self.num_units)):
        x = self._unit(i)(x, inverse=True)
        if i > 0 and self.growth:
          x = x[..., :-self.growth]
      return x

    noise_net_inputs = [x]
    z, logdet = self._unit(0)(x, train=train)
    for i in range(1, self.num_units):
      if self.growth:
        eta, term = CrossUnitCoupling(self.growth, self.noise, self.dtype, name=f'cross_unit_{i - 1}')(
            jnp.concatenate(noise_net_inputs, axis=-1), noise[i - 1])
        noise_net_inputs.append(z)
        z = jnp.concatenate([z, eta], axis=-1)
        logdet += term
      z, ld = self._unit(i)(z, train=train)
      logdet += ld
    return z, logdet

  def forward(self, x, noise, train: bool = False):
    return self(x, noise, train=train)

  def inverse(self, z):
    return self(z, inverse=True)
