"""Invertible 1x1 convolution (Glow): a learned C x C channel mixing W.

    forward  z = W x (per pixel)        logdet = H W log|det W|
    inverse  x = W^{-1} z

`parametrization='full'` is the official one: W is a free matrix initialised as
a random rotation; log|det W| comes from `slogdet` on the device (the official
code moves W to the CPU for it every step).
`parametrization='lu'` stores W = P L (U + diag(exp(log_s))) packed in one C x C
parameter (strictly lower part = L without its unit diagonal, strictly upper
part = U, diagonal = log_s): the same C^2 trainable numbers, log|det W| =
sum(log_s) in O(C), and cheap inverses by triangular solves. P is the fixed
channel reversal and the packed matrix starts at zero, so W starts as P.
Shapes: x, z [B, H, W, C]; W [C_out, C_in] as in PyTorch.

A unit of N modules holds its N weights stacked [N, C, C] (nn.scan), and for the
'full' parametrization it computes their log-determinants, or inverses, in one batched
call (`stacked_logdet`, `stacked_inverse`) and hands them in: one LU factorisation per
unit instead of one per module (on a GPU each is a cuSOLVER call plus ~10 small kernels,
forward and backward). `logdet=False` leaves the term to that caller, `w_inverse` gives
the inverse to use.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp

from denseflow_jax.precision import flow_float

from denseflow_jax.nets.layers import orthogonal_init


def _apply_matrix(w, x):
  return jnp.einsum('oi,bhwi->bhwo', w, x)


def stacked_logdet(w):
  """log|det W_i| of stacked weights [N, C, C] -> [N] (one batched LU factorisation)."""
  return jnp.linalg.slogdet(w)[1]


def stacked_inverse(w):
  """W_i^{-1} of stacked weights [N, C, C] (one batched inversion)."""
  return jnp.linalg.inv(w)


def _lu_factors(packed):
  c = packed.shape[0]
  lower = jnp.tril(packed, -1) + jnp.eye(c, dtype=packed.dtype)
  upper = jnp.triu(packed, 1) + jnp.diag(jnp.exp(jnp.diag(packed)))
  return lower, upper


class Invertible1x1Conv(nn.Module):
  parametrization: str = 'full'   # 'full' or 'lu'
  logdet: bool = True             # False: the caller adds H W log|det W| ('full' only)

  @nn.compact
  def __call__(self, x, inverse: bool = False, w_inverse=None):
    c = x.shape[-1]
    pixels = x.shape[1] * x.shape[2]
    x = flow_float(x)
    if self.parametrization == 'full':
      w = self.param('weight', orthogonal_init, (c, c), jnp.float32)
      if inverse:
        return _apply_matrix(jnp.linalg.inv(w) if w_inverse is None else w_inverse, x)
      logdet = jnp.linalg.slogdet(w)[1] * pixels if self.logdet else jnp.zeros((), x.dtype)
      return _apply_matrix(w, x), jnp.broadcast_to(logdet, x.shape[:1])
    if self.parametrization != 'lu':
      raise ValueError(f"conv1x1 parametrization must be 'full' or 'lu', got {self.parametrization!r}")
    packed = self.param('lu', nn.initializers.zeros, (c, c), jnp.float32)
    lower, upper = _lu_factors(packed)
    if inverse:
      y = x[..., ::-1]                          # P^{-1} = P (channel reversal)
      y = jax.scipy.linalg.solve_triangular(lower, y.reshape(-1, c).T, lower=True, unit_diagonal=True)
      y = jax.scipy.linalg.solve_triangular(upper, y, lower=False)
      return y.T.reshape(x.shape)
    z = _apply_matrix(lower @ upper, x)[..., ::-1]
    logdet = jnp.sum(jnp.diag(packed)) * pixels
    return z, jnp.broadcast_to(logdet, x.shape[:1])

  def forward(self, x):
    return self(x)

  def inverse(self, z):
    return self(z, inverse=True)
