"""The measurement of one train step configuration (step 2 of gpu_bench.py's docstring):
its parameter tree checked against the shared one, trace+lower and compile under the
entry's budget, a warm-up step, the synchronised steps and as many dispatched back to
back; one line. Part of experiments/gpu_bench.py."""
import math
import statistics
import time

import jax

from bench_log import memory, within
from bench_run import STEPS_PER_EPOCH, tree_of
from denseflow_jax import train_step


def _builder(step, state, x, key, times):
  """A function that traces, lowers and compiles `step`, its seconds into `times`."""
  def build():
    start = time.perf_counter()
    lowered = step.lower(state, x, key)
    times['trace_lower_s'] = time.perf_counter() - start
    compiled = lowered.compile()
    times['compile_s'] = time.perf_counter() - start - times['trace_lower_s']
    return compiled
  return build


def _steps(run, compiled, state, x, t0, budget):
  """A warm-up step, the timed synchronised steps and as many back to back:
  (first step s, [each timed step s], pipelined s per step, state, metrics)."""
  key = run.key
  start = time.perf_counter()
  state, metrics = compiled(state, x, key)          # warm-up
  jax.block_until_ready((state.step, metrics))
  first_s = time.perf_counter() - start

  def one_step(_):
    nonlocal state, metrics
    state, metrics = compiled(state, x, key)
    jax.block_until_ready((state.step, metrics))   # every output of a call is ready at once
  blocked = run.timed_calls(one_step, t0, budget, then_again=True)
  n = len(blocked)
  start = time.perf_counter()
  for _ in range(n):                                 # the same steps, dispatched back to back
    state, metrics = compiled(state, x, key)
  jax.block_until_ready((state, metrics))
  pipelined = (time.perf_counter() - start) / n
  return first_s, blocked, pipelined, state, metrics


def measure_train(run, name, dtype, batch, remat, rolled, budget):
  """Measures one train entry of the plan (a bench_run.Run's state), emits its line."""
  bench = run.bench
  unroll = 1 if rolled else run.unrolled
  desc = {'name': name, 'kind': 'train', 'batch': batch, 'dtype': dtype, 'remat': remat,
          'scan_unroll': unroll}
  t0 = time.monotonic()
  settings, spec = run.setup(dtype, batch, remat, unroll)
  init, to_state = train_step.make_state_init(spec, settings, run.mesh, STEPS_PER_EPOCH)
  x = run.images(spec, batch)
  start = time.perf_counter()
  if (unroll, remat) not in run.verified:          # the dtype does not change the tree
    if tree_of(jax.eval_shape(init, run.key, x)) != run.shared_tree:
      raise RuntimeError(f"{name}: the parameter tree differs from the rolled model's")
    run.verified.add((unroll, remat))
  verify_s = time.perf_counter() - start
  state = to_state(jax.tree.map(lambda a: a.copy(), run.variables))   # the step donates it
  step = train_step.make_train_step(spec, settings, run.mesh, STEPS_PER_EPOCH)
  times = {}
  limit = min(budget, bench.remaining()) - (time.monotonic() - t0) - 5
  if limit < 10:
    bench.skip(name, 'no time left to compile after the tree check',
               verify_tree_s=round(verify_s, 1))
    return
  done, compiled = within(limit, _builder(step, state, x, run.key, times))
  if not done:
    bench.background.append(name)
    run.too_slow[rolled] = name
    bench.emit({**desc, 'status': 'compile_timeout', 'verify_tree_s': round(verify_s, 1),
                'message': f'trace+lower+compile not done after {limit:.0f} s'})
    return
  run.compile_seen[rolled] = max(run.compile_seen.get(rolled, 0.0), sum(times.values()))
  first_s, blocked, pipelined, state, metrics = _steps(run, compiled, state, x, t0, budget)
  step_s = statistics.median(blocked)
  bpd = float(metrics['train_bpd'])
  line = {**desc, 'status': 'ok', 'verify_tree_s': round(verify_s, 1),
          'trace_lower_s': round(times['trace_lower_s'], 1),
          'compile_s': round(times['compile_s'], 1), 'first_step_s': round(first_s, 3),
          'steps_timed': len(blocked), 'step_s_median': round(step_s, 4),
          'step_s_min': round(min(blocked), 4), 'step_s_pipelined': round(pipelined, 4),
          'img_per_s': round(batch / step_s, 1),
          'img_per_s_pipelined': round(batch / pipelined, 1),
          'train_bpd': round(bpd, 4), 'finite': math.isfinite(bpd),
          'skipped_updates': int(metrics['skipped_total']), **memory(run.device, compiled)}
  run.results[name] = line
  bench.emit(line)
  run.check_variables()
  if run.best is None or batch / step_s > run.best[0]:
    run.best = (batch / step_s, name, compiled, state, x)
