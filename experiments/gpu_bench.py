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
"""
import gzip
import json
import math
import os
import platform
import shutil
import statistics
import sys
import threading
import time

START = time.monotonic()
sys.path.insert(0, os.getcwd())                                # configs.*
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))   # flops.py
os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')  # peak memory = what is used

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

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


class Bench:
  """State shared by the measurements: where lines go, the clock, the common context."""

  def __init__(self, out_dir):
    self.out_path = os.path.join(out_dir, 'bench.jsonl') if out_dir else None
    if out_dir:
      os.makedirs(out_dir, exist_ok=True)
    self.context = {}
    self.current = 'imports'
    self.background = []      # names of compiles abandoned at their budget, still running

  def elapsed(self):
    return time.monotonic() - START

  def remaining(self):
    return _BUDGET.value - self.elapsed()

  def emit(self, line):
    line = {**line, **self.context, 'elapsed_s': round(self.elapsed(), 1)}
    if self.background:
      line['compiles_still_running'] = list(self.background)
    text = json.dumps(line)
    print(text, flush=True)
    if self.out_path:
      with open(self.out_path, 'a') as f:
        f.write(text + '\n')

  def watchdog(self):
    def watch():
      while self.remaining() > -_GRACE.value:
        time.sleep(1.0)
      self.emit({'event': 'deadline', 'during': self.current,
                 'message': f'--budget_s {_BUDGET.value} + {_GRACE.value} s passed; exiting'})
      os._exit(3)
    threading.Thread(target=watch, daemon=True).start()


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


def _sig(value, digits=4):
  return float(f'{value:.{digits}g}')


def _memory(device, compiled=None):
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


def main(argv):
  del argv
  bench = Bench(_OUT.value)
  bench.watchdog()
  import jax
  import jax.numpy as jnp
  import numpy as np

  device = jax.devices()[0]
  bench.context = {'device': device.device_kind, 'platform': device.platform,
                   'jax': jax.__version__}
  if device.platform != 'gpu' and not _ALLOW_CPU.value:
    bench.emit({'event': 'error', 'error': f'JAX sees no GPU: jax.devices() = {jax.devices()} '
                '(platform %r); is the CUDA plugin installed? --allow_cpu rehearses on the CPU'
                % device.platform})
    sys.exit(4)

  import flax
  from denseflow_jax import evaluate, model as model_lib, sharding, train_step
  from denseflow_jax.settings import TrainSettings
  from denseflow_jax.spec import spec_from_config
  from flops import count_flops

  base = _CONFIG.value
  config_file = config_flags.get_config_filename(flags.FLAGS['config'])
  plan = list(PLAN) if _ONLY.value is None else list(_ONLY.value)
  unknown = set(_ONLY.value or ()) - set(PLAN)
  if unknown:
    raise app.UsageError(f'--only: unknown entries {sorted(unknown)}; choose from {list(PLAN)}')
  unrolled = int(base.model.scan_unroll)
  bench.context['config'] = config_file
  mesh = sharding.make_mesh()
  rng = np.random.default_rng(0)
  key = jax.random.PRNGKey(0)
  steps_per_epoch = 1000

  def setup(dtype, batch, remat, unroll):
    config = base.copy_and_resolve_references()
    config.model.compute_dtype = dtype
    config.model.remat = remat
    config.model.scan_unroll = unroll
    config.train.batch_size = batch
    return TrainSettings.from_config(config), spec_from_config(config.model)

  def images(spec, batch):   # random, never zeros
    local = batch // jax.process_count()
    return sharding.global_batch(
        rng.integers(0, 2 ** spec.num_bits, (local, *spec.image_shape), dtype=np.uint8), mesh)

  def tree_of(tree):
    return jax.tree.map(lambda a: (tuple(a.shape), str(a.dtype)), tree)

  bench.emit({'event': 'start', 'num_devices': jax.device_count(), 'python': platform.python_version(),
              'flax': flax.__version__, 'budget_s': _BUDGET.value, 'plan': plan,
              'config_scan_unroll': unrolled,
              'matmul_precision': str(jax.config.jax_default_matmul_precision),
              'xla_flags': os.environ.get('XLA_FLAGS', '')})

  # ---- 1. the variables, once, with the rolled model --------------------------------
  bench.current = 'init'
  start = time.perf_counter()
  init_batch = int(base.train.batch_size)
  settings0, spec0 = setup('float32', init_batch, False, 1)
  init0, to_state0 = train_step.make_state_init(spec0, settings0, mesh, steps_per_epoch)
  variables = jax.block_until_ready(init0(key, images(spec0, init_batch)))
  shared_tree = tree_of(variables)
  bench.emit({'event': 'init', 'init_batch': init_batch, 'scan_unroll': 1,
              'init_s': round(time.perf_counter() - start, 1),
              'parameters': sum(math.prod(a.shape) for a in jax.tree.leaves(variables['params'])),
              **_memory(device)})

  results = {}               # name -> its line
  verified = {(1, False)}    # (scan_unroll, remat) whose parameter tree was checked
  compile_seen = {}          # rolled? -> longest trace+lower+compile seen
  too_slow = {}              # rolled? -> the measurement whose compile outran its budget
  best = None                # (img/s, name, compiled, state, x) for the profile
  eval_unroll = unrolled

  def check_variables():
    if any(a.is_deleted() for a in jax.tree.leaves(variables)):
      raise RuntimeError('the shared variables were donated away: copy them before to_state')

  def skip(name, reason, **extra):
    bench.emit({'name': name, 'status': 'skipped', 'reason': reason, **extra})

  def timed_calls(fn, t0, budget, then_again=False):
    """Seconds of each of up to --steps calls fn(i) (each synchronised; at least 3), as many
    as the measurement's budget (started at t0) and the time left allow; `then_again`:
    the caller repeats as many calls afterwards."""
    times = []
    while len(times) < _STEPS.value:
      start = time.perf_counter()
      fn(len(times))
      times.append(time.perf_counter() - start)
      more = (2 + (len(times) + 1 if then_again else 0)) * times[-1]
      if len(times) >= 3 and (time.monotonic() - t0 + more > budget or more > bench.remaining()):
        break
    return times

  # ---- 2. train steps ---------------------------------------------------------------
  def measure_train(name, dtype, batch, remat, rolled, budget):
    nonlocal best
    unroll = 1 if rolled else unrolled
    desc = {'name': name, 'kind': 'train', 'batch': batch, 'dtype': dtype, 'remat': remat,
            'scan_unroll': unroll}
    t0 = time.monotonic()
    settings, spec = setup(dtype, batch, remat, unroll)
    init, to_state = train_step.make_state_init(spec, settings, mesh, steps_per_epoch)
    x = images(spec, batch)
    start = time.perf_counter()
    if (unroll, remat) not in verified:          # the dtype does not change the tree
      if tree_of(jax.eval_shape(init, key, x)) != shared_tree:
        raise RuntimeError(f"{name}: the parameter tree differs from the rolled model's")
      verified.add((unroll, remat))
    verify_s = time.perf_counter() - start
    state = to_state(jax.tree.map(lambda a: a.copy(), variables))   # the step donates it
    step = train_step.make_train_step(spec, settings, mesh, steps_per_epoch)
    times = {}

    def build():
      start = time.perf_counter()
      lowered = step.lower(state, x, key)
      times['trace_lower_s'] = time.perf_counter() - start
      compiled = lowered.compile()
      times['compile_s'] = time.perf_counter() - start - times['trace_lower_s']
      return compiled
    limit = min(budget, bench.remaining()) - (time.monotonic() - t0) - 5
    if limit < 10:
      skip(name, 'no time left to compile after the tree check', verify_tree_s=round(verify_s, 1))
      return
    done, compiled = within(limit, build)
    if not done:
      bench.background.append(name)
      too_slow[rolled] = name
      bench.emit({**desc, 'status': 'compile_timeout', 'verify_tree_s': round(verify_s, 1),
                  'message': f'trace+lower+compile not done after {limit:.0f} s'})
      return
    compile_seen[rolled] = max(compile_seen.get(rolled, 0.0), sum(times.values()))
    start = time.perf_counter()
    state, metrics = compiled(state, x, key)          # warm-up
    jax.block_until_ready((state.step, metrics))
    first_s = time.perf_counter() - start

    def one_step(_):
      nonlocal state, metrics
      state, metrics = compiled(state, x, key)
      jax.block_until_ready((state.step, metrics))   # every output of a call is ready at once
    blocked = timed_calls(one_step, t0, budget, then_again=True)
    n = len(blocked)
    start = time.perf_counter()
    for _ in range(n):                                 # the same steps, dispatched back to back
      state, metrics = compiled(state, x, key)
    jax.block_until_ready((state, metrics))
    pipelined = (time.perf_counter() - start) / n
    step_s = statistics.median(blocked)
    bpd = float(metrics['train_bpd'])
    line = {**desc, 'status': 'ok', 'verify_tree_s': round(verify_s, 1),
            'trace_lower_s': round(times['trace_lower_s'], 1),
            'compile_s': round(times['compile_s'], 1), 'first_step_s': round(first_s, 3),
            'steps_timed': n, 'step_s_median': round(step_s, 4),
            'step_s_min': round(min(blocked), 4), 'step_s_pipelined': round(pipelined, 4),
            'img_per_s': round(batch / step_s, 1),
            'img_per_s_pipelined': round(batch / pipelined, 1),
            'train_bpd': round(bpd, 4), 'finite': math.isfinite(bpd),
            'skipped_updates': int(metrics['skipped_total']), **_memory(device, compiled)}
    results[name] = line
    bench.emit(line)
    check_variables()
    if best is None or batch / step_s > best[0]:
      best = (batch / step_s, name, compiled, state, x)

  # ---- 3. evaluation and sampling ----------------------------------------------------
  eval_vars = {'params': variables['params'], 'batch_stats': variables['batch_stats']}

  def first_call(name, desc, budget, fn):
    """Compile + first call within the budget: its seconds, or None (line emitted)."""
    start = time.perf_counter()
    limit = min(budget, bench.remaining()) - 5
    done, _ = within(limit, fn)
    if not done:
      bench.background.append(name)
      bench.emit({**desc, 'status': 'compile_timeout',
                  'message': f'compile + first call not done after {limit:.0f} s'})
      return None
    return time.perf_counter() - start

  def measure_eval(name, dtype, batch, budget):
    desc = {'name': name, 'kind': 'eval', 'batch': batch, 'dtype': dtype, 'remat': False,
            'scan_unroll': eval_unroll}
    t0 = time.monotonic()
    _, spec = setup(dtype, batch, False, eval_unroll)
    log_prob_fn = evaluate.make_log_prob_fn(model_lib.make_model(spec))   # one-sample bound
    x = images(spec, batch)
    first_s = first_call(name, desc, budget,
                         lambda: jax.block_until_ready(log_prob_fn(eval_vars, x, key)))
    if first_s is None:
      return
    out = {}

    def one_call(i):
      out['log_p'] = jax.block_until_ready(log_prob_fn(eval_vars, x, jax.random.fold_in(key, i)))
    calls = timed_calls(one_call, t0, budget)
    call_s = statistics.median(calls)
    bpd = float(jnp.mean(model_lib.bits_per_dim(out['log_p'], spec)))
    results[name] = {**desc, 'status': 'ok', 'compile_and_first_s': round(first_s, 1),
                     'calls_timed': len(calls), 'call_s_median': round(call_s, 4),
                     'img_per_s': round(batch / call_s, 1), 'bpd_random_images': round(bpd, 3),
                     **_memory(device)}
    bench.emit(results[name])
    check_variables()

  def measure_sample(name, dtype, num, budget):
    desc = {'name': name, 'kind': 'sample', 'num': num, 'dtype': dtype,
            'scan_unroll': eval_unroll}
    t0 = time.monotonic()
    _, spec = setup(dtype, num, False, eval_unroll)
    model = model_lib.make_model(spec)
    out = {}

    def draw(i):      # uint8 images on the host: synchronised
      out['images'] = evaluate.sample_images(model, eval_vars, jax.random.fold_in(key, i), num,
                                             1.0, batch_size=num)
    first_s = first_call(name, desc, budget, lambda: draw(10 ** 6))   # not a timed key
    if first_s is None:
      return
    calls = timed_calls(draw, t0, budget)
    call_s = statistics.median(calls)
    results[name] = {**desc, 'status': 'ok', 'compile_and_first_s': round(first_s, 1),
                     'calls_timed': len(calls), 'sample_s_median': round(call_s, 4),
                     'img_per_s': round(num / call_s, 1),
                     'pixel_range': [int(out['images'].min()), int(out['images'].max())],
                     **_memory(device)}
    bench.emit(results[name])
    check_variables()

  for name in plan:
    kind, dtype, batch, remat, rolled, budget = PLAN[name]
    budget *= _SCALE.value
    bench.current = name
    left = bench.remaining()
    if kind == 'train' and rolled in too_slow:
      skip(name, f'{too_slow[rolled]} did not compile within its budget')
      continue
    predicted = compile_seen.get(rolled) if kind == 'train' else None
    if min(budget, left) < 20 or (predicted is not None and predicted + 10 > min(budget, left)):
      skip(name, 'does not fit the time left', time_left_s=round(left, 1),
           predicted_compile_s=predicted)
      continue
    if kind != 'train' and False in too_slow:
      eval_unroll = 1     # the unrolled model did not compile in time: evaluate rolled
    try:
      if kind == 'train':
        measure_train(name, dtype, batch, remat, rolled, budget)
      elif kind == 'eval':
        measure_eval(name, dtype, batch, budget)
      else:
        measure_sample(name, dtype, batch, budget)
    except Exception as e:  # noqa: BLE001 - an out-of-memory batch must not stop the rest
      message = f'{type(e).__name__}: {e}'
      bench.emit({'name': name, 'status': 'error', 'batch': batch, 'dtype': dtype,
                  'remat': remat, 'error': message[:600],
                  'out_of_memory': 'RESOURCE_EXHAUSTED' in message or 'out of memory' in message})

  # ---- 4. profile of the fastest train configuration --------------------------------
  if _PROFILE_DIR.value and best is not None:
    bench.current = 'profile'
    if bench.remaining() < 20:
      skip('profile', 'does not fit the time left', time_left_s=round(bench.remaining(), 1))
    else:
      try:
        profile(bench, best, _PROFILE_DIR.value, _PROFILE_STEPS.value, key, _OUT.value)
      except Exception as e:  # noqa: BLE001
        bench.emit({'name': 'profile', 'status': 'error', 'error': f'{type(e).__name__}: {e}'[:600]})
  best = None

  # ---- 5. FLOPs (counted on the rolled step's jaxpr: no compile) and the summary ------
  bench.current = 'summary'
  summary = {'event': 'summary', 'background_compiles': list(bench.background)}
  if bench.remaining() > 15:
    start = time.perf_counter()
    flops_batch = 8 * jax.device_count()   # per image; another batch keeps jit caches apart
    settings_f, spec_f = setup('float32', flops_batch, False, 1)
    flops = count_flops(
        train_step.make_train_step(spec_f, settings_f, mesh, steps_per_epoch),
        jax.eval_shape(to_state0, variables),
        jax.ShapeDtypeStruct((flops_batch, *spec_f.image_shape), jnp.uint8), key) / flops_batch
    summary['train_gflop_per_image'] = _sig(flops / 1e9)
    summary['flops_count_s'] = round(time.perf_counter() - start, 1)
  per_image = summary.get('train_gflop_per_image')
  for name, line in results.items():
    entry = {k: line[k] for k in ('img_per_s', 'compile_s', 'compile_and_first_s',
                                  'sample_s_median', 'peak_gib_in_use', 'program_temp_gib')
             if k in line}
    if line['kind'] == 'train' and per_image:
      entry['tflop_per_s'] = _sig(per_image * line['img_per_s'] / 1e3)
      if device.platform == 'gpu':
        entry['share_of_790_tflops'] = _sig(entry['tflop_per_s'] / H200_BF16_TFLOPS)
    summary[name] = entry
  bench.current = 'end'
  bench.emit(summary)
  sys.stdout.flush()
  if bench.background:     # a thread is still compiling: do not wait for it at exit
    os._exit(0)


def profile(bench, best, profile_dir, steps, key, out_dir):
  """A jax.profiler trace of `steps` steps of `best`, summarised: top kernels by time."""
  import jax
  import jax.profiler
  img_per_s, name, compiled, state, x = best
  shutil.rmtree(profile_dir, ignore_errors=True)
  options = jax.profiler.ProfileOptions()
  options.python_tracer_level = 0          # device and XLA events only: a smaller trace
  options.enable_hlo_proto = False
  start = time.perf_counter()
  with jax.profiler.trace(profile_dir, profiler_options=options):
    for i in range(steps):
      with jax.profiler.StepTraceAnnotation('train', step_num=i):
        state, metrics = compiled(state, x, key)
        jax.block_until_ready((state.step, metrics))
  wall = time.perf_counter() - start
  paths = [os.path.join(d, f) for d, _, fs in os.walk(profile_dir) for f in fs
           if f.endswith('.xplane.pb')]
  line = {'name': 'profile', 'kind': 'profile', 'of': name, 'steps': steps,
          'wall_ms_per_step': round(1e3 * wall / steps, 2), 'trace_files': len(paths)}
  if paths:
    path = max(paths, key=os.path.getsize)
    line['trace_mib'] = round(os.path.getsize(path) / 2 ** 20, 2)
    line.update(summarise_trace(path, steps))
    if out_dir:
      target = os.path.join(out_dir, 'profile.xplane.pb.gz')
      with open(path, 'rb') as src, gzip.open(target, 'wb', compresslevel=6) as dst:
        shutil.copyfileobj(src, dst)
      size = os.path.getsize(target)
      if size > 15.5 * 2 ** 20:
        os.remove(target)
        line['trace_copied'] = f'no: {size / 2 ** 20:.1f} MiB gzipped, over 16 MiB'
      else:
        line['trace_copied'] = f'$OUT/profile.xplane.pb.gz ({size / 2 ** 20:.1f} MiB)'
  bench.emit(line)


def summarise_trace(path, steps, top=25):
  """Device time by kernel name (GPU planes; on a CPU rehearsal, the events of XLA's CPU
  threads, which include the executor's own spans)."""
  from jax.profiler import ProfileData
  data = ProfileData.from_file(path)
  planes = [p for p in data.planes if p.name.startswith('/device:')]
  on_host = not planes
  if on_host:
    planes = [p for p in data.planes if p.name.startswith('/host:CPU')]
  totals, counts = {}, {}
  lines_seen = []
  for plane in planes:
    for line in plane.lines:
      # Derived lines repeat the kernels at coarser grain (modules, ops, steps).
      if line.name.startswith(('XLA Modules', 'XLA Ops', 'Steps', 'Framework', 'Source',
                               'TensorFlow', 'python')):
        continue
      if on_host and not line.name.startswith('tf_XLA'):
        continue
      lines_seen.append(f'{plane.name}/{line.name}')
      for event in line.events:
        totals[event.name] = totals.get(event.name, 0.0) + event.duration_ns
        counts[event.name] = counts.get(event.name, 0) + 1
  busy = sum(totals.values())
  ranked = sorted(totals, key=totals.get, reverse=True)[:top]
  return {
      'planes': [p.name for p in planes], 'lines': lines_seen[:12],
      'kernel_launches_per_step': round(sum(counts.values()) / steps, 1),
      'distinct_kernels': len(totals),
      'busy_ms_per_step': round(busy / steps / 1e6, 3),
      'top_kernels': [{'name': k[:120], 'ms_per_step': round(totals[k] / steps / 1e6, 3),
                       'calls_per_step': round(counts[k] / steps, 1),
                       'share': round(totals[k] / busy, 4) if busy else None}
                      for k in ranked],
  }


if __name__ == '__main__':
  app.run(main)
