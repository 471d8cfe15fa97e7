"""Subprocesses of tests/multihost_worker.py (one process of a training job each, on
simulated CPU devices) for tests/test_multihost.py and tests/test_reslice.py, and the
comparison of their train states."""
import os
import pathlib
import socket
import subprocess
import sys
import time
from types import SimpleNamespace

import jax
import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
WORKER = ROOT / 'tests' / 'multihost_worker.py'
WORKER_TIMEOUT_S = 480   # ~40 s alone; generous because pytest-xdist workers share the cores


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def worker_env() -> dict:
  env = {k: v for k, v in os.environ.items()
         # gRPC (the coordinator) would send 127.0.0.1 through a proxy.
         if '_proxy' not in k.lower() and k not in ('XLA_FLAGS', 'JAX_NUM_CPU_DEVICES')}
  env['JAX_PLATFORMS'] = 'cpu'
  env['PYTHONPATH'] = os.pathsep.join([str(ROOT), env.get('PYTHONPATH', '')])
  return env


def start(name, num_devices, workdir, logs, extra=()):
  log = open(logs / f'{name}.log', 'w')   # a file, not a pipe: a full pipe would block
  command = [sys.executable, str(WORKER), f'--num_cpu_devices={num_devices}',
             '--config', str(WORKER), '--workdir', str(workdir), *extra]
  proc = subprocess.Popen(command, cwd=ROOT, env=worker_env(), stdout=log,
                          stderr=subprocess.STDOUT)
  return SimpleNamespace(name=name, proc=proc, log=log, path=logs / f'{name}.log')


def wait_all(workers, timeout_s):
  """Waits for every worker; kills all at the first failure or at the deadline and fails
  with each worker's exit status and the end of its output."""
  deadline = time.monotonic() + timeout_s
  problem = None
  while problem is None and any(w.proc.poll() is None for w in workers):
    failed = [w for w in workers if w.proc.poll() not in (None, 0)]
    if failed:
      problem = f'{failed[0].name} exited with status {failed[0].proc.returncode}'
    elif time.monotonic() > deadline:
      problem = f'timed out after {timeout_s} s'
    else:
      time.sleep(0.5)
  if problem is None and any(w.proc.returncode for w in workers):
    problem = 'a worker failed'
  for w in workers:
    if w.proc.poll() is None:
      w.proc.kill()
    w.proc.wait()
    w.log.close()
  if problem is not None:
    tails = '\n'.join(f'--- {w.name} (status {w.proc.returncode}):\n'
                      f'{w.path.read_text()[-3000:]}' for w in workers)
    pytest.fail(f'{problem}\n{tails}', pytrace=False)


def start_hosts(name, num_processes, num_devices, workdir, logs, extra=()):
  """One job of ``num_processes`` processes (``--multihost`` over 127.0.0.1), each with
  ``num_devices`` devices, all on ``workdir``."""
  port = free_port()
  return [start(f'{name}_{i}', num_devices, workdir, logs,
                ['--multihost', f'--coordinator_address=127.0.0.1:{port}',
                 f'--num_processes={num_processes}', f'--process_id={i}', *extra])
          for i in range(num_processes)]


def assert_trees_close(got, want, what, relative_tolerance):
  """Each leaf of ``got`` within ``relative_tolerance`` of the largest absolute value of the
  same leaf of ``want``."""
  got = jax.tree_util.tree_flatten_with_path(got)[0]
  want = jax.tree_util.tree_flatten_with_path(want)[0]
  assert [p for p, _ in got] == [p for p, _ in want], what
  for (path, a), (_, b) in zip(got, want):
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape and a.dtype == b.dtype, (what, jax.tree_util.keystr(path))
    scale = float(np.max(np.abs(b))) if b.size else 0.0
    np.testing.assert_allclose(a, b, rtol=0, atol=relative_tolerance * scale,
                               err_msg=f'{what} {jax.tree_util.keystr(path)}')
