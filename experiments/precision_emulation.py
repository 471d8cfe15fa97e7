"""What an accelerator's matmul precision does to DenseFlow's numbers, emulated on the CPU.

    python experiments/precision_emulation.py --config configs/digits.py --workdir runs/digits \
        [--num_examples 360]

At `model.precision='default'` a TPU rounds both operands of every float32 convolution
and dot to bfloat16 (8-bit mantissa, one MXU pass, float32 accumulation), and an NVIDIA
GPU since Ampere to TF32 (10-bit mantissa). At 'high' a GPU still uses TF32, and a TPU
three bfloat16 passes ('bf16_3x': each operand split into a bfloat16 high part and a
bfloat16 remainder, a*b ~ hi*hi + hi*lo + lo*hi, accumulated in float32). A CPU computes float32 whatever the setting,
so here the model's program is run through an interpreter of its jaxpr that rounds those
operands the same way (round to nearest even) before each convolution and dot whose
precision is DEFAULT; operations at HIGH or HIGHEST (as JAX's own linear solves are) are
left alone, as the accelerators leave them. Everything else is the float32 program.

Two models, ONE JSON line each per rounding ('float32' is the reference):
  * the official weights of ../shared/fixtures/reference-small with the official noise:
    log p(x) against the official model's, and the invertibility error;
  * a trained model (`--workdir`, e.g. the quick start's configs/digits.py run): the
    one-sample bits/dim of the first `--num_examples` test images (fixed noise) and the
    invertibility error on them.
Invertibility error: max |y - inverse(forward(y))| over pixels of the continuous
(dequantized) image y in [0, 1), both directions computed at the emulated precision;
one quantisation level of an 8-bit image is 1/256.
"""
import json
import os
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

from configs import default  # noqa: E402
from denseflow_jax import data, model as model_lib  # noqa: E402
from denseflow_jax.convert import convert_state_dict, official_model_fields  # noqa: E402
from denseflow_jax.loading import load_model  # noqa: E402
from denseflow_jax.model import DenseFlow  # noqa: E402
from denseflow_jax.settings import DataSettings  # noqa: E402
from denseflow_jax.spec import spec_from_config  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file('config', None, 'The trained run\'s config file.')
_WORKDIR = flags.DEFINE_string('workdir', '', 'The trained run (its latest checkpoint).')
_NUM = flags.DEFINE_integer('num_examples', 360, 'Test images of the trained model.')
_FIXTURE = flags.DEFINE_string('fixture', str(ROOT.parent / 'shared' / 'fixtures' /
                                              'reference-small'), 'The parity fixture.')
ROUNDINGS = ('float32', 'bf16_3x', 'tf32', 'bfloat16')
_CALLS = ('pjit', 'closed_call', 'core_call', 'remat', 'checkpoint', 'custom_jvp_call',
          'custom_vjp_call', 'custom_vjp_call_jaxpr')


def round_operand(x, rounding: str):
  """x with its float32 mantissa rounded to nearest even: bfloat16 keeps 7 bits, TF32 10."""
  if rounding == 'float32' or x.dtype != jnp.float32:
    return x
  if rounding == 'bfloat16':
    return x.astype(jnp.bfloat16).astype(jnp.float32)
  bits = jax.lax.bitcast_convert_type(x, jnp.uint32)             # TF32: drop 13 low bits
  bits = (bits + jnp.uint32(0xFFF) + ((bits >> 13) & 1)) & jnp.uint32(0xFFFFE000)
  return jax.lax.bitcast_convert_type(bits, jnp.float32)


def _bf16_3x(primitive, a, b, params):
  """A bilinear op (convolution, dot) of float32 operands in three bfloat16 passes."""
  hi = lambda x: round_operand(x, 'bfloat16')
  a_hi, b_hi = hi(a), hi(b)
  a_lo, b_lo = hi(a - a_hi), hi(b - b_hi)
  bind = lambda x, y: primitive.bind(x, y, **params)
  return bind(a_lo, b_hi) + bind(a_hi, b_lo) + bind(a_hi, b_hi)


def _at_default_precision(params) -> bool:
  precision = params.get('precision')
  values = precision if isinstance(precision, tuple) else (precision,)
  return all(p in (None, jax.lax.Precision.DEFAULT) for p in values)


def _scan(params, invals, rounding):
  """lax.scan's semantics, iterated here so that its body is interpreted too."""
  body, n_consts, n_carry = params['jaxpr'], params['num_consts'], params['num_carry']
  consts, carry = invals[:n_consts], invals[n_consts:n_consts + n_carry]
  xs = invals[n_consts + n_carry:]
  steps = range(params['length'])
  ys = []
  for i in (reversed(steps) if params['reverse'] else steps):
    out = interpret(body.jaxpr, body.consts, [*consts, *carry, *[x[i] for x in xs]], rounding)
    carry, y = out[:n_carry], out[n_carry:]
    ys.append(y)
  if params['reverse']:
    ys.reverse()
  return [*carry, *[jnp.stack(column) for column in zip(*ys)]]


def interpret(jaxpr, consts, args, rounding: str):
  """Evaluates `jaxpr`, rounding the operands of DEFAULT-precision convolutions and dots."""
  env = {}
  read = lambda v: v.val if isinstance(v, jax.extend.core.Literal) else env[v]
  env.update(zip(jaxpr.constvars, consts))
  env.update(zip(jaxpr.invars, args))
  for eqn in jaxpr.eqns:
    invals, name = [read(v) for v in eqn.invars], eqn.primitive.name
    if (name in ('conv_general_dilated', 'dot_general') and _at_default_precision(eqn.params)
        and rounding == 'bf16_3x' and invals[0].dtype == jnp.float32):
      outs = _bf16_3x(eqn.primitive, *invals, eqn.params)
    elif name in ('conv_general_dilated', 'dot_general') and _at_default_precision(eqn.params):
      outs = eqn.primitive.bind(*[round_operand(x, rounding) for x in invals], **eqn.params)
    elif name in _CALLS:
      inner = next(eqn.params[k] for k in ('jaxpr', 'call_jaxpr', 'fun_jaxpr') if k in eqn.params)
      outs = interpret(getattr(inner, 'jaxpr', inner), getattr(inner, 'consts', []), invals,
                       rounding)
    elif name == 'scan':
      outs = _scan(eqn.params, invals, rounding)
    else:
      outs = eqn.primitive.bind(*invals, **eqn.params)
    outs = outs if eqn.primitive.multiple_results or name in _CALLS or name == 'scan' else [outs]
    env.update(zip(eqn.outvars, outs))
  return [read(v) for v in jaxpr.outvars]


def emulated(fn, rounding: str):
  """`fn` (of arrays, returning a pytree) jitted, with the rounding of `interpret`."""
  def run(*args):
    closed, shape = jax.make_jaxpr(fn, return_shape=True)(*args)
    flat = interpret(closed.jaxpr, closed.consts, jax.tree.leaves(args), rounding)
    return jax.tree.unflatten(jax.tree.structure(shape), flat)
  return jax.jit(run)


def measure(model, variables, x, noise, rounding):
  """(log p(x) [B] in nats, invertibility error) at the emulated precision."""
  def both(variables, x, noise):
    y, z, dropped, logdet = model.apply(variables, x, noise, method=DenseFlow.encode)
    log_p = logdet + model.apply(variables, z, method=lambda m, z: m.prior.log_prob(z))
    y_back = model.apply(variables, z, dropped, method=DenseFlow.inverse)
    return log_p, jnp.max(jnp.abs(y_back - y))
  log_p, error = emulated(both, rounding)(variables, x, noise)
  return np.asarray(log_p, np.float64), float(error)


def fixture_lines(fixture: pathlib.Path):
  meta = json.loads((fixture / 'meta.json').read_text())
  io = dict(np.load(fixture / 'io.npz'))
  model_config = default.get_config().model
  model_config.update({**official_model_fields(meta['config']), 'scan_unroll': 1})
  spec = spec_from_config(model_config)
  variables = convert_state_dict(dict(np.load(fixture / 'state_dict.npz')), spec)
  nhwc = lambda a: jnp.asarray(np.transpose(a, (0, 2, 3, 1)))
  noise = {'dequantization': nhwc(io['log_prob_noise_0']),
           'cross_unit': ((nhwc(io['log_prob_noise_1']),), (nhwc(io['log_prob_noise_2']),), ())}
  official = io['log_prob_random_noise'].astype(np.float64)
  for rounding in ROUNDINGS:
    log_p, error = measure(DenseFlow(spec), variables, nhwc(io['x_nchw']), noise, rounding)
    yield {'model': 'reference-small (official weights)', 'rounding': rounding,
           'bpd': float(np.mean(model_lib.bits_per_dim(log_p, spec))),
           'max_abs_log_p_vs_official_nats': float(np.max(np.abs(log_p - official))),
           'max_rel_log_p_vs_official': float(np.max(np.abs(log_p - official) / np.abs(official))),
           'invertibility_error': error}


def trained_lines(config, workdir: str, num: int):
  model, variables, _ = load_model(config, workdir, use_ema=False)
  spec = model.spec
  source = data.load_split(DataSettings.from_config(config), 'test', spec.image_shape,
                           spec.num_bits)
  x = np.stack([source[i] for i in range(min(num, len(source)))])
  noise = model_lib.draw_noise(spec, jax.random.PRNGKey(0), len(x))
  reference = None
  for rounding in ROUNDINGS:
    log_p, error = measure(model, variables, jnp.asarray(x), noise, rounding)
    bpd = model_lib.bits_per_dim(log_p, spec)
    reference = bpd if reference is None else reference
    yield {'model': f'{workdir} ({len(x)} test images)', 'rounding': rounding,
           'bpd': float(np.mean(bpd)), 'bpd_minus_float32': float(np.mean(bpd - reference)),
           'max_abs_bpd_diff_per_image': float(np.max(np.abs(bpd - reference))),
           'invertibility_error': error}


def main(argv):
  del argv
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  if (pathlib.Path(_FIXTURE.value) / 'state_dict.npz').exists():
    for line in fixture_lines(pathlib.Path(_FIXTURE.value)):
      print(json.dumps(line), flush=True)
  else:
    print(f'no parity fixture at {_FIXTURE.value}: skipped', file=sys.stderr)
  if _WORKDIR.value:
    for line in trained_lines(_CONFIG.value, _WORKDIR.value, _NUM.value):
      print(json.dumps(line), flush=True)


if __name__ == '__main__':
  app.run(main)
