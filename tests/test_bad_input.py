"""Bad input is refused with a message naming the problem and the fix, before anything
compiles, and nothing that exists is overwritten.

Tested elsewhere (not repeated here):
  image sizes the architecture cannot divide, zero / negative growth, block and layer
    counts, misspelled model keys      tests/test_model.py::test_bad_model_config_is_refused_before_anything_runs
  one-line CLI error for a bad model  tests/test_main.py::test_command_line_reports_bad_input_in_one_line
  global batch not dividing over the devices, bad train settings
                                      tests/test_train.py::test_batch_not_divisible_over_devices,
                                      ::test_bad_train_config_fails_before_anything_runs
  one bad value of every field of every config section (train, eval, sample, latent, fid,
    data, seed, checkpoint), missing / unknown fields, refused by every mode before it loads
                                      tests/test_settings.py
  a config that does not match the checkpoint in the workdir (refused, workdir untouched)
                                      tests/test_checkpoint.py::test_workdir_with_other_model_is_refused
  half-written / temporary checkpoint directories are never restored
                                      tests/test_checkpoint.py::test_incomplete_checkpoints_are_never_restored
  unprepared TFDS dataset             tests/test_data.py::test_unprepared_tfds_dataset_names_the_prepare_command
  npz with wrong keys / dtype / rank / channels / size / value range / no images
                                      tests/test_data.py::test_npz_errors
  images that do not fit the model config: one error naming every mismatch and the overrides
    that fix them all, from the command line too
                                      tests/test_own_data.py
  image folder with an unreadable file or mixed sizes, truncated image
                                      tests/test_data.py::test_folder_unreadable_file_and_mixed_sizes,
                                      ::test_folder_truncated_file_fails_on_read_naming_it
  official state dict with missing / extra / misshaped keys
                                      tests/test_parity.py::test_converter_names_missing_extra_and_misshaped_keys
"""
import pathlib
import shutil
import subprocess
import sys
import types

import jax
import numpy as np
import pytest

from denseflow_jax import errors
from denseflow_jax import checkpoint as ckpt_lib
from denseflow_jax import loading
from denseflow_jax import main as main_lib
from denseflow_jax import modes
from denseflow_jax import train
from denseflow_jax.errors import ConfigError
from helpers import fake_state, random_variables, tiny_config


ROOT = pathlib.Path(__file__).resolve().parents[1]


def snapshot(root):
  return {p: p.read_bytes() for p in sorted(pathlib.Path(root).rglob('*')) if p.is_file()}


def test_misspelled_config_key_on_the_command_line():
  proc = subprocess.run([sys.executable, '-m', 'denseflow_jax.main', '--config',
                         'configs/digits.py', '--mode', 'summary', '--config.train.batchsize=3'],
                        cwd=ROOT, capture_output=True, text=True, timeout=120)
  print(proc.stderr)
  assert proc.returncode != 0
  assert 'error: unknown config field in --config.train.batchsize' in proc.stderr
  assert 'Did you mean "batch_size"' in proc.stderr
  assert 'Traceback' not in proc.stderr


def test_workdir_that_cannot_be_written(tmp_path, make_config):
  # Tests run as root, where chmod does not stop writes: the parent is a regular file.
  blocker = tmp_path / 'file.txt'
  blocker.write_text('keep me')
  for mode in ('train', 'eval', 'sample'):
    with pytest.raises(ConfigError, match=r'cannot be created: .*file\.txt is a file, not a '
                                          r'directory; choose another --workdir') as info:
      modes.run(mode, make_config(base='digits'), str(blocker / 'run'))
  print(info.value)
  assert blocker.read_text() == 'keep me'


@pytest.mark.parametrize('field, value, message', [
    ('temperature', 0.0, 'sample.temperature must be positive, got 0.0'),
    ('temperature', -1.0, 'sample.temperature must be positive, got -1.0'),
    ('num', 0, 'sample.num must be at least 1, got 0'),
])
def test_sample_settings_are_checked_before_loading(tmp_path, field, value, message,
                                                     make_config):
  config = make_config(base='digits')
  config.sample[field] = value
  # The workdir holds no checkpoint: loading first would raise CheckpointError instead.
  with pytest.raises(ConfigError, match=message) as info:
    modes.run('sample', config, str(tmp_path / 'run'))
  print(info.value)
  assert not (tmp_path / 'run').exists()


@pytest.fixture
def two_checkpoints(tmp_path):
  config = tiny_config()
  checkpointer = ckpt_lib.TrainCheckpointer(tmp_path, keep=3, async_save=False)
  state = fake_state(random_variables())
  checkpointer.save(2, state, {}, config, {'phase': 'pretrain'})
  checkpointer.save(4, state, {}, config, {'phase': 'pretrain'})
  checkpointer.close()
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                          state)
  return tmp_path, config, state, abstract


def test_truncated_checkpoint_names_the_path_and_the_fallback(two_checkpoints):
  workdir, _, state, abstract = two_checkpoints
  step_dir = workdir / ckpt_lib.CHECKPOINTS_DIR / '4'
  for f in (step_dir / 'state').rglob('*'):
    if f.is_file() and f.parent.name == 'd':      # the OCDBT data files
      f.write_bytes(f.read_bytes()[:f.stat().st_size // 2])
  before = snapshot(workdir)
  checkpointer = ckpt_lib.TrainCheckpointer(workdir)
  with pytest.raises(errors.CheckpointError) as info:
    checkpointer.restore(checkpointer.latest_step(), abstract)
  message = str(info.value)
  print(message[:300], '...', message[-200:])
  assert f'checkpoint {step_dir}' in message and 'damaged' in message
  assert f'Move {step_dir} out of' in message and 'previous complete checkpoint (step 2)' in message
  assert snapshot(workdir) == before
  # The fix the message gives: without step 4, step 2 is restored.
  shutil.move(step_dir, workdir / 'step4-damaged')
  checkpointer = ckpt_lib.TrainCheckpointer(workdir)
  assert checkpointer.latest_step() == 2
  restored, _, _ = checkpointer.restore(2, abstract)
  np.testing.assert_array_equal(restored.params['prior']['loc'], state.params['prior']['loc'])


def test_eval_which_best_without_best_or_beside_config_checkpoint(two_checkpoints):
  workdir, config, _, _ = two_checkpoints
  config.eval.which = 'best'
  with pytest.raises(errors.CheckpointError, match='no best model in .*best: training writes '
                     'it .*Use --config.eval.which=latest'):
    loading.load_model(config, str(workdir), use_ema=False, which='best')
  with pytest.raises(errors.CheckpointError, match='no checkpoint in .*empty: train first'):
    loading.load_model(config, str(workdir / 'empty'), use_ema=False, which='best')
  config.checkpoint = str(workdir)
  with pytest.raises(ConfigError, match='--config.eval.which=best reads .* but '
                     '--config.checkpoint=.* names other variables: drop one'):
    modes.run('eval', config, str(workdir))


def test_garbled_checkpoint_config_is_refused_before_anything_runs(two_checkpoints):
  workdir, config, _, _ = two_checkpoints
  step_dir = workdir / ckpt_lib.CHECKPOINTS_DIR / '4'
  for f in (step_dir / 'config').iterdir():
    f.write_bytes(b'\x8b{garbage' + f.read_bytes()[7:])
  before = snapshot(workdir)
  with pytest.raises(errors.CheckpointError) as info:
    train.train_and_evaluate(config, workdir)
  message = str(info.value)
  print(message)
  assert f'checkpoint {step_dir} cannot be read' in message
  assert f'Move {step_dir} out of' in message and 'previous complete checkpoint (step 2)' in message
  assert snapshot(workdir) == before


def test_every_error_of_ours_shares_one_base_that_main_prints_in_one_line(monkeypatch, capsys):
  """main catches errors.DenseFlowError: whichever of our errors a mode raises, the user sees
  one 'error:' line and a non-zero exit, never a traceback."""
  classes = [c for c in vars(errors).values()
             if isinstance(c, type) and issubclass(c, Exception) and c.__module__ == errors.__name__]
  assert len(classes) >= 9
  assert all(issubclass(c, errors.DenseFlowError) for c in classes)
  for name, value in (('_MODE', 'train'), ('_CONFIG', None), ('_WORKDIR', None),
                      ('_MULTIHOST', False)):
    monkeypatch.setattr(main_lib, name, types.SimpleNamespace(value=value))
  for cls in classes:
    if cls is errors.TrainingInterrupted:
      continue
    def fail(*args, cls=cls):
      raise cls(f'{cls.__name__} message; set --config.x to fix it')
    monkeypatch.setattr(modes, 'run', fail)
    with pytest.raises(SystemExit) as info:
      main_lib.main(['main'])
    assert str(info.value.code) == f'error: {cls.__name__} message; set --config.x to fix it'
