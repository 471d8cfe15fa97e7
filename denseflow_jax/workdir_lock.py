"""One run per --workdir: an exclusive lock on ``WORKDIR/.lock`` for the run's lifetime.

Two runs in one workdir (the same training command started twice) would both train,
write every metrics record twice and collide on checkpoint steps. ``workdir_lock`` takes
``fcntl.flock(LOCK_EX | LOCK_NB)`` on ``WORKDIR/.lock``, kept open while the run lasts,
and writes who holds it (host, pid, start time, mode, command line) into the file, so a
second run is refused with :class:`~denseflow_jax.errors.WorkdirBusyError` naming the
running one and the fix.

What the lock does and does not cover:

* A holder that dies in any way (kill -9, out of memory, a crash) releases the lock:
  the kernel drops a flock with the last open descriptor of the file, so on a local
  file system there is never a stale lock to clean up. The file stays (emptied at a
  normal exit); a leftover is harmless, and holder info is only ever reported while
  the lock is actually held (a killed holder's info is recognised as such on its own
  host). A run that wrote nothing else (a bad setting found inside the mode) removes
  the file, and the workdir if it created it, so that a failed command leaves no trace.
* Shared file systems: Linux's NFS client carries flock to the server as a whole-file
  lock (unless mounted with ``local_lock=flock|all`` or ``nolock``), so the lock holds
  across hosts. If the holder's machine is lost (power, network), an NFSv4 server
  releases the lock when that client's lease expires (typically 90 s); until then a new
  run is refused, naming the lost host. An NFSv3 server (lockd) frees it only when the
  client reboots or an administrator clears it. FUSE mounts that do not implement locks
  (gcsfuse, for one) lock per host only: no protection between hosts.
* A file system that refuses locks altogether (ENOLCK, EOPNOTSUPP, ...) does not block
  anybody: the run proceeds unlocked after a logged warning.
* The descriptor is not inherited by programs the run starts (PEP 446), so a spawned
  helper does not keep the lock; a child forked without exec shares it until it exits.
* Multi-host: one lock for the whole job, taken by the primary process (process 0)
  alone; the others pass ``is_primary=False`` and touch nothing.
* A ``gs://`` workdir has no file to lock: bucket_lock.py holds a lock object with a
  heartbeat instead (same interface, same refusal line).

Stdlib only, so it can be used (and tested) without importing JAX.
"""
import contextlib
import datetime
import errno
import fcntl      # POSIX only (Linux, macOS), like the rest of the package
import json
import logging
import os
import shlex
import socket
import sys
import time

from denseflow_jax.errors import ConfigError, WorkdirBusyError

LOCK_FILE = '.lock'
# errno values with which flock says "held by someone else": EWOULDBLOCK (= EAGAIN on
# Linux) locally; EACCES from some NFS clients, as for fcntl locks.
_BUSY = {errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES}
# errno values with which a file system says it cannot lock at all: not a reason to
# refuse a run (the warning says the workdir is unprotected).
_UNSUPPORTED = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EINVAL}
# How long a refused run waits for the holder's info to appear: the holder writes it
# right after taking the lock, so only a run refused in that instant waits at all.
_INFO_WAIT_S = 2.0
# Retries of open + lock when the lock file is removed under us (by a run that wrote
# nothing else, see _release): each retry needs another such run to finish in between.
_OPEN_TRIES = 100

_log = logging.getLogger(__name__)


class _Busy(Exception):
  """flock found the lock held (kept apart from other OSErrors: an EACCES from opening
  the file is a permission problem, not a busy workdir)."""


def holder_info(mode: str, argv=None) -> dict:
  """The record a holder writes into the lock file: host, pid, since (local ISO time
  with UTC offset), mode and the command line (``argv``; default ``sys.orig_argv``, the
  command as typed: ``python -m denseflow_jax.main ...``, where ``sys.argv[0]`` would be
  the path of main.py)."""
  return {'host': socket.gethostname(), 'pid': os.getpid(),
          'since': datetime.datetime.now().astimezone().isoformat(timespec='seconds'),
          'mode': mode, 'argv': list(sys.orig_argv if argv is None else argv)}


def read_holder(path) -> dict | None:
  """The holder record in lock file ``path``, or None if it is empty, partly written or
  unreadable. It says who holds the lock only while the lock is held (see
  :func:`workdir_lock`); callers must not take it as proof of a running process."""
  try:
    with open(path, encoding='utf-8') as f:
      record = json.loads(f.read())
  except (OSError, ValueError):
    return None
  return record if isinstance(record, dict) and 'pid' in record else None


def _is_dead_here(record: dict) -> bool:
  """True if ``record`` names a process on this host that no longer exists: the info a
  killed holder left, not yet overwritten by the new holder (which just took the lock)."""
  if record.get('host') != socket.gethostname():
    return False     # another host's process cannot be checked from here
  try:
    os.kill(int(record['pid']), 0)
  except ProcessLookupError:
    return True
  except (OSError, ValueError, TypeError):
    return False     # exists but belongs to another user, or a malformed pid
  return False


def _current_holder(path) -> dict | None:
  """The live holder's record, waiting up to _INFO_WAIT_S for it: right after taking the
  lock the new holder has not yet replaced the file's old content (nothing, or the
  record of a killed holder)."""
  deadline = time.monotonic() + _INFO_WAIT_S
  while True:
    record = read_holder(path)
    if record is not None and not _is_dead_here(record):
      return record
    if time.monotonic() >= deadline:
      return None
    time.sleep(0.05)


def busy_message(workdir, record: dict | None) -> str:
  """The one-line refusal: who runs in ``workdir`` (from ``record``, if known) and the
  three ways out."""
  if record is None:
    who = 'another run (its details were not readable)'
    stop = 'stop it'
  else:
    host, pid = record.get('host', '?'), record.get('pid', '?')
    command = ' '.join(shlex.quote(str(a)) for a in record.get('argv') or [])
    who = (f'pid {pid} on host {host}, running since {record.get("since", "?")}: '
           f'--mode {record.get("mode", "?")}' + (f' ({command})' if command else ''))
    stop = f'stop it (kill {pid} on {host})'
  text = (f'--workdir {workdir} is in use by {who}. One run per workdir: wait for it to '
          f'finish, {stop}, or use another --workdir')
  return ' '.join(text.split())     # one line whatever the command line held


def _missing_dirs(workdir) -> list:
  """The directories from ``workdir`` up that do not exist yet (deepest first): what
  creating it creates, and what a run that wrote nothing removes again."""
  missing, path = [], os.path.abspath(workdir)
  while not os.path.exists(path):
    missing.append(path)
    path = os.path.dirname(path)
  return missing


def _open_locked(workdir, path):
  """Opens (creating if needed) and locks ``path``: (fd, locked, created).

  ``locked`` is False where locking is unsupported (warned); ``created`` tells whether
  this call created the file. Creating the file or the workdir never touches a live
  run's files: a run holding the lock always has the file, so a missing file means a
  free workdir, and opening an existing file changes nothing in it. After the lock is
  taken, the file must still be the one at ``path``: a run that wrote nothing removes
  its lock file (and workdir) while holding the lock, and an opener that got the old
  file then retries on the new one (the usual check that makes unlinking a flock'ed
  file safe). _Busy: another run holds the lock.
  """
  for _ in range(_OPEN_TRIES):
    os.makedirs(workdir, exist_ok=True)
    try:
      fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
      created = True
    except FileExistsError:
      try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
      except FileNotFoundError:
        continue       # removed in between: create it
      created = False
    except FileNotFoundError:
      continue         # the workdir was removed in between: create it again
    try:
      locked = _try_flock(fd, path)
      if locked and not _same_file(fd, path):
        os.close(fd)
        continue       # removed by its last holder after we opened it
    except BaseException:
      os.close(fd)
      raise
    return fd, locked, created
  raise WorkdirBusyError(f'{path} kept being removed while this run tried to lock it: '
                         'another program is deleting files in --workdir; stop it or use '
                         'another --workdir')


def _same_file(fd, path) -> bool:
  """True if descriptor ``fd`` is the file now at ``path``."""
  try:
    st = os.stat(path)
  except FileNotFoundError:
    return False
  return os.path.samestat(os.fstat(fd), st)


def _try_flock(fd, path) -> bool:
  """Takes the lock without waiting: True if taken, False if the file system cannot
  lock (a warning is logged); _Busy if the lock is held elsewhere."""
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except OSError as e:
    if e.errno in _BUSY:
      raise _Busy() from e
    if e.errno in _UNSUPPORTED:
      _log.warning('the file system of %s does not support locking (%s): proceeding '
                   'without protection against a second run in the same workdir', path, e)
      return False
    raise
  return True


def _write_holder(fd, record: dict):
  """Replaces the file's content with ``record`` (one JSON line), flushed to the file
  system so that a refused run on another host can read it."""
  data = (json.dumps(record) + '\n').encode('utf-8')
  os.ftruncate(fd, 0)
  os.pwrite(fd, data, 0)
  os.fsync(fd)


def _release(fd, path, locked: bool, created_dirs: list, created_file: bool):
  """Ends a run's hold on its lock file; the lock itself goes with ``os.close``.

  The holder info is erased first (the file emptied, not removed), so a finished run's
  info is never read as a live holder's. If the run wrote nothing but the lock file it
  created (a mode that failed on a bad setting, say), the file, and the workdir if this
  run created it, are removed while still locked: a bad command leaves no trace.
  """
  try:
    if not locked:
      return
    with contextlib.suppress(OSError):
      os.ftruncate(fd, 0)
    workdir = os.path.dirname(path)
    with contextlib.suppress(OSError):
      if created_file and os.listdir(workdir) == [LOCK_FILE]:
        os.unlink(path)
        for directory in created_dirs:     # deepest first; stops at one not empty
          os.rmdir(directory)
  finally:
    os.close(fd)      # releases the flock (the only descriptor of this open file)


@contextlib.contextmanager
def workdir_lock(workdir, mode: str, is_primary: bool = True, argv=None):
  """Holds the exclusive lock of ``workdir`` for the ``with`` block.

  Args:
    workdir: the run's directory; created if missing (a missing workdir has no holder).
    mode: what the run does ('train', 'eval', ...), reported to a refused run.
    is_primary: False on every process but process 0 of a multi-host job: those take no
      lock and touch nothing (process 0's lock covers the job).
    argv: the command line to report (default ``sys.orig_argv``).

  Raises:
    WorkdirBusyError: another run holds the lock; the message names its host, pid, start
      time and command, and the fix. Nothing in ``workdir`` was created or changed.
    ConfigError: the lock file cannot be opened (permissions).

  On leaving the block the holder info is erased (the file is emptied and kept, unless
  the run wrote nothing else: see _release) and the lock released; a killed holder's
  lock is released by the kernel (module docstring). Where locking is unsupported the
  block runs unlocked after a logged warning.
  """
  if not is_primary:
    yield
    return
  path = os.path.join(workdir, LOCK_FILE)
  created_dirs = _missing_dirs(workdir)
  try:
    fd, locked, created_file = _open_locked(workdir, path)
  except _Busy:
    raise WorkdirBusyError(busy_message(workdir, _current_holder(path))) from None
  except PermissionError as e:     # e.g. a .lock left by another user
    raise ConfigError(f'--workdir {workdir}: cannot open {path} ({e.strerror}); fix the '
                      'permissions or choose another --workdir') from None
  try:
    if locked:
      _write_holder(fd, holder_info(mode, argv))
    yield
  finally:
    _release(fd, path, locked, created_dirs, created_file)
