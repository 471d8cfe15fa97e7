"""`python -m denseflow_jax.main` end to end on tiny models: train a few steps (digits,
and CIFAR-10 through TFDS under `tfds.testing.mock_data`), resume, evaluate, sample."""
import importlib
import json
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from denseflow_jax import checkpoint, evaluate, modes

ROOT = pathlib.Path(__file__).resolve().parents[1]


def tiny(config, image_shape, num_bits):
  """Shrink a config's model and schedule so that a run compiles in seconds."""
  m = config.model
  m.image_shape, m.num_bits = image_shape, num_bits
  m.block_config, m.layers_config, m.mid_channels, m.growth_rate = (2,), (1,), (8,), 2
  m.coupling_net, m.glow_channels, m.dequantization = 'glow', 8, 'uniform'
  config.train.batch_size = 8
  config.train.num_steps = 3
  config.train.warmup_steps = 2
  config.train.log_every = 1
  config.train.checkpoint_every_steps = 2
  config.eval.batch_size = 8
  config.eval.num_examples = 16
  config.eval.k = 2
  config.eval.k_chunk = 2
  config.sample.num = 4
  config.sample.batch_size = 4
  return config


def assert_tensorboard_matches_metrics(workdir):
  """Every numeric (field, step) of metrics.jsonl is in the TensorBoard event files, with its
  value, and nothing else is: reruns and resumes neither lose nor duplicate a point."""
  from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
  want = {}
  for line in (workdir / 'metrics.jsonl').read_text().splitlines():
    record = json.loads(line)
    for key, value in record.items():
      if key != 'step' and isinstance(value, (int, float)) and not isinstance(value, bool):
        want.setdefault((key, record['step']), []).append(float(value))
  events = EventAccumulator(str(workdir / 'tensorboard')).Reload()
  got = {}
  for tag in events.Tags()['scalars']:
    steps = [event.step for event in events.Scalars(tag)]
    assert len(steps) == len(set(steps)), f'{tag} has a step twice: {steps}'
    for event in events.Scalars(tag):
      got.setdefault((tag.split('/', 1)[1], event.step), []).append(event.value)
  assert got.keys() == want.keys()
  for key, values in want.items():
    assert sorted(got[key]) == pytest.approx(sorted(values), rel=1e-6), key


def run_all_modes(config, workdir, capsys=None):
  modes.run('train', config, str(workdir))
  ckpts = sorted(p.name for p in (workdir / 'checkpoints').iterdir())
  records = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  train_bpd = [r['train_bpd'] for r in records if 'train_bpd' in r]
  assert train_bpd and all(np.isfinite(train_bpd))

  # Running the finished command again changes nothing (nothing logged is lost) ...
  modes.run('train', config, str(workdir))
  assert_tensorboard_matches_metrics(workdir)
  # ... and a second invocation with more steps resumes from the checkpoint of step 3.
  config.train.num_steps = 4
  modes.run('train', config, str(workdir))
  if capsys is not None:        # the story of the three runs on the console
    story = [line for line in capsys.readouterr().out.splitlines()
             if line.startswith(('starting', 'finished', 'already', 'resuming', 'step '))]
    assert [line.split(' ')[0] for line in story] == [
        'starting', 'step', 'finished', 'already', 'resuming', 'step', 'finished'], story
    assert story[2].startswith('finished 3 steps') and 'last test_bpd' in story[2]
    assert story[3].startswith('already finished at step 3 of 3: nothing to do')
    assert story[4].startswith('resuming from step 3 of 4 (checkpoint ')
  records = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  steps = [r['step'] for r in records if 'train_bpd' in r]
  assert steps == sorted(set(steps)) and max(steps) <= 4, steps   # no step trained twice
  assert_tensorboard_matches_metrics(workdir)

  result = modes.run('eval', config, str(workdir))
  assert np.isfinite(result['elbo_bpd']) and np.isfinite(result['iwbo_bpd'])
  assert (workdir / 'eval_test_k2.json').exists()
  images = modes.run('sample', config, str(workdir))
  assert images.shape == (4, *config.model.image_shape)
  assert list((workdir / 'samples').glob('samples_T1_n4.png'))
  # One way to sample: the library call with the same seed gives the same images, whatever
  # its batch size (image n uses fold_in(key, n)).
  model, variables, _ = checkpoint.load_model(config, str(workdir), config.eval.use_ema)
  library = evaluate.sample_images(model, variables, jax.random.PRNGKey(config.seed), 4,
                                   config.sample.temperature, batch_size=3)
  np.testing.assert_array_equal(images, library)
  return ckpts


def test_digits_train_resume_eval_sample(tmp_path, capsys):
  config = tiny(importlib.import_module('configs.digits').get_config(), (8, 8, 1), 5)
  ckpts = run_all_modes(config, tmp_path, capsys)
  assert ckpts, 'no checkpoint written'


def test_cifar10_through_tfds_mock_data(tmp_path):
  tfds = pytest.importorskip('tensorflow_datasets')
  config = tiny(importlib.import_module('configs.cifar10').get_config(), (32, 32, 3), 8)
  config.data.augmentation = 'eta'
  with tfds.testing.mock_data(num_examples=24):
    run_all_modes(config, tmp_path)


def test_command_line_reports_bad_input_in_one_line():
  proc = subprocess.run([sys.executable, '-m', 'denseflow_jax.main', '--config',
                         'configs/cifar10.py', '--mode', 'summary',
                         '--config.model.growth_rate=-1'],
                        cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert proc.returncode != 0
  assert 'error: model.growth_rate must be positive' in proc.stderr
  assert 'Traceback' not in proc.stderr


def test_configs_load_from_any_working_directory(tmp_path):
  """A config file finds its sibling default.py whatever the working directory."""
  proc = subprocess.run([sys.executable, '-m', 'denseflow_jax.main',
                         f'--config={ROOT / "configs" / "digits.py"}', '--mode', 'summary'],
                        cwd=tmp_path, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr
  assert 'total' in proc.stdout


def test_missing_config_file_is_one_line(tmp_path):
  proc = subprocess.run([sys.executable, '-m', 'denseflow_jax.main', '--config',
                         'configs/nonexistent.py', '--mode', 'summary'],
                        cwd=tmp_path, capture_output=True, text=True, timeout=120)
  assert proc.returncode != 0
  assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]      # one line
  assert 'error: --config configs/nonexistent.py: no such file' in proc.stderr
  assert 'cifar10.py' in proc.stderr                                     # names the configs


def _cli(args, cwd=ROOT):
  return subprocess.run([sys.executable, '-m', 'denseflow_jax.main', *args], cwd=cwd,
                        capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize('flag', ['-h', '--help'])
def test_help_lists_modes_configs_and_overrides(flag):
  proc = _cli([flag])
  assert proc.returncode == 0, proc.stderr
  for word in ('--mode', 'train', 'eval', 'interpolate', 'configs/cifar10.py',
               'configs/digits.py', '--config.eval.k', '--config.train.batch_size'):
    assert word in proc.stdout, word


def test_positional_mode_and_empty_workdir_are_one_line_errors(tmp_path):
  proc = _cli(['--config', 'configs/digits.py', 'eval'])
  assert proc.returncode != 0 and 'Traceback' not in proc.stderr
  assert "did you mean --mode eval?" in proc.stderr
  proc = _cli(['--config', 'configs/digits.py', '--workdir', str(tmp_path), '--mode', 'eval'])
  assert proc.returncode != 0 and 'Traceback' not in proc.stderr
  assert f'error: no checkpoint in {tmp_path}: train first' in proc.stderr
