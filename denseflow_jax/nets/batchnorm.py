"""BatchNorm with PyTorch's `nn.BatchNorm2d` semantics (the official coupling nets use it).

Training:   y = (x - mean_B) / sqrt(var_B + eps) * scale + bias, with the biased
            batch variance; running statistics are updated as
            r <- (1 - m) r + m * stat, m = 0.1, using the *unbiased* batch variance.
Evaluation: the running statistics replace the batch statistics.

Flax's BatchNorm keeps the biased variance in its running average, which would
make converted official statistics drift differently; hence this small module.
Statistics are computed in float32 whatever the compute dtype.

The batch statistics come from ONE reduction, the per-channel means of (x - K) and
(x - K)^2 with K the running mean (a constant here: stop_gradient):

    mean_B = K + E[x - K],   var_B = E[(x - K)^2] - E[x - K]^2

On several devices the batch is sharded, and each reduction is an all-reduce on the
critical path: mean then E[(x - mean)^2] would be two, one after the other, in every
coupling network's forward pass (issue #26). Shifting by K keeps the one-pass formula
accurate: K is close to the batch mean once training has run a few steps, so the
subtraction does not cancel (at the first pass K = 0, as in the two-pass form's first
step). Mathematically var_B does not depend on K, so neither do its gradients.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp

from denseflow_jax.precision import flow_float


class BatchNorm(nn.Module):
  """Per-channel BatchNorm over (batch, height, width) of NHWC inputs."""
  momentum: float = 0.1
  epsilon: float = 1e-5

  @nn.compact
  def __call__(self, x, train: bool):
    channels = x.shape[-1]
    scale = self.param('scale', nn.initializers.ones, (channels,))
    bias = self.param('bias', nn.initializers.zeros, (channels,))
    running_mean = self.variable('batch_stats', 'mean', lambda: jnp.zeros((channels,), jnp.float32))
    running_var = self.variable('batch_stats', 'var', lambda: jnp.ones((channels,), jnp.float32))
    x32 = flow_float(x)
    if train:
      axes = tuple(range(x.ndim - 1))
      shift = jax.lax.stop_gradient(running_mean.value)
      centred = x32 - shift
      moments = jnp.mean(jnp.concatenate([centred, jnp.square(centred)], axis=-1), axes)
      offset, mean_square = moments[:channels], moments[channels:]
      mean = shift + offset
      var = jnp.maximum(mean_square - jnp.square(offset), 0.0)
      # Also during `init`: the official first (data-dependent initialisation) pass is a
      # training-mode forward that updates the running statistics once.
      n = x.size // channels
      running_mean.value = (1 - self.momentum) * running_mean.value + self.momentum * mean
      running_var.value = ((1 - self.momentum) * running_var.value
                           + self.momentum * var * n / max(n - 1, 1))
    else:
      mean, var = running_mean.value, running_var.value
    y = (x32 - mean) * (scale / jnp.sqrt(var + self.epsilon)) + bias
    return y.astype(x.dtype)
