"""Squeeze-and-drop between DenseFlow blocks (official `InvertibleTransition`).

    forward  [z_keep, z_drop] = squeeze(x)  (halves of the channels)
             logdet = log N(z_drop; 0, I)   (z_drop is resolved here and leaves the flow)
    inverse  x = unsqueeze([z_keep, z_drop]),  z_drop ~ N(0, T^2 I) when sampling
Shapes: x [B, H, W, C] -> z_keep [B, H/2, W/2, 2C].
"""
import jax.numpy as jnp

from denseflow_jax.flows.gaussian import standard_normal_logpdf

from denseflow_jax.flows.squeeze import squeeze, unsqueeze


def squeeze_drop_forward(x):
  """x -> (z_keep, log N(z_drop; 0, I) [B], z_drop)."""
  keep, drop = jnp.split(squeeze(x), 2, axis=-1)
  return keep, standard_normal_logpdf(drop), drop


def squeeze_drop_inverse(keep, drop):
  return unsqueeze(jnp.concatenate([keep, drop.astype(keep.dtype)], axis=-1))
