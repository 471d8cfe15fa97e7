"""Cross-unit coupling: the noise that augments each DenseFlow unit (paper Sec. 3.2).

With e ~ N(0, I) of `growth` channels and h the concatenation of the block input
and the outputs of all units before the previous one (official indexing, see
`dense_block.py`):

    preconditioned:  (mu, log_sigma) = g(h),  eta = mu + exp(log_sigma) * e
    white:           eta = e                              (ablation)
    term added to log p:  sum(log_sigma) - log N(e; 0, I)

The term is the exact log-density correction of the augmented lower bound. The
inverse needs no computation: the flow's inverse simply drops eta's channels.
"""
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from denseflow_jax.flows.gaussian import standard_normal_logpdf, sum_except_batch
from denseflow_jax.nets.noise_net import NoiseNet


def cross_unit_term(eps, log_sigma):
  return sum_except_batch(log_sigma) - standard_normal_logpdf(eps)


class CrossUnitCoupling(nn.Module):
  growth: int
  noise: str = 'preconditioned'   # or 'white'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, h, eps):  # h [B, H, W, C_h], eps [B, H, W, growth] -> eta, term [B]
    if self.noise == 'white':
      return eps, cross_unit_term(eps, jnp.zeros_like(eps))
    mu, log_sigma = NoiseNet(self.growth, dtype=self.dtype, name='g')(h)
    return mu + jnp.exp(log_sigma) * eps, cross_unit_term(eps, log_sigma)
