"""Squeeze (space-to-depth 2x2, RealNVP) and its inverse, logdet = 0.

    [B, H, W, C] -> [B, H/2, W/2, 4C],  output channel c*4 + 2*dy + dx holds
    input channel c at offset (dy, dx): the channel order of the official
    NCHW `Squeeze2d`, so channel slices mean the same thing in both codes.
"""
import jax.numpy as jnp


def squeeze(x):
  b, h, w, c = x.shape
  if h % 2 or w % 2:
    raise ValueError(f'squeeze needs even height and width, got {h}x{w}')
  t = x.reshape(b, h // 2, 2, w // 2, 2, c)
  return jnp.transpose(t, (0, 1, 3, 5, 2, 4)).reshape(b, h // 2, w // 2, 4 * c)


def unsqueeze(z):
  b, h, w, c4 = z.shape
  t = z.reshape(b, h, w, c4 // 4, 2, 2)
  return jnp.transpose(t, (0, 1, 4, 2, 5, 3)).reshape(b, 2 * h, 2 * w, c4 // 4)
