"""The console of a run: a bar on a terminal, plain periodic lines in a log file, log
records and story lines kept off the bar, the compile notice, and a finish line and
TensorBoard folder that name and hold only what exists."""
import fcntl
import io
import logging
import os
import pathlib
import pty
import struct
import subprocess
import sys
import termios

from denseflow_jax import metrics_log
from denseflow_jax.console import Progress

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = ['--config.model.block_config=(2,)', '--config.model.layers_config=(1,)',
        '--config.model.mid_channels=(8,)', '--config.model.growth_rate=2',
        '--config.train.batch_size=8', '--config.eval.batch_size=8',
        '--config.eval.num_examples=8', '--config.train.log_every=2']


class Terminal(io.StringIO):
  def isatty(self):
    return True


def test_plain_lines_without_a_terminal_every_n_steps_with_an_eta():
  err, out = io.StringIO(), io.StringIO()
  with Progress(10, desc='pretrain', stream=err, lines=out, plain_every=5) as progress:
    progress.say('compiling the train step...')
    progress.start(0)
    for step in range(1, 11):
      progress.update(step, bpd='3.4000')
  assert out.getvalue() == 'compiling the train step...\n'
  lines = err.getvalue().splitlines()
  assert '\r' not in err.getvalue()
  assert [line.split(':')[0] for line in lines] == ['pretrain step 5/10 (50.0%)',
                                                      'pretrain step 10/10 (100.0%)']
  assert lines[0].startswith('pretrain step 5/10 (50.0%): bpd 3.4000; eta ')
  assert 'eta' not in lines[1]                     # finished: nothing left to estimate


def test_on_a_terminal_the_bar_starts_after_compiling_and_log_records_stay_off_it():
  err, out = Terminal(), io.StringIO()
  with Progress(4, desc='pretrain', stream=err, lines=out) as progress:
    progress.update(1)                             # before start: the compile step, no bar
    assert err.getvalue() == ''
    progress.start(1)
    progress.update(2)
    logging.getLogger('absl').warning('SIGINT received: finishing the current step')
    progress.update(3)
  text = err.getvalue()
  assert '\nwarning: SIGINT received: finishing the current step\n' in text.replace('\r', '\n')
  # The warning has a line of its own: no bar text before it on the same line.
  line = [piece for piece in text.replace('\r', '\n').split('\n') if 'SIGINT' in piece]
  assert line == ['warning: SIGINT received: finishing the current step']
  assert '2/4' in text and '3/4' in text and '1/4' in text
  assert out.getvalue() == ''


def _pseudo_terminal_output(columns):
  """What Progress writes to a real pseudo-terminal ``columns`` wide (0: never sized)."""
  master, slave = pty.openpty()
  fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack('HHHH', 24, columns, 0, 0))
  with os.fdopen(slave, 'w') as terminal:
    with Progress(4, desc='pretrain', stream=terminal, lines=io.StringIO(),
                  plain_every=2) as progress:
      interactive = progress.interactive
      progress.start(0)
      for step in range(1, 5):
        progress.update(step, bpd='3.4000')
  written = b''
  os.set_blocking(master, False)
  try:
    while chunk := os.read(master, 65536):
      written += chunk
  except OSError:       # drained (EAGAIN), or the terminal's side is closed (EIO)
    pass
  os.close(master)
  return interactive, written.decode()


def test_a_sized_terminal_gets_the_bar_and_an_unsized_one_plain_lines():
  """tqdm draws nothing on a terminal 0 columns wide (``script``, some job runners): there
  the plain lines are written instead of nothing."""
  interactive, written = _pseudo_terminal_output(100)
  assert interactive and '4/4' in written and '\r' in written
  interactive, written = _pseudo_terminal_output(0)
  assert not interactive
  assert 'pretrain step 2/4 (50.0%): bpd 3.4000' in written
  assert 'pretrain step 4/4 (100.0%)' in written


def test_log_handlers_are_restored():
  root = logging.getLogger()
  before = root.handlers[:]
  with Progress(1, stream=io.StringIO(), lines=io.StringIO()):
    assert root.handlers != before
  assert root.handlers == before
  with Progress(1, enabled=False):                 # processes other than 0 change nothing
    assert root.handlers == before


def test_a_run_to_a_log_file_reads_as_lines(tmp_path):
  """--mode train with stderr in a file: plain lines, no carriage returns; the compile
  notice on stdout; the finish line names no samples folder (none was written); a rerun of
  the finished run adds no TensorBoard file."""
  workdir = tmp_path / 'run'
  command = [sys.executable, '-m', 'denseflow_jax.main', '--config', 'configs/digits.py',
             '--workdir', str(workdir), '--config.train.num_steps=4', *TINY]
  with open(tmp_path / 'err', 'w') as err:
    proc = subprocess.run(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=err, text=True,
                          timeout=300)
  stderr = (tmp_path / 'err').read_text()
  assert proc.returncode == 0, stderr
  assert '\r' not in stderr
  assert [line.split(':')[0] for line in stderr.splitlines()] == [
      'pretrain step 2/4 (50.0%)', 'pretrain step 4/4 (100.0%)'], stderr
  out = proc.stdout.splitlines()
  assert out[0].startswith('initialising the model on the first batch')
  assert out[2].startswith('compiling the train step (once per run')
  assert out[3].startswith('compiled the train step in ')
  assert out[-1].startswith('finished 4 steps') and 'metrics in' in out[-1]
  assert 'samples in' not in out[-1] and not (workdir / 'samples').exists()
  events = list((workdir / metrics_log.TENSORBOARD_DIR).iterdir())
  again = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert again.returncode == 0, again.stderr
  assert again.stdout.startswith('already finished at step 4 of 4')
  assert list((workdir / metrics_log.TENSORBOARD_DIR).iterdir()) == events
