"""Channel switch: the two halves of the channels trade places.

    forward  [a, b] -> [b, a]   (a = first ceil(C/2) channels)    logdet = 0
    inverse  [b, a] -> [a, b]

The official inverse splits at ceil(C/2) again, which is only a true inverse for
even C (every DenseFlow configuration has even widths); ours splits at the
width of b, so it is exact for odd C too.
"""
import flax.linen as nn
import jax.numpy as jnp


def switch_forward(x):
  half = (x.shape[-1] + 1) // 2
  z = jnp.concatenate([x[..., half:], x[..., :half]], axis=-1)
  return z, jnp.zeros(x.shape[:1], jnp.float32)


def switch_inverse(z):
  second = z.shape[-1] // 2        # width of b, which now comes first
  return jnp.concatenate([z[..., second:], z[..., :second]], axis=-1)


class ChannelSwitch(nn.Module):

  def __call__(self, x, inverse: bool = False):
    return switch_inverse(x) if inverse else switch_forward(x)

  def forward(self, x):
    return self(x)

  def inverse(self, z):
    return self(z, inverse=True)
