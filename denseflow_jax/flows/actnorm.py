"""ActNorm (Glow), per channel:

    forward  z = (x - shift) * exp(-log_scale)       logdet = -H W sum_c log_scale_c
    inverse  x = shift + z * exp(log_scale)

Data-dependent initialisation (official `ActNormBijection2d`): on the first batch,
shift = per-channel mean and log_scale = log(std + 1e-6), with the *unbiased*
std as `torch.std` computes it; in Flax this happens when the model is
initialised with `init` on a data batch. Always computed in float32.
Shapes: x, z [B, H, W, C]; shift, log_scale [C].
"""
import flax.linen as nn
import jax.numpy as jnp


def actnorm_forward(x, shift, log_scale):
  z = (x - shift) * jnp.exp(-log_scale)
  logdet = -jnp.sum(log_scale) * (x.shape[1] * x.shape[2])
  return z, jnp.broadcast_to(logdet, x.shape[:1])


def actnorm_inverse(z, shift, log_scale):
  return shift + z * jnp.exp(log_scale)


class ActNorm(nn.Module):
  eps: float = 1e-6

  @nn.compact
  def __call__(self, x, inverse: bool = False):
    axes = (0, 1, 2)
    shift = self.param('shift', lambda _: jnp.mean(x, axes))
    log_scale = self.param('log_scale', lambda _: jnp.log(jnp.std(x, axes, ddof=1) + self.eps))
    if inverse:
      return actnorm_inverse(x, shift, log_scale)
    return actnorm_forward(x, shift, log_scale)

  def forward(self, x):
    return self(x)

  def inverse(self, z):
    return self(z, inverse=True)
