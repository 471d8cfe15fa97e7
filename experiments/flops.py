"""FLOPs of a jitted function, counted analytically from its jaxpr.

XLA's `cost_analysis()` on GPU leaves out convolutions that run as cuDNN calls
(it reported 0.17 GFLOP for a step that does ~150), so we count on the jaxpr,
which is the same on every backend: 2 x multiply-adds of every convolution and
dot product, scan bodies multiplied by their length, both branches of nothing
(cond takes its most expensive branch). Elementwise work is ignored: it is
noise next to the convolutions of DenseFlow.
"""
import math

import jax
from jax.extend import core as jex_core


def _conv_flops(eqn):
  out = eqn.outvars[0].aval.shape
  rhs = eqn.invars[1].aval.shape
  out_feature_dim = eqn.params['dimension_numbers'].rhs_spec[0]
  return 2 * math.prod(out) * math.prod(rhs) // rhs[out_feature_dim]


def _dot_flops(eqn):
  (lhs_contract, _), _ = eqn.params['dimension_numbers']
  lhs = eqn.invars[0].aval.shape
  return 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in lhs_contract)


def _sub_jaxprs(eqn):
  for value in eqn.params.values():
    for item in value if isinstance(value, (tuple, list)) else (value,):
      if isinstance(item, jex_core.ClosedJaxpr):
        yield item.jaxpr
      elif isinstance(item, jex_core.Jaxpr):
        yield item


def jaxpr_flops(jaxpr) -> int:
  total = 0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == 'conv_general_dilated':
      total += _conv_flops(eqn)
    elif name == 'dot_general':
      total += _dot_flops(eqn)
    elif name == 'cond':
      total += max(jaxpr_flops(b.jaxpr) for b in eqn.params['branches'])
    else:
      inner = sum(jaxpr_flops(j) for j in _sub_jaxprs(eqn))
      total += inner * (eqn.params['length'] if name == 'scan' else 1)
  return total


def count_flops(fn, *args) -> int:
  """FLOPs of one call of `fn(*args)` (args may be ShapeDtypeStructs)."""
  return jaxpr_flops(jax.make_jaxpr(fn)(*args).jaxpr)
