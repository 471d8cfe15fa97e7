"""The assembled model: parameter counts of the published configs (via --mode
summary), whole-model round trip, and configuration errors."""
import dataclasses
import importlib
import pathlib
import re

import jax
import numpy as np
import pytest

from denseflow_jax import ablation
from denseflow_jax import model as model_lib
from denseflow_jax import modes
from denseflow_jax.model import DenseFlow
from denseflow_jax.errors import ConfigError
from denseflow_jax.flows.dequantization import dequantization_inverse
from denseflow_jax.spec import spec_from_config
from helpers import model_spec


def _summary_total(capsys, config_name, **model_overrides):
  config = importlib.import_module(f'configs.{config_name}').get_config()
  for key, value in model_overrides.items():
    config.model[key] = value
  modes.run('summary', config, None)
  out = capsys.readouterr().out
  return int(re.search(r'^total\s+([\d,]+)$', out, re.M)[1].replace(',', ''))


def test_summary_cifar10_is_the_official_densflow_74_10_count(capsys):
  assert _summary_total(capsys, 'cifar10') == 130_647_294


def test_summary_64x64_inputs_give_the_same_count(capsys):
  assert _summary_total(capsys, 'imagenet64') == 130_647_294


TINY = model_spec(image_shape=(8, 8, 3), block_config=(2, 1), layers_config=(1, 1),
                 mid_channels=(8, 8), growth_rate=2)


def test_whole_model_round_trip_recovers_the_dequantized_input():
  model = model_lib.make_model(TINY)
  x = jax.random.randint(jax.random.PRNGKey(0), (2, 8, 8, 3), 0, 256).astype(np.uint8)
  variables = jax.jit(lambda r, x: model_lib.init_variables(model, r, x))(jax.random.PRNGKey(1), x)
  noise = model_lib.draw_noise(TINY, jax.random.PRNGKey(2), 2)

  def round_trip(v, x, noise):
    y, z, dropped, _ = model.apply(v, x, noise, method=DenseFlow.encode)
    return y, model.apply(v, z, dropped, method=DenseFlow.inverse)

  y, y_back = jax.jit(round_trip)(variables, x, noise)
  assert float(np.min(y)) >= 0.0 and float(np.max(y)) < 1.0
  np.testing.assert_allclose(y_back, y, atol=1e-4)
  # Dequantization is undone exactly by flooring.
  np.testing.assert_array_equal(dequantization_inverse(y_back, 8), x)



def test_initialising_pass_log_prob_equals_a_training_pass_with_its_variables():
  """init_with_log_prob's log p (test_init's initial loss, as the official first pass gives
  it) is what a training-mode pass with the returned variables computes: no layer computes
  differently while it initialises (ActNorm normalises with the statistics it just took)."""
  # One unit of dense + attention coupling, uniform dequantization: compiles in seconds.
  spec = dataclasses.replace(TINY, block_config=(1,), layers_config=(1,), mid_channels=(8,),
                             dequantization='uniform')
  model = model_lib.make_model(spec)
  x = jax.random.randint(jax.random.PRNGKey(0), (4, 8, 8, 3), 0, 256).astype(np.uint8)
  noise = model_lib.draw_noise(spec, jax.random.PRNGKey(2), 4)

  def both(r, x, noise):
    log_p, variables = model_lib.init_with_log_prob(model, r, x, noise)
    again, _ = model.apply(variables, x, noise, train=True, method=DenseFlow.log_prob,
                           mutable=['batch_stats'])
    return log_p, again

  log_p, again = jax.jit(both)(jax.random.PRNGKey(1), x, noise)
  assert log_p.shape == (4,)
  np.testing.assert_allclose(log_p, again, rtol=1e-5)

@pytest.mark.parametrize('overrides, message', [
    ({'image_shape': (12, 12, 3)}, 'multiples of 8'),
    ({'image_shape': (8, 8, 3), 'block_config': (2, 2, 1), 'layers_config': (1, 1, 1),
      'mid_channels': (8, 8, 8)}, 'divisible by 4'),
    ({'growth_rate': 0}, 'growth_rate must be positive'),
    ({'growth_rate': -3}, 'growth_rate must be positive'),
    ({'block_config': (0, 4, 1)}, 'block_config entries must be positive'),
    ({'layers_config': (5, -1, 20)}, 'layers_config entries must be positive'),
    ({'block_config': (6, 4)}, 'one entry per block'),
    ({'coupling_net': 'resnet'}, "coupling_net must be one of"),
    ({'num_bits': 9}, 'num_bits must be in 1..8'),
    ({'precision': 'float32'}, "precision must be one of \\('default', 'high', 'highest'\\)"),
    ({'scan_unroll': -1}, 'scan_unroll must be 0 \\(per platform\\) or at least 1'),
    ({'grwoth_rate': 10}, "unknown model config keys \\['grwoth_rate'\\]"),
])
def test_bad_model_config_is_refused_before_anything_runs(overrides, message):
  config = dict(model_spec().__dict__)
  config.update(overrides)
  with pytest.raises(ConfigError, match=message):
    spec_from_config(config)


@pytest.mark.parametrize('scan_unroll, platform, expected', [
    (0, 'tpu', 1), (0, 'gpu', 20), (0, 'cpu', 20), (5, 'tpu', 5), (64, 'gpu', 64)])
def test_scan_unroll_zero_follows_the_platform(scan_unroll, platform, expected):
  """0: rolled on a TPU, every module of the largest unit unrolled elsewhere (DenseFlow-74-10's
  units have 5, 6 and 20 modules); a set value is kept on every platform."""
  assert model_spec(scan_unroll=scan_unroll).unroll_for(platform) == expected


def _ablation_table():
  """{row: (parameters, published bpd)} parsed from experiments/ablations.md."""
  path = pathlib.Path(__file__).resolve().parents[1] / 'experiments' / 'ablations.md'
  rows = re.findall(r'^\| (\d) \|[^|]+\|[^|]+\| ([\d,]+) \| ([\d.]+) \|', path.read_text(), re.M)
  return {int(r): (int(p.replace(',', '')), float(b)) for r, p, b in rows}


def test_ablation_rows_match_the_doc_and_row_6_the_official_count(capsys):
  """experiments/ablations.md must agree with `--mode summary` for every row and with the
  published bpd recorded in denseflow_jax/ablation.py (the doc is hand-written)."""
  table = _ablation_table()
  assert sorted(table) == sorted(ablation.ROWS)
  assert table[6][0] == 75_020_522   # row 6 is the official DenseFlow-45-6
  for row, (params, bpd) in table.items():
    config = importlib.import_module('configs.ablation').get_config()
    config.ablation_row = row
    modes.run('summary', config, None)    # applies the row
    out = capsys.readouterr().out
    assert int(re.search(r'^total\s+([\d,]+)$', out, re.M)[1].replace(',', '')) == params, row
    assert bpd == ablation.ROWS[row][3], row


@pytest.mark.parametrize('overrides, row, match', [
    ({'noise': 'white'}, 6, r"--config.model.noise=white conflicts with --config.ablation_row=6"),
    ({'coupling_net': 'glow'}, 5, r"coupling_net=glow conflicts with --config.ablation_row=5"),
    ({}, 7, r'ablation_row must be one of \[1, 2, 3, 4, 5, 6\]'),
])
def test_ablation_row_never_silently_overrides_an_explicit_switch(overrides, row, match):
  config = importlib.import_module('configs.ablation').get_config()
  for name, value in overrides.items():
    config.model[name] = value
  config.ablation_row = row
  with pytest.raises(ConfigError, match=match):
    modes.run('summary', config, None)


def test_ablation_row_accepts_an_override_that_agrees_with_it():
  config = importlib.import_module('configs.ablation').get_config()
  config.model.noise = 'white'
  config.ablation_row = 5                 # row 5 is white noise
  ablation.finalize_config(config)
  assert (config.model.coupling_net, config.model.cross_unit, config.model.noise) == (
      'dense_attention', True, 'white')
