"""What the train step asks of a GPU, judged on the CPU: the step lowered for CUDA, counted.

    python experiments/hlo_counts.py --config configs/cifar10.py --batch_size 64

Lowers the real jitted train step (`train_step.make_train_step`, Adamax, data-parallel
shardings) for the 'cuda' platform on this machine -- no GPU is needed, nothing is
compiled -- once with `model.scan_unroll` as configured and once with `scan_unroll=1`
(rolled), and counts the StableHLO text: all ops, convolutions, dot_generals,
transposes, concatenates, while loops, custom calls by target, and the dtypes of the
convolutions and dots. Then the bytes the backward pass keeps from the forward pass
(the residuals of `jax.vjp` of the training loss with respect to the parameters, from
the jaxpr; XLA may still fuse or rematerialise some), for each precision variant,
split into activations and residuals that are the step's own inputs (parameters,
images, noise). Prints ONE JSON line (and the counts of each lowering to stderr as it
goes). For the compiled GPU program itself (kernels, bytes, memory, collectives) use
experiments/gpu_compile.py; this script counts the program XLA is given.

Counting is on the text, with each `func.call` replaced by its callee's counts (a
fully unrolled scan is emitted as one body function called once per module, so the
counts as emitted, also given, undercount what the program holds). Memory: tracing the
unrolled DenseFlow-74-10 peaked at 0.82 GiB of host memory (2026-11-30); `--max_rss_gib`
stops the script (exit 2, one JSON line saying so) before it takes more.
"""
import collections
import json
import math
import os
import re
import resource
import sys
import threading
import time

sys.path.insert(0, os.getcwd())   # configs.*, denseflow_jax

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from absl import app, flags  # noqa: E402
from jax.extend import core as jex_core  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from denseflow_jax import model as model_lib, sharding, train_step  # noqa: E402
from denseflow_jax.settings import TrainSettings  # noqa: E402
from denseflow_jax.spec import spec_from_config  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file (configs/*.py).')
_BATCH = flags.DEFINE_integer('batch_size', 64, 'Global batch of the lowered step.')
_UNROLLS = flags.DEFINE_list('unrolls', None, 'scan_unroll values to lower (default: the '
                             "config's, then 1).")
_PLATFORM = flags.DEFINE_string('platform', 'cuda', 'Lowering platform.')
_RESIDUALS = flags.DEFINE_list(
    'residuals', ['float32', 'bfloat16', 'bfloat16+remat'],
    "Precision variants (dtype[+remat]) whose saved-for-backward bytes are counted "
    "(rolled model, same residuals as unrolled); '' for none.")
_MAX_RSS = flags.DEFINE_float('max_rss_gib', 5.0, 'Stop (exit 2) above this resident memory.')

_OP = re.compile(r'^\s*(?:%[^=]*= )?"?([a-z_]+\.[a-z_.0-9]+|call(?= @))')
_TYPES = re.compile(r': \((tensor<[^>]*>), (tensor<[^>]*>)\) -> (tensor<[^>]*>)')
_CUSTOM_CALL = re.compile(r'stablehlo\.custom_call @([\w.$-]+)')
_FUNC = re.compile(r'func\.func (?:\w+ )?@([\w.$-]+)')
_CALLEE = re.compile(r'call @([\w.$-]+)')
_DTYPE_BYTES = {'bool': 1}


def _rss_gib():
  with open('/proc/self/status') as f:
    for line in f:
      if line.startswith('VmRSS:'):
        return int(line.split()[1]) / 2 ** 20
  return 0.0


def _peak_rss_gib():
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def _memory_guard(limit_gib):
  def watch():
    while True:
      rss = _rss_gib()
      if rss > limit_gib:
        print(json.dumps({'error': f'resident memory {rss:.2f} GiB above --max_rss_gib '
                          f'{limit_gib}; stopped'}), flush=True)
        os._exit(2)
      time.sleep(0.5)
  threading.Thread(target=watch, daemon=True).start()


def _element(tensor_type):
  return tensor_type[len('tensor<'):-1].split('x')[-1]


def _per_function(text):
  """{function name: (Counter of keys, [callees])} of a StableHLO module's text. Keys:
  'op:NAME', 'custom_call:TARGET', 'convolution:TYPES', 'dot_general:TYPES'."""
  functions = {}
  counter, callees = collections.Counter(), []
  for line in text.splitlines():
    match = _OP.match(line)
    if not match:
      continue
    name = match.group(1)
    if name == 'func.func':
      counter, callees = collections.Counter(), []
      functions[_FUNC.search(line).group(1)] = (counter, callees)
      continue
    counter['op:' + ('func.call' if name == 'call' else name)] += 1
    if name in ('call', 'func.call'):
      callees.append(_CALLEE.search(line).group(1))
    elif name == 'stablehlo.custom_call':
      target = _CUSTOM_CALL.search(line)
      counter['custom_call:' + (target.group(1) if target else '?')] += 1
    elif name in ('stablehlo.convolution', 'stablehlo.dot_general'):
      types = _TYPES.search(line)
      key = ('?' if not types else
             f'{_element(types.group(1))},{_element(types.group(2))}->{_element(types.group(3))}')
      counter[f'{name[len("stablehlo."):]}:{key}'] += 1
  return functions


def _summary(counter):
  def by(prefix):
    return {k[len(prefix):]: n for k, n in counter.most_common() if k.startswith(prefix)}
  ops = by('op:')
  calls = ops.pop('func.call', 0)
  return {
      'calls': calls,
      'stablehlo_ops': sum(n for k, n in ops.items() if k.startswith('stablehlo.')),
      'all_ops': sum(ops.values()),
      'convolutions': ops.get('stablehlo.convolution', 0),
      'dot_generals': ops.get('stablehlo.dot_general', 0),
      'transposes': ops.get('stablehlo.transpose', 0),
      'concatenates': ops.get('stablehlo.concatenate', 0),
      'while_loops': ops.get('stablehlo.while', 0),
      'custom_calls': ops.get('stablehlo.custom_call', 0),
      'custom_call_targets': by('custom_call:'),
      'convolution_dtypes': by('convolution:'),
      'dot_dtypes': by('dot_general:'),
      'top_ops': dict(list(ops.items())[:12]),
  }


def count_ops(text):
  """Op counts of a StableHLO module's text, with every `func.call` replaced by the
  callee's ops (as XLA's inliner does before optimising: what the program holds), and
  the counts as emitted (each function once) under 'as_emitted'. A loop body counts
  once, however often it runs."""
  functions = _per_function(text)
  inlined = {}

  def expand(name):
    if name not in inlined:
      counter, callees = functions[name]
      total = collections.Counter(counter)
      for callee in callees:
        total.update(expand(callee))
      inlined[name] = total
    return inlined[name]
  emitted = collections.Counter()
  for counter, _ in functions.values():
    emitted.update(counter)
  result = _summary(expand('main'))
  result['inlined_calls'] = result.pop('calls')
  result['as_emitted'] = {k: v for k, v in _summary(emitted).items()
                          if k in ('stablehlo_ops', 'calls', 'convolutions', 'dot_generals',
                                   'transposes', 'concatenates', 'custom_calls')}
  result['as_emitted']['functions'] = len(functions)
  return result


def _nbytes(aval):
  name = str(aval.dtype)
  size = _DTYPE_BYTES.get(name) or max(1, aval.dtype.itemsize)
  return math.prod(aval.shape) * size


def saved_residuals(loss, params, *rest):
  """Bytes jax.vjp of `loss(params, *rest)` w.r.t. params keeps for the backward pass:
  (activations, residuals that are inputs, number of residuals)."""
  def residuals(p, *r):
    _, vjp_fn = jax.vjp(lambda q: loss(q, *r), p)
    return jax.tree.leaves(vjp_fn)

  jaxpr = jax.make_jaxpr(residuals)(params, *rest).jaxpr
  inputs = set(jaxpr.invars)
  outputs = {v for v in jaxpr.outvars if isinstance(v, jex_core.Var)}   # not literals
  activations = from_inputs = 0
  count = len(outputs)
  for var in outputs:
    if var in inputs:
      from_inputs += _nbytes(var.aval)
    else:
      activations += _nbytes(var.aval)
  return activations, from_inputs, count


def _config_for(base, **model):
  """(TrainSettings, ModelSpec) of the config `base` with these model settings."""
  config = base.copy_and_resolve_references()
  for name, value in model.items():
    config.model[name] = value
  return TrainSettings.from_config(config), spec_from_config(config.model)


def _abstract_state(spec, settings, mesh, key):
  """Abstract (variables, train state, batch of images) of the step (jax.eval_shape)."""
  init, to_state = train_step.make_state_init(spec, settings, mesh, steps_per_epoch=1000)
  x = jax.ShapeDtypeStruct((settings.batch_size, *spec.image_shape), jnp.uint8)
  variables = jax.eval_shape(init, key, x)
  return variables, jax.eval_shape(to_state, variables), x


def lowering_counts(base, unroll, mesh, key, platform):
  """(counts of the train step with this scan_unroll lowered for `platform`, the
  (shape, dtype) tree of its variables)."""
  settings, spec = _config_for(base, scan_unroll=unroll)
  start = time.perf_counter()
  variables, state, x = _abstract_state(spec, settings, mesh, key)
  tree = jax.tree.map(lambda a: (a.shape, str(a.dtype)), variables)
  step = train_step.make_train_step(spec, settings, mesh, steps_per_epoch=1000)
  traced = step.trace(state, x, key)
  trace_s = time.perf_counter() - start
  lowered = traced.lower(lowering_platforms=(platform,))
  text = lowered.as_text()
  lower_s = time.perf_counter() - start - trace_s
  counts = count_ops(text)
  counts.update(text_lines=text.count('\n'), text_mib=round(len(text) / 2 ** 20, 1))
  del text
  # The same module as XLA HLO (before any optimisation): instructions, calls inlined
  # per computation, chlo ops expanded.
  hlo = lowered.compiler_ir('hlo').as_hlo_text()
  counts['hlo_instructions'] = sum(1 for line in hlo.splitlines() if ' = ' in line)
  counts['hlo_computations'] = sum(1 for line in hlo.splitlines()
                                   if line.endswith('{') and ' = ' not in line)
  del hlo
  counts.update(trace_s=round(trace_s, 1), lower_s=round(lower_s, 1),
                rss_gib_after=round(_rss_gib(), 2))
  return counts, tree


def residual_bytes(base, variant, mesh, key):
  """(saved-for-backward figures of one precision variant 'dtype[+remat]' of the rolled
  model, its abstract variables)."""
  dtype, _, remat = variant.partition('+')
  settings, spec = _config_for(base, scan_unroll=1, compute_dtype=dtype, remat=remat == 'remat')
  start = time.perf_counter()
  variables, _, x = _abstract_state(spec, settings, mesh, key)
  model = model_lib.make_model(spec)
  noise = jax.eval_shape(lambda k: model_lib.draw_noise(spec, k, settings.batch_size), key)
  loss = lambda p, bs, xb, nz: train_step.train_loss(model, p, bs, xb, nz)[0]
  act, inputs, count = saved_residuals(loss, variables['params'], variables['batch_stats'],
                                       x, noise)
  return {'activations_gib': round(act / 2 ** 30, 3), 'inputs_gib': round(inputs / 2 ** 30, 3),
          'count': count, 'seconds': round(time.perf_counter() - start, 1)}, variables


def main(argv):
  del argv
  _memory_guard(_MAX_RSS.value)
  base = _CONFIG.value
  batch = _BATCH.value
  base.train.batch_size = batch
  mesh = sharding.make_mesh()
  key = jax.random.PRNGKey(0)
  unrolls = [int(u) for u in (_UNROLLS.value or [base.model.scan_unroll, 1])]
  result = {'config': config_flags.get_config_filename(flags.FLAGS['config']),
            'batch_size': batch, 'platform': _PLATFORM.value,
            'compute_dtype': base.model.compute_dtype, 'remat': base.model.remat,
            'jax': jax.__version__, 'host': 'cpu'}
  trees = {}
  for unroll in unrolls:
    counts, trees[unroll] = lowering_counts(base, unroll, mesh, key, _PLATFORM.value)
    result[f'scan_unroll_{unroll}'] = counts
    print(f'scan_unroll={unroll}: {json.dumps(counts)}', file=sys.stderr, flush=True)
  result['same_parameter_tree'] = all(trees[u] == trees[unrolls[0]] for u in unrolls)

  residuals = {}
  for variant in filter(None, _RESIDUALS.value):
    residuals[variant], variables = residual_bytes(base, variant, mesh, key)
    print(f'residuals {variant}: {json.dumps(residuals[variant])}', file=sys.stderr, flush=True)
  if residuals:
    result['saved_for_backward'] = residuals
    result['parameters'] = sum(math.prod(a.shape) for a in jax.tree.leaves(variables['params']))
  result['peak_rss_gib'] = round(_peak_rss_gib(), 2)
  print(json.dumps(result), flush=True)


if __name__ == '__main__':
  flags.mark_flags_as_required(['config'])
  app.run(main)
