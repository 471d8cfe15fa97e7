"""Shared test helpers: tiny configs and fake variables / states (imported as `helpers`;
pytest puts tests/ on the path)."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from configs import default
from denseflow_jax import train_step
from denseflow_jax.settings import TrainSettings

TRAIN_BATCH = 16


def tiny_config():
  c = default.get_config()
  c.model.image_shape = (8, 8, 1)
  c.model.num_bits = 5
  c.model.block_config = (2,)
  c.model.layers_config = (1,)
  c.model.mid_channels = (8,)
  c.model.growth_rate = 2
  c.data.dataset = 'digits'
  c.train.batch_size = 16
  return c


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
  c = default.get_config()
  m = c.model
  m.image_shape = (8, 8, 1)
  m.num_bits = 5
  m.block_config = (2,)
  m.layers_config = (1,)
  m.mid_channels = (8,)
  m.growth_rate = 2
  m.coupling_net = 'glow'
  m.glow_channels = 8
  m.dequantization = 'uniform'
  c.data.dataset = 'npz'
  c.data.source = npz_path
  c.data.augmentation = 'none'
  t = c.train
  t.batch_size = TRAIN_BATCH
  t.lr = 1e-3
  t.warmup_steps = 2
  t.gamma = 0.5
  t.grad_clip = 1.0
  t.ema_decay = 0.9
  t.log_every = 1
  t.checkpoint_every_steps = 100
  t.num_steps = 4
  t.eval_every_epochs = 1
  t.sample_every_epochs = 1
  return c
