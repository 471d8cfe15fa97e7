"""Tests of denseflow_jax.train (8 simulated CPU devices, tiny Glow-coupling model).

Every test shares one tiny model, one data set (48 digits, 3 steps per epoch) and one set
of training settings, so the train step compiles once for the 8-device mesh (cached in
train_step.make_train_step) and once for the 1-device comparison.
"""
import dataclasses
import json
import logging
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.datasets import load_digits

from configs import default
from denseflow_jax import errors
from denseflow_jax import checkpoint as ckpt_lib
from denseflow_jax import loading
from denseflow_jax import training_data
from denseflow_jax import metrics_log
from denseflow_jax import modes
from denseflow_jax import outputs
from denseflow_jax import sharding
from denseflow_jax import train
from denseflow_jax import train_step
from denseflow_jax.data import sources as data_sources
from denseflow_jax.settings import StepSettings, TrainSettings
from helpers import TRAIN_BATCH, step_settings, train_config, train_iterator
from denseflow_jax.model import DenseFlow, draw_noise
from denseflow_jax.errors import ConfigError
from denseflow_jax.spec import spec_from_config

BATCH = TRAIN_BATCH
NUM_TRAIN = 48          # 3 steps per epoch


@pytest.fixture(scope='module')
def digits_npz(tmp_path_factory):
  images = load_digits().images.astype(np.uint8)[:, :, :, None]
  path = tmp_path_factory.mktemp('data') / 'digits48.npz'
  np.savez(path, train=images[:NUM_TRAIN], test=images[NUM_TRAIN:NUM_TRAIN + 16])
  return str(path)


@pytest.fixture
def config(digits_npz):
  return train_config(digits_npz)


@pytest.fixture(scope='module')
def compiled(digits_npz):
  """Initial variables, both meshes and their (cached) train steps."""
  c = train_config(digits_npz)
  spec = spec_from_config(c.model)
  iterator = train_iterator(c)
  spe = iterator.steps_per_epoch
  mesh8 = sharding.make_mesh()
  mesh1 = sharding.make_mesh(jax.devices()[:1])
  assert mesh8.size == 8
  batches = [next(iterator) for _ in range(2)]
  settings = TrainSettings.from_config(c)
  init, to_state = train_step.make_state_init(spec, settings, mesh8, spe)
  variables = jax.device_get(init(jax.random.PRNGKey(0), sharding.global_batch(batches[0], mesh8)))
  return {'config': c, 'spec': spec, 'spe': spe, 'mesh8': mesh8, 'mesh1': mesh1,
          'batches': batches, 'variables': variables, 'to_state': to_state,
          'settings': settings,
          'step8': train_step.make_train_step(spec, settings, mesh8, spe),
          'step1': train_step.make_train_step(spec, settings, mesh1, spe)}


def state_on(compiled, mesh, variables=None, **replace):
  variables = compiled['variables'] if variables is None else variables
  rep = sharding.replicated(mesh)
  to_state = compiled['to_state'] if mesh is compiled['mesh8'] else jax.jit(
      lambda v: train_step.create_train_state(v, train_step.make_optimizer(
          compiled['settings'].step_settings(compiled['spe'])), ema=True),
      out_shardings=rep)
  state = to_state(jax.device_put(variables, rep))
  return state.replace(**{k: jax.device_put(jnp.asarray(v, jnp.int32), rep)
                          for k, v in replace.items()})


def leaves_equal(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  return len(la) == len(lb) and all(
      np.array_equal(np.asarray(x), np.asarray(y), equal_nan=True) for x, y in zip(la, lb))


# ---------------------------------------------------------------------------
# Schedule and settings (no compilation).
# ---------------------------------------------------------------------------


def official_lr(step, lr, warmup, gamma, steps_per_epoch, first):
  """The official loop's lr (torch 1.8.1: first = lr; torch 2.x: first = 0), written out."""
  if step == 0:
    return first
  return lr * min(1.0, step / warmup) * (gamma if step % steps_per_epoch == 0 else 1.0)


@pytest.mark.parametrize('kind', ['official', 'official_torch2', 'exponential'])
def test_lr_schedule_matches_closed_form(kind):
  settings = step_settings(10, lr=1e-3, warmup_steps=5, gamma=0.9, lr_schedule=kind)
  schedule = train_step.make_lr_schedule(settings)
  for step in (0, 1, 3, 5, 9, 10, 11, 19, 20, 37, 40, 1000):
    if kind == 'exponential':
      want = 1e-3 * min(1.0, step / 5) * 0.9 ** (step // 10)
    else:
      want = official_lr(step, 1e-3, 5, 0.9, 10, 1e-3 if kind == 'official' else 0.0)
    assert math.isclose(float(schedule(step)), want, rel_tol=1e-6, abs_tol=1e-12), step
  # Without warm-up the official loop has ExponentialLR alone: it compounds, step 1 included.
  no_warmup = train_step.make_lr_schedule(step_settings(4, lr=2e-3, warmup_steps=0, gamma=0.5,
                                                        lr_schedule=kind))
  assert [float(no_warmup(s)) for s in (0, 3, 4, 8)] == pytest.approx([2e-3, 2e-3, 1e-3, 5e-4])
  finetune = train_step.make_lr_schedule(step_settings(10, phase='finetune', finetune_lr=2e-5,
                                                       warmup_steps=5, lr_schedule=kind))
  assert [float(finetune(s)) for s in (0, 7, 10, 5000)] == pytest.approx([2e-5] * 4)


def test_official_schedule_never_compounds():
  """CIFAR-10's recipe (warm-up 5000, gamma 0.9975, 781 steps per epoch, 400 epochs): the
  official lr is 1e-3 to the end but for the first step of each epoch."""
  settings = step_settings(781, lr=1e-3, warmup_steps=5000, gamma=0.9975)
  assert settings.lr_schedule == 'official'       # the default
  schedule = train_step.make_lr_schedule(settings)
  last = 400 * 781 - 1
  assert [float(schedule(s)) for s in (0, 2500, 781 * 399, last)] == pytest.approx(
      [1e-3, 5e-4, 0.9975e-3, 1e-3])
  exponential = train_step.make_lr_schedule(dataclasses.replace(settings,
                                                                lr_schedule='exponential'))
  assert float(exponential(last)) == pytest.approx(1e-3 * 0.9975 ** 399)    # 0.37e-3


def test_settings_from_default_config():
  settings = TrainSettings.from_config(default.get_config()).step_settings(781)
  assert settings == StepSettings(
      steps_per_epoch=781, phase='pretrain', lr_schedule='official', optimizer='adamax',
      lr=1e-3, warmup_steps=5000,
      gamma=0.9975, finetune_lr=2e-5, grad_clip=0.0, ema_decay=0.0)
  hash(settings)


def test_batch_not_divisible_over_devices(config, tmp_path):
  config.train.batch_size = 12
  with pytest.raises(ConfigError, match=r'train\.batch_size = 12.*8 devices'):
    sharding.split_batch(config.train.batch_size, 'train.batch_size', sharding.make_mesh())
  with pytest.raises(ConfigError, match=r'train\.batch_size = 12.*8 devices'):
    train.train_and_evaluate(config, tmp_path / 'run')
  assert not (tmp_path / 'run').exists()


@pytest.mark.parametrize('field, value, match', [
    ('phase', 'warmup', 'train.phase'),
    ('optimizer', 'sgd', 'train.optimizer'),
    ('gamma', 0.0, 'train.gamma'),
    ('ema_decay', 1.0, 'train.ema_decay'),
    ('max_nonfinite_in_row', 0, 'train.max_nonfinite_in_row'),
])
def test_bad_train_config_fails_before_anything_runs(config, tmp_path, field, value, match):
  config.train[field] = value
  with pytest.raises(ConfigError, match=match.replace('.', r'\.')):
    train.train_and_evaluate(config, tmp_path / 'run')
  assert not (tmp_path / 'run').exists()


def test_finetune_needs_a_trained_model(config, tmp_path):
  config.train.phase = 'finetune'
  with pytest.raises(ConfigError, match='needs a trained model'):
    train.train_and_evaluate(config, tmp_path / 'run')
  assert not (tmp_path / 'run').exists()


# ---------------------------------------------------------------------------
# The train step.
# ---------------------------------------------------------------------------


def test_sharded_step_matches_single_device(compiled, caplog):
  key = jax.random.PRNGKey(7)
  results = {}
  for name in ('mesh8', 'mesh1'):
    mesh = compiled[name]
    step = compiled['step8' if name == 'mesh8' else 'step1']
    state = state_on(compiled, mesh)
    losses = []
    caplog.clear()
    with jax.log_compiles(True), caplog.at_level(logging.WARNING):
      for batch in compiled['batches']:
        state, metrics = step(state, sharding.global_batch(batch, mesh), key)
        losses.append(float(metrics['train_bpd']))
    # Compiled at most once (earlier tests may have compiled it already), never per step.
    compiles = [r for r in caplog.records if 'compilation of jit(step_fn)' in r.getMessage()]
    assert len(compiles) <= 1, [r.getMessage() for r in compiles]
    results[name] = (jax.device_get(state), losses)
  (s8, l8), (s1, l1) = results['mesh8'], results['mesh1']
  assert l8 == pytest.approx(l1, rel=1e-6)
  assert int(s8.step) == 2 and int(s8.skipped_total) == 0
  for tree8, tree1 in ((s8.params, s1.params), (s8.ema_params, s1.ema_params),
                       (s8.opt_state, s1.opt_state)):
    for a, b in zip(jax.tree.leaves(tree8), jax.tree.leaves(tree1)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  assert not leaves_equal(s8.params, compiled['variables']['params'])   # it did train


def test_steps_follow_torch_adamax_and_the_warmup(compiled):
  """Three train steps against torch.optim.Adamax's rule written out in NumPy, with the
  official schedule (torch 1.8.1: step 0 at the base lr, then lr * min(1, n / warmup);
  no epoch starts in these steps) and global-norm clipping (config: warmup 2, clip 1.0):

      g <- g * min(1, clip / |g|);   m <- b1 m + (1 - b1) g;   u <- max(b2 u, |g| + eps)
      p <- p - lr_n / (1 - b1^(n+1)) * m / u           (b1, b2, eps = 0.9, 0.999, 1e-8)
  """
  c, spec, mesh = compiled['config'], compiled['spec'], compiled['mesh1']
  model = DenseFlow(spec)
  key = jax.random.PRNGKey(3)
  grad_fn = jax.jit(lambda p, s, x, k: jax.grad(
      lambda p: train_step.train_loss(model, p, s, x, draw_noise(spec, k, x.shape[0])), has_aux=True)(p))
  state = state_on(compiled, mesh)
  params = jax.tree.map(lambda a: np.asarray(a, np.float64), compiled['variables']['params'])
  batch_stats = compiled['variables']['batch_stats']
  m = jax.tree.map(np.zeros_like, params)
  u = jax.tree.map(np.zeros_like, params)
  batches = [compiled['batches'][0], compiled['batches'][1], compiled['batches'][0]]
  for n, batch in enumerate(batches):
    p32 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)
    g, batch_stats = grad_fn(p32, batch_stats, jnp.asarray(batch), jax.random.fold_in(key, n))
    g = jax.tree.map(lambda a: np.asarray(a, np.float64), g)
    norm = math.sqrt(sum(float(np.sum(a ** 2)) for a in jax.tree.leaves(g)))
    g = jax.tree.map(lambda a: a * min(1.0, c.train.grad_clip / norm), g)
    m = jax.tree.map(lambda m_, g_: 0.9 * m_ + 0.1 * g_, m, g)
    u = jax.tree.map(lambda u_, g_: np.maximum(0.999 * u_, np.abs(g_) + 1e-8), u, g)
    lr = official_lr(n, c.train.lr, c.train.warmup_steps, c.train.gamma, compiled['spe'],
                     first=c.train.lr)
    params = jax.tree.map(lambda p_, m_, u_: p_ - lr / (1 - 0.9 ** (n + 1)) * m_ / u_,
                          params, m, u)
    state, metrics = compiled['step1'](state, sharding.global_batch(batch, mesh), key)
    assert float(metrics['lr']) == pytest.approx(lr, rel=1e-6, abs=1e-12), n
    got = jax.device_get(state.params)
    for want_leaf, got_leaf in zip(jax.tree.leaves(params), jax.tree.leaves(got)):
      np.testing.assert_allclose(got_leaf, want_leaf, rtol=1e-5, atol=2e-7, err_msg=f'step {n}')
  moved = [np.max(np.abs(a - b)) for a, b in zip(jax.tree.leaves(params),
                                                 jax.tree.leaves(compiled['variables']['params']))]
  assert max(moved) > 1e-4                                    # the steps did move the weights


def test_nonfinite_step_is_skipped_and_counted(compiled):
  mesh, step = compiled['mesh8'], compiled['step8']
  variables = jax.tree.map(np.array, compiled['variables'])
  variables['params']['prior']['loc'][0] = np.nan
  state = state_on(compiled, mesh, variables, nonfinite_count=2, skipped_total=5)
  before = jax.device_get(state)
  state, metrics = step(state, sharding.global_batch(compiled['batches'][0], mesh),
                        jax.random.PRNGKey(0))
  after = jax.device_get(state)
  assert not np.isfinite(metrics['train_bpd'])
  assert int(metrics['skipped']) == 1
  assert (int(after.step), int(after.nonfinite_count), int(after.skipped_total)) == (1, 3, 6)
  for field in ('params', 'batch_stats', 'opt_state', 'ema_params'):
    assert leaves_equal(getattr(after, field), getattr(before, field)), field

  # A finite step afterwards resets the run of skipped steps, not the total.
  state = state_on(compiled, mesh, nonfinite_count=3, skipped_total=6)
  state, metrics = step(state, sharding.global_batch(compiled['batches'][0], mesh),
                        jax.random.PRNGKey(0))
  assert int(metrics['skipped']) == 0
  assert (int(state.nonfinite_count), int(state.skipped_total)) == (0, 6)


# ---------------------------------------------------------------------------
# train_and_evaluate.
# ---------------------------------------------------------------------------



def final_state(workdir):
  checkpointer = ckpt_lib.TrainCheckpointer(workdir)
  return checkpointer.restore_raw_state(checkpointer.latest_step())


def test_resume_is_exact(config, tmp_path, compiled):
  del compiled   # only shares the compiled step
  config.train.num_steps = 4
  straight = train.train_and_evaluate(config, tmp_path / 'straight')
  config.train.num_steps = 2
  train.train_and_evaluate(config, tmp_path / 'resumed')
  assert ckpt_lib.TrainCheckpointer(tmp_path / 'resumed').all_steps() == [2]
  config.train.num_steps = 4
  resumed = train.train_and_evaluate(config, tmp_path / 'resumed')
  assert int(resumed.step) == 4
  assert leaves_equal(jax.device_get(straight), jax.device_get(resumed))
  assert leaves_equal(final_state(tmp_path / 'straight'), final_state(tmp_path / 'resumed'))

  records = metrics_log.read_metrics(tmp_path / 'resumed')
  assert [r['step'] for r in records] == [1, 2, 3, 4]
  assert [r['train_bpd'] for r in records] == [r['train_bpd'] for r in
                                               metrics_log.read_metrics(tmp_path / 'straight')]
  # The official schedule across the resume: the base lr at step 1, warm-up over 2 steps,
  # the first step of the second epoch halved (3 steps per epoch); the record of step n
  # shows the lr used by update n (schedule at n - 1).
  assert [r['lr'] for r in records] == pytest.approx([1e-3, 5e-4, 1e-3, 5e-4])
  assert all(set(r) >= {'step', 'epoch', 'lr', 'train_bpd', 'img_per_s', 'skipped'}
             for r in records)
  assert list((tmp_path / 'resumed' / metrics_log.TENSORBOARD_DIR).iterdir())


def test_hooks_and_best_checkpoint(config, tmp_path, compiled):
  del compiled
  calls = []
  values = iter([3.0, 2.5])

  def eval_fn(state, step):
    calls.append(('eval', step, int(state.step)))
    return {'test_bpd': next(values)}

  def sample_fn(state, step):
    calls.append(('sample', step, int(state.step)))

  train.train_and_evaluate(config, tmp_path / 'run', eval_fn=eval_fn, sample_fn=sample_fn)
  # Epoch 1 ends after step 3; the final evaluation at step 4.
  assert calls == [('eval', 3, 3), ('sample', 3, 3), ('eval', 4, 4)]
  evals = [r for r in metrics_log.read_metrics(tmp_path / 'run') if 'test_bpd' in r]
  assert [(r['step'], r['test_bpd']) for r in evals] == [(3, 3.0), (4, 2.5)]
  assert ckpt_lib.read_metadata(tmp_path / 'run' / ckpt_lib.BEST_DIR)['step'] == 4
  best = ckpt_lib.load_variables(tmp_path / 'run' / ckpt_lib.BEST_DIR, config)
  assert leaves_equal(best['params'], final_state(tmp_path / 'run')['ema_params'])



def test_periodic_evaluation_loads_the_test_split_once(config, tmp_path, compiled, monkeypatch):
  """modes.train evaluates at steps 3 and 4 with the test split loaded once, not per eval."""
  del compiled
  loads = []
  load_npz = data_sources._load_npz

  def counting_load_npz(source, split, *args):
    loads.append(split)
    return load_npz(source, split, *args)

  monkeypatch.setattr(data_sources, '_load_npz', counting_load_npz)
  config.train.sample_every_epochs = 100     # no sampling: only the evaluations matter here
  config.eval.batch_size = BATCH
  modes.run('train', config, str(tmp_path / 'run'))
  evals = [r['step'] for r in metrics_log.read_metrics(tmp_path / 'run') if 'test_bpd' in r]
  assert evals == [3, 4]
  assert loads.count('test') == 1, loads

def test_train_records_the_data_top_level_for_its_grids(config, tmp_path, compiled,
                                                       monkeypatch, capsys):
  """--mode train records the train array's largest value (npz) in the workdir, its periodic
  grids use it, and a later load reads it back; with EMA kept, eval.use_ema=True says
  nothing."""
  del compiled
  tops = []
  save_grid = outputs.save_sample_grid

  def spying_save_grid(*args, top=None, **kwargs):
    tops.append(top)
    return save_grid(*args, top=top, **kwargs)

  monkeypatch.setattr(outputs, 'save_sample_grid', spying_save_grid)
  config.eval.batch_size = BATCH
  workdir = tmp_path / 'run'
  with np.load(config.data.source) as f:
    want = int(f['train'].max())
  modes.run('train', config, str(workdir))
  assert tops == [want] and (workdir / 'samples' / 'step_00000003.png').is_file()
  record = json.loads((workdir / training_data.DATA_RECORD_FILE).read_text())
  assert record == {'dataset': 'npz', 'num_bits': 5, 'top_level': want,
                    'how': 'the largest value of the npz train array'}
  capsys.readouterr()
  _, _, loaded = loading.load_model(config, str(workdir), use_ema=True)
  assert (loaded['parameters'], loaded['data_top_level']) == ('ema', want)
  assert 'note:' not in capsys.readouterr().err


def test_refused_run_writes_no_record(config, tmp_path, compiled):
  """A run refused at its start (here: a fine-tune without a trained model) leaves no
  training_data.json behind."""
  del compiled
  config.train.phase = 'finetune'
  with pytest.raises(ConfigError, match='needs a trained model'):
    modes.run('train', config, str(tmp_path / 'run'))
  assert not (tmp_path / 'run' / training_data.DATA_RECORD_FILE).exists()


def test_nonfinite_run_stops_without_checkpoint(config, tmp_path, compiled):
  variables = jax.tree.map(np.array, compiled['variables'])
  variables['params']['prior']['log_scale'][:] = np.inf
  ckpt_lib.save_variables(tmp_path / 'bad', variables, config)
  config.checkpoint = str(tmp_path / 'bad')
  config.train.max_nonfinite_in_row = 2
  with pytest.raises(errors.NonFiniteError, match='2 consecutive steps'):
    train.train_and_evaluate(config, tmp_path / 'run')
  assert ckpt_lib.TrainCheckpointer(tmp_path / 'run').latest_step() is None
  assert [r['skipped'] for r in metrics_log.read_metrics(tmp_path / 'run')] == [1, 1]


def test_start_from_variables_then_finetune(config, tmp_path, compiled):
  ckpt_lib.save_variables(tmp_path / 'converted', compiled['variables'], config)
  config.checkpoint = str(tmp_path / 'converted')
  config.train.num_steps = 3
  state = train.train_and_evaluate(config, tmp_path / 'run')
  assert int(state.step) == 3

  config.train.phase = 'finetune'
  config.train.finetune_lr = 3e-5
  config.train.num_steps = 2
  state = train.train_and_evaluate(config, tmp_path / 'run')
  assert int(state.step) == 5
  records = metrics_log.read_metrics(tmp_path / 'run')
  assert [r['lr'] for r in records[3:]] == pytest.approx([3e-5, 3e-5])
  pretrained = ckpt_lib.load_variables(tmp_path / 'run' / ckpt_lib.PRETRAINED_DIR)
  assert ckpt_lib.read_metadata(tmp_path / 'run' / ckpt_lib.PRETRAINED_DIR)['step'] == 3
  assert not leaves_equal(pretrained['params'], jax.device_get(state.params))

  # Pretraining cannot continue a fine-tuned workdir.
  config.train.phase = 'pretrain'
  config.train.num_steps = 8
  with pytest.raises(ConfigError, match='fine-tuning run'):
    train.train_and_evaluate(config, tmp_path / 'run')


def test_digits_config_is_valid():
  from configs import digits
  c = digits.get_config()
  spec_from_config(c.model)
  TrainSettings.from_config(c)
  sharding.split_batch(c.train.batch_size, 'train.batch_size', sharding.make_mesh())
  assert train_iterator(c).steps_per_epoch == 23
