"""Our train step in lockstep with 40 steps of the official training loop
(../shared/fixtures/lockstep, see its README): from the converted starting state, on the
recorded batches and noise, with our optimizer. Skips where the fixture is absent.

Part (a) feeds the recorded lr sequence into the step, so it tests the step alone, over all
40 steps; part (b) runs our default schedule ('official') against the run under torch
1.8.1's schedulers (`variant_torch18.npz`), so it tests the schedule as the step computes
it. (b) runs the first SCHEDULE_STEPS (10) steps, where its lrs already differ from (a)'s
(step 1: 1e-3 against 0) and a wrong schedule is off by 1e-2 in the loss from step 2;
with DENSEFLOW_SLOW_TESTS=1 all 40 (each step is ~6 s on 2 cores; the schedule's whole
40-step sequence is checked without the model in
test_default_schedules_give_the_recorded_lr_sequences).

Tolerances come from the fixture's noise floor (README "What agreement to expect";
meta.json `noise_floor`): the official code against itself under another float32 rounding
(2 threads; oneDNN off). Our XLA float32 arithmetic is one more such rounding, so the loss
and the global parameter measures must stay within FACTOR (3) times the larger of the two
official-vs-itself figures at that step. The BatchNorm running statistics are judged by
their single worst entry (max|d| / max|p| of the worst tensor), a noisier figure: within
BN_FACTOR (10) times it. Measured (experiments/RESULTS.md, "Lockstep"): losses within 1.1x
the floor, parameters within 0.9x, BatchNorm statistics within 3.2x. A wrong schedule or
BatchNorm momentum moves them by orders of magnitude.
"""
import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from denseflow_jax import model as model_lib
from denseflow_jax import train_step
from denseflow_jax.convert import convert_state_dict, flax_location
from denseflow_jax.state_dict import flatten
from helpers import official_spec, step_settings

CHECKPOINTS = (1, 10, 20, 40)
SCHEDULE_STEPS = 40 if os.environ.get('DENSEFLOW_SLOW_TESTS') else 10
FACTOR = 3
BN_FACTOR = 10
# The attention output biases feed a BatchNorm: their gradient is rounding noise on either
# side, and so is where Adamax moves them (README). Left out of the parameter measures.
NOISE_ONLY = 'mha.out_transform.bias'


def nhwc(a):
  return jnp.asarray(np.moveaxis(a, 1, -1))


@pytest.fixture(scope='module')
def fixture(lockstep_dir):
  meta = json.loads((lockstep_dir / 'meta.json').read_text())
  spec = official_spec(meta)
  s0 = dict(np.load(lockstep_dir / 'state_dict_0.npz'))
  variables = convert_state_dict(s0, spec)
  flat = flatten(variables)
  for key, value in s0.items():      # our layout maps back onto theirs, entry for entry
    ours = official_view(flat, key, value.shape)
    assert ours is None or np.array_equal(ours, value), key
  argv = meta['optimizer']['argv']
  recipe = dict(zip(argv[::2], argv[1::2]))
  assert recipe['--optimizer'] == 'adamax' and meta['optimizer']['use_grad_norm'] == 0
  settings = step_settings(meta['steps_per_epoch'], lr=float(recipe['--lr']),
                           warmup_steps=int(recipe['--warmup']), gamma=float(recipe['--gamma']),
                           optimizer='adamax', grad_clip=0.0, ema_decay=0.0)
  return {'meta': meta, 'spec': spec, 's0': s0, 'variables': variables, 'settings': settings,
          'trajectory': dict(np.load(lockstep_dir / 'trajectory.npz')),
          'variant': np.load(lockstep_dir / 'variant_torch18.npz'),
          'index': np.load(lockstep_dir / 'sample_index.npz'),
          'summaries': {t: np.load(lockstep_dir / f'state_summary_{t}.npz') for t in CHECKPOINTS}}


def official_view(flat_ours, key, shape):
  """Our variable for the official state-dict `key`, in its layout; None for the buffers
  our code derives (convert.py's layout changes, undone)."""
  location = flax_location(key, len(shape))
  if location is None:
    return None
  collection, path, stack = location
  value = np.asarray(flat_ours['/'.join((collection,) + path)])
  value = value if stack is None else value[stack]
  if path[-1] == 'kernel':
    value = value.transpose(3, 2, 0, 1)          # [kh, kw, I, O] -> [O, I, kh, kw]
  return value.reshape(shape)


def recorded_noise(trajectory, i):
  """Step i's three official draws, in our noise structure (model.draw_noise)."""
  return {'dequantization': nhwc(trajectory['noise_0'][i]),
          'cross_unit': ((nhwc(trajectory['noise_1'][i]),), (nhwc(trajectory['noise_2'][i]),),
                         ())}


@pytest.fixture(scope='module')
def one_step(fixture):
  """train_step.train_step_fn with the recorded noise, jitted once for both parts: the lr
  of a step is ``lr_table[state.step]`` where ``feed`` is set (part a), else that of the
  default schedule of the settings (part b), computed in the step as training computes it.
  Compiled with XLA's optimisations on (the suite turns them off to compile faster): the
  unoptimised program took ~190 s per step on 2 cores, this one ~6 s."""
  model = model_lib.make_model(fixture['spec'])
  settings = fixture['settings']
  default = train_step.make_lr_schedule(settings)

  def step(state, batch, noise, lr_table, feed):
    schedule = lambda s: jnp.where(feed, lr_table[s], default(s))    # noqa: E731
    fn = train_step.train_step_fn(model, settings, schedule,
                                  noise_fn=lambda spec, key, batch_size: noise)
    return fn(state, batch, jax.random.PRNGKey(0))      # the key goes unused

  trajectory = fixture['trajectory']
  args = (initial_state(fixture), nhwc(trajectory['batch'][0]), recorded_noise(trajectory, 0),
          jnp.zeros(len(trajectory['loss']), jnp.float32), jnp.asarray(True))
  optimizations_off = jax.config.read('jax_disable_most_optimizations')
  jax.config.update('jax_disable_most_optimizations', False)
  try:
    return jax.jit(step, donate_argnums=0).lower(*args).compile()
  finally:
    jax.config.update('jax_disable_most_optimizations', optimizations_off)


def initial_state(fx):
  """The converted starting state S0 with a fresh Adamax state."""
  return train_step.create_train_state(jax.tree.map(jnp.asarray, fx['variables']),
                                       train_step.make_optimizer(fx['settings']))


def replay(fx, one_step, lr_table=None, steps=None):
  """The first `steps` (all 40) steps: (losses, lrs, {T: our state in the official layout}
  at the checkpoints reached, the last Adamax state). With `lr_table` the step runs at those
  lrs, else at our schedule's."""
  trajectory, losses, lrs, states = fx['trajectory'], [], [], {}
  feed = jnp.asarray(lr_table is not None)
  lr_table = jnp.asarray(np.zeros(len(trajectory['loss'])) if lr_table is None else lr_table,
                         jnp.float32)
  state = initial_state(fx)
  for i in range(steps or len(trajectory['loss'])):
    state, metrics = one_step(state, nhwc(trajectory['batch'][i]),
                              recorded_noise(trajectory, i), lr_table, feed)
    losses.append(float(metrics['train_bpd']))
    lrs.append(float(metrics['lr']))
    assert int(metrics['skipped']) == 0
    if i + 1 in CHECKPOINTS:
      flat = flatten(jax.device_get({'params': state.params, 'batch_stats': state.batch_stats}))
      states[i + 1] = {k: official_view(flat, k, v.shape) for k, v in fx['s0'].items()
                       if flax_location(k, v.ndim) is not None}
  return np.array(losses), np.array(lrs), states, jax.device_get(state.opt_state)


def official_reruns(meta):
  """The official code against itself, under two other float32 roundings (meta.json)."""
  return meta['noise_floor']['threads2'], meta['noise_floor']['no_mkldnn']


def loss_floor(meta):
  """The largest relative loss difference of those reruns over the 40 steps (4.5e-6)."""
  return max(run['loss_rel_diff_max'] for run in official_reruns(meta))


def floor(meta, measure, t, entries='params_stored_entries'):
  """The larger official-vs-itself figure of `measure` after step t. The main recording's
  step 1 ran at lr 0 (no parameter moved), so for parameters after step 1 the figure at
  step 10 stands in (the floor grows with the step)."""
  t = 10 if t == 1 and measure != 'bn_max_rel' else t
  figures = [run[entries][str(t)][measure] for run in official_reruns(meta)]
  return max(f[0] if isinstance(f, list) else f for f in figures)


def stored(summary, prefix, index, key, full_value):
  """(official stored entries of `key` after the step, the same entries of `full_value`)."""
  if f'{prefix}full/{key}' in summary:
    return summary[f'{prefix}full/{key}'].ravel(), full_value.ravel()
  return summary[f'{prefix}sampled/{key}'].ravel(), full_value.ravel()[index[key]]


def state_measures(fx, ours, summary, prefix, trainable):
  """The README's global measures of our state against one official state summary."""
  d2 = moved2 = whole_ours2 = whole_official2 = 0.0
  bn_worst = (0.0, '')
  for key, value in ours.items():
    official, mine = stored(summary, prefix, fx['index'], key, value.astype(np.float64))
    start = stored(summary, prefix, fx['index'], key, fx['s0'][key].astype(np.float64))[1]
    if key.endswith(('running_mean', 'running_var')):
      rel = np.max(np.abs(mine - official)) / np.max(np.abs(official))
      bn_worst = max(bn_worst, (rel, key))
    elif key in trainable and NOISE_ONLY not in key:
      d2 += np.sum((mine - official) ** 2)
      moved2 += np.sum((official - start) ** 2)
      whole_official2 += summary[f'{prefix}stats/{key}'][1] ** 2
      whole_ours2 += np.sum((value.astype(np.float64) - fx['s0'][key]) ** 2)
  return {'d': np.sqrt(d2), 'moved': np.sqrt(moved2), 'bn_max_rel': bn_worst,
          'whole_moved_rel': abs(np.sqrt(whole_ours2) / np.sqrt(whole_official2) - 1)
          if whole_official2 else np.sqrt(whole_ours2)}


def disagreements(fx, run, official, prefix):
  """Every measure outside FACTOR x its noise floor, as lines (empty: in lockstep), over
  the steps the run made."""
  meta, trainable = fx['meta'], set(fx['meta']['trainable_keys'])
  losses, lrs, states, _ = run
  official = {k: official[k][:len(losses)] for k in ('loss', 'lr')}
  bad = []
  loss_rel = np.abs(losses - official['loss']) / np.abs(official['loss'])
  limit = FACTOR * loss_floor(meta)
  for t in np.flatnonzero(loss_rel > limit)[:8]:
    bad.append(f'step {t + 1}: loss {losses[t]:.7f}, official {official["loss"][t]:.7f} '
               f'(rel {loss_rel[t]:.2e} > {limit:.2e})')
  # One float32 rounding of the official float64 lr.
  for t in np.flatnonzero(~np.isclose(lrs, official['lr'], rtol=1.2e-7, atol=0))[:8]:
    bad.append(f'step {t + 1}: lr {lrs[t]:.7g}, official {official["lr"][t]:.7g}')
  for t in sorted(states):
    summary = fx['summaries'][t] if prefix is None else fx['variant']
    m = state_measures(fx, states[t], summary, prefix(t) if prefix else '', trainable)
    limit = FACTOR * floor(meta, 'global_norm_rel', t)
    if not m['moved']:      # the official step did not move them (lr 0): nor may ours
      if m['d']:
        bad.append(f'after step {t}: parameters moved (||d|| = {m["d"]:.3g}); official: not')
    elif m['d'] / m['moved'] > limit:
      bad.append(f'after step {t}: parameters ||d|| / ||p_T - p_0|| = '
                 f'{m["d"] / m["moved"]:.3g} > {limit:.3g}')
    limit = FACTOR * floor(meta, 'global_norm_rel', t, entries='params')
    if m['whole_moved_rel'] > limit:
      bad.append(f'after step {t}: ||p_T - p_0|| over whole tensors off by '
                 f'{m["whole_moved_rel"]:.3g} (relative) > {limit:.3g}')
    limit = BN_FACTOR * floor(meta, 'bn_max_rel', t)
    if m['bn_max_rel'][0] > limit:
      bad.append(f'after step {t}: BatchNorm running statistics max|d|/max|p| = '
                 f'{m["bn_max_rel"][0]:.3g} > {limit:.3g} ({m["bn_max_rel"][1]})')
  return bad


def test_default_schedules_give_the_recorded_lr_sequences(fixture):
  """'official' is torch 1.8.1's sequence, 'official_torch2' the recorded torch 2.x one."""
  for kind, want in (('official', fixture['variant']['lr']),
                     ('official_torch2', fixture['trajectory']['lr'])):
    schedule = train_step.make_lr_schedule(dataclasses.replace(fixture['settings'],
                                                               lr_schedule=kind))
    got = np.asarray(schedule(jnp.arange(len(want))), np.float64)
    np.testing.assert_allclose(got, want, rtol=1.2e-7, atol=0, err_msg=kind)


def test_lockstep_with_the_recorded_lr(fixture, one_step):
  """(a) The recorded (torch 2.x) lr fed in: the step alone."""
  run = replay(fixture, one_step, lr_table=fixture['trajectory']['lr'])
  bad = disagreements(fixture, run, fixture['trajectory'], None)
  assert not bad, 'out of lockstep with the official run:\n' + '\n'.join(bad)


def test_lockstep_with_the_default_schedule(fixture, one_step):
  """(b) Our default schedule against the official run under torch 1.8.1 (the first
  SCHEDULE_STEPS steps)."""
  run = replay(fixture, one_step, steps=SCHEDULE_STEPS)
  assert sorted(run[2]) == [t for t in CHECKPOINTS if t <= SCHEDULE_STEPS]
  bad = disagreements(fixture, run, fixture['variant'], lambda t: f'T{t}/')
  assert not bad, 'out of lockstep with the official run (torch 1.8.1):\n' + '\n'.join(bad)
