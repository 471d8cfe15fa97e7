"""The lines a training run prints (and records as events in metrics.jsonl): how it
starts, resumes or is already finished, what it compiles and how long that took last
time, and how it finishes, naming only the files that exist."""
from __future__ import annotations

from typing import Optional

from denseflow_jax import checkpoint as ckpt_lib
from denseflow_jax.metrics_log import METRICS_FILE, read_events

SAMPLES_DIR = 'samples'        # where modes.train's sample grids go


def start_event(workdir, checkpoints, phase, latest, start_step, total_steps):
  """(event, message): the first line a run prints, new, resumed or already finished."""
  if start_step >= total_steps:
    return 'already_finished', (
        f'already finished at step {start_step} of {total_steps}: nothing to do '
        f'(checkpoints in {checkpoints}, metrics in {workdir / METRICS_FILE})')
  if latest is not None:
    return 'resume', f'resuming from step {start_step} of {total_steps} (checkpoint {checkpoints})'
  return 'start', f'starting a new run in {workdir}: {total_steps} steps ({phase})'


def finish_message(workdir, checkpoints, step, seconds, best_metric, last_value, meta) -> str:
  """The last line a run prints: steps, time, last and best metric, where things are (only
  what exists: a run that never sampled names no samples folder)."""
  parts = [f'finished {step} steps in {seconds:.0f} s']
  if last_value is not None:
    parts.append(f'last {best_metric} {last_value:.4f}')
  if meta.get('best') is not None:
    parts.append(f'best {meta["best"]:.4f} at step {meta.get("best_step")} '
                 f'({workdir / ckpt_lib.BEST_DIR})')
  places = f'checkpoints in {checkpoints}, metrics in {workdir / METRICS_FILE}'
  if (workdir / SAMPLES_DIR).is_dir():
    places += f', samples in {workdir / SAMPLES_DIR}'
  return '; '.join(parts) + '; ' + places


def last_compile_seconds(workdir) -> Optional[float]:
  """How long the train step took to compile in this workdir's last run, if it said."""
  events = read_events(workdir) if (workdir / METRICS_FILE).exists() else []
  seconds = [float(e['seconds']) for e in events if e['event'] == 'compiled']
  return seconds[-1] if seconds else None


def compile_notice(last_seconds: Optional[float]) -> str:
  if last_seconds is not None:
    return (f'compiling the train step (took {last_seconds:.0f} s last time in this '
            'workdir)...')
  return ('compiling the train step (once per run: 7-50 s for configs/digits.py on 2 CPU '
          'cores, about 6 min for DenseFlow-74-10 on an H200)...')
