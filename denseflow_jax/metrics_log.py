"""What a training run records: the metrics window (sums kept on the device between log
lines) and the log itself (WORKDIR/metrics.jsonl and TensorBoard scalars, process 0 only).

One JSON object per line in metrics.jsonl, each with its 'step'. Metrics records (training
and evaluation) and, between them, the story of the run as 'event' records (the lines the
console prints when a run starts, resumes, is already finished, is interrupted or finishes):

    {"event": "start", "message": "starting a new run in DIR: 200 steps (pretrain)", "step": 0}
    {"step": 100, "epoch": 0.5, "lr": 0.001, "train_bpd": 3.41, "img_per_s": 812.0,
     "grad_norm": 2.3, "skipped": 0, "skipped_steps": [], "skipped_total": 0}
    {"step": 200, "epoch": 1.0, "test_bpd": 3.38}
    {"event": "finish", "message": "finished 200 steps in 95 s; ...", "step": 200}

The metrics go to TensorBoard as 'train/<name>' and 'eval/<name>'; events do not. In a
``gs://`` workdir tensorboardX writes its event files to the bucket itself (its own
google-cloud-storage writer, which uploads the whole file at each flush), and
metrics.jsonl is rewritten by one upload per record (files.append_text). To read
only the metrics, skip the records that have an 'event' key (``read_metrics`` does).
"""
from __future__ import annotations

import functools
import json
import time
from typing import Callable, Mapping, Optional

import jax
import jax.numpy as jnp
from tensorboardX import SummaryWriter

from denseflow_jax.files import append_text, as_path, is_bucket, write_text_atomic

METRICS_FILE = 'metrics.jsonl'
TENSORBOARD_DIR = 'tensorboard'
EVENTS = ('start', 'resume', 'already_finished', 'compiled', 'interrupt', 'finish')


def _read_records(workdir) -> list:
  path = as_path(workdir) / METRICS_FILE
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_metrics(workdir) -> list:
  """The metrics records of WORKDIR/metrics.jsonl, in order (event records left out)."""
  return [r for r in _read_records(workdir) if 'event' not in r]


def read_events(workdir) -> list:
  """The event records (the run's story) of WORKDIR/metrics.jsonl, in order."""
  return [r for r in _read_records(workdir) if 'event' in r]


def _zero_sums(capacity: int) -> dict:
  return {'bpd_sum': jnp.zeros((), jnp.float32), 'finite': jnp.zeros((), jnp.int32),
          'skipped': jnp.zeros((), jnp.int32),
          'skipped_steps': jnp.zeros((capacity,), jnp.int32)}


@functools.partial(jax.jit, donate_argnums=0)
def _add(sums: dict, metrics: Mapping) -> dict:
  """Adds one train step's metrics to the window's sums (on the device, no host sync)."""
  skipped = metrics['skipped'] > 0
  slot = jnp.minimum(sums['skipped'], sums['skipped_steps'].shape[0] - 1)
  steps = sums['skipped_steps']
  steps = steps.at[slot].set(jnp.where(skipped, metrics['step'] + 1, steps[slot]))
  return {'bpd_sum': sums['bpd_sum'] + jnp.where(skipped, 0.0, metrics['train_bpd']),
          'finite': sums['finite'] + (~skipped).astype(jnp.int32),
          'skipped': sums['skipped'] + skipped.astype(jnp.int32),
          'skipped_steps': steps}


class MetricsWindow:
  """The train-step metrics since the last log line.

  ``add`` keeps running sums on the device (no transfer: the loop never waits for a
  step's numbers); ``flush`` fetches them once per log line and returns the record:
  mean train bits/dim over the finite steps, img/s over the timed steps, the skipped
  steps, and the last step's lr, gradient norm and counters. The clock is restarted after
  compilation, evaluations and checkpoints (``restart_clock``), so img/s measures
  training alone.
  """

  def __init__(self, capacity: int, batch_size: int, steps_per_epoch: int, sharding):
    self._batch_size, self._steps_per_epoch = int(batch_size), int(steps_per_epoch)
    self._zeros = jax.jit(functools.partial(_zero_sums, int(capacity)), out_shardings=sharding)
    self._sums, self._last = self._zeros(), None
    self._clock, self._timed_steps = None, 0

  def add(self, metrics: Mapping) -> None:
    self._sums, self._last = _add(self._sums, metrics), metrics
    if self._clock is not None:
      self._timed_steps += 1

  def restart_clock(self) -> None:
    """Starts timing from now (call once the device has finished the steps so far)."""
    jax.block_until_ready(self._sums)
    self._clock, self._timed_steps = time.perf_counter(), 0

  def nonfinite_in_row(self) -> int:
    """Consecutive skipped updates up to the last step added (fetches one scalar)."""
    return int(jax.device_get(self._last['nonfinite_count'])) if self._last is not None else 0

  def flush(self, step: int) -> dict:
    """The record for the log line at ``step``; the sums start again from zero."""
    sums, last = jax.device_get((self._sums, self._last))
    elapsed = time.perf_counter() - self._clock if self._clock is not None else 0.0
    finite, skipped = int(sums['finite']), int(sums['skipped'])
    record = {
        'step': step, 'epoch': step / self._steps_per_epoch, 'lr': float(last['lr']),
        # None (JSON null) where undefined: every step skipped, or no timed step yet.
        'train_bpd': float(sums['bpd_sum']) / finite if finite else None,
        'img_per_s': (self._timed_steps * self._batch_size / elapsed
                      if self._timed_steps and elapsed > 0 else None),
        'skipped': skipped, 'skipped_steps': [int(s) for s in sums['skipped_steps'][:skipped]],
        'skipped_total': int(last['skipped_total']), 'grad_norm': float(last['grad_norm'])}
    self._sums = self._zeros()
    if self._clock is not None:
      self._clock, self._timed_steps = time.perf_counter(), 0
    return record


class MetricsLog:
  """metrics.jsonl, TensorBoard scalars and the console lines of the run's story; writes and
  prints nothing where ``enabled`` is False (processes other than 0). A context manager:
  leaving it closes the TensorBoard writer. ``console`` prints a line (tqdm.write keeps
  the progress bar intact).

  ``resume_step``: the step the run starts from. Records an interrupted run wrote after
  it are dropped from metrics.jsonl, and TensorBoard drops its events at later steps (not
  those at ``resume_step`` itself, which a rerun of a finished run would otherwise lose).
  """

  def __init__(self, workdir, resume_step: Optional[int], enabled: bool,
               console: Callable[[str], None] = print):
    self.enabled, self._console = enabled, console
    self.path = as_path(workdir) / METRICS_FILE
    self.writer = None
    if not enabled:
      return
    if not is_bucket(self.path):      # a bucket has no directories to make
      self.path.parent.mkdir(parents=True, exist_ok=True)
    if resume_step is not None and self.path.exists():
      kept = [line for line in self.path.read_text().splitlines()
              if line.strip() and json.loads(line).get('step', 0) <= resume_step]
      write_text_atomic(self.path, ''.join(line + '\n' for line in kept))
    # Made at the first metrics record: a rerun of a finished run leaves no empty file.
    self._purge = None if resume_step is None else resume_step + 1

  def write(self, record: Mapping, prefix: str) -> None:
    """Appends ``record`` (with its 'step') to metrics.jsonl and its numbers to TensorBoard
    as '<prefix>/<name>'."""
    if not self.enabled:
      return
    record = {k: (v.item() if hasattr(v, 'item') else v) for k, v in record.items()}
    self._append(record)
    if self.writer is None:
      self.writer = SummaryWriter(str(self.path.parent / TENSORBOARD_DIR),
                                  purge_step=self._purge)
    for k, v in record.items():
      if k != 'step' and isinstance(v, (int, float)) and not isinstance(v, bool):
        self.writer.add_scalar(f'{prefix}/{k}', v, record['step'])
    self.writer.flush()

  def say(self, message: str) -> None:
    """Prints ``message`` on the console (process 0 only)."""
    if self.enabled:
      self._console(message)

  def event(self, step: int, event: str, message: str, echo: bool = True, **fields) -> None:
    """One line of the run's story: printed (unless ``echo`` is False) and appended to
    metrics.jsonl with ``fields`` (not to TensorBoard)."""
    if event not in EVENTS:
      raise ValueError(f'unknown event {event!r}; one of {EVENTS}')
    if echo:
      self.say(message)
    if self.enabled:
      self._append({'step': int(step), 'event': event, 'message': message, **fields})

  def _append(self, record: Mapping) -> None:
    append_text(self.path, json.dumps(record, sort_keys=True) + '\n')

  def close(self) -> None:
    if self.writer is not None:
      self.writer.close()
      self.writer = None

  def __enter__(self) -> 'MetricsLog':
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()
