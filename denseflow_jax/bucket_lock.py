"""One run per ``gs://`` workdir: a lock object with a heartbeat, where a file lock cannot work.

An object store has no flock, and nobody releases an object for a process that died. So
the lock is the object ``WORKDIR/.lock`` holding the holder's record (host, pid, since,
mode, command line; ``workdir_lock.holder_info``), and every change to it is a
conditional write that Cloud Storage applies to one writer only:

* **Taking it**: create the object with ``ifGenerationMatch=0`` (only if absent). Of two
  runs starting together exactly one create succeeds; the other gets HTTP 412 and is
  refused with the same one line as on a local workdir (``workdir_lock.busy_message``).
* **Heartbeat**: while the run lasts a thread rewrites the object every
  :data:`HEARTBEAT_S` seconds (or a sixth of a shorter staleness time) with
  ``ifGenerationMatch=<the generation it wrote last>``, and the time of this beat
  (``beat``, Unix seconds) in the record.
* **A killed holder** (kill -9, a preempted VM) stops beating. Once its last beat is
  more than :func:`stale_seconds` old (default :data:`STALE_S`;
  environment variable ``DENSEFLOW_BUCKET_LOCK_STALE_S``), a new run takes it over by
  rewriting it with ``ifGenerationMatch=<the stale generation>``: of two runs taking over
  together only one wins, and a holder that was only slow and beats in between makes both
  fail (the takers are then refused). A takeover is logged with the old holder's record.
  Staleness compares the holder's clock with this machine's: NTP-synchronised machines
  (Cloud TPU VMs are) differ by far less than the margin.
* **Losing it**: a heartbeat that finds the object rewritten or gone (another run took it
  over after this one could not beat for :func:`stale_seconds`, e.g. a network outage)
  prints one ``error:`` line and ends the process at once, so that two runs never go on
  writing one workdir (its unsaved steps are lost; the checkpoints stay).
* **Releasing it**: deleted at the end of the run, only if it is still this run's
  generation.

Multi-host: process 0 alone takes the lock (``modes._one_run``). Credentials and the
endpoint are google-cloud-storage's own: Application Default Credentials, or
``STORAGE_EMULATOR_HOST`` for an emulator (the tests; README, "Tests").
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import threading
import time

import google.auth.exceptions
import requests
from google.api_core import exceptions as gexc
from google.cloud import storage

from denseflow_jax.errors import ConfigError, WorkdirBusyError
from denseflow_jax.files import BUCKET_SCHEME
from denseflow_jax.workdir_lock import LOCK_FILE, busy_message, holder_info

HEARTBEAT_S = 30.0
STALE_S = 180.0      # six missed heartbeats: a live holder is never taken for dead
# A heartbeat at least this many times per staleness period, whatever the period.
BEATS_PER_STALE = 6
STALE_ENV = 'DENSEFLOW_BUCKET_LOCK_STALE_S'
# Exit status of a run that lost its lock (EX_TEMPFAIL: the same command may be rerun).
LOST_EXIT_CODE = 75

_log = logging.getLogger(__name__)


def stale_seconds() -> float:
  """How long a lock may go without a heartbeat before a new run takes it over."""
  value = os.environ.get(STALE_ENV, '')
  try:
    seconds = float(value) if value else STALE_S
  except ValueError:
    raise ConfigError(f'{STALE_ENV}={value!r} is not a number of seconds; unset it or set '
                      f'e.g. {STALE_ENV}={STALE_S:.0f}') from None
  if seconds <= 0:
    raise ConfigError(f'{STALE_ENV}={value} must be positive; unset it or set e.g. '
                      f'{STALE_ENV}={STALE_S:.0f}')
  return seconds


def split_url(url: str) -> tuple[str, str]:
  """'gs://bucket/a/b' -> ('bucket', 'a/b')."""
  bucket, _, name = os.fspath(url)[len(BUCKET_SCHEME):].partition('/')
  return bucket, name.strip('/')


def _lock_blob(workdir) -> storage.Blob:
  bucket, prefix = split_url(workdir)
  client = storage.Client()
  return client.bucket(bucket).blob(f'{prefix}/{LOCK_FILE}' if prefix else LOCK_FILE)


def _upload(blob: storage.Blob, record: dict, generation: int) -> int:
  """Writes ``record``, stamped with this moment (its 'beat', Unix seconds), if the
  object's generation is ``generation`` (0: absent); returns the new generation.
  gexc.PreconditionFailed: someone else changed it first."""
  data = json.dumps(dict(record, beat=time.time())) + '\n'
  blob.upload_from_string(data, content_type='application/json',
                          if_generation_match=generation)
  return int(blob.generation)


def _read(blob: storage.Blob) -> tuple[int, dict | None, float] | None:
  """(generation, holder record, seconds since its last beat) of the lock object, or
  None where it is absent. Content and generation come from one download, so they always
  belong together. The age is by the holder's clock against this machine's (the
  object's own timestamps would do as well on Cloud Storage, but emulators get them
  wrong on overwrites); an object without a readable beat counts as stale."""
  current = blob.bucket.blob(blob.name)
  try:
    data = current.download_as_bytes()
  except gexc.NotFound:
    return None
  try:
    record = json.loads(data)
    age = max(0.0, time.time() - float(record['beat']))
  except (ValueError, KeyError, TypeError):
    record, age = None, float('inf')
  holder = record if isinstance(record, dict) and 'pid' in record else None
  return int(current.generation), holder, age


def _acquire(workdir, blob: storage.Blob, record: dict) -> int:
  """Creates the lock object, or takes over a stale one; the generation written.
  WorkdirBusyError while another run holds it."""
  stale = stale_seconds()
  for _ in range(3):     # each retry needs the lock to change hands in between
    try:
      return _upload(blob, record, 0)
    except gexc.PreconditionFailed:
      pass
    found = _read(blob)
    if found is None:
      continue             # released in between: create it again
    current, holder, age = found
    if age < stale:
      raise WorkdirBusyError(busy_message(workdir, holder))
    try:
      generation = _upload(blob, record, current)
    except gexc.PreconditionFailed:
      continue             # another run took it over first, or the holder beat
    _log.warning('took over the lock of --workdir %s: its last heartbeat was %.0f s ago '
                 '(more than %.0f s), from %s', workdir, age, stale,
                 json.dumps(holder) if holder else 'an unreadable record')
    return generation
  raise WorkdirBusyError(busy_message(workdir, None))


class _Heartbeat(threading.Thread):
  """Rewrites the lock object every HEARTBEAT_S seconds (conditional on the generation it
  wrote last) until stopped; ends the process if another run took the lock over."""

  def __init__(self, workdir, blob: storage.Blob, record: dict, generation: int):
    super().__init__(name='workdir-lock-heartbeat', daemon=True)
    self.workdir, self.blob, self.record, self.generation = workdir, blob, record, generation
    self.interval = min(HEARTBEAT_S, stale_seconds() / BEATS_PER_STALE)
    self.stopped = threading.Event()

  def run(self):
    while not self.stopped.wait(self.interval):
      try:
        self.generation = _upload(self.blob, self.record, self.generation)
      except (gexc.PreconditionFailed, gexc.NotFound):
        if self.stopped.is_set():
          return
        print(f'error: --workdir {self.workdir}: this run lost its lock (it could not renew '
              f'it for {stale_seconds():.0f} s and another run took it over, or the lock '
              'object was deleted); stopping at once so that two runs never write one '
              'workdir. The other run resumes from the last checkpoint',
              file=sys.stderr, flush=True)
        os._exit(LOST_EXIT_CODE)        # pylint: disable=protected-access
      except Exception as e:            # pylint: disable=broad-except
        # A network problem: try again at the next beat (the lock goes stale only after
        # stale_seconds without one).
        _log.warning('could not renew the lock of --workdir %s (%s: %s); retrying',
                     self.workdir, type(e).__name__, e)


def _release(blob: storage.Blob, generation: int) -> None:
  """Deletes the lock object if it is still this run's (a failure is only logged: the
  lock then goes stale and the next run takes it over)."""
  try:
    blob.delete(if_generation_match=generation)
  except (gexc.NotFound, gexc.PreconditionFailed):
    pass
  except Exception as e:                # pylint: disable=broad-except
    _log.warning('could not remove the lock object gs://%s/%s (%s: %s); the next run takes '
                 'it over after %.0f s', blob.bucket.name, blob.name, type(e).__name__, e,
                 stale_seconds())


def _access_error(workdir, error: Exception) -> ConfigError:
  """The one-line error for a bucket this run cannot use: what is wrong and the fix."""
  bucket = split_url(workdir)[0]
  if isinstance(error, google.auth.exceptions.DefaultCredentialsError):
    return ConfigError(
        f'--workdir {workdir}: no Google Cloud credentials were found; run `gcloud auth '
        'application-default login`, or set GOOGLE_APPLICATION_CREDENTIALS to a service '
        "account's key file (a Cloud TPU VM uses its own service account)")
  if isinstance(error, gexc.NotFound):
    return ConfigError(
        f'--workdir {workdir}: the bucket gs://{bucket} does not exist; create it (gcloud '
        f'storage buckets create gs://{bucket}) or fix the bucket name in --workdir')
  if isinstance(error, (gexc.Forbidden, gexc.Unauthorized)):
    return ConfigError(
        f'--workdir {workdir}: no permission to write to gs://{bucket} ({error.message}); '
        'grant this account roles/storage.objectAdmin on the bucket or use another --workdir')
  return ConfigError(
      f'--workdir {workdir}: cannot reach Cloud Storage ({type(error).__name__}: '
      f'{" ".join(str(error).split())[:300]}); check the network and credentials, or use a '
      'local --workdir')


@contextlib.contextmanager
def bucket_lock(workdir, mode: str, is_primary: bool = True, argv=None):
  """Holds the lock of the ``gs://`` ``workdir`` for the ``with`` block (module
  docstring); the interface of ``workdir_lock.workdir_lock``.

  Raises:
    WorkdirBusyError: another live run holds it (the same line as for a local workdir).
    ConfigError: the bucket does not exist, no credentials, no permission, no network.
  """
  if not is_primary:
    yield
    return
  record = holder_info(mode, argv)
  try:
    blob = _lock_blob(workdir)
    generation = _acquire(workdir, blob, record)
  except (google.auth.exceptions.GoogleAuthError, gexc.GoogleAPICallError,
          requests.exceptions.RequestException) as e:
    raise _access_error(workdir, e) from None
  heartbeat = _Heartbeat(workdir, blob, record, generation)
  heartbeat.start()
  try:
    yield
  finally:
    heartbeat.stopped.set()
    heartbeat.join()
    _release(blob, heartbeat.generation)
