"""Shared test helpers: tiny configs and fake variables / states (imported as `helpers`;
pytest puts tests/ on the path)."""
import dataclasses
import importlib
from typing import Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from configs import default
from denseflow_jax import data, train_step
from denseflow_jax.convert import official_model_fields
from denseflow_jax.settings import DataSettings, TrainSettings
from denseflow_jax.sharding import BatchSplit
from denseflow_jax.spec import ModelSpec, spec_from_config

TRAIN_BATCH = 16


# The tiny model every test config starts from: one block of two units of one module each,
# 8 mid channels, on 8x8 5-bit digits (compiles in seconds on one core).
TINY = {
    'model.image_shape': (8, 8, 1), 'model.num_bits': 5, 'model.block_config': (2,),
    'model.layers_config': (1,), 'model.mid_channels': (8,), 'model.growth_rate': 2,
    'data.dataset': 'digits', 'train.batch_size': 16,
}
# The Glow-coupling variant with uniform dequantization (compiles fastest of all).
GLOW = {'model.coupling_net': 'glow', 'model.glow_channels': 8,
        'model.dequantization': 'uniform'}


def model_spec(**fields) -> ModelSpec:
  """The ModelSpec of configs/default.py with `fields` changed."""
  return dataclasses.replace(spec_from_config(default.get_config().model), **fields)


def official_spec(meta) -> ModelSpec:
  """The ModelSpec of an official-model fixture, from its meta.json (constructor arguments)."""
  return model_spec(**official_model_fields(meta['config']))


def tiny_config(overrides: Optional[Mapping] = None, base: str = 'default'):
  """The one test-config builder (also the `make_config` fixture of conftest.py):
  configs/<base>.py, the tiny model (TINY), then ``overrides`` ({'section.field': value},
  as --config.section.field=value would set them)."""
  config = importlib.import_module(f'configs.{base}').get_config()
  config.update_from_flattened_dict({**TINY, **(overrides or {})})
  return config


def step_settings(steps_per_epoch, **changes):
  """StepSettings of configs/default.py with `changes`."""
  settings = TrainSettings.from_config(default.get_config()).step_settings(steps_per_epoch)
  return dataclasses.replace(settings, **changes)


def random_variables(seed=0, batch_stats=True):
  rng = np.random.default_rng(seed)
  variables = {'params': {'prior': {'loc': rng.normal(size=6).astype(np.float32),
                                    'log_scale': rng.normal(size=6).astype(np.float32)},
                          'blocks_0': {'unit_0': {'kernel': rng.normal(size=(1, 3, 3, 2, 8))
                                                  .astype(np.float32)}}}}
  variables['batch_stats'] = ({'blocks_0': {'mean': rng.normal(size=8).astype(np.float32)}}
                              if batch_stats else {})
  return variables


def assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert np.asarray(x).dtype == np.asarray(y).dtype
    np.testing.assert_array_equal(x, y)


def fake_state(variables, ema=True, step=3):
  """A TrainState with a real optax Adamax state (namedtuples) and counters."""
  settings = TrainSettings.from_config(default.get_config()).step_settings(5)
  tx = train_step.make_optimizer(dataclasses.replace(settings, grad_clip=1.0))
  state = train_step.create_train_state(variables, tx, ema=ema, step=step)
  return state.replace(opt_state=jax.tree.map(lambda x: x + 1, state.opt_state),
                       skipped_total=jnp.asarray(2, jnp.int32))


def train_config(npz_path):
  """The tiny Glow model trained on an .npz of digits (test_train, test_robustness)."""
  return tiny_config({
      **GLOW, 'data.dataset': 'npz', 'data.source': npz_path, 'data.augmentation': 'none',
      'train.batch_size': TRAIN_BATCH, 'train.lr': 1e-3, 'train.warmup_steps': 2,
      'train.gamma': 0.5, 'train.grad_clip': 1.0, 'train.ema_decay': 0.9,
      'train.log_every': 1, 'train.checkpoint_every_steps': 100, 'train.num_steps': 4,
      'train.eval_every_epochs': 1, 'train.sample_every_epochs': 1})


def split_of(config, split):
  """The split of `config`'s data, checked against its model."""
  return data.load_split(config.data, split, config.model.image_shape, config.model.num_bits)


def train_iterator(config, process_index=0, process_count=1, source=None):
  """data.make_train_iterator with the arguments a full `config` gives (train.batch_size
  over `process_count` processes)."""
  source = split_of(config, 'train') if source is None else source
  batch = BatchSplit(config.train.batch_size, 'train.batch_size', process_index,
                     process_count)
  return data.make_train_iterator(DataSettings.from_config(config), source,
                                  config.model.image_shape, batch, config.seed)
