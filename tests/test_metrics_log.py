"""The metrics window (device-side sums between log lines) against plain Python sums."""
import math

import jax
import jax.numpy as jnp
import numpy as np

from denseflow_jax import sharding
from denseflow_jax.metrics_log import MetricsWindow


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
