"""Test settings: CPU only, 8 simulated devices, XLA optimisations off.

Compile time dominates this suite on 2 cores; `jax_disable_most_optimizations`
cuts it several-fold and does not change results beyond float rounding.
"""
import os

os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import jax  # noqa: E402

jax.config.update('jax_num_cpu_devices', 8)
jax.config.update('jax_disable_most_optimizations', True)

import pathlib  # noqa: E402

import pytest  # noqa: E402

import helpers  # noqa: E402

FIXTURES = pathlib.Path(__file__).resolve().parents[2] / 'shared' / 'fixtures'
FIXTURE_DIR = FIXTURES / 'reference-small'


@pytest.fixture(scope='session')
def reference_dir():
  """The official-model fixture (../shared/fixtures/reference-small); skip where absent."""
  if not (FIXTURE_DIR / 'state_dict.npz').exists():
    pytest.skip(f'reference fixture not found at {FIXTURE_DIR}')
  return FIXTURE_DIR


@pytest.fixture(scope='session')
def init_stats_dir():
  """Official per-parameter statistics at initialisation (../shared/fixtures/init-stats)."""
  path = FIXTURES / 'init-stats'
  if not (path / 'official_init.json').exists():
    pytest.skip(f'init-stats fixture not found at {path}')
  return path


@pytest.fixture(scope='session')
def make_config():
  """The test-config builder, ``make_config(overrides=None, base='default')``: the tiny model
  of helpers.TINY on configs/<base>.py, then ``{'section.field': value}`` overrides."""
  return helpers.tiny_config
