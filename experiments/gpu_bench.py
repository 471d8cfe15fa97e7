"""Accelerator throughput of DenseFlow in one process: one JSON line per figure (issue #10).

On a lent GPU machine, through the wrapper (it installs the carried wheels first):

    bash experiments/gpu_check.sh                  # = gpu_bench.py --config configs/cifar10.py
    bash experiments/gpu_check.sh --profile_dir /tmp/prof --budget_s 450

Rehearsal on a CPU (tiny model):

    python experiments/gpu_bench.py --config configs/digits.py --allow_cpu --budget_s 600 \
        --step_budget_scale 3 --profile_dir /tmp/prof

PREPARING THE WHEELS (once, on the development machine, in the root of the checkout the
device tool sends). The GPU image has jax, flax, optax, orbax-checkpoint, absl-py, etils,
protobuf, ... but not these five: `import configs.default` needs ml_collections,
`import denseflow_jax.evaluate` needs grain (the data package; grain needs array_record
and portpicker), and `python -m denseflow_jax.main` needs tensorboardX (metrics_log.py)
as well, for a training run there (checked by hiding each module, 2026-11-30):

    echo /.whl/ >> .git/info/exclude
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
      --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      --platform manylinux1_x86_64 -d .whl \
      grain==0.2.18 array_record==0.8.6 portpicker==1.6.0 ml_collections==1.1.0 \
      tensorboardX==2.6.5
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
      --implementation cp --platform manylinux2014_x86_64 -d .whl/protobuf 'protobuf>=5.28.3,<6'

(4.4 MiB, plus 0.3 MiB of protobuf.) grain's generated protobuf module refuses a protobuf
runtime older than 5.28.3; the image's own protobuf version is not known here, so the
wrapper installs .whl/protobuf/ only if `import grain` fails. Their other requirements
(absl-py, etils, cloudpickle, psutil, PyYAML, numpy, packaging) are in the image.

THE DEVICE CALL (the device tool's `run`). A session has 15 minutes of device time in
all, a machine's start (1-2 minutes) included, and no machine starts with under 4
minutes left: this call takes about 10 of them and leaves room for one short second
call (e.g. `--only train_bf16_b256 --budget_s 150` after a change):

    run(command="bash experiments/gpu_check.sh --budget_s 450 --profile_dir /tmp/prof",
        carry=[".whl"], timeout_s=540)

`--only NAME,NAME` runs those entries of PLAN in the order given (e.g. the rolled step
first if the unrolled compile proves too slow).

What it does, in order, cheapest first, each step under its own time budget and all
under --budget_s (a step that no longer fits is skipped with a line saying so; past
--budget_s plus a grace the process prints a line and exits 3, so every figure already
printed stays in $OUT/bench.jsonl):

  1. initialise the variables ONCE, with the rolled model (scan_unroll=1), batch 64;
  2. train steps: fp32 batch 64, bf16 batch 256, bf16 batch 1024 with remat (all with
     the config's scan_unroll), then fp32 batch 64 rolled (scan_unroll=1). Each builds a
     TrainState from a copy of the shared variables (the step donates its state); the
     first step of each (scan_unroll, remat) pair checks that its parameter tree equals
     the shared one (jax.eval_shape of its init: a trace, no compile). If an unrolled
     compile outruns its budget, the later unrolled steps are skipped (the thread is left
     compiling: later lines say so) and the evaluation uses the rolled model;
  3. evaluation (one-sample bound, eval mode, fp32, batch 256) and 128 samples, then
     bf16 evaluation at batch 1024 if time is left;
  4. with --profile_dir: a jax.profiler trace of a few steps of the fastest train
     configuration, summarised into the top kernels by device time (one JSON line); the
     raw trace is copied, gzipped, to $OUT/profile.xplane.pb.gz if under 16 MiB;
  5. the train step's FLOPs per image, counted on the rolled step's jaxpr
     (experiments/flops.py; the same for every dtype and unroll, recomputation by remat
     not counted), and a summary line: every measurement's img/s, compile seconds,
     memory and TFLOP/s.

Every line carries device kind, platform, jax version and config; measurement lines the
batch, dtype, remat and scan_unroll. Train lines: trace+lower and compile seconds, the
median step (block_until_ready on each, after a warm-up step) and the mean of the same
number of steps dispatched back to back, img/s, the program's own memory (XLA's
memory_analysis) and the device's peak so far (memory_stats; cumulative over the process:
the batches grow in the plan's order, except the last, rolled batch 64). Eval and sample
lines: compile plus first call, the median call, img/s.

The parts, beside this file (the command line, PLAN and the order of the steps):
bench_log.py (the lines, the clocks and budgets, memory figures), bench_run.py (the state
the measurements share, step 1), bench_train.py (step 2), bench_eval.py (step 3),
bench_profile.py (step 4); flops.py counts the FLOPs of step 5.
"""
import os
import platform
import sys
import time

START = time.monotonic()
sys.path.insert(0, os.getcwd())                                # configs.*
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))   # flops.py, bench_*.py
# Before JAX starts its GPU client (jax and the bench_* modules are imported below; the
# client starts at jax.devices() in main): peak memory = what is used.
os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')

import flax  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from bench_eval import measure_eval, measure_sample  # noqa: E402
from bench_log import Bench, sig  # noqa: E402
from bench_profile import profile  # noqa: E402
from bench_run import STEPS_PER_EPOCH, Run  # noqa: E402
from bench_train import measure_train  # noqa: E402
from denseflow_jax import train_step  # noqa: E402
from flops import count_flops  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/cifar10.py', 'Config file.')
_ALLOW_CPU = flags.DEFINE_bool('allow_cpu', False, 'Run without a GPU (rehearsal).')
_BUDGET = flags.DEFINE_float('budget_s', 450, 'Seconds for everything, imports included.')
_GRACE = flags.DEFINE_float('grace_s', 30, 'Past budget_s + grace_s the process exits (3).')
_ONLY = flags.DEFINE_list('only', None, 'Run only these plan entries (names in PLAN below), '
                          'in the order given.')
_STEPS = flags.DEFINE_integer('steps', 10, 'Timed steps / calls per measurement (at most).')
_SCALE = flags.DEFINE_float('step_budget_scale', 1.0, "Multiplies each plan entry's budget "
                            '(a CPU rehearsal compiles slower).')
_PROFILE_DIR = flags.DEFINE_string('profile_dir', '', 'Trace the fastest train config here.')
_PROFILE_STEPS = flags.DEFINE_integer('profile_steps', 3, 'Steps in the trace.')
_OUT = flags.DEFINE_string('out', os.environ.get('OUT', ''), 'Also append lines to OUT/bench.jsonl.')

# name: (kind, dtype, batch, remat, rolled, budget seconds incl. compile). Cheapest first.
PLAN = {
    'train_fp32_b64': ('train', 'float32', 64, False, False, 200),
    'train_bf16_b256': ('train', 'bfloat16', 256, False, False, 120),
    'train_bf16_b1024_remat': ('train', 'bfloat16', 1024, True, False, 120),
    'train_fp32_b64_rolled': ('train', 'float32', 64, False, True, 100),
    'eval_fp32_b256': ('eval', 'float32', 256, False, None, 60),
    'sample_fp32_128': ('sample', 'float32', 128, False, None, 60),
    'eval_bf16_b1024': ('eval', 'bfloat16', 1024, False, None, 45),
}
H200_BF16_TFLOPS = 790.0     # measured on this workplace's H200s (KINDS.md), a lead


def run_entry(run, name):
  """One entry of PLAN (steps 2 and 3), or a line saying why it is skipped; an error
  (e.g. out of memory) is a line too, and the plan goes on."""
  bench = run.bench
  kind, dtype, batch, remat, rolled, budget = PLAN[name]
  budget *= _SCALE.value
  bench.current = name
  left = bench.remaining()
  if kind == 'train' and rolled in run.too_slow:
    bench.skip(name, f'{run.too_slow[rolled]} did not compile within its budget')
    return
  predicted = run.compile_seen.get(rolled) if kind == 'train' else None
  if min(budget, left) < 20 or (predicted is not None and predicted + 10 > min(budget, left)):
    bench.skip(name, 'does not fit the time left', time_left_s=round(left, 1),
               predicted_compile_s=predicted)
    return
  if kind != 'train' and False in run.too_slow:
    run.eval_unroll = 1     # the unrolled model did not compile in time: evaluate rolled
  try:
    if kind == 'train':
      measure_train(run, name, dtype, batch, remat, rolled, budget)
    elif kind == 'eval':
      measure_eval(run, name, dtype, batch, budget)
    else:
      measure_sample(run, name, dtype, batch, budget)
  except Exception as e:  # noqa: BLE001 - an out-of-memory batch must not stop the rest
    message = f'{type(e).__name__}: {e}'
    bench.emit({'name': name, 'status': 'error', 'batch': batch, 'dtype': dtype,
                'remat': remat, 'error': message[:600],
                'out_of_memory': 'RESOURCE_EXHAUSTED' in message or 'out of memory' in message})


def profile_fastest(run):
  """Step 4, with --profile_dir: the profile of the fastest train configuration."""
  bench = run.bench
  if _PROFILE_DIR.value and run.best is not None:
    bench.current = 'profile'
    if bench.remaining() < 20:
      bench.skip('profile', 'does not fit the time left', time_left_s=round(bench.remaining(), 1))
    else:
      try:
        profile(bench, run.best, _PROFILE_DIR.value, _PROFILE_STEPS.value, run.key, _OUT.value)
      except Exception as e:  # noqa: BLE001
        bench.emit({'name': 'profile', 'status': 'error', 'error': f'{type(e).__name__}: {e}'[:600]})
  run.best = None


def summary_line(run):
  """Step 5: the train step's FLOPs per image (counted on the rolled step's jaxpr: no
  compile) if time is left, and every measurement's figures."""
  summary = {'event': 'summary', 'background_compiles': list(run.bench.background)}
  if run.bench.remaining() > 15:
    start = time.perf_counter()
    flops_batch = 8 * jax.device_count()   # per image; another batch keeps jit caches apart
    settings_f, spec_f = run.setup('float32', flops_batch, False, 1)
    flops = count_flops(
        train_step.make_train_step(spec_f, settings_f, run.mesh, STEPS_PER_EPOCH),
        jax.eval_shape(run.to_state0, run.variables),
        jax.ShapeDtypeStruct((flops_batch, *spec_f.image_shape), jnp.uint8), run.key) / flops_batch
    summary['train_gflop_per_image'] = sig(flops / 1e9)
    summary['flops_count_s'] = round(time.perf_counter() - start, 1)
  per_image = summary.get('train_gflop_per_image')
  for name, line in run.results.items():
    entry = {k: line[k] for k in ('img_per_s', 'compile_s', 'compile_and_first_s',
                                  'sample_s_median', 'peak_gib_in_use', 'program_temp_gib')
             if k in line}
    if line['kind'] == 'train' and per_image:
      entry['tflop_per_s'] = sig(per_image * line['img_per_s'] / 1e3)
      if run.device.platform == 'gpu':
        entry['share_of_790_tflops'] = sig(entry['tflop_per_s'] / H200_BF16_TFLOPS)
    summary[name] = entry
  return summary


def main(argv):
  del argv
  # The budget counts from START, before the imports; the watchdog can only start once
  # the flags are parsed (after the imports).
  bench = Bench(_OUT.value, START, _BUDGET.value, _GRACE.value)
  bench.watchdog()
  device = jax.devices()[0]
  bench.context = {'device': device.device_kind, 'platform': device.platform,
                   'jax': jax.__version__}
  if device.platform != 'gpu' and not _ALLOW_CPU.value:
    bench.emit({'event': 'error', 'error': f'JAX sees no GPU: jax.devices() = {jax.devices()} '
                '(platform %r); is the CUDA plugin installed? --allow_cpu rehearses on the CPU'
                % device.platform})
    sys.exit(4)

  plan = list(PLAN) if _ONLY.value is None else list(_ONLY.value)
  unknown = set(_ONLY.value or ()) - set(PLAN)
  if unknown:
    raise app.UsageError(f'--only: unknown entries {sorted(unknown)}; choose from {list(PLAN)}')
  bench.context['config'] = config_flags.get_config_filename(flags.FLAGS['config'])
  run = Run(bench, _CONFIG.value, device, _STEPS.value)
  bench.emit({'event': 'start', 'num_devices': jax.device_count(), 'python': platform.python_version(),
              'flax': flax.__version__, 'budget_s': _BUDGET.value, 'plan': plan,
              'config_scan_unroll': run.unrolled,
              'matmul_precision': str(jax.config.jax_default_matmul_precision),
              'xla_flags': os.environ.get('XLA_FLAGS', '')})
  run.init_variables()                       # 1. the variables, once, rolled
  for name in plan:                          # 2., 3. train steps, evaluation, sampling
    run_entry(run, name)
  profile_fastest(run)                       # 4.
  bench.current = 'summary'                  # 5.
  summary = summary_line(run)
  bench.current = 'end'
  bench.emit(summary)
  sys.stdout.flush()
  if bench.background:     # a thread is still compiling: do not wait for it at exit
    os._exit(0)


if __name__ == '__main__':
  app.run(main)
