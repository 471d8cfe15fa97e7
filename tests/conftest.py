"""Test settings: CPU only, 8 simulated devices, XLA optimisations off, one compilation cache.

Compile time dominates this suite on 2 cores; `jax_disable_most_optimizations`
cuts it several-fold and does not change results beyond float rounding. The settings are
environment variables, so the subprocesses the tests start (the command line, training
runs that get killed, the notebook kernel, multi-host workers) inherit them.
"""
import atexit
import os
import shutil
import tempfile

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('JAX_DISABLE_MOST_OPTIMIZATIONS', 'true')
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  # One persistent compilation cache per test run, made by the first process (pytest, before
  # it starts the xdist workers) and inherited with the environment by the workers and every
  # subprocess they start: a program compiled again (the tiny model in another test or
  # another process) is read back instead. A fresh directory, so no run sees an older one.
  # (A cache directory already set in the environment is used, and kept, as it is.)
  os.environ['JAX_COMPILATION_CACHE_DIR'] = tempfile.mkdtemp(prefix='denseflow-jax-tests-')
  atexit.register(shutil.rmtree, os.environ['JAX_COMPILATION_CACHE_DIR'], ignore_errors=True)
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')    # cache every program
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '-1')

import jax  # noqa: E402

jax.config.update('jax_num_cpu_devices', 8)
jax.config.update('jax_disable_most_optimizations', True)   # also if jax was imported first

import pathlib  # noqa: E402

import pytest  # noqa: E402

import helpers  # noqa: E402

FIXTURES = pathlib.Path(__file__).resolve().parents[2] / 'shared' / 'fixtures'


def _fixture_folder(name: str, marker: str) -> pathlib.Path:
  """../shared/fixtures/<name>, or a skip naming where it was looked for."""
  path = FIXTURES / name
  if not (path / marker).exists():
    pytest.skip(f'{name} fixture not found at {path}')
  return path


@pytest.fixture(scope='session')
def reference_dir():
  """The official-model fixture (../shared/fixtures/reference-small); skip where absent."""
  return _fixture_folder('reference-small', 'state_dict.npz')


@pytest.fixture(scope='session')
def lockstep_dir():
  """40 recorded official training steps (../shared/fixtures/lockstep); skip where absent."""
  return _fixture_folder('lockstep', 'trajectory.npz')


@pytest.fixture(scope='session')
def init_stats_dir():
  """Official per-parameter statistics at initialisation (../shared/fixtures/init-stats)."""
  return _fixture_folder('init-stats', 'official_init.json')


@pytest.fixture(scope='session')
def make_config():
  """The test-config builder, ``make_config(overrides=None, base='default')``: the tiny model
  of helpers.TINY on configs/<base>.py, then ``{'section.field': value}`` overrides."""
  return helpers.tiny_config
