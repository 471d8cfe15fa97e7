"""`python -m denseflow_jax.convert`: official state dict -> a checkpoint the project loads."""
import importlib

import jax
import numpy as np
import pytest

from denseflow_jax import checkpoint
from denseflow_jax.convert import convert_checkpoint
from denseflow_jax.errors import ConvertError


@pytest.fixture(scope='module')
def small_config():
  return importlib.import_module('configs.reference_small').get_config()


def test_convert_npz_writes_a_loadable_checkpoint(reference_dir, small_config, tmp_path):
  out = tmp_path / 'converted'
  variables = convert_checkpoint(str(reference_dir / 'state_dict.npz'), small_config, str(out))
  loaded = checkpoint.load_variables(out, small_config)
  for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(variables)):
    np.testing.assert_array_equal(a, b)
  state_dict = np.load(reference_dir / 'state_dict.npz')
  np.testing.assert_array_equal(loaded['params']['prior']['loc'],
                                state_dict['base_dist.loc'].reshape(-1))


def test_convert_refuses_to_overwrite_and_reports_missing_inputs(reference_dir, small_config, tmp_path):
  out = tmp_path / 'existing'
  out.mkdir()
  (out / 'keep.txt').write_text('precious')
  with pytest.raises(ConvertError, match='already exists'):
    convert_checkpoint(str(reference_dir / 'state_dict.npz'), small_config, str(out))
  assert (out / 'keep.txt').read_text() == 'precious'
  with pytest.raises(ConvertError, match='does not exist'):
    convert_checkpoint(str(tmp_path / 'nope.npz'), small_config, str(tmp_path / 'new'))


def test_convert_reads_an_official_style_checkpoint_pt(reference_dir, small_config, tmp_path):
  """An official checkpoint.pt is a torch pickle of {'model': state_dict, ...}; needs torch."""
  torch = pytest.importorskip('torch')
  state_dict = np.load(reference_dir / 'state_dict.npz')
  path = tmp_path / 'checkpoint.pt'
  torch.save({'current_epoch': 3, 'model': {k: torch.from_numpy(state_dict[k]) for k in state_dict.files}},
             path)
  out = tmp_path / 'from_pt'
  variables = convert_checkpoint(str(path), small_config, str(out))
  np.testing.assert_array_equal(variables['params']['prior']['loc'],
                                state_dict['base_dist.loc'].reshape(-1))
