"""gs:// workdirs against a real Cloud Storage API: fake-gcs-server on 127.0.0.1
(gcs_emulator.py; nothing leaves the machine).

The lock (bucket_lock.py): a second run is refused in the local lock's one line; a stale
lock is taken over by exactly one of several runs; a missing bucket and missing
credentials are one line each. End to end: the command line trains configs/digits.py
into gs://test-bucket/runs/d, a second run is refused, the first is killed with SIGKILL,
the same command takes the stale lock over and resumes, and the numbers equal an
uninterrupted run's on local disk; then --mode eval and --mode sample read the bucket.
"""
import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import google.auth.exceptions
import numpy as np
import pytest
from etils import epath
from google.auth.compute_engine import _metadata as gce_metadata
from google.cloud import storage

from denseflow_jax import bucket_lock as lock_lib
from denseflow_jax import checkpoint as ckpt_lib
from denseflow_jax import files
from denseflow_jax import metrics_log
from denseflow_jax.bucket_lock import bucket_lock
from denseflow_jax.errors import ConfigError, WorkdirBusyError
from denseflow_jax.settings import Settings
from gcs_emulator import BUCKET, emulator, pointed_at
from test_robustness import OVERRIDES, assert_same_state, final_state

ROOT = pathlib.Path(__file__).resolve().parents[1]
ISO_TIME = r'\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d'
NUM_STEPS = 30
STALE_S = 6.0       # the runs' staleness time (DENSEFLOW_BUCKET_LOCK_STALE_S): a killed
                    # run's lock is taken over after this, not after the default 3 min
KILL_AFTER = 12     # steps logged before the SIGKILL (checkpoints every 5 steps)
RUN_OVERRIDES = [o for o in OVERRIDES if 'num_steps' not in o and 'checkpoint_every' not in o]
RUN_OVERRIDES += [f'--config.train.num_steps={NUM_STEPS}',
                  '--config.train.checkpoint_every_steps=5', '--config.eval.k=2']


@pytest.fixture(scope='module')
def gcs(tmp_path_factory):
  """The emulator's URL; this process's clients point at it for the module."""
  log = tmp_path_factory.mktemp('gcs') / 'fake-gcs-server.log'
  with emulator(str(log)) as url, pointed_at(url):
    yield url


@pytest.fixture(scope='module')
def env(gcs, tmp_path_factory):
  """The subprocesses' environment: the emulator's (os.environ, from pointed_at), a short
  staleness time, and a compilation cache of this module's own (a process killed while
  writing an entry leaves it truncated)."""
  del gcs
  return dict(os.environ, PYTHONUNBUFFERED='1', **{lock_lib.STALE_ENV: str(STALE_S)},
              JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.mktemp('jax_cache')))


def lock_blob(workdir) -> storage.Blob:
  bucket, prefix = lock_lib.split_url(workdir)
  return storage.Client().bucket(bucket).blob(f'{prefix}/.lock')


def holder(workdir):
  """The record in the lock object of ``workdir``, or None where there is none."""
  blob = lock_blob(workdir)
  return json.loads(blob.download_as_bytes()) if blob.exists() else None


# ---------------------------------------------------------------- the lock, in this process


def test_second_run_is_refused_in_one_line_and_the_lock_is_released(gcs):
  workdir = f'gs://{BUCKET}/lock/busy'
  argv = ['python', '-m', 'denseflow_jax.main', '--workdir', workdir]
  host, pid = re.escape(socket.gethostname()), os.getpid()
  with bucket_lock(workdir, 'train', argv=argv):
    record = holder(workdir)
    assert (record['pid'], record['mode'], record['argv']) == (pid, 'train', argv)
    with pytest.raises(WorkdirBusyError) as refused:
      with bucket_lock(workdir, 'eval'):
        pass
    message = str(refused.value)
    assert re.fullmatch(
        rf'--workdir {workdir} is in use by pid {pid} on host {host}, running since '
        rf'{ISO_TIME}: --mode train \(python -m denseflow_jax.main --workdir {workdir}\)\. '
        rf'One run per workdir: wait for it to finish, stop it \(kill {pid} on {host}\), or '
        'use another --workdir', message), message
    assert holder(workdir) == record            # the refused run changed nothing
  assert holder(workdir) is None                # released: the object is deleted
  with bucket_lock(workdir, 'eval'):
    assert holder(workdir)['mode'] == 'eval'


def test_a_stale_lock_is_taken_over_by_exactly_one_run(gcs, monkeypatch, caplog):
  workdir = f'gs://{BUCKET}/lock/stale'
  monkeypatch.setenv(lock_lib.STALE_ENV, '2')
  lost = {'host': 'lost-vm', 'pid': 4242, 'since': '2026-01-01T00:00:00+00:00',
          'mode': 'train', 'argv': ['x'], 'beat': time.time()}
  lock_blob(workdir).upload_from_string(json.dumps(lost), if_generation_match=0)
  with pytest.raises(WorkdirBusyError, match='in use by pid 4242 on host lost-vm'):
    with bucket_lock(workdir, 'train'):     # fresh: refused
      pass
  time.sleep(2.5)                           # now stale: its beat is older than 2 s
  takers, outcomes, done = 4, [], threading.Event()
  start, first_read, seen = threading.Barrier(takers), threading.Barrier(takers), threading.local()
  real_read = lock_lib._read

  def read_together(blob):
    found = real_read(blob)
    if not getattr(seen, 'once', False):    # every taker sees the stale lock before any
      seen.once = True                      # takes it over: the race the precondition decides
      first_read.wait(30)
    return found

  monkeypatch.setattr(lock_lib, '_read', read_together)

  def take():
    start.wait()
    try:
      with bucket_lock(workdir, 'train'):
        outcomes.append('won')
        done.wait(30)                       # hold (beating) until the others have tried
    except WorkdirBusyError:
      outcomes.append('refused')
      if outcomes.count('refused') == takers - 1:
        done.set()

  threads = [threading.Thread(target=take) for _ in range(takers)]
  for t in threads:
    t.start()
  for t in threads:
    t.join(60)
  assert sorted(outcomes) == ['refused'] * (takers - 1) + ['won'], outcomes
  taken = [r.getMessage() for r in caplog.records if 'took over the lock' in r.getMessage()]
  assert len(taken) == 1 and '"host": "lost-vm"' in taken[0], taken
  assert holder(workdir) is None


# Holds the lock of argv[1] in a process of its own, printing 'locked', until killed.
HOLD = """
import sys, time
from denseflow_jax.bucket_lock import bucket_lock
with bucket_lock(sys.argv[1], 'train'):
  print('locked', flush=True)
  time.sleep(120)
"""


def test_a_run_that_lost_its_lock_stops_at_once(env):
  """Another run took the lock over (this one looked dead): the next heartbeat finds the
  object rewritten, says so in one line and ends the process."""
  workdir = f'gs://{BUCKET}/lock/lost'
  proc = subprocess.Popen([sys.executable, '-c', HOLD, workdir], cwd=ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    assert proc.stdout.readline() == 'locked\n', proc.stderr.read()
    lock_blob(workdir).upload_from_string('{"pid": 1, "host": "taker"}')   # a takeover
    assert proc.wait(timeout=30) == lock_lib.LOST_EXIT_CODE
  finally:
    proc.kill()
  lines = proc.stderr.read().strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(
      f'error: --workdir {workdir}: this run lost its lock'), lines
  assert holder(workdir) == {'pid': 1, 'host': 'taker'}     # the taker's lock is left alone


def test_missing_credentials_are_one_line(gcs, monkeypatch, tmp_path):
  """No emulator and no credentials anywhere (no key file, no gcloud login, and the
  metadata server at 127.0.0.1:1): the bucket lock says what to do."""
  for name in ('STORAGE_EMULATOR_HOST', 'GOOGLE_APPLICATION_CREDENTIALS'):
    monkeypatch.delenv(name, raising=False)
  monkeypatch.setenv('CLOUDSDK_CONFIG', str(tmp_path))
  # google-auth read these when it was imported, before the emulator's environment was set.
  monkeypatch.setattr(gce_metadata, '_NO_GCE_CHECK', True)
  monkeypatch.setattr(gce_metadata, '_GCE_METADATA_HOST', '127.0.0.1:1')
  with pytest.raises(ConfigError) as error:
    with bucket_lock(f'gs://{BUCKET}/x', 'train'):
      pass
  assert str(error.value).startswith(f'--workdir gs://{BUCKET}/x: no Google Cloud credentials '
                                     'were found; run `gcloud auth application-default login`')
  assert isinstance(error.value.__context__, google.auth.exceptions.DefaultCredentialsError)


def test_bucket_files_are_written_whole_or_not_at_all(gcs):
  """files.py on a bucket: a failing writer uploads nothing (the old object stays), a log
  grows by appends, and a result never replaces an earlier one."""
  path = f'gs://{BUCKET}/files/result.json'
  files.write_json_atomic(path, {'a': 1})

  def fail_halfway(f):
    f.write(b'{"half": ')
    raise RuntimeError('disk full')

  with pytest.raises(RuntimeError, match='disk full'):
    files.atomic_write(path, fail_halfway)
  assert json.loads(epath.Path(path).read_text()) == {'a': 1}
  log = f'gs://{BUCKET}/files/log.jsonl'
  files.append_text(log, 'one\n')
  files.append_text(log, 'two\n')
  assert epath.Path(log).read_text() == 'one\ntwo\n'
  assert files.unused_stem(f'gs://{BUCKET}/files/result', ('.json',)) == (
      f'gs://{BUCKET}/files/result-2')


@pytest.mark.parametrize('field', ['source', 'tfds_data_dir'])
def test_data_in_a_bucket_is_refused_in_one_line(make_config, field):
  """Data is read from a file system (README, "Multi-host"): a gs:// data path is refused
  before anything loads, naming the way out."""
  config = make_config({f'data.{field}': 'gs://bucket/data'})
  with pytest.raises(ConfigError) as error:
    Settings.from_config(config, ('data',))
  assert str(error.value) == (
      f"data.{field} must be a file-system path: data is not read from gs:// URLs (copy it "
      'to local disk, or mount the bucket with gcsfuse and give the mounted path), got '
      "'gs://bucket/data'")


# ---------------------------------------------------------------- the command line


def command(workdir, mode='train'):
  return [sys.executable, '-m', 'denseflow_jax.main', '--config', 'configs/digits.py',
          '--workdir', str(workdir), '--mode', mode, *RUN_OVERRIDES]


def start(workdir, env, log_path):
  log = open(log_path, 'ab')   # pylint: disable=consider-using-with
  proc = subprocess.Popen(command(workdir), cwd=ROOT, env=env, stdout=log,
                          stderr=subprocess.STDOUT)
  log.close()
  return proc


def run(workdir, env, mode='train', timeout=240):
  return subprocess.run(command(workdir, mode), cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=timeout)


def wait_until(condition, proc, log_path, timeout=240):
  deadline = time.monotonic() + timeout
  while not condition():
    assert proc.poll() is None, pathlib.Path(log_path).read_text()[-3000:]
    assert time.monotonic() < deadline, f'timed out: {pathlib.Path(log_path).read_text()[-3000:]}'
    time.sleep(0.1)


def train_records(workdir):
  path = epath.Path(str(workdir)) / metrics_log.METRICS_FILE
  return ([r for r in metrics_log.read_metrics(workdir) if 'train_bpd' in r]
          if path.exists() else [])


def test_missing_bucket_is_one_line(env):
  result = run('gs://no-such-bucket/runs/d', env, timeout=120)
  assert result.returncode == 1 and result.stdout == '', result.stdout + result.stderr
  assert result.stderr.strip().splitlines() == [
      'error: --workdir gs://no-such-bucket/runs/d: the bucket gs://no-such-bucket does not '
      'exist; create it (gcloud storage buckets create gs://no-such-bucket) or fix the bucket '
      'name in --workdir'], result.stderr


@pytest.fixture(scope='module')
def straight(env, tmp_path_factory):
  """The uninterrupted run, on local disk (also fills the compilation cache)."""
  workdir = tmp_path_factory.mktemp('straight') / 'run'
  result = run(workdir, env)
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir


def test_bucket_run_killed_and_resumed_equals_local_then_eval_and_sample(env, straight,
                                                                        tmp_path):
  workdir, log_path = f'gs://{BUCKET}/runs/d', tmp_path / 'run.log'
  first = start(workdir, env, log_path)
  try:
    wait_until(lambda: (holder(workdir) or {}).get('pid') == first.pid, first, log_path)
    second = run(workdir, env, timeout=120)   # refused at once, first line of main
    assert second.returncode == 1 and second.stdout == '', second.stderr[-3000:]
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        f'error: --workdir {workdir} is in use by pid {first.pid} on host '), lines
    wait_until(lambda: len(train_records(workdir)) >= KILL_AFTER, first, log_path)
  finally:
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=60)
  killed = time.monotonic()
  assert holder(workdir)['pid'] == first.pid      # a killed run's lock is left behind...
  assert 0 < len(train_records(workdir)) < NUM_STEPS
  time.sleep(max(0.0, STALE_S - (time.monotonic() - killed)))
  resumed = run(workdir, env)                     # ...and taken over once stale
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert 'took over the lock' in resumed.stderr and 'resuming from step' in resumed.stdout
  assert holder(workdir) is None

  records, reference = train_records(workdir), train_records(straight)
  assert [r['step'] for r in records] == list(range(1, NUM_STEPS + 1))
  assert [r['train_bpd'] for r in records] == pytest.approx(
      [r['train_bpd'] for r in reference], rel=1e-6)
  step, state = final_state(workdir)
  assert step == NUM_STEPS
  assert_same_state(state, final_state(straight)[1])
  assert [e['event'] for e in metrics_log.read_events(workdir)][-1] == 'finish'
  assert (epath.Path(workdir) / ckpt_lib.BEST_DIR / ckpt_lib.VARIABLES_DIR).is_dir()
  assert list((epath.Path(workdir) / metrics_log.TENSORBOARD_DIR).iterdir())

  evaluated = run(workdir, env, 'eval')
  assert evaluated.returncode == 0, evaluated.stderr[-3000:]
  result = json.loads((epath.Path(workdir) / 'eval_test_k2_latest_raw.json').read_text())
  assert (result['checkpoint'], result['step']) == (workdir, NUM_STEPS)
  sampled = run(workdir, env, 'sample')
  assert sampled.returncode == 0, sampled.stderr[-3000:]
  stem = epath.Path(workdir) / 'samples' / 'samples_T1_n4_latest_raw'
  with (stem.parent / (stem.name + '.npz')).open('rb') as f, np.load(f) as npz:
    assert npz['images'].shape == (4, 8, 8, 1)
  assert (stem.parent / (stem.name + '.png')).is_file()
  assert f'-> {stem}.png' in sampled.stdout
