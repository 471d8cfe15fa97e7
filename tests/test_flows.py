"""Every invertible layer: round trip, jit == no-jit, log-det == log|det| of the
autodiff Jacobian (float64); exact terms of cross-unit coupling and
squeeze-and-drop against closed forms (SciPy), squeeze against the official
NCHW formula."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from denseflow_jax.flows.actnorm import ActNorm
from denseflow_jax.flows.channel_switch import ChannelSwitch
from denseflow_jax.flows.conv1x1 import Invertible1x1Conv
from denseflow_jax.flows.coupling import AffineCoupling
from denseflow_jax.flows.cross_unit import CrossUnitCoupling
from denseflow_jax.flows.dense_block import DenseFlowBlock
from denseflow_jax.flows.squeeze import squeeze, unsqueeze
from denseflow_jax.flows.squeeze_drop import squeeze_drop_forward, squeeze_drop_inverse
from denseflow_jax.flows.unit import Unit
from denseflow_jax.nets.coupling_net import DenseAttentionNet, GlowNet, ResidualDenseNet
from denseflow_jax.nets.noise_net import NoiseNet


def _perturb(tree, key, scale=0.1):
  """Random offsets so that zero-initialised heads are not the identity."""
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(key, len(leaves))
  return treedef.unflatten([l + scale * jax.random.normal(k, l.shape, l.dtype) for l, k in zip(leaves, keys)])


class Case:
  """A layer as forward(variables, x, dtype) -> (z, logdet) and inverse(variables, z, dtype) -> x."""

  def __init__(self, make, shape, context_channels=0):
    self.make, self.shape, self.context_channels = make, shape, context_channels

  def _context(self, x):
    if not self.context_channels:
      return {}
    c = jnp.cos(jnp.arange(np.prod(x.shape[:-1]) * self.context_channels, dtype=x.dtype))
    return {'context': c.reshape(*x.shape[:-1], self.context_channels)}

  def forward(self, variables, x, dtype=jnp.float32):
    return self.make(dtype).apply(variables, x, **self._context(x), method='forward')

  def inverse(self, variables, z, dtype=jnp.float32):
    return self.make(dtype).apply(variables, z, **self._context(z), method='inverse')

  def init(self, key, x):
    return jax.jit(self._init)(key, x)   # jitted: op by op, the initialisation took ~9 s

  def _init(self, key, x):
    variables = self.make(jnp.float32).init(key, x, **self._context(x))
    return {**variables, 'params': _perturb(variables.get('params', {}), jax.random.fold_in(key, 1))}


def _net(cls, **kw):
  return lambda dtype: functools.partial(cls, dtype=dtype, **kw)


CASES = {
    'actnorm': Case(lambda d: ActNorm(), (2, 4, 4, 6)),
    'conv1x1_full': Case(lambda d: Invertible1x1Conv('full'), (2, 4, 4, 6)),
    'conv1x1_lu': Case(lambda d: Invertible1x1Conv('lu'), (2, 4, 4, 6)),
    'coupling_dense_attention': Case(
        lambda d: AffineCoupling(_net(DenseAttentionNet, mid_channels=8, depth=2, growth=4)(d)), (2, 4, 4, 6)),
    'coupling_glow_odd_width': Case(lambda d: AffineCoupling(_net(GlowNet, hidden=8)(d)), (2, 4, 4, 5)),
    'coupling_conditional': Case(
        lambda d: AffineCoupling(_net(ResidualDenseNet, mid_channels=8, depth=2, growth=4)(d)), (2, 4, 4, 4),
        context_channels=3),
    'channel_switch_even': Case(lambda d: ChannelSwitch(), (2, 2, 2, 6)),
    'channel_switch_odd': Case(lambda d: ChannelSwitch(), (2, 2, 2, 5)),
    'unit_scan_3_modules': Case(lambda d: Unit(3, _net(GlowNet, hidden=8)(d)), (2, 4, 4, 4)),
    'unit_unrolled_3_modules': Case(lambda d: Unit(3, _net(GlowNet, hidden=8)(d), unroll=3),
                                    (2, 4, 4, 4)),
}


def _jacobian_logdet(fn, x):
  flat = lambda v: fn(v.reshape(x.shape)).reshape(-1)
  jac = jax.jacfwd(flat)(x.reshape(-1))
  return jnp.linalg.slogdet(jac)[1]


@pytest.mark.parametrize('name', sorted(CASES))
def test_invertible_layer(name):
  case = CASES[name]
  key = jax.random.PRNGKey(0)
  x = jax.random.normal(key, case.shape) * 1.5 + 0.3
  variables = case.init(jax.random.PRNGKey(1), x)

  z, logdet = jax.jit(case.forward)(variables, x)
  assert z.shape == x.shape and logdet.shape == (x.shape[0],)
  x_back = jax.jit(case.inverse)(variables, z)
  np.testing.assert_allclose(x_back, x, atol=1e-5, rtol=1e-5)

  z_eager, logdet_eager = case.forward(variables, x)
  np.testing.assert_allclose(z_eager, z, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(logdet_eager, logdet, atol=1e-4, rtol=1e-5)

  with jax.enable_x64(True):
    v64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), variables)
    x64 = jnp.asarray(x[:1], jnp.float64)
    fwd = lambda v: case.forward(v64, v, jnp.float64)[0]
    expected = jax.jit(_jacobian_logdet, static_argnums=0)(fwd, x64)
    got = case.forward(v64, x64, jnp.float64)[1][0]
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-8)
    if name not in ('channel_switch_even', 'channel_switch_odd'):
      assert abs(float(expected)) > 1e-3, 'degenerate case: the log-det should not vanish'


def _official_squeeze_nchw(x):
  """Official Squeeze2d: view(b, c, h/2, 2, w/2, 2).permute(0, 1, 3, 5, 2, 4)."""
  b, c, h, w = x.shape
  t = x.reshape(b, c, h // 2, 2, w // 2, 2).transpose(0, 1, 3, 5, 2, 4)
  return t.reshape(b, 4 * c, h // 2, w // 2)


def test_squeeze_matches_official_channel_order_and_inverts():
  x = np.random.RandomState(0).randn(2, 6, 4, 3).astype(np.float32)   # NHWC
  expected = _official_squeeze_nchw(x.transpose(0, 3, 1, 2)).transpose(0, 2, 3, 1)
  np.testing.assert_array_equal(squeeze(jnp.asarray(x)), expected)
  np.testing.assert_array_equal(unsqueeze(squeeze(jnp.asarray(x))), x)


def test_squeeze_drop_term_is_standard_normal_density_of_dropped_half():
  x = np.random.RandomState(1).randn(3, 4, 4, 2).astype(np.float32)
  keep, log_p, drop = squeeze_drop_forward(jnp.asarray(x))
  # Dropped channels k in [2C, 4C): input channel k // 4 at offset ((k % 4) // 2, k % 2).
  c = x.shape[-1]
  closed = np.zeros(3)
  for k in range(2 * c, 4 * c):
    dy, dx = (k % 4) // 2, k % 2
    closed += stats.norm.logpdf(x[:, dy::2, dx::2, k // 4]).sum(axis=(1, 2))
  np.testing.assert_allclose(log_p, closed, rtol=1e-5)
  assert keep.shape == (3, 2, 2, 2 * c)
  np.testing.assert_allclose(squeeze_drop_inverse(keep, drop), x)


@pytest.mark.parametrize('noise', ['preconditioned', 'white'])
def test_cross_unit_term_is_minus_log_density_of_injected_noise(noise):
  key = jax.random.PRNGKey(3)
  h = jax.random.normal(key, (2, 4, 4, 5))
  eps = jax.random.normal(jax.random.fold_in(key, 1), (2, 4, 4, 3))
  layer = CrossUnitCoupling(3, noise)
  variables = layer.init(key, h, eps)
  variables = {'params': _perturb(variables.get('params', {}), key, 0.3)}
  eta, term = layer.apply(variables, h, eps)
  if noise == 'white':
    mu, sigma = np.zeros(eps.shape), np.ones(eps.shape)
  else:
    mu, log_sigma = NoiseNet(3).apply({'params': variables['params']['g']}, h)
    sigma = np.exp(log_sigma)
    assert np.abs(np.asarray(log_sigma)).max() > 1e-3   # the perturbed g really scales
  np.testing.assert_allclose(eta, mu + sigma * np.asarray(eps), rtol=1e-5, atol=1e-6)
  # term = -log q(eta | h) with q = N(mu, sigma^2): the augmented bound's correction.
  closed = -stats.norm.logpdf(np.asarray(eta, np.float64), mu, sigma).sum(axis=(1, 2, 3))
  np.testing.assert_allclose(term, closed, rtol=1e-5)


def test_dense_flow_block_round_trip_drops_injected_noise():
  block = DenseFlowBlock(3, 2, functools.partial(GlowNet, hidden=8), growth=2)
  key = jax.random.PRNGKey(4)
  x = jax.random.normal(key, (2, 4, 4, 4))
  noise = [jax.random.normal(jax.random.fold_in(key, i), (2, 4, 4, 2)) for i in range(2)]
  variables = block.init(key, x, noise)
  variables = {'params': _perturb(variables['params'], key)}
  z, _ = jax.jit(lambda v, x, n: block.apply(v, x, n))(variables, x, noise)
  assert z.shape == (2, 4, 4, 8)
  x_back = jax.jit(lambda v, z: block.apply(v, z, inverse=True))(variables, z)
  np.testing.assert_allclose(x_back, x, atol=1e-5, rtol=1e-5)
