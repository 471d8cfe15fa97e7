"""Performance switches keep the maths: bfloat16 compute, rematerialisation, LU 1x1 convs."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from denseflow_jax import model as model_lib
from denseflow_jax.model import DenseFlow
from helpers import model_spec

# One block with uniform dequantization keeps compiling cheap; it still has the dense +
# attention coupling networks, cross-unit coupling and every flow layer.
SPEC = model_spec(image_shape=(8, 8, 3), block_config=(2,), layers_config=(1,), mid_channels=(8,),
                 growth_rate=2, dequantization='uniform')


@pytest.fixture(scope='module')
def setup():
  model = model_lib.make_model(SPEC)
  x = jax.random.randint(jax.random.PRNGKey(0), (4, 8, 8, 3), 0, 256).astype(np.uint8)
  variables = jax.jit(lambda r, x: model_lib.init_variables(model, r, x))(jax.random.PRNGKey(1), x)
  # Move away from the identity initialisation so every path contributes.
  leaves, treedef = jax.tree.flatten(variables['params'])
  keys = jax.random.split(jax.random.PRNGKey(2), len(leaves))
  params = treedef.unflatten([p + 0.02 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])
  variables = {**variables, 'params': params}
  noise = model_lib.draw_noise(SPEC, jax.random.PRNGKey(3), 4)
  return x, variables, noise


def _bpd(spec, variables, x, noise):
  model = DenseFlow(spec)
  return model_lib.bits_per_dim(model.apply(variables, x, noise, method=DenseFlow.log_prob), spec)


def test_bfloat16_compute_agrees_with_float32_within_0_01_bpd(setup):
  x, variables, noise = setup
  f32 = jax.jit(lambda v, x, n: _bpd(SPEC, v, x, n))(variables, x, noise)
  bf16_spec = dataclasses.replace(SPEC, compute_dtype='bfloat16')
  bf16 = jax.jit(lambda v, x, n: _bpd(bf16_spec, v, x, n))(variables, x, noise)
  assert bf16.dtype == jnp.float32                       # the bound itself stays float32
  np.testing.assert_allclose(bf16, f32, atol=0.01)
  assert np.max(np.abs(bf16 - f32)) > 1e-6               # bfloat16 really was used


def test_remat_gives_the_same_loss_and_gradients(setup):
  x, variables, noise = setup

  def loss(spec):
    def f(params):
      v = {**variables, 'params': params}
      log_p, _ = DenseFlow(spec).apply(v, x, noise, train=True, method=DenseFlow.log_prob,
                                       mutable=['batch_stats'])
      return -jnp.mean(log_p)
    return jax.jit(jax.value_and_grad(f))(variables['params'])

  plain_loss, plain_grads = loss(SPEC)
  remat_loss, remat_grads = loss(dataclasses.replace(SPEC, remat=True))
  np.testing.assert_allclose(remat_loss, plain_loss, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(remat_grads), jax.tree.leaves(plain_grads)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def _conv_and_dot_precisions(jaxpr) -> list:
  """The precision of every convolution and dot in `jaxpr`, nested jaxprs included, but
  not those of jnp.linalg's solves (custom_linear_solve: JAX fixes them at HIGHEST)."""
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == 'custom_linear_solve':
      continue
    if eqn.primitive.name in ('conv_general_dilated', 'dot_general'):
      found.append(eqn.params['precision'])
    for param in eqn.params.values():
      for sub in (param if isinstance(param, (tuple, list)) else (param,)):
        inner = getattr(sub, 'jaxpr', sub)
        if hasattr(inner, 'eqns'):
          found += _conv_and_dot_precisions(inner)
  return found


@pytest.mark.parametrize('precision', ['default', 'high', 'highest'])
def test_model_precision_reaches_every_convolution_and_dot(setup, precision):
  """model.precision is traced into every convolution and dot of the bound and of the
  inverse (the 1x1 convolutions' linear algebra and the attention's small matmuls too),
  whatever JAX's own default is around the call."""
  x, variables, noise = setup
  model = model_lib.make_model(dataclasses.replace(SPEC, precision=precision))
  expected = jax.lax.Precision(precision)
  z = jax.random.normal(jax.random.PRNGKey(4), (4, *SPEC.latent_shape()))
  programs = [
      lambda: model.apply(variables, x, noise, method=DenseFlow.log_prob),
      lambda: model.apply(variables, z, [], method=DenseFlow.inverse)]
  for program in programs:
    with jax.default_matmul_precision('highest' if precision != 'highest' else 'default'):
      found = _conv_and_dot_precisions(jax.make_jaxpr(program)().jaxpr)
    assert len(found) > 10
    assert all(p in (expected, (expected, expected)) for p in found), set(map(str, found))
