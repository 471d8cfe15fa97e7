"""A config's accelerator program, compiled on a machine without the accelerator.

    # NVIDIA GPUs (issue #19): a venv with the CUDA plugin and ptxas
    python -m venv .venv-gpu-compile && .venv-gpu-compile/bin/pip install -e ".[gpu-compile]"
    .venv-gpu-compile/bin/python experiments/accel_compile.py --config configs/cifar10.py --target h200
    # TPUs (issue #26): a venv with libtpu
    python -m venv .venv-tpu-compile && .venv-tpu-compile/bin/pip install -e ".[tpu]"
    .venv-tpu-compile/bin/python experiments/accel_compile.py --config configs/cifar10.py \
        --target v5e --topology 4x4 --programs train

Targets: GPUs `h200`, `h100` (experiments/gpu_targets/: the device descriptions XLA
reads; `--gpus` of them on one host) and TPU generations `v4`, `v5e`, `v5p`, `v6e`
(`--topology`, e.g. 2x2 or 16x16 for v5e/v6e, 2x2x1 or 4x4x4 for v4/v5p: libtpu makes
compile-only devices for the whole slice, several hosts included, each device with its
process index and torus coordinates). The programs named by `--programs`:

  train    the jitted data-parallel train step (train_step.make_train_step), batch
           train.batch_size (global), on the project's own mesh (sharding.make_mesh);
  eval     the one-sample bound in evaluation mode (evaluate.log_prob_batch), batch
           eval.batch_size;
  sample   the sampler (sampling.sample_batch), sample.batch_size images.

`model.scan_unroll=0` (per platform) is resolved for the target, not for this CPU.
ONE JSON line per program: trace / lower / compile seconds and this process's peak host
memory so far (getrusage); the ops the program runs, by kind and by model part (loops
expanded by their trip counts: GPU kernels and library calls, TPU fusions and other ops;
experiments/hlo_kernels.py) with the bytes they read and write; collectives by kind with
their bytes per device; XLA's memory analysis (per device: on a TPU against the chip's
HBM, `hbm`); FLOPs counted on the jaxpr (experiments/flops.py, per image); on TPUs also
XLA's cost analysis (`xla_cost`: flops and bytes accessed as XLA:TPU counts them, loop
bodies ONCE, not times their trip count); for several hosts, whether each host's devices
are contiguous in the mesh. A program that does not fit a TPU chip's HBM is one `error:`
line (denseflow_jax/device_memory.py, as in training) and exit status 1. `--hlo_dir`
keeps each program's optimised HLO text. `--state_layout auto` compiles the train step
with the state's memory layouts left to XLA (an experiment: experiments/RESULTS.md).

Nothing runs: the programs are compiled and read. The JAX backend is the CPU
(`JAX_PLATFORMS=cpu`), set here before JAX starts, with cuDNN algorithm choice off and
libtpu's search for TPU VM metadata quieted. A DenseFlow-74-10 train step takes minutes
and 13+ GB of host memory to compile (experiments/RESULTS.md): one at a time on 24 GB.
"""
import dataclasses
import json
import os
import pathlib
import resource
import sys
import time

os.environ['JAX_PLATFORMS'] = 'cpu'
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' --xla_gpu_autotune_level=0').strip()
# Without these libtpu asks a metadata server that does not exist here for the TPU VM's
# type and hosts, and waits for it; compile-only devices need neither.
os.environ.setdefault('TPU_ACCELERATOR_TYPE', 'v5litepod-4')
os.environ.setdefault('TPU_WORKER_HOSTNAMES', 'localhost')
# libtpu allows one process per machine unless told otherwise (a lock file in /tmp); a
# compile-only process touches no TPU, so a second one (a test beside a long compile) is safe.
os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
HERE = pathlib.Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]   # configs.*, denseflow_jax, flops, hlo_kernels

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from absl import app, flags  # noqa: E402
from jax.experimental import mesh_utils, topologies  # noqa: E402
from jax.experimental.layout import Format, Layout  # noqa: E402
from ml_collections import config_flags  # noqa: E402

import flops  # noqa: E402
import hlo_kernels  # noqa: E402
from denseflow_jax import device_memory, evaluate, model as model_lib, sampling, sharding, train_step  # noqa: E402
from denseflow_jax.errors import ConfigError  # noqa: E402
from denseflow_jax.settings import EvalSettings, SampleSettings, TrainSettings  # noqa: E402
from denseflow_jax.spec import spec_from_config  # noqa: E402

GPU_TARGETS = {'h200': HERE / 'gpu_targets' / 'h200.txtpb',
               'h100': HERE / 'gpu_targets' / 'h100_sxm.txtpb'}
# TPU generations: libtpu's name, the default slice (one host: 4 chips), HBM per chip in GiB
# (Cloud TPU's documentation; the compiler's own usable figure is in each line's `hbm`),
# and the chip configuration of a Cloud TPU VM: v4 and v5p chips have two TensorCores that
# JAX drives as ONE device ('megacore'; libtpu's compile-only default for v4 is one device
# per core, 8 on a v4-8, which is not what a TPU VM runs), v5e and v6e chips have one.
TPU_TARGETS = {'v4': ('v4', '2x2x1', 32, 'megacore'), 'v5e': ('v5e', '2x2', 16, 'default'),
               'v5p': ('v5p', '2x2x1', 95, 'megacore'), 'v6e': ('v6e', '2x2', 32, 'default')}
# A TPU VM host of a multi-host slice drives 4 chips (2x2). Single-host v5e-8 / v6e-8 VMs
# (one host, 8 chips) are compiled as 2 hosts of 4: the same per-chip program, but the
# mesh report's process count is not theirs.
CHIPS_PER_HOST = (2, 2, 1)
PROGRAMS = ('train', 'eval', 'sample')
STEPS_PER_EPOCH = 1000   # a constant of the lr schedule alone: the program does not depend on it
INSTALL = {'cuda': 'pip install -e ".[gpu-compile]" (JAX\'s CUDA plugin at jax\'s version and '
                  'ptxas; README, "The accelerator programs, compiled without one")',
           'tpu': 'pip install -e ".[tpu]" (libtpu at jax\'s version; README, "The '
                  'accelerator programs, compiled without one")'}
FIELDS = {'train': 'train.batch_size', 'eval': 'eval.batch_size', 'sample': 'sample.batch_size'}

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file (configs/*.py).')
_TARGET = flags.DEFINE_enum('target', 'h200', sorted({**GPU_TARGETS, **TPU_TARGETS}),
                            'Accelerator to compile for.')
_GPUS = flags.DEFINE_integer('gpus', 1, 'GPU targets: number of GPUs (one host).')
_TOPOLOGY = flags.DEFINE_string('topology', '', 'TPU targets: the slice, e.g. 2x2, 4x4, '
                                '16x16 (v5e, v6e) or 2x2x1, 4x4x4 (v4, v5p); default 4 chips.')
_PROGRAMS = flags.DEFINE_list('programs', list(PROGRAMS), f'Any of {", ".join(PROGRAMS)}.')
_HLO_DIR = flags.DEFINE_string('hlo_dir', '', 'Write each optimised HLO module here.')
_LABEL = flags.DEFINE_string('label', '', 'Copied into every line (name of the variant).')
_STATE_LAYOUT = flags.DEFINE_enum(
    'state_layout', 'default', ['default', 'auto'],
    'Memory layouts of the train state: row-major (default: what training uses) or left to '
    'XLA (auto: Layout.AUTO for the state in and out; an experiment, experiments/RESULTS.md).')


class CompileError(RuntimeError):
  """Compiling for the target is not possible here (the message says what to install)."""


def platform_of(target: str) -> str:
  """The platform JAX lowers for: 'tpu' or 'cuda'."""
  return 'tpu' if target in TPU_TARGETS else 'cuda'


def target_devices(target: str, gpus: int = 1, topology: str = '') -> list:
  """Compile-only devices: `gpus` GPUs of a GPU target, or a TPU slice's chips."""
  try:
    if target in TPU_TARGETS:
      name, default_topology, _, chip_config = TPU_TARGETS[target]
      return list(topologies.get_topology_desc(
          topology_name=f'{name}:{topology or default_topology}', platform='tpu',
          chip_config_name=chip_config, chips_per_host_bounds=CHIPS_PER_HOST).devices)
    return list(topologies.get_topology_desc(
        platform='cuda', target_config=GPU_TARGETS[target].read_text(),
        topology=f'1x1x{gpus}').devices)
  except Exception as error:  # the plugins' errors are plain RuntimeErrors
    raise CompileError(f'cannot make compile-only {target} devices ({error}); run it in a venv '
                       f'with {INSTALL[platform_of(target)]}') from error


def mesh_report(mesh) -> dict:
  """Processes, and whether each process's devices form one contiguous block of the mesh
  (global_batch gives process p rows [p*b, (p+1)*b) only then), for sharding.make_mesh and
  for jax.experimental.mesh_utils.create_device_mesh on the same devices."""
  ours = list(mesh.devices.flat)

  def contiguous(order):
    owners = [d.process_index for d in order]
    blocks = [p for i, p in enumerate(owners) if i == 0 or owners[i - 1] != p]
    return len(blocks) == len(set(owners))

  try:
    theirs = list(mesh_utils.create_device_mesh((len(ours),), devices=ours).flat)
  except Exception as error:  # noqa: BLE001 -- report, do not fail the compile
    theirs, note = None, f'{type(error).__name__}: {error}'[:200]
  else:
    note = None
  return {'processes': len({d.process_index for d in ours}),
          'hosts_contiguous': contiguous(ours),
          'mesh_utils_hosts_contiguous': None if theirs is None else contiguous(theirs),
          'mesh_utils_same_order': None if theirs is None else
          [d.id for d in theirs] == [d.id for d in ours],
          **({'mesh_utils_error': note} if note else {})}


def _placed(tree, sharding_):
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding_), tree)


def abstract_state(spec, config, mesh):
  """Abstract (variables, train state) replicated on the mesh, from one abstract
  initialisation (jax.eval_shape) on one image per device: their shapes do not depend on
  the batch, so every program shares them."""
  settings = dataclasses.replace(TrainSettings.from_config(config), batch_size=mesh.size)
  init, to_state = train_step.make_state_init(spec, settings, mesh, STEPS_PER_EPOCH)
  one_each = jax.ShapeDtypeStruct((mesh.size, *spec.image_shape), jnp.uint8)
  variables = jax.eval_shape(init, jax.random.PRNGKey(0), one_each)
  replicated = sharding.replicated(mesh)
  return _placed(variables, replicated), _placed(jax.eval_shape(to_state, variables), replicated)


def _batch_of(mesh, shape, dtype, field: str, batch: int):
  """An abstract [batch, *shape] array sharded over the mesh; `field` names the config
  setting `batch` comes from, for the error when it does not divide over the devices."""
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
  devices (evaluation and sampling data-parallel like the train step)."""
  key = jax.random.PRNGKey(0)
  key = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=sharding.replicated(mesh))
  if name == 'train':
    settings = TrainSettings.from_config(config)
    images = _batch_of(mesh, spec.image_shape, jnp.uint8, FIELDS[name], settings.batch_size)
    step = (auto_layout_train_step(spec, settings, mesh) if state_layout == 'auto' else
            train_step.make_train_step(spec, settings, mesh, STEPS_PER_EPOCH))
    return step.trace(state, images, key), settings.batch_size
  model = model_lib.make_model(spec)
  if name == 'eval':
    batch = EvalSettings.from_config(config).batch_size
    images = _batch_of(mesh, spec.image_shape, jnp.uint8, FIELDS[name], batch)
    return evaluate.log_prob_batch.trace(model, variables, images, key), batch
  batch = SampleSettings.from_config(config).batch_size
  keys = _batch_of(mesh, key.shape, key.dtype, FIELDS[name], batch)
  temperature = jax.ShapeDtypeStruct((), jnp.float32, sharding=sharding.replicated(mesh))
  return sampling.sample_batch.trace(model, variables, keys, temperature), batch


def _memory(compiled, target: str) -> dict:
  """XLA's memory analysis per device, in GiB; on a TPU `hbm` against the chip's HBM."""
  stats = compiled.memory_analysis()
  fields = ('argument_size_in_bytes', 'output_size_in_bytes', 'alias_size_in_bytes',
            'temp_size_in_bytes')
  gib = {f.replace('_size_in_bytes', '_gib'): round(getattr(stats, f) / 2 ** 30, 3)
         for f in fields}
  gib['peak_gib'] = round((stats.argument_size_in_bytes + stats.output_size_in_bytes
                           - stats.alias_size_in_bytes + stats.temp_size_in_bytes) / 2 ** 30, 3)
  if target in TPU_TARGETS:
    chip = TPU_TARGETS[target][2]
    gib['hbm'] = f'{gib["peak_gib"]:.2f} of {chip} GiB ({100 * gib["peak_gib"] / chip:.0f}%)'
  return gib


def _xla_cost(compiled) -> dict:
  """XLA:TPU's own cost analysis: flops and bytes accessed, loop bodies counted once."""
  try:
    cost = compiled.cost_analysis()
  except Exception:  # noqa: BLE001 -- the CUDA plugin does not answer
    return {}
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  if not cost:   # the CUDA plugin answers None
    return {}
  return {'xla_cost': {'gflop_loop_bodies_once': round(cost.get('flops', 0) / 1e9, 1),
                       'gb_accessed_loop_bodies_once': round(cost.get('bytes accessed', 0) / 1e9, 2)}}


def _host_peak_gib() -> float:
  return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, 2)   # KiB -> GiB


def compile_program(name: str, config, spec, mesh, variables, state, target: str,
                    hlo_dir: str = '', state_layout: str = 'default') -> dict:
  """One program's figures (module docstring); `variables`, `state` from abstract_state.
  Raises device_memory.DeviceMemoryError when the program does not fit a chip."""
  start = time.perf_counter()
  traced, batch = traced_program(name, config, spec, mesh, variables, state, state_layout)
  trace_s = time.perf_counter() - start
  lowered = traced.lower(lowering_platforms=(platform_of(target),))
  lower_s = time.perf_counter() - start - trace_s
  compiled = device_memory.run_or_explain(lowered.compile, (), f'the {name} program', batch,
                                          mesh, FIELDS[name])
  compile_s = time.perf_counter() - start - trace_s - lower_s
  text = compiled.as_text()
  if hlo_dir:
    pathlib.Path(hlo_dir).mkdir(parents=True, exist_ok=True)
    (pathlib.Path(hlo_dir) / f'{name}.hlo.txt').write_text(text)
  ops = hlo_kernels.count_kernels(text)
  train_only = ({'state_layout': state_layout, **non_default_layouts(compiled)}
                if name == 'train' else {})
  return {
      'program': name, 'batch': batch, 'batch_per_device': batch // mesh.size,
      'compute_dtype': spec.compute_dtype, 'precision': spec.precision,
      'remat': spec.remat, 'scan_unroll': spec.scan_unroll,
      'trace_s': round(trace_s, 1), 'lower_s': round(lower_s, 1),
      'compile_s': round(compile_s, 1), 'host_peak_gib': _host_peak_gib(),
      'kernels': ops['kernels'],
      'kernel_gb': round(ops['kernel_bytes'] / 1e9, 2),
      'gflop_per_image': round(flops.jaxpr_flops(traced.jaxpr.jaxpr) / batch / 1e9, 2),
      'memory': _memory(compiled, target),
      **_xla_cost(compiled),
      'collectives': ops['collectives'],
      'by_kind': ops['by_kind'],
      'by_part': ops['by_part'],
      'gb_by_kind': {k: round(v / 1e9, 3) for k, v in ops['bytes_by_kind'].items()},
      'gb_by_part': {k: round(v / 1e9, 3) for k, v in ops['bytes_by_part'].items()},
      'by_part_kind': ops['by_part_kind'],
      'unknown_trip_counts': ops['unknown_trip_counts'],
      **train_only,
  }


def main(argv):
  del argv
  unknown = set(_PROGRAMS.value) - set(PROGRAMS)
  if unknown:
    raise app.UsageError(f'--programs: unknown {sorted(unknown)}; choose from {PROGRAMS}')
  config, target = _CONFIG.value, _TARGET.value
  try:
    devices = target_devices(target, _GPUS.value, _TOPOLOGY.value)
  except CompileError as error:
    print(f'error: {error}', file=sys.stderr)
    return 2
  mesh = sharding.make_mesh(sharding.process_major(devices))
  spec = spec_from_config(config.model)
  # model.scan_unroll=0 follows the platform: the target's, not this CPU's.
  spec = dataclasses.replace(spec, scan_unroll=spec.unroll_for(platform_of(target)))
  common = {'config': config_flags.get_config_filename(flags.FLAGS['config']),
            'label': _LABEL.value, 'target': target, 'devices': mesh.size,
            'device_kind': devices[0].device_kind,
            **({'topology': _TOPOLOGY.value or TPU_TARGETS[target][1], **mesh_report(mesh)}
               if target in TPU_TARGETS else {'gpus': _GPUS.value}),
            'jax': jax.__version__, 'host_cpus': os.cpu_count()}
  variables, state = abstract_state(spec, config, mesh)
  for name in _PROGRAMS.value:
    try:
      line = compile_program(name, config, spec, mesh, variables, state, target,
                             _HLO_DIR.value, _STATE_LAYOUT.value)
    except device_memory.DeviceMemoryError as error:
      print(f'error: {error}', file=sys.stderr)
      if error.compiler_says:
        print(f'XLA said: {error.compiler_says}', file=sys.stderr)
      return 1
    except (CompileError, ConfigError) as error:
      print(f'error: {error}', file=sys.stderr)
      return 2
    print(json.dumps({**common, **line}), flush=True)
  return 0


if __name__ == '__main__':
  flags.mark_flags_as_required(['config'])
  app.run(main)
