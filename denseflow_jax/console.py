"""What a long job shows on the console while it runs: a progress bar on a terminal,
plain periodic lines in a log file.

    with Progress(total=5750, initial=0, desc='pretrain') as progress:
      progress.say('compiling the train step ...')    # a line, never glued onto the bar
      ... first step (compiles) ...
      progress.start(step)                             # the bar (and its ETA) from here
      progress.update(step, bpd='3.41')

* On a terminal (stderr is a TTY) a tqdm bar on stderr. It is created by ``start``, after
  the compilation, so its rate and ETA count only the steps that follow.
* Otherwise (a batch job's log, ``2> file``) no bar: ``update`` prints one plain line on
  stderr per ``plain_every`` steps (``pretrain step 100/5750 (1.7%): bpd 3.41, img_s
  812.0; eta 1:13:09``) instead of ~30 carriage-return redraws per second.
* ``say`` prints a line of the run's story on stdout, above the bar; while the Progress
  is open, Python and absl log records are printed on stderr as ``warning: ...`` lines,
  also above the bar, never inside it.
* Everything is silent where ``enabled`` is False (processes other than 0).
"""
from __future__ import annotations

import contextlib
import datetime
import logging
import os
import sys
import time
from typing import Optional, TextIO

from tqdm.auto import tqdm


def is_interactive(stream: TextIO) -> bool:
  """A terminal, where a redrawn bar reads well (not a file or a pipe).

  A terminal that reports a width of 0 columns (a pseudo-terminal nobody sized, as some
  job runners and ``script`` give) counts as not one: tqdm draws nothing there, and plain
  lines are better than silence."""
  if not getattr(stream, 'isatty', lambda: False)():
    return False
  try:
    return os.get_terminal_size(stream.fileno()).columns > 0
  except (AttributeError, OSError, ValueError):   # no fileno, not a terminal, closed
    return True       # a terminal whose width cannot be asked: trust isatty


class _LineHandler(logging.Handler):
  """Log records as plain console lines through ``write``."""

  def __init__(self, write):
    super().__init__(logging.INFO)
    self._write = write

  def emit(self, record: logging.LogRecord) -> None:
    self._write(f'{record.levelname.lower()}: {record.getMessage()}')


class Progress(contextlib.AbstractContextManager):
  """The console of one long loop: see the module docstring."""

  def __init__(self, total: int, initial: int = 0, desc: str = '', unit: str = 'step',
               enabled: bool = True, stream: Optional[TextIO] = None,
               lines: Optional[TextIO] = None, plain_every: int = 1):
    self.total, self.desc, self.unit, self.enabled = int(total), desc, unit, enabled
    self._stream = sys.stderr if stream is None else stream     # the bar, plain lines, logs
    self._lines = sys.stdout if lines is None else lines        # the story
    self.interactive = is_interactive(self._stream)
    self._plain_every = max(1, int(plain_every))
    self._bar = None
    self._started_at, self._started_step = None, int(initial)
    self._root_handlers = None
    if enabled:   # log records through say() while open (absl's handler sits on the root)
      root = logging.getLogger()
      self._root_handlers = root.handlers[:]
      root.handlers = [_LineHandler(lambda line: self._write(line, self._stream))]

  def say(self, message: str) -> None:
    """One line of the story on stdout, off the bar."""
    if self.enabled:
      self._write(message, self._lines)

  def _write(self, line: str, file: TextIO) -> None:
    tqdm.write(line, file=file)   # clears the bar first and redraws it after
    file.flush()

  def start(self, step: int) -> None:
    """Timing (rate, ETA) from now, at ``step`` done: call after the compilation."""
    self._started_at, self._started_step = time.perf_counter(), int(step)
    if self.enabled and self.interactive and self._bar is None:
      self._bar = tqdm(total=self.total, initial=int(step), desc=self.desc, unit=self.unit,
                       dynamic_ncols=True, file=self._stream)

  def status(self, text: str) -> None:
    """What the loop is doing now (e.g. 'evaluating'): the bar's label on a terminal."""
    if self._bar is not None:
      self._bar.set_description(text)

  def update(self, step: int, **postfix) -> None:
    """``step`` steps done; ``postfix`` (name: text) shown beside the bar, or in the plain
    line every ``plain_every`` steps."""
    if not self.enabled:
      return
    if self._bar is not None:
      self._bar.set_description(self.desc)
      if postfix:
        self._bar.set_postfix(postfix, refresh=False)
      self._bar.update(int(step) - self._bar.n)
    elif not self.interactive and (step % self._plain_every == 0 or step == self.total):
      self._write(self._plain_line(int(step), postfix), self._stream)

  def _plain_line(self, step: int, postfix) -> str:
    line = f'{self.desc} {self.unit} {step}/{self.total} ({100 * step / self.total:.1f}%)'
    if postfix:
      line += ': ' + ', '.join(f'{k} {v}' for k, v in postfix.items())
    done = step - self._started_step
    if self._started_at is not None and done > 0 and step < self.total:
      rate = (time.perf_counter() - self._started_at) / done
      line += f'; eta {datetime.timedelta(seconds=round(rate * (self.total - step)))}'
    return line

  def close(self) -> None:
    if self._bar is not None:
      self._bar.set_description(self.desc)   # the last label may be 'evaluating'
      self._bar.close()
      self._bar = None
    if self._root_handlers is not None:
      logging.getLogger().handlers = self._root_handlers
      self._root_handlers = None

  def __exit__(self, *exc_info) -> None:
    self.close()
