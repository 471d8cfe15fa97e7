"""The profile of gpu_bench.py (step 4 of its docstring): a jax.profiler trace of a few
steps of the fastest train configuration, summarised into the top kernels by device time
(one line); the raw trace copied, gzipped, to $OUT/profile.xplane.pb.gz if under 16 MiB.
Part of experiments/gpu_bench.py."""
import gzip
import os
import shutil
import time

import jax
import jax.profiler
from jax.profiler import ProfileData


def profile(bench, best, profile_dir, steps, key, out_dir):
  """A jax.profiler trace of `steps` steps of `best`, summarised: top kernels by time."""
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
