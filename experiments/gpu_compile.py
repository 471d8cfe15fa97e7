"""The GPU program of a config, compiled on a machine without a GPU (issue #19).

    python -m venv .venv-gpu-compile && . .venv-gpu-compile/bin/activate
    pip install -e ".[gpu-compile]"        # the CUDA plugin at jax's version, and ptxas
    python experiments/gpu_compile.py --config configs/cifar10.py
    python experiments/gpu_compile.py --config configs/cifar10.py --target h100 --gpus 8 \
        --programs train --config.train.batch_size=512 --config.model.compute_dtype=bfloat16

Compiles, for `--gpus` compile-only GPUs of `--target` (experiments/gpu_targets/: the
device descriptions XLA reads; h200 and h100), the programs named by `--programs`:

  train    the jitted data-parallel train step (train_step.make_train_step), batch
           train.batch_size (global);
  eval     the one-sample bound in evaluation mode (evaluate.make_log_prob_fn's
           program), batch eval.batch_size;
  sample   the sampler (sampling.sample_images' program), sample.batch_size images,

and prints ONE JSON line per program: trace / lower / compile seconds; the kernels one
call launches, by kind and by model part (forward and backward), loops expanded, and
the bytes they read and write (experiments/hlo_kernels.py); XLA's memory analysis;
FLOPs counted on the jaxpr (experiments/flops.py; per image); collectives by kind with
their bytes. `--hlo_dir` keeps each program's optimised HLO text. `--state_layout auto`
compiles the train step with the state's memory layouts left to XLA (the line then says
how many state leaves it laid out other than row-major): an experiment, not what
training compiles (experiments/RESULTS.md).

A venv of its own: without a GPU the CUDA plugin logs to the stderr of every JAX process.
Nothing runs: the programs are compiled (ptxas for sm_90a really runs) and read.
The JAX backend is the CPU (`JAX_PLATFORMS=cpu`), cuDNN algorithm choice is off
(`--xla_gpu_autotune_level=0`), both set here before JAX starts. Each compile of the
full DenseFlow-74-10 train step takes minutes on 2 cores (experiments/RESULTS.md).
"""
import dataclasses
import json
import os
import pathlib
import sys
import time

os.environ['JAX_PLATFORMS'] = 'cpu'
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' --xla_gpu_autotune_level=0').strip()
HERE = pathlib.Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]   # configs.*, denseflow_jax, flops, hlo_kernels

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from absl import app, flags  # noqa: E402
from jax.experimental import topologies  # noqa: E402
from jax.experimental.layout import Format, Layout  # noqa: E402
from ml_collections import config_flags  # noqa: E402

import flops  # noqa: E402
import hlo_kernels  # noqa: E402
from denseflow_jax import evaluate, model as model_lib, sampling, sharding, train_step  # noqa: E402
from denseflow_jax.errors import ConfigError  # noqa: E402
from denseflow_jax.settings import EvalSettings, SampleSettings, TrainSettings  # noqa: E402
from denseflow_jax.spec import spec_from_config  # noqa: E402

TARGETS = {'h200': HERE / 'gpu_targets' / 'h200.txtpb',
           'h100': HERE / 'gpu_targets' / 'h100_sxm.txtpb'}
PROGRAMS = ('train', 'eval', 'sample')
STEPS_PER_EPOCH = 1000   # a constant of the lr schedule alone: the kernels do not depend on it
INSTALL = ('run it in a venv with pip install -e ".[gpu-compile]" (JAX\'s CUDA plugin at '
           'jax\'s version and ptxas; README, "The GPU program, compiled without a GPU")')

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file (configs/*.py).')
_TARGET = flags.DEFINE_enum('target', 'h200', sorted(TARGETS), 'GPU to compile for.')
_GPUS = flags.DEFINE_integer('gpus', 1, 'Number of GPUs (one host, data-parallel).')
_PROGRAMS = flags.DEFINE_list('programs', list(PROGRAMS), f'Any of {", ".join(PROGRAMS)}.')
_HLO_DIR = flags.DEFINE_string('hlo_dir', '', 'Write each optimised HLO module here.')
_LABEL = flags.DEFINE_string('label', '', 'Copied into every line (name of the variant).')
_STATE_LAYOUT = flags.DEFINE_enum(
    'state_layout', 'default', ['default', 'auto'],
    'Memory layouts of the train state: row-major (default: what training uses) or left to '
    'XLA (auto: Layout.AUTO for the state in and out; an experiment, experiments/RESULTS.md).')


class CompileError(RuntimeError):
  """Compiling for a GPU is not possible here (the message says what to install)."""


def gpu_mesh(target: str, gpus: int) -> jax.sharding.Mesh:
  """A data-parallel mesh over `gpus` compile-only GPUs of `target`."""
  text = TARGETS[target].read_text()
  try:
    devices = topologies.get_topology_desc(platform='cuda', target_config=text,
                                           topology=f'1x1x{gpus}').devices
  except Exception as error:  # the plugin's errors are plain RuntimeErrors
    raise CompileError(f'cannot make compile-only CUDA devices ({error}); {INSTALL}') from error
  return sharding.make_mesh(list(devices))


def _placed(tree, sharding_):
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding_), tree)


def abstract_state(spec, config, mesh):
  """Abstract (variables, train state) replicated on the mesh, from one abstract
  initialisation (jax.eval_shape) on one image per GPU: their shapes do not depend on
  the batch, so every program shares them."""
  settings = dataclasses.replace(TrainSettings.from_config(config), batch_size=mesh.size)
  init, to_state = train_step.make_state_init(spec, settings, mesh, STEPS_PER_EPOCH)
  one_each = jax.ShapeDtypeStruct((mesh.size, *spec.image_shape), jnp.uint8)
  variables = jax.eval_shape(init, jax.random.PRNGKey(0), one_each)
  replicated = sharding.replicated(mesh)
  return _placed(variables, replicated), _placed(jax.eval_shape(to_state, variables), replicated)


def _batch_of(mesh, shape, dtype, field: str, batch: int):
  """An abstract [batch, *shape] array sharded over the mesh; `field` names the config
  setting `batch` comes from, for the error when it does not divide over the GPUs."""
  sharding.BatchSplit(batch, field, device_count=mesh.size)   # ConfigError if it does not
  return jax.ShapeDtypeStruct((batch, *shape), dtype, sharding=sharding.batch_sharding(mesh))


def auto_layout_train_step(spec, settings: TrainSettings, mesh):
  """The train step of `train_step.make_train_step`, but with the memory layouts of the
  state (in, and out: it is donated) chosen by XLA (`Layout.AUTO`) instead of row-major.
  Row-major conv kernels are not cuDNN's layout, so the update of every kernel reads
  transposed operands and cannot be written in place: XLA adds a copy into each donated
  buffer, and each module's slice of a stacked kernel is transposed before its call."""
  step_settings = settings.step_settings(STEPS_PER_EPOCH)
  fn = train_step.train_step_fn(model_lib.make_model(spec), step_settings)
  rep = sharding.replicated(mesh)
  auto = Format(Layout.AUTO, rep)
  return jax.jit(fn, in_shardings=(auto, sharding.batch_sharding(mesh), rep),
                 out_shardings=(auto, rep), donate_argnums=(0,))


def non_default_layouts(compiled) -> dict:
  """How many state leaves the compiled step takes in a layout other than row-major."""
  formats = jax.tree.leaves(compiled.input_formats[0][0],
                            is_leaf=lambda leaf: isinstance(leaf, Format))
  moved = [f for f in formats if f.layout is not None and
           tuple(f.layout.major_to_minor) != tuple(range(len(f.layout.major_to_minor)))]
  return {'state_leaves': len(formats), 'state_leaves_not_row_major': len(moved)}


def traced_program(name: str, config, spec, mesh, variables, state,
                   state_layout: str = 'default'):
  """(jax Traced of the program, its batch). Every program's batch is sharded over the
  GPUs (evaluation and sampling data-parallel like the train step)."""
  key = jax.random.PRNGKey(0)
  key = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=sharding.replicated(mesh))
  if name == 'train':
    settings = TrainSettings.from_config(config)
    images = _batch_of(mesh, spec.image_shape, jnp.uint8, 'train.batch_size',
                       settings.batch_size)
    step = (auto_layout_train_step(spec, settings, mesh) if state_layout == 'auto' else
            train_step.make_train_step(spec, settings, mesh, STEPS_PER_EPOCH))
    return step.trace(state, images, key), settings.batch_size
  model = model_lib.make_model(spec)
  if name == 'eval':
    batch = EvalSettings.from_config(config).batch_size
    images = _batch_of(mesh, spec.image_shape, jnp.uint8, 'eval.batch_size', batch)
    return evaluate.log_prob_batch.trace(model, variables, images, key), batch
  batch = SampleSettings.from_config(config).batch_size
  keys = _batch_of(mesh, key.shape, key.dtype, 'sample.batch_size', batch)
  temperature = jax.ShapeDtypeStruct((), jnp.float32, sharding=sharding.replicated(mesh))
  return sampling.sample_batch.trace(model, variables, keys, temperature), batch


def _memory(compiled) -> dict:
  stats = compiled.memory_analysis()
  fields = ('argument_size_in_bytes', 'output_size_in_bytes', 'alias_size_in_bytes',
            'temp_size_in_bytes')
  gib = {f.replace('_size_in_bytes', '_gib'): round(getattr(stats, f) / 2 ** 30, 3)
         for f in fields}
  gib['peak_gib'] = round((stats.argument_size_in_bytes + stats.output_size_in_bytes
                           - stats.alias_size_in_bytes + stats.temp_size_in_bytes) / 2 ** 30, 3)
  return gib


def compile_program(name: str, config, spec, mesh, variables, state, hlo_dir: str = '',
                    state_layout: str = 'default') -> dict:
  """One program's figures (module docstring); `variables`, `state` from abstract_state."""
  start = time.perf_counter()
  traced, batch = traced_program(name, config, spec, mesh, variables, state, state_layout)
  trace_s = time.perf_counter() - start
  lowered = traced.lower(lowering_platforms=('cuda',))
  lower_s = time.perf_counter() - start - trace_s
  compiled = lowered.compile()
  compile_s = time.perf_counter() - start - trace_s - lower_s
  text = compiled.as_text()
  if hlo_dir:
    pathlib.Path(hlo_dir).mkdir(parents=True, exist_ok=True)
    (pathlib.Path(hlo_dir) / f'{name}.hlo.txt').write_text(text)
  kernels = hlo_kernels.count_kernels(text)
  train_only = ({'state_layout': state_layout, **non_default_layouts(compiled)}
                if name == 'train' else {})
  return {
      'program': name, 'batch': batch, 'compute_dtype': spec.compute_dtype,
      'remat': spec.remat, 'scan_unroll': spec.scan_unroll,
      'trace_s': round(trace_s, 1), 'lower_s': round(lower_s, 1),
      'compile_s': round(compile_s, 1),
      'kernels': kernels['kernels'],
      'kernel_gb': round(kernels['kernel_bytes'] / 1e9, 2),
      'gflop_per_image': round(flops.jaxpr_flops(traced.jaxpr.jaxpr) / batch / 1e9, 2),
      'memory': _memory(compiled),
      'collectives': kernels['collectives'],
      'by_kind': kernels['by_kind'],
      'by_part': kernels['by_part'],
      'gb_by_kind': {k: round(v / 1e9, 3) for k, v in kernels['bytes_by_kind'].items()},
      'gb_by_part': {k: round(v / 1e9, 3) for k, v in kernels['bytes_by_part'].items()},
      'by_part_kind': kernels['by_part_kind'],
      'unknown_trip_counts': kernels['unknown_trip_counts'],
      **train_only,
  }


def main(argv):
  del argv
  unknown = set(_PROGRAMS.value) - set(PROGRAMS)
  if unknown:
    raise app.UsageError(f'--programs: unknown {sorted(unknown)}; choose from {PROGRAMS}')
  config = _CONFIG.value
  try:
    mesh = gpu_mesh(_TARGET.value, _GPUS.value)
  except CompileError as error:
    print(f'error: {error}', file=sys.stderr)
    return 2
  common = {'config': config_flags.get_config_filename(flags.FLAGS['config']),
            'label': _LABEL.value, 'target': _TARGET.value, 'gpus': _GPUS.value,
            'jax': jax.__version__, 'host_cpus': os.cpu_count()}
  spec = spec_from_config(config.model)
  variables, state = abstract_state(spec, config, mesh)
  for name in _PROGRAMS.value:
    try:
      line = compile_program(name, config, spec, mesh, variables, state, _HLO_DIR.value,
                             _STATE_LAYOUT.value)
    except (CompileError, ConfigError) as error:
      print(f'error: {error}', file=sys.stderr)
      return 2
    print(json.dumps({**common, **line}), flush=True)
  return 0


if __name__ == '__main__':
  flags.mark_flags_as_required(['config'])
  app.run(main)
