"""Multi-host training on one machine: two processes of `python -m denseflow_jax.main
--multihost` (jax.distributed over 127.0.0.1, 4 CPU devices each, gloo collectives) must
train like one process with 8 devices.

Both runs use tests/multihost_worker.py (it configures JAX, then calls main) with the
tiny digits config in that file: global batch 16 (8 rows per host), 3 steps, checkpoints
at steps 2 and 3, the evaluation at the end that `--mode train` runs. The two-host run
stops at step 2 and resumes from the checkpoint both processes wrote to the shared
workdir, with a grain worker process per host (data.worker_count=1; the checkpoint holds
process 0's data-stream state only, which process 1 must apply to its own stream); the
one-host run trains straight through without grain workers. The truth is
the single-process run: the global batch of step n holds the same rows in the same
order only if data.make_train_iterator gives process p rows [p * 8, (p + 1) * 8) and
sharding.global_batch / make_mesh put them there. Even the same rows in another order
change the result (row r's noise is drawn for position r): with the mesh in reverse
process order the final parameters differed by up to 0.29 of a leaf's largest value.

Tolerance: the runs reduce over the 8 devices differently (gloo across processes,
XLA:CPU within one), so float32 sums round differently; after 3 steps we saw per-leaf
differences up to 6e-6 of the leaf's largest absolute value (Adam moments of ActNorm),
4e-6 in the parameters. Each leaf must agree within 2e-5 of its largest absolute value;
every parameter leaf moves by more than 10x that in the last step alone.

The three processes start together (each costs ~20 s of CPU, mostly compilation) and
are all killed as soon as one fails or when WORKER_TIMEOUT_S has passed; the failure
message holds the end of each one's output.
"""
import os
from types import SimpleNamespace

import jax
import numpy as np
import pytest

from denseflow_jax import checkpoint as ckpt_lib
from denseflow_jax import sharding
from denseflow_jax import metrics_log
from denseflow_jax.workdir_lock import workdir_lock
import worker_processes
from worker_processes import WORKER_TIMEOUT_S, start, start_hosts, wait_all

RELATIVE_TOLERANCE = 2e-5


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  base = tmp_path_factory.mktemp('multihost')
  logs = base / 'logs'
  logs.mkdir()
  multi = base / 'two_hosts'           # one workdir, shared by both processes
  workers = start_hosts('process', 2, 4, multi, logs,
                        ['--first_run_steps=2', '--config.data.worker_count=1'])
  workers.append(start('single', 8, base / 'one_host', logs))
  wait_all(workers, WORKER_TIMEOUT_S)
  return SimpleNamespace(multi=multi, single=base / 'one_host')



def assert_trees_close(got, want, what):
  worker_processes.assert_trees_close(got, want, what, RELATIVE_TOLERANCE)


def test_two_hosts_train_like_one_host(runs):
  steps = ckpt_lib.TrainCheckpointer(runs.multi).all_steps()
  assert steps == ckpt_lib.TrainCheckpointer(runs.single).all_steps() == [2, 3]
  # The whole train state (params, ActNorm/BatchNorm state, Adamax moments, EMA,
  # counters), read back on this one process from the checkpoint both hosts wrote.
  multi = jax.device_get(ckpt_lib.TrainCheckpointer(runs.multi).restore_raw_state(3))
  single = jax.device_get(ckpt_lib.TrainCheckpointer(runs.single).restore_raw_state(3))
  assert int(multi['step']) == 3 and int(multi['skipped_total']) == 0
  assert_trees_close(multi, single, 'train state')
  # One step moves every parameter leaf far beyond the tolerance (else agreement is void).
  before = jax.device_get(ckpt_lib.TrainCheckpointer(runs.single).restore_raw_state(2)['params'])
  moved = [np.max(np.abs(a - b)) / np.max(np.abs(a))
           for a, b in zip(jax.tree.leaves(single['params']), jax.tree.leaves(before))]
  assert min(moved) > 10 * RELATIVE_TOLERANCE, moved

  # The per-step losses and gradient norms, and the final test bits/dim, agree as well.
  got, want = metrics_log.read_metrics(runs.multi), metrics_log.read_metrics(runs.single)
  train_got = [r for r in got if 'train_bpd' in r]
  train_want = [r for r in want if 'train_bpd' in r]
  assert [r['step'] for r in train_got] == [r['step'] for r in train_want] == [1, 2, 3]
  for a, b in zip(train_got, train_want):
    for key in ('train_bpd', 'grad_norm', 'lr'):
      assert a[key] == pytest.approx(b[key], rel=1e-5), (key, a['step'])
  # Evaluations at the end of each run (the two-host one stopped at step 2 as well).
  assert [r['step'] for r in got if 'test_bpd' in r] == [2, 3]
  assert [r['step'] for r in want if 'test_bpd' in r] == [3]
  assert got[-1]['test_bpd'] == pytest.approx(want[-1]['test_bpd'], rel=1e-5)
  # The story of each run, written once (by process 0), not once per process.
  events = {run: [(e['event'], e['step']) for e in metrics_log.read_events(run)]
            for run in (runs.multi, runs.single)}
  assert events[runs.multi] == [('start', 0), ('compiled', 1), ('finish', 2), ('resume', 2),
                                ('compiled', 3), ('finish', 3)]
  assert events[runs.single] == [('start', 0), ('compiled', 1), ('finish', 3)]


def test_checkpoints_are_written_by_both_hosts(runs):
  step = runs.multi / ckpt_lib.CHECKPOINTS_DIR / '3'
  assert ckpt_lib.is_complete_step_dir(step)
  # orbax's OCDBT format: each process writes its share of the arrays in its own folder
  # (replicated arrays too: orbax spreads their writes over the processes).
  folders = sorted((step / 'state').glob('ocdbt.process_*'))
  assert [f.name for f in folders] == ['ocdbt.process_0', 'ocdbt.process_1']
  assert all(any((f / 'd').iterdir()) for f in folders)
  # WORKDIR/best (saved collectively after an evaluation) is readable here, on one
  # process, although its arrays were saved from 8 devices of 2 processes that do not
  # exist here; it holds the EMA parameters of the train state at its step.
  best = ckpt_lib.load_variables(runs.multi / ckpt_lib.BEST_DIR)
  best_step = ckpt_lib.read_metadata(runs.multi / ckpt_lib.BEST_DIR)['step']
  assert best_step in (2, 3)
  state = ckpt_lib.TrainCheckpointer(runs.multi).restore_raw_state(best_step)
  assert_trees_close(best['params'], jax.device_get(state['ema_params']), 'best vs EMA')


def test_mesh_is_process_major():
  """Devices of one process form one block of the mesh, in process order, whatever the
  order of their ids (on TPU pods ids need not follow the hosts)."""
  Device = lambda i, p: SimpleNamespace(id=i, process_index=p)   # noqa: E731
  devices = [Device(0, 0), Device(1, 1), Device(2, 0), Device(3, 1), Device(4, 2),
             Device(5, 2)]
  ordered = sharding.process_major(devices)
  assert [(d.process_index, d.id) for d in ordered] == [(0, 0), (0, 2), (1, 1), (1, 3),
                                                        (2, 4), (2, 5)]
  mesh = sharding.make_mesh()
  assert list(mesh.devices) == sorted(jax.devices(), key=lambda d: d.id)   # one process


def test_make_mesh_orders_devices_process_major(monkeypatch):
  """make_mesh must go through process_major (with one process the ids are already in
  order, so only this check catches a make_mesh that stops calling it)."""
  monkeypatch.setattr(sharding, 'process_major', lambda devices: list(reversed(devices)))
  assert list(sharding.make_mesh().devices) == list(reversed(jax.devices()))


def test_a_job_on_a_busy_workdir_stops_on_every_host(tmp_path):
  """Process 0 is refused the workdir lock (held here, as by another run): it says so in
  one error line, and process 1 stops too instead of waiting at its first collective."""
  workdir, logs = tmp_path / 'busy', tmp_path / 'logs'
  logs.mkdir()
  with workdir_lock(workdir, 'train'):
    workers = start_hosts('process', 2, 4, workdir, logs)
    try:
      codes = [w.proc.wait(timeout=WORKER_TIMEOUT_S) for w in workers]
    finally:
      for w in workers:
        if w.proc.poll() is None:
          w.proc.kill()
        w.log.close()
  outputs = [w.path.read_text() for w in workers]
  assert codes == [1, 1], outputs
  assert f'error: --workdir {workdir} is in use by pid {os.getpid()}' in outputs[0], outputs[0]
  assert 'process 0 of this job could not take the workdir lock' in outputs[1], outputs[1]
  assert not (workdir / metrics_log.METRICS_FILE).exists()
