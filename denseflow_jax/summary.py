"""Trainable-parameter table of a DenseFlow, computed from shapes only.

`jax.eval_shape` traces the initialisation without allocating or computing
anything, so the table of DenseFlow-74-10 (130.6M parameters) prints in seconds
on any machine.
"""
import dataclasses
import math
from typing import List, Tuple

import jax
import jax.numpy as jnp

from denseflow_jax import model as model_lib
from denseflow_jax.spec import ModelSpec


def variable_shapes(spec: ModelSpec):
  """ShapeDtypeStructs of {'params', 'batch_stats'} for `spec`."""
  # A rolled scan traces each unit's module once instead of once per module (~3x faster
  # here); the stacked parameter shapes do not depend on the unroll factor.
  model = model_lib.make_model(dataclasses.replace(spec, scan_unroll=1))
  x = jax.ShapeDtypeStruct((1, *spec.image_shape), jnp.uint8)
  return jax.eval_shape(lambda x: model_lib.init_variables(model, jax.random.PRNGKey(0), x), x)


def _count(tree) -> int:
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


def parameter_table(spec: ModelSpec) -> List[Tuple[str, int]]:
  """[(part, trainable parameters)]: dequantization, each block (and its units), prior."""
  params = variable_shapes(spec)['params']
  rows = [('dequantization', _count(params.get('dequantization', {})))]
  for b in range(len(spec.block_config)):
    block = params[f'blocks_{b}']
    rows.append((f'block {b}', _count(block)))
    for name in sorted(block, key=lambda n: (n.split('_')[0], int(n.rsplit('_', 1)[1]))):
      rows.append((f'  {name}', _count(block[name])))
  rows.append(('prior', _count(params['prior'])))
  rows.append(('total', _count(params)))
  return rows


def format_table(rows, spec: ModelSpec) -> str:
  width = max(len(name) for name, _ in rows)
  lines = [f'DenseFlow {spec.block_config} units x {spec.layers_config} modules, '
           f'growth {spec.growth}, mid {spec.mid_channels}, image {spec.image_shape}',
           f'{"part":<{width}}  {"trainable":>13}']
  lines += [f'{name:<{width}}  {count:>13,}' for name, count in rows]
  return '\n'.join(lines)
