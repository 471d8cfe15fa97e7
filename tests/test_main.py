"""`python -m denseflow_jax.main` end to end on tiny models: train a few steps (digits,
and CIFAR-10 through TFDS under `tfds.testing.mock_data`), resume, evaluate, sample."""
import json
import pathlib
import subprocess
import sys

import jax
import numpy as np
from PIL import Image
import pytest

from denseflow_jax import loading, metrics_log, modes, outputs, sampling, training_data
from helpers import GLOW, tiny_config

ROOT = pathlib.Path(__file__).resolve().parents[1]


def tiny(base, dataset, image_shape, num_bits):
  """configs/<base>.py with the tiny Glow model and a schedule that runs in seconds."""
  return tiny_config({
      **GLOW, 'data.dataset': dataset, 'model.image_shape': image_shape,
      'model.num_bits': num_bits, 'train.batch_size': 8, 'train.num_steps': 3,
      'train.warmup_steps': 2, 'train.log_every': 1, 'train.checkpoint_every_steps': 2,
      'eval.batch_size': 8, 'eval.num_examples': 16, 'eval.k': 2, 'eval.k_chunk': 2,
      'sample.num': 4, 'sample.batch_size': 4}, base=base)


def assert_tensorboard_matches_metrics(workdir):
  """Every numeric (field, step) of metrics.jsonl's metrics records is in the TensorBoard
  event files, with its value, and nothing else is: reruns and resumes neither lose nor
  duplicate a point. (Event records, the run's story, do not go to TensorBoard.)"""
  from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
  want = {}
  for record in metrics_log.read_metrics(workdir):
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
             if line.startswith(('starting', 'compil', 'finished', 'already', 'resuming',
                                 'step '))]
    assert [' '.join(line.split(' ')[:2]) for line in story] == [
        'starting a', 'compiling the', 'compiled the', 'step 3:', 'step 3:', 'finished 3',
        'already finished', 'resuming from', 'compiling the', 'compiled the', 'step 4:',
        'step 4:', 'finished 4'], story
    assert story[3] == 'step 3: evaluating (the first evaluation compiles)...'
    assert story[4].startswith('step 3: test_bpd ')
    # The second run's compile notice is the first run's compile time.
    first_compile = float(story[2].split(' in ')[1].split()[0])
    assert story[8] == (f'compiling the train step (took {first_compile:.0f} s last time in '
                        'this workdir)...')
    story = [line for line in story if not line.startswith(('step ', 'compiling'))]
    assert story[2].startswith('finished 3 steps') and 'last test_bpd' in story[2]
    assert story[3].startswith('already finished at step 3 of 3: nothing to do')
    assert story[4].startswith('resuming from step 3 of 4 (checkpoint ')
    # ... and metrics.jsonl keeps the same story, each line as an event record.
    events = metrics_log.read_events(workdir)
    assert [e['message'] for e in events] == [
        line for line in story if not line.startswith('step ')]
    assert [(e['event'], e['step']) for e in events] == [
        ('start', 0), ('compiled', 1), ('finish', 3), ('already_finished', 3), ('resume', 3),
        ('compiled', 4), ('finish', 4)]
  records = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  steps = [r['step'] for r in records if 'train_bpd' in r]
  assert steps == sorted(set(steps)) and max(steps) <= 4, steps   # no step trained twice
  assert_tensorboard_matches_metrics(workdir)

  result = modes.run('eval', config, str(workdir))
  assert np.isfinite(result['elbo_bpd']) and np.isfinite(result['iwbo_bpd'])
  # The eval JSON says what it evaluated, and its name carries which parameters.
  want = {'step': 4, 'which': 'latest', 'parameters': 'raw', 'k': 2, 'seed': config.seed,
          'num_examples': 16, 'checkpoint': str(workdir)}
  assert {key: result[key] for key in want} == want
  first = workdir / 'eval_test_k2_latest_raw.json'
  assert json.loads(first.read_text()) == result
  # WORKDIR/best: the parameters of the lowest periodic test bits/dim in metrics.jsonl.
  # Evaluated twice: a new file each time; no run replaces an earlier result.
  evals = [(r['test_bpd'], r['step']) for r in records if 'test_bpd' in r]
  config.eval.use_ema, config.eval.which = False, 'best'
  best = modes.run('eval', config, str(workdir))
  assert (best['which'], best['step'], best['parameters']) == ('best', min(evals)[1], 'raw')
  modes.run('eval', config, str(workdir))
  assert json.loads(first.read_text()) == result
  assert json.loads((workdir / 'eval_test_k2_best_raw.json').read_text()) == best
  assert (workdir / 'eval_test_k2_best_raw-2.json').exists()
  config.eval.use_ema, config.eval.which = None, 'latest'       # the defaults again

  images = modes.run('sample', config, str(workdir))
  assert images.shape == (4, *config.model.image_shape)
  assert (workdir / 'samples' / 'samples_T1_n4_latest_raw.png').exists()
  # One way to sample: the library call with the same seed gives the same images, whatever
  # its batch size (image n uses fold_in(key, n)).
  model, variables, _ = loading.load_model(config, str(workdir), config.eval.use_ema)
  library = sampling.sample_images(model, variables, jax.random.PRNGKey(config.seed), 4,
                                   config.sample.temperature, batch_size=3)
  np.testing.assert_array_equal(images, library)
  modes.run('sample', config, str(workdir))      # again: numbered, the first grid is kept
  assert sorted(p.name for p in (workdir / 'samples').glob('samples_T1_n4*')) == [
      'samples_T1_n4_latest_raw-2.npz', 'samples_T1_n4_latest_raw-2.png',
      'samples_T1_n4_latest_raw.npz', 'samples_T1_n4_latest_raw.png']
  return ckpts


def test_digits_train_resume_eval_sample(tmp_path, capsys):
  config = tiny('digits', 'digits', (8, 8, 1), 5)
  ckpts = run_all_modes(config, tmp_path, capsys)
  assert ckpts, 'no checkpoint written'
  # The defaults agree (train.ema_decay=0 keeps no EMA parameters, eval.use_ema unset follows
  # the run): the modes took the raw parameters (their files say so) and printed no note.
  assert 'note:' not in capsys.readouterr().err
  # Training recorded the digits' top level (16 of the 5-bit model's 31), load_model reads
  # it back without the data, and --mode sample's grid shows level 16 as white.
  assert json.loads((tmp_path / training_data.DATA_RECORD_FILE).read_text())['top_level'] == 16
  assert loading.load_model(config, str(tmp_path), True)[2]['data_top_level'] == 16
  # Asking for the EMA parameters (eval.use_ema=True) of this run says there are none.
  note = (f'note: eval.use_ema=True but {tmp_path} holds no EMA parameters (trained with '
          'train.ema_decay=0); using the raw parameters')
  assert capsys.readouterr().err.splitlines() == [note]
  with np.load(tmp_path / 'samples' / 'samples_T1_n4_latest_raw.npz') as f:
    images = f['images']                                   # the raw levels, unscaled
  picture = np.asarray(Image.open(tmp_path / 'samples' / 'samples_T1_n4_latest_raw.png'))
  want = outputs.make_grid(images, 5, top=16)[..., 0]
  scale = picture.shape[1] // want.shape[1]
  np.testing.assert_array_equal(picture[::scale, ::scale], want)
  assert not np.array_equal(want, outputs.make_grid(images, 5)[..., 0])   # not 31 -> 255


def test_cifar10_through_tfds_mock_data(tmp_path):
  tfds = pytest.importorskip('tensorflow_datasets')
  config = tiny('cifar10', 'cifar10', (32, 32, 3), 8)
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


def test_multihost_is_refused_for_modes_that_are_not_split_over_processes(tmp_path):
  proc = subprocess.run([sys.executable, '-m', 'denseflow_jax.main', '--config',
                         'configs/digits.py', '--mode', 'eval', '--multihost',
                         f'--workdir={tmp_path}'],
                        cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert proc.returncode != 0
  assert proc.stderr.strip() == ('error: --multihost is for --mode train; run --mode eval on '
                                 'one host, without --multihost (it reads the shared --workdir)')


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
  # The configs' folder in full: the help is read from any working directory.
  for word in ('--mode', 'train', 'eval', 'interpolate', f'in {ROOT / "configs"}: ',
               'cifar10.py', 'digits.py', '--config.eval.k', '--config.train.batch_size'):
    assert word in proc.stdout, word


def test_positional_mode_and_empty_workdir_are_one_line_errors(tmp_path):
  proc = _cli(['--config', 'configs/digits.py', 'eval'])
  assert proc.returncode != 0 and 'Traceback' not in proc.stderr
  assert "did you mean --mode eval?" in proc.stderr
  proc = _cli(['--config', 'configs/digits.py', '--workdir', str(tmp_path), '--mode', 'eval'])
  assert proc.returncode != 0 and 'Traceback' not in proc.stderr
  assert f'error: no checkpoint in {tmp_path}: train first' in proc.stderr
