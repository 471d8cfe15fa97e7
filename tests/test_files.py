"""denseflow_jax.files: atomic writes keep the old file on failure (tests/test_evaluate.py)
and give the new one the permissions a plain open() would."""
import os
import stat

import numpy as np
import pytest

from denseflow_jax import files


@pytest.mark.parametrize('umask', [0o022, 0o077, 0o002])
def test_atomic_files_get_the_mode_of_a_plain_open(tmp_path, umask):
  old = os.umask(umask)
  try:
    with open(tmp_path / 'plain', 'wb') as f:
      f.write(b'x')
    files.write_json_atomic(tmp_path / 'eval.json', {'bpd': 3.0})
    files.write_npz_atomic(tmp_path / 'grid.npz', images=np.zeros((1, 2, 2, 3), np.uint8))
  finally:
    os.umask(old)
  want = stat.S_IMODE(os.stat(tmp_path / 'plain').st_mode)
  assert want == 0o666 & ~umask
  for name in ('eval.json', 'grid.npz'):
    assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == want, name


def test_unused_stem_numbers_a_new_result_instead_of_replacing_one(tmp_path):
  stem = str(tmp_path / 'samples_T1_n4')
  assert files.unused_stem(stem, ('.png', '.npz')) == stem
  (tmp_path / 'samples_T1_n4.npz').write_bytes(b'')           # one member of the set is enough
  assert files.unused_stem(stem, ('.png', '.npz')) == stem + '-2'
  (tmp_path / 'samples_T1_n4-2.png').write_bytes(b'')
  assert files.unused_stem(stem, ('.png', '.npz')) == stem + '-3'
  assert files.unused_stem(str(tmp_path / 'other'), ('.png',)) == str(tmp_path / 'other')
