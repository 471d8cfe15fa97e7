"""Resuming on a slice of another size (a preempted TPU job comes back on whatever is free).

The train state is replicated and the data stream's position is global (batch n of every
process is its rows of global batch n), so a checkpoint written on N devices or P processes
resumes on M. This module checks that: in this process, the one refusal (a global batch
that does not divide over the new slice) and that it comes before anything is written;
in subprocesses (tests/multihost_worker.py, as tests/test_multihost.py), real resumes from
8 devices to 4 and from 2 processes to 1 (the `runs` fixture).

Tolerance. The resumed and the uninterrupted run add the same float32 numbers in another
order: the gradient all-reduce, the batch statistics (ActNorm initialisation, BatchNorm)
and the loss mean are sums over devices, which XLA:CPU splits over 4 instead of 8 devices
and gloo adds across processes. A reordered float32 sum differs by a few units in the last
place (2**-23 = 1.2e-7 relative), and the differences compound over the steps through
Adamax, which divides by the largest gradient seen (a small gradient's rounding moves its
update most). Measured (December 7, 2 cores): the metrics differed by at most 1.2e-7
relative (1 ulp), the final train state by at most 6.1e-6 of a leaf's largest value
(2 processes -> 1; 7.3e-7 for 8 -> 4 devices). The tolerances are test_multihost.py's for
the same kind of difference: 1e-5 relative per metric (80 ulps, room for runs whose
parameters move the loss more) and 2e-5 of each state leaf's largest value. A stream
resumed one batch off moved the step-3 train bits/dim by 1.9e-3 relative and the state by
a whole leaf's scale, far outside both. (Not the final test bits/dim alone: it moved by
only 2.7e-6.)

Cost on 2 cores, alone: about 90 s wall, 60 s CPU (five processes of ~10 s of CPU each,
mostly start-up and compilation; 3 then 2 at a time).
"""
import os
import pathlib
import shutil
from types import SimpleNamespace

import jax
import pytest

from denseflow_jax import checkpoint as ckpt_lib
from denseflow_jax import metrics_log
from denseflow_jax import modes
from denseflow_jax.errors import ConfigError
from helpers import fake_state, random_variables, tiny_config
from worker_processes import (WORKER_TIMEOUT_S, assert_trees_close, start, start_hosts,
                              wait_all)

STEPS = 4                  # tests/multihost_worker.py's config checkpoints every 2 steps
STEPS_FLAG = f'--config.train.num_steps={STEPS}'
METRIC_TOLERANCE = 1e-5    # relative, per metric (module docstring)
STATE_TOLERANCE = 2e-5     # of each state leaf's largest absolute value


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


# ---------------------------------------------------------------- real resumes


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """Four runs of tests/multihost_worker.py's config (global batch 16, checkpoints at steps
  2 and 4, the evaluation at the end):

    reference        8 devices, 1 process, steps 0-4 uninterrupted
    from_8_devices   the reference's workdir as preemption after step 2 leaves it (its
                     step-4 checkpoint removed; metrics past step 2 stay, as a run killed
                     later writes them), resumed on 4 devices
    from_2_processes 2 processes x 4 devices (one grain worker each) to step 2, resumed by
                     1 process with 8 devices and 2 grain workers
  """
  base = tmp_path_factory.mktemp('reslice')
  logs = base / 'logs'
  logs.mkdir()
  runs = SimpleNamespace(reference=base / 'reference', from_8_devices=base / 'from_8_devices',
                         from_2_processes=base / 'from_2_processes')
  first = start_hosts('two_processes', 2, 4, runs.from_2_processes, logs,
                      ['--config.train.num_steps=2', '--config.data.worker_count=1'])
  first.append(start('reference', 8, runs.reference, logs, [STEPS_FLAG]))
  wait_all(first, WORKER_TIMEOUT_S)
  shutil.copytree(runs.reference, runs.from_8_devices)
  shutil.rmtree(runs.from_8_devices / ckpt_lib.CHECKPOINTS_DIR / str(STEPS))
  wait_all([start('four_devices', 4, runs.from_8_devices, logs, [STEPS_FLAG]),
            start('one_process', 8, runs.from_2_processes, logs,
                  [STEPS_FLAG, '--config.data.worker_count=2'])], WORKER_TIMEOUT_S)
  return runs


@pytest.mark.parametrize('resumed', ['from_8_devices', 'from_2_processes'])
def test_a_run_resumed_on_another_slice_continues_the_same_run(runs, resumed):
  """The resumed run's metrics (per step, and the final test bits/dim) and final train state
  equal the uninterrupted run's up to float rounding; its global batch is unchanged."""
  workdir = getattr(runs, resumed)
  events = [(e['event'], e['step']) for e in metrics_log.read_events(workdir)]
  assert events[-3:] == [('resume', 2), ('compiled', 3), ('finish', STEPS)], events
  got, want = metrics_log.read_metrics(workdir), metrics_log.read_metrics(runs.reference)
  train_got, train_want = ([r for r in records if 'train_bpd' in r] for records in (got, want))
  assert [r['step'] for r in train_got] == [r['step'] for r in train_want] == [1, 2, 3, 4]
  for a, b in zip(train_got, train_want):
    for key in ('train_bpd', 'grad_norm', 'lr'):
      assert a[key] == pytest.approx(b[key], rel=METRIC_TOLERANCE), (key, a['step'])
  assert (got[-1]['step'], want[-1]['step']) == (STEPS, STEPS)     # the final evaluation
  assert got[-1]['test_bpd'] == pytest.approx(want[-1]['test_bpd'], rel=METRIC_TOLERANCE)
  checkpoints = {run: ckpt_lib.TrainCheckpointer(run) for run in (workdir, runs.reference)}
  assert_trees_close(jax.device_get(checkpoints[workdir].restore_raw_state(STEPS)),
                     jax.device_get(checkpoints[runs.reference].restore_raw_state(STEPS)),
                     'train state', STATE_TOLERANCE)
  position = checkpoints[workdir].stored_json(STEPS, 'data')
  assert position['step'] == STEPS and position['pipeline']['global_batch'] == 16
  assert position['layout'] == {'process_index': 0, 'process_count': 1,
                                'worker_count': 2 if resumed == 'from_2_processes' else 0}
