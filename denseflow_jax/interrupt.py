"""Stopping a run cleanly on SIGTERM (preemption) or SIGINT (Ctrl-C).

    with stop_signals() as stop:
      for step in ...:
        ...
        if stop['signal']:          # 'SIGTERM' or 'SIGINT': checkpoint, then stop
          ...

The first signal only sets the flag, so the step in flight finishes and the loop can
write a checkpoint; a second Ctrl-C raises KeyboardInterrupt at once.
"""
import contextlib
import logging
import signal
import threading


@contextlib.contextmanager
def stop_signals():
  """Yields a dict whose 'signal' becomes the name of the first SIGTERM / SIGINT received
  (the loop then finishes its step, checkpoints and stops); a second SIGINT raises
  KeyboardInterrupt at once. The previous handlers are restored on exit. Outside the main
  thread (where handlers cannot be installed) nothing is installed."""
  flag = {'signal': None}
  if threading.current_thread() is not threading.main_thread():
    yield flag
    return

  def handler(signum, frame):
    del frame
    name = signal.Signals(signum).name
    if flag['signal'] is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt   # second Ctrl-C: abort now (the last checkpoint stays)
    if flag['signal'] is None:
      flag['signal'] = name
      logging.warning('%s received: finishing the current step, then checkpointing and '
                      'stopping (Ctrl-C again aborts without a checkpoint)', name)

  previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
  try:
    yield flag
  finally:
    for s, h in previous.items():
      signal.signal(s, h)
