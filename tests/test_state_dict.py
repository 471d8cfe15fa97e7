"""The shared state-dict helpers (denseflow_jax/state_dict.py) and the checkpoint check
that uses them (checkpoint.check_variables)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from denseflow_jax import checkpoint, state_dict
from denseflow_jax.errors import CheckpointError, ConvertError


class _Error(ValueError):
  pass


EXPECTED = {'params/a/kernel': (3, 3, 2, 4), 'params/a/bias': (4,), 'params/b/scale': (4,)}


def _broken():
  """One missing (params/b/scale), one unexpected (params/c/bias), one mis-shaped entry."""
  return {'params/a/kernel': np.zeros((3, 3, 2, 5), np.float32),
          'params/a/bias': np.zeros((4,), np.float32),
          'params/c/bias': (7,)}


def test_report_names_missing_unexpected_and_misshaped_entries():
  with pytest.raises(_Error) as info:
    state_dict.report_mismatches(EXPECTED, _broken(), _Error, what='the file does not fit',
                                 fix='convert it again')
  message = str(info.value)
  assert message.startswith('the file does not fit (3 problems); convert it again\n')
  assert 'missing params/b/scale' in message
  assert 'unexpected params/c/bias' in message
  assert 'shape of params/a/kernel: got (3, 3, 2, 5), expected (3, 3, 2, 4)' in message


def test_report_returns_the_problems_without_an_error_class_and_none_for_a_match():
  problems = state_dict.report_mismatches(EXPECTED, _broken())
  assert problems == ['missing params/b/scale', 'unexpected params/c/bias',
                      'shape of params/a/kernel: got (3, 3, 2, 5), expected (3, 3, 2, 4)']
  fine = {k: np.zeros(s) for k, s in EXPECTED.items()}
  assert state_dict.report_mismatches(EXPECTED, fine, _Error, what='x', fix='y') == []


def test_report_lists_the_first_few_of_each_kind_with_labels_and_other_problems():
  expected = {f'params/w{i:02d}': (1,) for i in range(25)}
  got = {f'torch.w{i:02d}': (1,) for i in range(12)}
  with pytest.raises(_Error) as info:
    state_dict.report_mismatches(expected, got, _Error, what='bad', fix='fix it',
                                 labels={'torch.w00': "'torch.w00' (official)"},
                                 other=['fc.weight has 1000 classes'])
  lines = str(info.value).splitlines()
  assert lines[0] == 'bad (38 problems); fix it'
  assert lines[1] == '  fc.weight has 1000 classes'
  assert sum(line.startswith('  missing ') for line in lines) == state_dict.SHOWN_PER_KIND
  assert '  ... and 15 more missing' in lines
  assert "  unexpected 'torch.w00' (official)" in lines
  assert '  ... and 2 more unexpected' in lines


def test_flatten_unflatten_and_kernel_layout():
  tree = {'params': {'a': {'kernel': np.zeros((1,))}}, 'batch_stats': {}}
  flat = state_dict.flatten(tree)
  assert list(flat) == ['params/a/kernel']
  assert state_dict.unflatten(flat) == {'params': {'a': {'kernel': flat['params/a/kernel']}}}
  torch_kernel = np.arange(2 * 3 * 4 * 5).reshape(2, 3, 4, 5)     # [out, in, kh, kw]
  flax_kernel = state_dict.kernel_to_flax(torch_kernel)
  assert flax_kernel.shape == (4, 5, 3, 2)
  assert flax_kernel[1, 2, 0, 1] == torch_kernel[1, 0, 1, 2]


def test_read_state_dict_reads_npz_and_names_a_missing_file(tmp_path):
  np.savez(tmp_path / 'sd.npz', **{'a.weight': np.ones((2, 3), np.float32)})
  read = state_dict.read_state_dict(str(tmp_path / 'sd.npz'))
  assert list(read) == ['a.weight'] and read['a.weight'].shape == (2, 3)
  with pytest.raises(ConvertError, match='does not exist'):
    state_dict.read_state_dict(str(tmp_path / 'absent.npz'))


def test_check_variables_names_what_does_not_fit_the_model():
  abstract = {'params': {'a': {'kernel': jax.ShapeDtypeStruct((3, 3, 2, 4), jnp.float32),
                               'bias': jax.ShapeDtypeStruct((4,), jnp.float32)}},
              'batch_stats': {'bn': {'mean': jax.ShapeDtypeStruct((4,), jnp.float32)}}}
  good = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), abstract)
  checkpoint.check_variables(good, abstract, 'DIR')
  bad = {'params': {'a': {'kernel': np.zeros((3, 3, 2, 5), np.float32),
                          'bias': np.zeros((4,), np.float64)},
                    'extra': {'scale': np.zeros((1,), np.float32)}},
         'batch_stats': {}}
  with pytest.raises(CheckpointError) as info:
    checkpoint.check_variables(bad, abstract, 'DIR')
  message = str(info.value)
  assert 'the variables in DIR do not fit the configured model (4 problems)' in message
  assert 'check the model config' in message
  assert 'missing batch_stats/bn/mean' in message
  assert 'unexpected params/extra/scale' in message
  assert 'shape of params/a/kernel: got (3, 3, 2, 5), expected (3, 3, 2, 4)' in message
  assert 'dtype of params/a/bias: got float64, expected float32' in message
