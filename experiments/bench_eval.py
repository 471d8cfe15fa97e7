"""The measurements of evaluation and sampling (step 3 of gpu_bench.py's docstring): the
one-sample bound in eval mode, and drawing images, each with the shared variables: the
compile and first call under the entry's budget, then the timed calls; one line each.
Part of experiments/gpu_bench.py."""
import statistics
import time

import jax
import jax.numpy as jnp

from bench_log import memory, within
from denseflow_jax import evaluate, model as model_lib, sampling


def _first_call(bench, name, desc, budget, fn):
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


def measure_eval(run, name, dtype, batch, budget):
  """Measures one eval entry of the plan (a bench_run.Run's state), emits its line."""
  desc = {'name': name, 'kind': 'eval', 'batch': batch, 'dtype': dtype, 'remat': False,
          'scan_unroll': run.eval_unroll}
  t0 = time.monotonic()
  _, spec = run.setup(dtype, batch, False, run.eval_unroll)
  log_prob_fn = evaluate.make_log_prob_fn(model_lib.make_model(spec))   # one-sample bound
  x = run.images(spec, batch)
  variables, key = run.eval_variables(), run.key
  first_s = _first_call(run.bench, name, desc, budget,
                        lambda: jax.block_until_ready(log_prob_fn(variables, x, key)))
  if first_s is None:
    return
  out = {}

  def one_call(i):
    out['log_p'] = jax.block_until_ready(log_prob_fn(variables, x, jax.random.fold_in(key, i)))
  calls = run.timed_calls(one_call, t0, budget)
  call_s = statistics.median(calls)
  bpd = float(jnp.mean(model_lib.bits_per_dim(out['log_p'], spec)))
  run.results[name] = {**desc, 'status': 'ok', 'compile_and_first_s': round(first_s, 1),
                       'calls_timed': len(calls), 'call_s_median': round(call_s, 4),
                       'img_per_s': round(batch / call_s, 1), 'bpd_random_images': round(bpd, 3),
                       **memory(run.device)}
  run.bench.emit(run.results[name])
  run.check_variables()


def measure_sample(run, name, dtype, num, budget):
  """Measures one sample entry of the plan (`num` images per call), emits its line."""
  desc = {'name': name, 'kind': 'sample', 'num': num, 'dtype': dtype,
          'scan_unroll': run.eval_unroll}
  t0 = time.monotonic()
  _, spec = run.setup(dtype, num, False, run.eval_unroll)
  model = model_lib.make_model(spec)
  variables, key = run.eval_variables(), run.key
  out = {}

  def draw(i):      # uint8 images on the host: synchronised
    out['images'] = sampling.sample_images(model, variables, jax.random.fold_in(key, i), num,
                                           1.0, batch_size=num)
  first_s = _first_call(run.bench, name, desc, budget, lambda: draw(10 ** 6))   # not a timed key
  if first_s is None:
    return
  calls = run.timed_calls(draw, t0, budget)
  call_s = statistics.median(calls)
  run.results[name] = {**desc, 'status': 'ok', 'compile_and_first_s': round(first_s, 1),
                       'calls_timed': len(calls), 'sample_s_median': round(call_s, 4),
                       'img_per_s': round(num / call_s, 1),
                       'pixel_range': [int(out['images'].min()), int(out['images'].max())],
                       **memory(run.device)}
  run.bench.emit(run.results[name])
  run.check_variables()
