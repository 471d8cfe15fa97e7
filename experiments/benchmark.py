"""Throughput of DenseFlow: training, log-likelihood evaluation and sampling.

    python experiments/benchmark.py --config configs/cifar10.py --batch_size 64 \
        [--config.model.compute_dtype=bfloat16] [--repeats 5] [--skip_train]

Synthetic uint8 data, the real train step (Adamax, data-parallel over every
device). Prints ONE JSON line: train_img_per_s, eval_img_per_s, sample_128_s,
compile_s (train step), peak_mem_gib, flops_per_image (train step, counted on
the jaxpr: see experiments/flops.py), mfu (against --peak_tflops or the table
below), plus device, batch size, precision and versions. Every timing is taken
after a warm-up call, over several repeats, with block_until_ready.
"""
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.getcwd())                               # configs.*
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))   # flops.py

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file (configs/*.py).')
_BATCH = flags.DEFINE_integer('batch_size', 64, 'Global batch for training and evaluation.')
_REPEATS = flags.DEFINE_integer('repeats', 5, 'Timed calls per measurement.')
_SAMPLES = flags.DEFINE_integer('num_samples', 128, 'Images for the sampling time.')
_SKIP_TRAIN = flags.DEFINE_bool('skip_train', False, 'Only evaluation and sampling.')
_PEAK = flags.DEFINE_float('peak_tflops', 0.0, 'Device peak for the MFU (0: from the table).')

# Dense peak throughput (TFLOP/s) by device kind and compute dtype, from vendor sheets.
PEAK_TFLOPS = {
    'H200': {'bfloat16': 989.0, 'float32': 494.0},    # float32 runs on TF32 tensor cores
    'H100': {'bfloat16': 989.0, 'float32': 494.0},
    'A100': {'bfloat16': 312.0, 'float32': 156.0},
}


def _timed(fn, repeats):
  """Median seconds of `fn()` (whose result is blocked on) over `repeats` calls."""
  import jax
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return sorted(times)[len(times) // 2]


def main(argv):
  del argv
  import jax
  import jax.numpy as jnp
  import numpy as np

  import flax
  from denseflow_jax import evaluate, model as model_lib, sharding, train_step
  from denseflow_jax.settings import TrainSettings
  from denseflow_jax.spec import spec_from_config
  from flops import count_flops

  config = _CONFIG.value
  batch = _BATCH.value
  config.train.batch_size = batch
  spec = spec_from_config(config.model)
  model = model_lib.make_model(spec)
  mesh = sharding.make_mesh()
  device = jax.devices()[0]
  rng = np.random.default_rng(0)
  local = batch // jax.process_count()
  x = sharding.global_batch(rng.integers(0, 2 ** spec.num_bits, (local, *spec.image_shape),
                                      dtype=np.uint8), mesh)
  key = jax.random.PRNGKey(0)
  result = {'device': device.device_kind, 'num_devices': jax.device_count(),
            'batch_size': batch, 'precision': spec.compute_dtype, 'remat': spec.remat,
            'conv1x1': spec.conv1x1, 'image_shape': list(spec.image_shape),
            'block_config': list(spec.block_config), 'layers_config': list(spec.layers_config),
            'jax': jax.__version__, 'flax': flax.__version__, 'python': platform.python_version()}

  settings = TrainSettings.from_config(config)
  init, to_state = train_step.make_state_init(spec, settings, mesh, steps_per_epoch=1000)
  variables = init(key, x)

  if not _SKIP_TRAIN.value:
    step = train_step.make_train_step(spec, settings, mesh, steps_per_epoch=1000)
    state = to_state(variables)
    result['flops_per_image'] = count_flops(
        train_step.train_step_fn(model, settings.step_settings(1000)),
        state, x, key) / batch
    start = time.perf_counter()
    compiled = step.lower(state, x, key).compile()
    result['compile_s'] = time.perf_counter() - start
    state, _ = compiled(state, x, key)                      # warm-up

    def one_step():
      nonlocal state
      state, metrics = compiled(state, x, key)
      return metrics['train_bpd']
    result['train_img_per_s'] = batch / _timed(one_step, _REPEATS.value)
    result['train_bpd_finite'] = bool(np.isfinite(np.asarray(one_step())))

  log_prob_fn = evaluate.make_log_prob_fn(model)
  eval_vars = {'params': variables['params'], 'batch_stats': variables['batch_stats']}
  jax.block_until_ready(log_prob_fn(eval_vars, x, key))     # compile + warm-up
  result['eval_img_per_s'] = batch / _timed(lambda: log_prob_fn(eval_vars, x, key), _REPEATS.value)

  num = _SAMPLES.value
  evaluate.sample_images(model, eval_vars, key, num, 1.0, batch_size=num)   # compile
  result[f'sample_{num}_s'] = _timed(
      lambda: jnp.asarray(evaluate.sample_images(model, eval_vars, key, num, 1.0, batch_size=num)),
      _REPEATS.value)

  stats = device.memory_stats() if hasattr(device, 'memory_stats') else None
  result['peak_mem_gib'] = (stats['peak_bytes_in_use'] / 2 ** 30
                            if stats and 'peak_bytes_in_use' in stats else None)
  peak = _PEAK.value or next((v.get(spec.compute_dtype) for k, v in PEAK_TFLOPS.items()
                              if k in device.device_kind), None)
  result['peak_tflops'] = peak
  if peak and 'train_img_per_s' in result:
    achieved = result['flops_per_image'] * result['train_img_per_s'] * 1e-12
    result['mfu'] = achieved / (peak * jax.device_count())
  else:
    result['mfu'] = None
  print(json.dumps(result))


if __name__ == '__main__':
  flags.mark_flags_as_required(['config'])
  app.run(main)
