"""Compile time of the train step as modules are added to every unit.

    python experiments/compile_scaling.py --config configs/reference_small.py --scales 1,2,4

For each scale s, layers_config is multiplied by s (the number of glow-like
modules per unit) and the train step is lowered and compiled; with the modules
of a unit in one `nn.scan`, the compiled program does not grow with s, so the
compile time should stay roughly flat. Prints one JSON line per scale, with the load
average of the machine beside the times, the CPU seconds the compile used (all threads:
less sensitive to other jobs than the wall time) and the process's peak resident memory.
The state is abstract (`jax.eval_shape`): only the train step is compiled, not the init.

Rolled against unrolled (issue #10): the same command with and without
`--config.model.scan_unroll=1`.
"""
import json
import os
import resource
import sys
import time

sys.path.insert(0, os.getcwd())   # configs.*, denseflow_jax

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from denseflow_jax import sharding, train_step  # noqa: E402
from denseflow_jax.settings import TrainSettings  # noqa: E402
from denseflow_jax.spec import spec_from_config  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file (configs/*.py).')
_SCALES = flags.DEFINE_list('scales', ['1', '2', '4'], 'Multipliers of layers_config.')
_BATCH = flags.DEFINE_integer('batch_size', 8, 'Global batch.')


def _cpu_s():
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime


def main(argv):
  del argv
  base = _CONFIG.value
  mesh = sharding.make_mesh()
  for scale in map(int, _SCALES.value):
    config = base.copy_and_resolve_references()
    config.model.layers_config = tuple(scale * n for n in base.model.layers_config)
    config.train.batch_size = _BATCH.value
    spec = spec_from_config(config.model)
    x = jax.ShapeDtypeStruct((_BATCH.value, *spec.image_shape), jnp.uint8)
    key = jax.random.PRNGKey(0)
    settings = TrainSettings.from_config(config)
    init, to_state = train_step.make_state_init(spec, settings, mesh, steps_per_epoch=1000)
    state = jax.eval_shape(to_state, jax.eval_shape(init, key, x))
    step = train_step.make_train_step(spec, settings, mesh, steps_per_epoch=1000)
    start = time.perf_counter()
    lowered = step.lower(state, x, key)
    lower_s = time.perf_counter() - start
    load_before = os.getloadavg()
    cpu_before = _cpu_s()
    lowered.compile()
    compile_s = time.perf_counter() - start - lower_s
    compile_cpu_s = _cpu_s() - cpu_before
    print(json.dumps({'layers_config': list(spec.layers_config), 'trace_lower_s': lower_s,
                      'compile_s': compile_s, 'compile_cpu_s': compile_cpu_s,
                      'scan_unroll': spec.scan_unroll,
                      'batch_size': _BATCH.value, 'device': jax.devices()[0].device_kind,
                      'loadavg_1min_before_after': [load_before[0], os.getloadavg()[0]],
                      'peak_rss_gib': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20,
                      'JAX_DISABLE_MOST_OPTIMIZATIONS': os.environ.get('JAX_DISABLE_MOST_OPTIMIZATIONS', ''),
                      'jax': jax.__version__}), flush=True)


if __name__ == '__main__':
  flags.mark_flags_as_required(['config'])
  app.run(main)
