"""gpu_bench.py's JSON lines and clocks: where each line goes, the global budget and its
watchdog, a compile run under its own time limit, the timing of repeated calls, and the
memory figures a line carries. Part of experiments/gpu_bench.py (its docstring describes
the lines); nothing here imports JAX."""
import json
import os
import threading
import time


class Bench:
  """State shared by the measurements: where lines go, the clock, the common context."""

  def __init__(self, out_dir, start, budget_s, grace_s):
    """`start`: time.monotonic() when the process started (the budget counts from it)."""
    self.out_path = os.path.join(out_dir, 'bench.jsonl') if out_dir else None
    if out_dir:
      os.makedirs(out_dir, exist_ok=True)
    self.start = start
    self.budget_s = budget_s
    self.grace_s = grace_s
    self.context = {}
    # What the process is doing, for the watchdog's line. Until 'init': jax.devices(),
    # which starts the backend and imports its plugin (the CUDA plugin on a GPU machine).
    self.current = 'imports'
    self.background = []      # names of compiles abandoned at their budget, still running

  def elapsed(self):
    return time.monotonic() - self.start

  def remaining(self):
    return self.budget_s - self.elapsed()

  def emit(self, line):
    line = {**line, **self.context, 'elapsed_s': round(self.elapsed(), 1)}
    if self.background:
      line['compiles_still_running'] = list(self.background)
    text = json.dumps(line)
    print(text, flush=True)
    if self.out_path:
      with open(self.out_path, 'a') as f:
        f.write(text + '\n')

  def skip(self, name, reason, **extra):
    self.emit({'name': name, 'status': 'skipped', 'reason': reason, **extra})

  def watchdog(self):
    """A thread that prints a line and ends the process (exit 3) past budget + grace."""
    def watch():
      while self.remaining() > -self.grace_s:
        time.sleep(1.0)
      self.emit({'event': 'deadline', 'during': self.current,
                 'message': f'--budget_s {self.budget_s} + {self.grace_s} s passed; exiting'})
      os._exit(3)
    threading.Thread(target=watch, daemon=True).start()

  def timed_calls(self, fn, steps, t0, budget, then_again=False):
    """Seconds of each of up to `steps` calls fn(i) (each synchronised; at least 3), as
    many as the measurement's budget (started at t0) and the time left allow;
    `then_again`: the caller repeats as many calls afterwards."""
    times = []
    while len(times) < steps:
      start = time.perf_counter()
      fn(len(times))
      times.append(time.perf_counter() - start)
      more = (2 + (len(times) + 1 if then_again else 0)) * times[-1]
      if len(times) >= 3 and (time.monotonic() - t0 + more > budget or more > self.remaining()):
        break
    return times


def within(seconds, fn):
  """fn() in a thread; (True, result) or (False, None) if it takes longer than `seconds`
  (the thread is left to finish: XLA compiles cannot be interrupted). Exceptions propagate."""
  box = {}

  def run():
    try:
      box['result'] = fn()
    except BaseException as e:  # noqa: BLE001 - re-raised in the caller
      box['error'] = e
  thread = threading.Thread(target=run, daemon=True)
  thread.start()
  thread.join(max(seconds, 0.0))
  if thread.is_alive():
    return False, None
  if 'error' in box:
    raise box['error']
  return True, box['result']


def sig(value, digits=4):
  """`value` rounded to `digits` significant digits."""
  return float(f'{value:.{digits}g}')


def memory(device, compiled=None):
  """The device's memory so far (memory_stats, GiB) and, given a compiled program, its own
  temporary and argument memory (XLA's memory_analysis), where the backend reports them."""
  out = {}
  stats = device.memory_stats() if hasattr(device, 'memory_stats') else None
  if stats:
    for key in ('peak_bytes_in_use', 'bytes_in_use', 'bytes_limit'):
      if key in stats:
        out[key.replace('bytes', 'gib')] = round(stats[key] / 2 ** 30, 3)
  if compiled is not None:
    try:
      mem = compiled.memory_analysis()
      out['program_temp_gib'] = round(mem.temp_size_in_bytes / 2 ** 30, 3)
      out['program_args_gib'] = round(mem.argument_size_in_bytes / 2 ** 30, 3)
    except Exception:  # noqa: BLE001 - not every backend reports it
      pass
  return out
