"""The JAX model against outputs of the official PyTorch model
(../shared/fixtures/reference-small, see its README): converted weights +
recorded noise must give the official numbers. Skips where the fixture is absent."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from denseflow_jax.convert import ConvertError, convert_state_dict
from denseflow_jax.flows.dequantization import dequantization_inverse
from denseflow_jax.model import DenseFlow
from denseflow_jax.nets.coupling_net import DenseAttentionNet
from denseflow_jax.spec import ModelSpec


def nhwc(a):
  return jnp.asarray(np.transpose(a, (0, 2, 3, 1)))


@pytest.fixture(scope='module')
def reference(reference_dir):
  meta = json.loads((reference_dir / 'meta.json').read_text())
  cfg = meta['config']
  c, h, w = cfg['data_shape']
  spec = ModelSpec(image_shape=(h, w, c), block_config=tuple(cfg['block_config']),
                   layers_config=tuple(cfg['layers_config']),
                   mid_channels=tuple(cfg['layer_mid_chnls']), growth_rate=cfg['growth_rate'])
  state_dict = dict(np.load(reference_dir / 'state_dict.npz'))
  io = dict(np.load(reference_dir / 'io.npz'))
  variables = convert_state_dict(state_dict, spec)
  return spec, state_dict, io, variables, meta


def _noise(io, prefix):
  return {'dequantization': nhwc(io[f'{prefix}_0']),
          'cross_unit': ((nhwc(io[f'{prefix}_1']),), (nhwc(io[f'{prefix}_2']),), ())}


def test_converted_parameter_count_matches_official(reference):
  spec, _, _, variables, meta = reference
  assert sum(np.size(p) for p in jax.tree.leaves(variables['params'])) == meta['num_params']


@pytest.fixture(scope='module')
def log_prob_fn(reference):
  model = DenseFlow(reference[0])
  return jax.jit(lambda v, x, n: model.apply(v, x, n, method=DenseFlow.log_prob))


def test_log_prob_with_recorded_noise(reference, log_prob_fn):
  _, _, io, variables, _ = reference
  noise = _noise(io, 'log_prob_noise')
  got = log_prob_fn(variables, nhwc(io['x_nchw']), noise)
  np.testing.assert_allclose(got, io['log_prob_random_noise'], rtol=1e-4)


def test_log_prob_with_zero_noise(reference, log_prob_fn):
  _, _, io, variables, _ = reference
  noise = jax.tree.map(jnp.zeros_like, _noise(io, 'log_prob_noise'))
  got = log_prob_fn(variables, nhwc(io['x_nchw']), noise)
  np.testing.assert_allclose(got, io['log_prob_zero_noise'], rtol=1e-4)


def test_sampling_with_recorded_noise(reference):
  spec, _, io, variables, _ = reference
  model = DenseFlow(spec)
  # Official draw order: final latent, then the dropped halves from the latent side.
  eps = nhwc(io['sample_noise_0'])
  dropped = [nhwc(io['sample_noise_2']), nhwc(io['sample_noise_1'])]
  y = jax.jit(lambda v, e, d: model.apply(v, e, d, 1.0, method=DenseFlow.sample_continuous))(
      variables, eps, dropped)
  np.testing.assert_allclose(y, nhwc(io['sample_continuous']), atol=1e-4)
  images = dequantization_inverse(y, spec.num_bits)
  mismatched = int(np.sum(np.asarray(images) != np.asarray(nhwc(io['sample_uint8']))))
  # Observed: 0 of 2304 pixels differ; a pixel within ~1e-6 of a floor boundary may flip.
  assert mismatched <= 3, f'{mismatched} sampled pixels differ from the official uint8 sample'


def test_coupling_network_alone(reference):
  spec, _, io, variables, meta = reference
  assert 'transforms.3.blocks.0.transforms.0.transforms.2.coupling_net' in meta['coupling_net']
  net_params = jax.tree.map(lambda a: a[0], variables['params']['blocks_0']['unit_0']['modules']
                            ['coupling']['net'])
  net_stats = jax.tree.map(lambda a: a[0], variables['batch_stats']['blocks_0']['unit_0']['modules']
                           ['coupling']['net'])
  x = nhwc(io['coupling_net_in'])
  net = DenseAttentionNet(features=io['coupling_net_out'].shape[1], mid_channels=spec.mid_channels[0])
  out = net.apply({'params': net_params, 'batch_stats': net_stats}, x, False)
  np.testing.assert_allclose(out, nhwc(io['coupling_net_out']), rtol=1e-4, atol=1e-5)


def test_converter_names_missing_extra_and_misshaped_keys(reference):
  spec, state_dict, _, _, _ = reference
  broken = dict(state_dict)
  del broken['base_dist.loc']
  broken['transforms.3.blocks.0.transforms.0.transforms.1.weight'] = np.zeros((3, 3), np.float32)
  broken['transforms.9.something.weight'] = np.zeros((2,), np.float32)
  with pytest.raises(ConvertError) as err:
    convert_state_dict(broken, spec)
  message = str(err.value)
  assert 'prior/loc' in message                                     # missing
  assert "transforms.3.blocks.0.transforms.0.transforms.1.weight" in message and '(3, 3)' in message
  assert 'transforms.9.something.weight' in message                 # extra


def test_converter_rejects_a_config_that_does_not_match(reference):
  spec, state_dict, _, _, _ = reference
  wrong = ModelSpec(**{**spec.__dict__, 'growth_rate': spec.growth_rate + 2})
  with pytest.raises(ConvertError, match='growth_rate'):
    convert_state_dict(state_dict, wrong)
