"""Resuming on a slice of another size (a preempted TPU job comes back on whatever is free).

The train state is replicated and the data stream's position is global (batch n of every
process is its rows of global batch n), so a checkpoint written on N devices or P processes
resumes on M. This module checks that: in this process, the one refusal (a global batch
that does not divide over the new slice) and that it comes before anything is written;
in subprocesses (tests/multihost_worker.py, as tests/test_multihost.py), real resumes.
"""
import os
import pathlib

import pytest

from denseflow_jax import checkpoint as ckpt_lib
from denseflow_jax import modes
from denseflow_jax.errors import ConfigError
from helpers import fake_state, random_variables, tiny_config


def _checkpointed_run(workdir, batch_size):
  """A workdir holding one checkpoint of a run with this global batch (written, as far as
  this test knows, on a slice of another size: the refusal reads only the stored config)."""
  config = tiny_config({'train.batch_size': batch_size})
  checkpointer = ckpt_lib.TrainCheckpointer(workdir, keep=3)
  checkpointer.save(2, fake_state(random_variables(), step=2), {}, config, {'phase': 'pretrain'})
  checkpointer.wait()
  checkpointer.close()


def _tree(path: pathlib.Path) -> dict:
  """Every file and folder under ``path`` with its size and modification time."""
  return {str(p.relative_to(path)): (p.stat().st_size, p.stat().st_mtime_ns)
          for p in sorted(path.rglob('*'))}


@pytest.fixture
def lock_calls(monkeypatch):
  """The workdir locks modes.run takes (a refusal must come before the first)."""
  calls = []
  lock = modes.workdir_lock

  def recording_lock(workdir, *args, **kwargs):
    calls.append(workdir)
    return lock(workdir, *args, **kwargs)

  monkeypatch.setattr(modes, 'workdir_lock', recording_lock)
  return calls


def test_a_batch_that_does_not_divide_over_the_new_slice_is_refused_first(tmp_path,
                                                                          lock_calls):
  """A run with global batch 12 (e.g. on 4 or 6 devices) resumed on this 8-device slice: one
  line naming the slice sizes 12 divides over and the batches this slice takes; nothing
  written, no lock taken."""
  workdir = tmp_path / 'run'
  _checkpointed_run(workdir, 12)
  before = _tree(workdir)
  with pytest.raises(ConfigError) as refused:
    modes.run('train', tiny_config({'train.batch_size': 12}), str(workdir))
  message = str(refused.value)
  assert message == (
      'train.batch_size = 12 (the global batch) does not divide over the 8 devices of this '
      f'slice, and --workdir {workdir} holds a run with train.batch_size = 12, which a resumed '
      'run keeps (its data stream and learning-rate schedule follow the global batch): '
      'resume on a slice whose device count divides 12 (1, 2, 3, 4, 6, 12), or start a new '
      '--workdir with --config.train.batch_size a multiple of 8 (e.g. 8 or 16)')
  assert _tree(workdir) == before and lock_calls == []


def test_a_changed_batch_is_pointed_back_to_the_runs_own(tmp_path, lock_calls):
  """--config.train.batch_size=12 on a run trained with 16: resume with 16 (it divides)."""
  workdir = tmp_path / 'run'
  _checkpointed_run(workdir, 16)
  with pytest.raises(ConfigError, match=r'holds a run with train.batch_size = 16, which a '
                     r'resumed run keeps .*: resume with --config.train.batch_size=16$'):
    modes.run('train', tiny_config({'train.batch_size': 12}), str(workdir))
  assert lock_calls == []


def test_a_new_run_with_a_batch_that_does_not_divide_is_refused(tmp_path, lock_calls):
  """Without a checkpoint: the batches that divide, and no workdir made."""
  workdir = tmp_path / 'new'
  with pytest.raises(ConfigError) as refused:
    modes.run('train', tiny_config({'train.batch_size': 20}), str(workdir))
  assert str(refused.value) == ('train.batch_size = 20 (the global batch) does not divide over '
                                'the 8 devices; set --config.train.batch_size to a multiple '
                                'of 8 (e.g. 16 or 24)')
  assert not os.path.exists(workdir) and lock_calls == []
