"""One run per --workdir (denseflow_jax/workdir_lock.py): a second run is refused in one
line naming the first (host, pid, since when, command) and touches nothing; a run killed
with SIGKILL does not block the next; a run that wrote nothing leaves no trace.

The lock is taken in other processes as it is in real use: `python -c` with the module
alone (fast), and the command line itself, two real training processes on one workdir.
"""
import errno
import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

from denseflow_jax import errors, metrics_log, modes
from denseflow_jax import workdir_lock as lock_lib
from denseflow_jax.workdir_lock import LOCK_FILE, read_holder, workdir_lock

ROOT = pathlib.Path(__file__).resolve().parents[1]
ISO_TIME = r'\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d'

# Takes the lock in a process of its own: prints 'locked' and holds it until killed
# (argv: workdir, 'hold'), or takes it and lets go (argv: workdir); exit 3 if refused.
TAKE = """
import sys, time
from denseflow_jax.errors import WorkdirBusyError
from denseflow_jax.workdir_lock import workdir_lock
try:
  with workdir_lock(sys.argv[1], 'eval'):
    print('locked', flush=True)
    if sys.argv[2:] == ['hold']:
      time.sleep(600)
except WorkdirBusyError as e:
  print(e)
  sys.exit(3)
"""


def take(workdir, *args):
  return subprocess.run([sys.executable, '-c', TAKE, str(workdir), *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=60)


def snapshot(directory):
  """Every path under ``directory`` with its size, mtime and (for files) content."""
  result = {}
  for path in sorted(pathlib.Path(directory).rglob('*')):
    st = path.stat()
    result[str(path)] = (st.st_size, st.st_mtime_ns,
                         path.read_bytes() if path.is_file() else None)
  return result


def wait_for_holder(workdir, proc, timeout=120):
  """Waits until process ``proc`` holds ``workdir``'s lock (its record is in the file)."""
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    record = read_holder(pathlib.Path(workdir) / LOCK_FILE)
    if record is not None and record['pid'] == proc.pid:
      return record
    assert proc.poll() is None, f'the run ended (rc {proc.returncode}) before locking'
    time.sleep(0.05)
  raise AssertionError(f'{proc.pid} did not take the lock of {workdir} in {timeout} s')


# ---------------------------------------------------------------- the module


def test_second_lock_is_refused_naming_the_holder_and_touches_nothing(tmp_path):
  workdir = tmp_path / 'run'
  argv = ['python', '-m', 'denseflow_jax.main', '--workdir', str(workdir)]
  with workdir_lock(workdir, 'train', argv=argv):
    (workdir / 'metrics.jsonl').write_text('{}\n')
    before = snapshot(workdir)
    proc = take(workdir)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    message = proc.stdout.strip()
    print(message)
    assert message.splitlines() == [message]
    assert re.fullmatch(
        rf'--workdir {re.escape(str(workdir))} is in use by pid {os.getpid()} on host '
        rf'{re.escape(socket.gethostname())}, running since {ISO_TIME}: --mode train '
        rf'\(python -m denseflow_jax.main --workdir {re.escape(str(workdir))}\)\. One run per '
        rf'workdir: wait for it to finish, stop it \(kill {os.getpid()} on '
        rf'{re.escape(socket.gethostname())}\), or use another --workdir', message), message
    assert snapshot(workdir) == before               # the refused run changed nothing
    with pytest.raises(errors.WorkdirBusyError, match=f'pid {os.getpid()} '):
      with workdir_lock(workdir, 'eval'):            # also refused within one process
        pass
  # Released: the holder info is gone (a finished run is never reported), the file stays.
  assert (workdir / LOCK_FILE).read_text() == '' and read_holder(workdir / LOCK_FILE) is None
  proc = take(workdir)
  assert proc.returncode == 0 and proc.stdout == 'locked\n', proc.stdout + proc.stderr


def test_holder_record(tmp_path):
  with workdir_lock(tmp_path, 'sample', argv=['a', 'b c']):
    record = json.loads((tmp_path / LOCK_FILE).read_text())
  assert record.keys() == {'host', 'pid', 'since', 'mode', 'argv'}
  assert (record['host'], record['pid'], record['mode'], record['argv']) == (
      socket.gethostname(), os.getpid(), 'sample', ['a', 'b c'])
  assert re.fullmatch(ISO_TIME, record['since'])
  with workdir_lock(tmp_path, 'train'):             # default: the command as typed
    assert read_holder(tmp_path / LOCK_FILE)['argv'] == sys.orig_argv


def test_sigkilled_holder_does_not_block(tmp_path):
  holder = subprocess.Popen([sys.executable, '-c', TAKE, str(tmp_path), 'hold'], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline() == 'locked\n'
    assert take(tmp_path).returncode == 3
  finally:
    holder.kill()
    holder.wait()
  assert read_holder(tmp_path / LOCK_FILE)['pid'] == holder.pid    # its info is left
  start = time.monotonic()
  with workdir_lock(tmp_path, 'train'):
    assert read_holder(tmp_path / LOCK_FILE)['pid'] == os.getpid()
  assert time.monotonic() - start < 1


def test_a_killed_holders_info_is_not_reported_as_the_live_one(tmp_path, monkeypatch):
  """Between taking the lock and writing its record the new holder's file still holds a
  killed run's record: the refusal must not name the dead process."""
  dead = subprocess.run([sys.executable, '-c', 'import os; print(os.getpid())'],
                        capture_output=True, text=True, check=True)
  (tmp_path / LOCK_FILE).write_text(json.dumps(
      {'host': socket.gethostname(), 'pid': int(dead.stdout), 'since': 'then', 'mode': 'train',
       'argv': ['old']}))
  monkeypatch.setattr(lock_lib, '_INFO_WAIT_S', 0.2)
  fd = os.open(tmp_path / LOCK_FILE, os.O_RDWR)
  try:
    lock_lib.fcntl.flock(fd, lock_lib.fcntl.LOCK_EX)    # held, record not yet written
    with pytest.raises(errors.WorkdirBusyError) as info:
      with workdir_lock(tmp_path, 'train'):
        pass
  finally:
    os.close(fd)
  assert str(info.value) == (
      f'--workdir {tmp_path} is in use by another run (its details were not readable). One '
      'run per workdir: wait for it to finish, stop it, or use another --workdir')


def test_a_run_that_writes_nothing_leaves_no_trace(tmp_path):
  workdir = tmp_path / 'a' / 'b'
  with workdir_lock(workdir, 'eval'):          # a missing workdir: created, then removed
    assert os.listdir(workdir) == [LOCK_FILE]
  assert list(tmp_path.iterdir()) == []
  with workdir_lock(tmp_path, 'eval'):         # an existing one: only the lock file goes
    pass
  assert list(tmp_path.iterdir()) == []
  with workdir_lock(workdir, 'train'):         # a run that wrote something keeps it all
    (workdir / 'metrics.jsonl').write_text('')
  assert sorted(os.listdir(workdir)) == [LOCK_FILE, 'metrics.jsonl']
  assert (workdir / LOCK_FILE).read_text() == ''
  (workdir / 'metrics.jsonl').unlink()
  with workdir_lock(workdir, 'eval'):          # an old lock file stays
    pass
  assert os.listdir(workdir) == [LOCK_FILE]


def test_non_primary_processes_take_no_lock_and_touch_nothing(tmp_path):
  with workdir_lock(tmp_path / 'new', 'train', is_primary=False):
    pass
  assert not (tmp_path / 'new').exists()
  with workdir_lock(tmp_path, 'train'):
    with workdir_lock(tmp_path, 'train', is_primary=False):   # process 0 holds it
      pass


class _NoLocks:
  LOCK_EX, LOCK_NB = 2, 4

  @staticmethod
  def flock(fd, operation):
    raise OSError(errno.ENOLCK, 'No locks available')


def test_a_file_system_without_locks_runs_unlocked_with_a_warning(tmp_path, monkeypatch,
                                                                  caplog):
  monkeypatch.setattr(lock_lib, 'fcntl', _NoLocks)
  ran = []
  with workdir_lock(tmp_path, 'train'):
    with workdir_lock(tmp_path, 'train'):      # nothing to refuse with
      ran.append(True)
  assert ran == [True]
  assert 'does not support locking' in caplog.text and 'No locks available' in caplog.text


def test_modes_lock_the_workdir_before_loading(tmp_path, make_config):
  """--mode eval on a busy workdir: refused before any checkpoint is read (the workdir
  has none, which a load would report first); summary reads no workdir and is not."""
  config = make_config(base='digits')
  with workdir_lock(tmp_path, 'train'):
    with pytest.raises(errors.WorkdirBusyError, match=f'pid {os.getpid()} '):
      modes.run('eval', config, str(tmp_path))
    modes.run('summary', config, str(tmp_path))


# ---------------------------------------------------------------- the command line

NUM_STEPS = 100_000     # "forever": the first run is stopped by the test
OVERRIDES = [
    '--config.model.block_config=(2,)', '--config.model.layers_config=(1,)',
    '--config.model.mid_channels=(8,)', '--config.model.growth_rate=2',
    '--config.model.glow_channels=8', '--config.train.batch_size=8',
    '--config.train.warmup_steps=2', '--config.train.log_every=1',
    '--config.eval.batch_size=8', '--config.eval.num_examples=8', '--config.sample.num=4',
    '--config.sample.batch_size=4']


def command(workdir, num_steps=NUM_STEPS):
  return [sys.executable, '-m', 'denseflow_jax.main', '--config', 'configs/digits.py',
          '--workdir', str(workdir), *OVERRIDES, f'--config.train.num_steps={num_steps}']


def start(workdir, **env):
  log = open(pathlib.Path(str(workdir) + '.log'), 'wb')   # pylint: disable=consider-using-with
  proc = subprocess.Popen(command(workdir), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                          env=dict(os.environ, PYTHONUNBUFFERED='1', **env))
  log.close()
  return proc


def test_second_training_command_on_a_busy_workdir_is_refused_in_one_line(tmp_path):
  workdir = tmp_path / 'run'
  first = start(workdir)
  try:
    holder = wait_for_holder(workdir, first)
    lock_path = workdir / LOCK_FILE
    before = (lock_path.stat().st_mtime_ns, lock_path.read_bytes())
    started = time.monotonic()
    second = subprocess.run(command(workdir), cwd=ROOT, capture_output=True, text=True,
                            timeout=60)
    seconds = time.monotonic() - started
    print(second.stderr, f'refused in {seconds:.1f} s')
    assert second.returncode == 1 and second.stdout == ''
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f'error: --workdir {workdir} is in use by '
                                                   f'pid {first.pid} on host '), lines
    assert f'running since {holder["since"]}: --mode train (' in lines[0]
    assert 'denseflow_jax.main --config configs/digits.py --workdir' in lines[0]
    assert lines[0].endswith('or use another --workdir')
    # The lock file is as it was (the first run writes the rest meanwhile: that nothing
    # else was touched is checked by the first test, and by the events below).
    assert (lock_path.stat().st_mtime_ns, lock_path.read_bytes()) == before
    assert first.poll() is None, 'the first run stopped'
    while not ((workdir / metrics_log.METRICS_FILE).exists() and
               any('train_bpd' in r for r in metrics_log.read_metrics(workdir))):
      assert first.poll() is None, pathlib.Path(str(workdir) + '.log').read_text()[-3000:]
      time.sleep(0.05)
    first.send_signal(signal.SIGINT)
    assert first.wait(timeout=120) == 130
  finally:
    first.kill()
  events = [e['event'] for e in metrics_log.read_events(workdir)]
  assert events == ['start', 'compiled', 'interrupt'], events   # one run: no second start


def test_sigkilled_training_run_does_not_block_the_next(tmp_path):
  workdir = tmp_path / 'run'
  # A compilation cache of its own: a process killed while writing an entry would leave
  # it truncated for the other tests.
  first = start(workdir, JAX_COMPILATION_CACHE_DIR=str(tmp_path / 'killed_cache'))
  try:
    wait_for_holder(workdir, first)
  finally:
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=60)
  assert read_holder(workdir / LOCK_FILE)['pid'] == first.pid     # its record is left
  second = subprocess.run(command(workdir, num_steps=2), cwd=ROOT, capture_output=True,
                          text=True, timeout=240)
  assert second.returncode == 0, second.stderr[-3000:]
  assert 'finished 2 steps' in second.stdout + second.stderr
  assert (workdir / LOCK_FILE).read_text() == ''
