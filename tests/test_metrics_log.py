"""The metrics window (device-side sums between log lines) against plain Python sums; the
log's event records (the run's story) kept apart from its metrics."""
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from denseflow_jax import sharding
from denseflow_jax.metrics_log import METRICS_FILE, MetricsLog, MetricsWindow, read_metrics


def _metrics(step, bpd, skipped, skipped_total, nonfinite):
  return {'step': jnp.int32(step), 'train_bpd': jnp.float32(bpd), 'lr': jnp.float32(1e-3 * step),
          'grad_norm': jnp.float32(step / 10), 'skipped': jnp.int32(skipped),
          'skipped_total': jnp.int32(skipped_total), 'nonfinite_count': jnp.int32(nonfinite)}


def test_window_means_finite_steps_lists_skipped_ones_and_starts_again():
  mesh = sharding.make_mesh()
  window = MetricsWindow(capacity=4, batch_size=8, steps_per_epoch=10,
                         sharding=sharding.replicated(mesh))
  # steps 0..3 (logged as steps 1..4): step 2 and 4 skipped, their loss is NaN.
  losses = [3.25, math.nan, 2.5, math.nan]
  skipped = [0, 1, 0, 1]
  window.restart_clock()
  for i, (loss, s) in enumerate(zip(losses, skipped)):
    window.add(_metrics(i, loss, s, sum(skipped[:i + 1]), s))
  assert window.nonfinite_in_row() == 1
  record = window.flush(4)
  assert record['step'] == 4 and record['epoch'] == 0.4
  np.testing.assert_allclose(record['train_bpd'], (3.25 + 2.5) / 2, rtol=1e-6)
  assert (record['skipped'], record['skipped_steps'], record['skipped_total']) == (2, [2, 4], 2)
  np.testing.assert_allclose((record['lr'], record['grad_norm']), (3e-3, 0.3), rtol=1e-6)
  assert record['img_per_s'] > 0
  # The next window starts from zero; all of it skipped -> no mean (null in metrics.jsonl).
  window.add(_metrics(4, math.nan, 1, 3, 2))
  record = window.flush(5)
  assert (record['train_bpd'], record['skipped'], record['skipped_steps']) == (None, 1, [5])


def test_window_without_a_started_clock_reports_no_speed():
  window = MetricsWindow(2, 8, 10, sharding.replicated(sharding.make_mesh()))
  window.add(_metrics(0, 1.0, 0, 0, 0))
  record = window.flush(1)
  assert record['img_per_s'] is None and record['train_bpd'] == 1.0
  assert jax.device_get(record['skipped_steps']) == []


def test_log_keeps_events_apart_from_metrics_and_prints_them(tmp_path):
  printed = []
  with MetricsLog(tmp_path, None, enabled=True, console=printed.append) as log:
    log.event(0, 'start', 'starting a new run')
    log.write({'step': 2, 'train_bpd': 3.5}, 'train')
    log.event(2, 'interrupt', 'stopped', echo=False)
    with pytest.raises(ValueError, match="unknown event 'begin'"):
      log.event(2, 'begin', 'x')
  assert printed == ['starting a new run']
  lines = [json.loads(line) for line in (tmp_path / METRICS_FILE).read_text().splitlines()]
  assert [line.get('event') for line in lines] == ['start', None, 'interrupt']
  assert read_metrics(tmp_path) == [{'step': 2, 'train_bpd': 3.5}]
  # Resuming at step 0 drops what came after it, events included.
  with MetricsLog(tmp_path, 0, enabled=True, console=printed.append):
    pass
  assert [json.loads(line)['event'] for line in
          (tmp_path / METRICS_FILE).read_text().splitlines()] == ['start']


def test_log_of_other_processes_writes_and_prints_nothing(tmp_path):
  printed = []
  with MetricsLog(tmp_path, None, enabled=False, console=printed.append) as log:
    log.event(0, 'start', 'starting a new run')
    log.say('hello')
  assert printed == [] and not (tmp_path / METRICS_FILE).exists()
