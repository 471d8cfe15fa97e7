"""The numerical precision of the model in one place.

Compute dtype. Convolutions and the dense blocks run in the configured compute dtype
(`model.compute_dtype`, e.g. bfloat16). Everything that enters the likelihood
directly (ActNorm, the 1x1 conv and its log-det, the affine coupling update,
BatchNorm statistics, attention softmax/inverse, Gaussian log-densities) runs
in at least float32: `flow_float` promotes to float32 and keeps float64 as
float64 (the Jacobian tests run in float64).

Matmul precision. A float32 convolution or dot does not run in float32 on every
accelerator: at JAX's default precision a TPU rounds both operands to bfloat16 (one
MXU pass, float32 accumulation) and an NVIDIA GPU since Ampere uses TF32 (10-bit
mantissa). `model.precision` ('default' | 'high' | 'highest', jax.lax.Precision) is
applied to every convolution and dot of the model, including those inside the linear
algebra of the 1x1 convolutions' log-determinants and inverses, by tracing each public
method of DenseFlow under `jax.default_matmul_precision` (`with_matmul_precision`).
CPUs compute float32 whatever the setting (the parity tests run there).
"""
import functools

import jax
import jax.numpy as jnp


def flow_float(x):
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def with_matmul_precision(method):
  """Decorates a method of a module that has `spec.precision`: its convolutions and dots
  are traced at that precision (nested calls re-enter the same setting)."""
  @functools.wraps(method)
  def traced_at_precision(self, *args, **kwargs):
    with jax.default_matmul_precision(self.spec.precision):
      return method(self, *args, **kwargs)
  return traced_at_precision
