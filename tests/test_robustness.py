"""Nothing lost: real training processes killed (SIGKILL) at random points, during steps
and during checkpoint saves, and restarted each time, end with exactly the parameters of
an uninterrupted run; SIGTERM / Ctrl-C stop cleanly after a checkpoint and say how to
resume; no checkpoint ever holds a non-finite value.

Every subprocess shares one JAX persistent compilation cache (this module's own; the
thresholds from conftest.py), so only the first one compiles; the others still pay ~8 s of
imports each.
"""
import json
import os
import pathlib
import random
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from sklearn.datasets import load_digits

from denseflow_jax import checkpoint as ckpt_lib
from denseflow_jax import errors
from denseflow_jax import sharding
from denseflow_jax import metrics_log
from denseflow_jax import train
from denseflow_jax import train_step
from denseflow_jax.settings import TrainSettings
from denseflow_jax.spec import spec_from_config
from helpers import train_config, train_iterator

ROOT = pathlib.Path(__file__).resolve().parents[1]
NUM_STEPS = 12
OVERRIDES = [
    '--config.model.block_config=(2,)', '--config.model.layers_config=(1,)',
    '--config.model.mid_channels=(8,)', '--config.model.growth_rate=2',
    '--config.model.glow_channels=8', '--config.train.batch_size=8',
    f'--config.train.num_steps={NUM_STEPS}', '--config.train.warmup_steps=2',
    '--config.train.log_every=1', '--config.train.checkpoint_every_steps=2',
    '--config.train.keep_checkpoints=2', '--config.eval.batch_size=8',
    '--config.eval.num_examples=8', '--config.sample.num=4', '--config.sample.batch_size=4']
KILLS = 6


@pytest.fixture(scope='module')
def env(tmp_path_factory):
  # The run's settings from os.environ (conftest.py), but a cache of this module's own: a
  # process killed while writing an entry leaves it truncated, and no other test should
  # meet that entry.
  return dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.mktemp('jax_cache')),
              PYTHONUNBUFFERED='1')


def command(workdir):
  return [sys.executable, '-m', 'denseflow_jax.main', '--config', 'configs/digits.py',
          '--workdir', str(workdir), *OVERRIDES]


def start(workdir, env):
  log = open(pathlib.Path(str(workdir) + '.log'), 'ab')   # pylint: disable=consider-using-with
  proc = subprocess.Popen(command(workdir), cwd=ROOT, env=env, stdout=log,
                          stderr=subprocess.STDOUT)
  log.close()
  return proc


def metrics_lines(workdir):
  path = pathlib.Path(workdir) / metrics_log.METRICS_FILE
  lines = path.read_text().splitlines() if path.exists() else []
  return [line for line in lines if '"event"' not in line]     # metrics records only


def final_state(workdir):
  checkpointer = ckpt_lib.TrainCheckpointer(workdir)
  step = checkpointer.latest_step()
  return step, checkpointer.restore_raw_state(step)


def assert_same_state(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(la) == len(lb)
  for x, y in zip(la, lb):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-6)


@pytest.fixture(scope='module')
def straight(env, tmp_path_factory):
  """The uninterrupted run (also fills the compilation cache)."""
  workdir = tmp_path_factory.mktemp('straight') / 'run'
  proc = start(workdir, env)
  assert proc.wait(timeout=240) == 0, pathlib.Path(str(workdir) + '.log').read_text()[-3000:]
  return workdir


def _saving_steps(directory):
  """Steps orbax is writing now (temporary '<step>.orbax-checkpoint-tmp-*' directories)."""
  try:
    return [int(e.name.split('.')[0]) for e in os.scandir(directory)
            if 'orbax-checkpoint-tmp' in e.name and e.name.split('.')[0].isdigit()]
  except FileNotFoundError:
    return []


def test_sigkill_at_random_points_loses_nothing(env, straight, tmp_path):
  seed = int(time.time())
  rng = random.Random(seed)
  workdir = tmp_path / 'run'
  ckpt_dir = workdir / ckpt_lib.CHECKPOINTS_DIR
  kills = []     # (kind, target step, metrics lines when killed, complete checkpoints after)
  while len(kills) < KILLS:
    latest = ckpt_lib.TrainCheckpointer(workdir).latest_step() or 0
    kind = 'save' if len(kills) % 2 == 0 else 'step'
    if kind == 'save':    # kill while orbax writes checkpoint `target` (2, 4 or 6 steps on)
      target = min(NUM_STEPS, latest + 2 * rng.randint(1, 3))
    else:                 # kill a random 0-0.15 s after step `target` was logged
      target = min(NUM_STEPS - 2, latest + rng.randint(1, 4))
    delay = rng.uniform(0.0, 0.15)
    proc = start(workdir, env)
    trained_at = None
    while proc.poll() is None:
      if kind == 'save':
        if any(step >= target for step in _saving_steps(ckpt_dir)):
          break
        time.sleep(0.001)
      else:
        if trained_at is None and len(metrics_lines(workdir)) >= target:
          trained_at = time.monotonic()
        if trained_at is not None and time.monotonic() - trained_at >= delay:
          break
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, (
        f'seed {seed}: the run ended before kill {len(kills) + 1} ({kind} at {target}): '
        f'{kills}')
    kills.append((kind, target, len(metrics_lines(workdir)),
                  ckpt_lib.TrainCheckpointer(workdir).all_steps()))
  proc = start(workdir, env)
  assert proc.wait(timeout=120) == 0, pathlib.Path(str(workdir) + '.log').read_text()[-3000:]
  print(f'{len(kills)} of {len(kills)} SIGKILLs survived (seed {seed}; kind, target step, '
        f'metrics lines, complete checkpoints after the kill): {kills}')

  step, state = final_state(workdir)
  step_ref, state_ref = final_state(straight)
  assert step == step_ref == NUM_STEPS
  assert_same_state(state, state_ref)
  records = [json.loads(line) for line in metrics_lines(workdir) if 'train_bpd' in line]
  ref = [json.loads(line) for line in metrics_lines(straight) if 'train_bpd' in line]
  assert [r['step'] for r in records] == list(range(1, NUM_STEPS + 1))
  assert [r['train_bpd'] for r in records] == pytest.approx([r['train_bpd'] for r in ref],
                                                            rel=1e-6)


def _interrupt(workdir, env, sig):
  proc = start(workdir, env)
  lines = len(metrics_lines(workdir))
  while proc.poll() is None and len(metrics_lines(workdir)) <= lines:
    time.sleep(0.005)
  proc.send_signal(sig)
  proc.wait(timeout=120)
  return proc.returncode, pathlib.Path(str(workdir) + '.log').read_text()


def test_sigterm_and_ctrl_c_checkpoint_and_say_how_to_resume(env, straight, tmp_path):
  workdir = tmp_path / 'run'
  rc, log = _interrupt(workdir, env, signal.SIGTERM)
  assert rc == 0, log[-3000:]
  assert 'training stopped by SIGTERM after step' in log, log[-3000:]
  assert 'resume: ' in log and f'--workdir {workdir}' in log
  stopped = int(log.split('training stopped by SIGTERM after step ')[1].split(';')[0])
  assert 0 < stopped < NUM_STEPS
  assert ckpt_lib.TrainCheckpointer(workdir).latest_step() == stopped

  rc, log = _interrupt(workdir, env, signal.SIGINT)
  assert rc == 130, log[-3000:]
  assert 'training stopped by SIGINT after step' in log
  resumed = int(log.split('training stopped by SIGINT after step ')[1].split(';')[0])
  assert stopped < resumed < NUM_STEPS
  assert ckpt_lib.TrainCheckpointer(workdir).latest_step() == resumed

  proc = start(workdir, env)                  # the same command resumes and finishes
  assert proc.wait(timeout=120) == 0
  step, state = final_state(workdir)
  assert step == NUM_STEPS
  assert_same_state(state, final_state(straight)[1])
  # metrics.jsonl tells the same story as the console, interruptions included.
  events = metrics_log.read_events(workdir)
  # Each run also records when its train step had compiled (after its first step).
  assert [(e['event'], e['step']) for e in events] == [
      ('start', 0), ('compiled', 1), ('interrupt', stopped), ('resume', stopped),
      ('compiled', stopped + 1), ('interrupt', resumed), ('resume', resumed),
      ('compiled', resumed + 1), ('finish', NUM_STEPS)], events
  assert 'training stopped by SIGINT' in events[5]['message']
  print(f'SIGTERM after step {stopped}, SIGINT after step {resumed}, resumed to {NUM_STEPS}')


def test_nonfinite_steps_are_logged_and_never_checkpointed(tmp_path):
  """Every step non-finite but fewer than train.max_nonfinite_in_row: each skipped update
  is logged with its step, and the checkpoint at step 2 is refused (the parameters are not
  finite), so no checkpoint ever holds a non-finite value."""
  images = load_digits().images.astype(np.uint8)[:, :, :, None]
  np.savez(tmp_path / 'digits.npz', train=images[:48], test=images[48:64])
  config = train_config(str(tmp_path / 'digits.npz'))   # test_train's model: compiled once
  spec = spec_from_config(config.model)
  mesh = sharding.make_mesh()
  iterator = train_iterator(config)
  init, _ = train_step.make_state_init(spec, TrainSettings.from_config(config), mesh,
                                       iterator.steps_per_epoch)
  batch = next(iterator)
  variables = jax.tree.map(np.array, jax.device_get(
      init(jax.random.PRNGKey(0), sharding.global_batch(batch, mesh))))
  variables['params']['prior']['log_scale'][:] = np.nan
  ckpt_lib.save_variables(tmp_path / 'bad', variables, config)
  config.checkpoint = str(tmp_path / 'bad')
  config.train.max_nonfinite_in_row = 10
  config.train.checkpoint_every_steps = 2
  with pytest.raises(errors.NonFiniteError, match='refusing to checkpoint step 2: the '
                                                 'parameters are not finite') as info:
    train.train_and_evaluate(config, tmp_path / 'run')
  print(info.value)
  assert ckpt_lib.TrainCheckpointer(tmp_path / 'run').latest_step() is None
  records = [json.loads(line) for line in metrics_lines(tmp_path / 'run')]
  assert [(r['step'], r['skipped'], r['skipped_steps'], r['skipped_total'])
          for r in records] == [(1, 1, [1], 1), (2, 1, [2], 2)]
