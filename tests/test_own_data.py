"""Own data in one try (issue #21): images that do not fit the model config are one error
naming every mismatch with the overrides that fix them all, those overrides work, and an
unprepared TFDS data set is one error line with nothing logged before it."""
import dataclasses
import logging
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from configs import digits
from denseflow_jax import data, errors
from denseflow_jax.data import tfds_source
from denseflow_jax.spec import spec_from_config
from helpers import tiny_config

ROOT = pathlib.Path(__file__).resolve().parents[1]
DIGITS = spec_from_config(digits.get_config().model)        # 8x8x1, 5 bits, 2 blocks
ISSUE_ERROR = ('does not fit the model config: images are 16x16x3 but model.image_shape = '
               '(8, 8, 1); values reach 254 but model.num_bits = 5 allows 0..31. Add: '
               '--config.model.image_shape=16,16,3 --config.model.num_bits=8')


@pytest.fixture
def rgb16_npz(tmp_path):
  """The issue's data: 16x16 RGB images with values up to 254."""
  images = np.random.default_rng(0).integers(0, 255, (20, 16, 16, 3), dtype=np.uint8)
  assert images.max() == 254
  path = tmp_path / 'mine.npz'
  np.savez(path, train=images[:16], test=images[16:])
  return path


def npz_data(path):
  return tiny_config({'data.dataset': 'npz', 'data.source': str(path)}).data


def suggested(message):
  """{field: value} of the overrides after 'Add: ', parsed as the command line parses them
  (tests/test_own_data.py::test_command_line_... runs them through the command line)."""
  fields = {}
  for flag in message.split('Add: ', 1)[1].split():
    name, value = flag.removeprefix('--config.model.').split('=')
    fields[name] = tuple(int(v) for v in value.split(',')) if ',' in value else int(value)
  return fields


def test_one_error_lists_every_mismatch_and_its_overrides_fit(rgb16_npz):
  with pytest.raises(errors.DataError) as info:
    data.load_split(npz_data(rgb16_npz), 'train', model=DIGITS)
  message = str(info.value)
  assert message == f"data.source {rgb16_npz} key 'train' {ISSUE_ERROR}"
  fixed = dataclasses.replace(DIGITS, **suggested(message))
  assert (fixed.image_shape, fixed.num_bits) == ((16, 16, 3), 8)
  for split in ('train', 'test'):
    assert data.load_split(npz_data(rgb16_npz), split, model=fixed)[0].shape == (16, 16, 3)


def test_overrides_the_model_would_refuse_are_not_suggested(tmp_path):
  """18x18 cannot pass the digits model's two blocks (multiples of 4): the message says so
  instead of suggesting image_shape=18,18,1."""
  path = tmp_path / 'odd.npz'
  np.savez(path, train=np.zeros((2, 18, 18, 1), np.uint8), test=np.zeros((2, 18, 18, 1),
                                                                        np.uint8))
  with pytest.raises(errors.DataError) as info:
    data.load_split(npz_data(path), 'train', model=DIGITS)
  message = str(info.value)
  assert 'images are 18x18x1 but model.image_shape = (8, 8, 1)' in message
  assert message.endswith(
      '--config.model.image_shape=18,18,1 would not be enough: model.image_shape 18x18 cannot '
      'be divided by the 2-block multi-scale architecture: height and width must be multiples '
      'of 4; resize the images or use fewer blocks')
  assert 'Add:' not in message
  # Without the ModelSpec (image_shape and num_bits only) nothing more is known.
  with pytest.raises(errors.DataError, match=r'Add: --config.model.image_shape=18,18,1$'):
    data.load_split(npz_data(path), 'train', (8, 8, 1), 5)
  with pytest.raises(TypeError, match='not both'):
    data.load_split(npz_data(path), 'train', (8, 8, 1), model=DIGITS)


def test_digits_names_the_bits_it_needs():
  with pytest.raises(errors.DataError, match=r'values reach 16 but model.num_bits = 4 allows '
                                             r'0\.\.15\. Add: --config.model.num_bits=5$'):
    data.load_split(tiny_config().data, 'train', model=dataclasses.replace(DIGITS, num_bits=4))


def cli(*args, cwd):
  return subprocess.run([sys.executable, '-m', 'denseflow_jax.main', *args], cwd=cwd,
                        capture_output=True, text=True, timeout=300)


def test_command_line_own_data_is_one_error_line_whose_overrides_work(rgb16_npz, tmp_path):
  """The issue's command, run from the data's folder: one `error:` line with both overrides;
  the overrides as printed parse on the command line into the model they name."""
  config = str(ROOT / 'configs' / 'digits.py')
  own = ['--config', config, '--config.data.dataset=npz', '--config.data.source=mine.npz']
  proc = cli(*own, '--workdir', str(tmp_path / 'run'), cwd=rgb16_npz.parent)
  assert proc.returncode == 1
  assert proc.stderr == f"error: data.source mine.npz key 'train' {ISSUE_ERROR}\n"
  assert not (tmp_path / 'run').exists()
  overrides = proc.stderr.split('Add: ', 1)[1].split()
  proc = cli(*own, *overrides, '--mode', 'summary', cwd=rgb16_npz.parent)
  assert proc.returncode == 0, proc.stderr
  assert 'image (16, 16, 3)' in proc.stdout.splitlines()[0]


def test_unprepared_tfds_dataset_is_one_error_line(tmp_path):
  """Nothing but our error on stderr: TFDS's two 'Variant folder ... has no
  dataset_info.json' warnings about the folder it probed are held back."""
  proc = cli('--config', str(ROOT / 'configs' / 'cifar10.py'), '--workdir', str(tmp_path / 'run'),
             '--config.data.dataset=cifar10', f'--config.data.tfds_data_dir={tmp_path / "tfds"}',
             cwd=tmp_path)
  assert proc.returncode == 1
  lines = proc.stderr.splitlines()
  assert len(lines) == 1, proc.stderr
  assert lines[0].startswith("error: TFDS data set 'cifar10' is not prepared in ")
  assert 'Variant folder' not in proc.stderr + proc.stdout


def test_tfds_logs_are_replayed_when_the_data_set_opens(monkeypatch):
  """What absl logs while a data set opens is held back only when the opening fails."""
  seen = []

  class Keep(logging.Handler):
    def emit(self, record):
      seen.append(record.getMessage())

  handler = Keep()
  logging.getLogger('absl').addHandler(handler)
  try:
    def opens(name, tfds_split, data_dir):
      logging.getLogger('absl').warning('opened %s', name)
      return [{'image': np.zeros((8, 8, 1), np.uint8)}]

    def fails(name, tfds_split, data_dir):
      logging.getLogger('absl').warning('probing %s', name)
      raise errors.DataError('not prepared')

    monkeypatch.setattr(tfds_source, '_open_tfds', opens)
    assert len(tfds_source.load_tfds('cifar10', 'train', '', (8, 8, 1), 8)) == 1
    monkeypatch.setattr(tfds_source, '_open_tfds', fails)
    with pytest.raises(errors.DataError, match='not prepared'):
      tfds_source.load_tfds('cifar10', 'train', '', (8, 8, 1), 8)
  finally:
    logging.getLogger('absl').removeHandler(handler)
  assert seen == ['opened cifar10']
