"""The mixed-precision policy in one place.

Convolutions and the dense blocks run in the configured compute dtype
(`model.compute_dtype`, e.g. bfloat16). Everything that enters the likelihood
directly (ActNorm, the 1x1 conv and its log-det, the affine coupling update,
BatchNorm statistics, attention softmax/inverse, Gaussian log-densities) runs
in at least float32: `flow_float` promotes to float32 and keeps float64 as
float64 (the Jacobian tests run in float64).
"""
import jax.numpy as jnp


def flow_float(x):
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))
