"""Official PyTorch DenseFlow `state_dict` -> our Flax variables (and a checkpoint).

    python -m denseflow_jax.convert --checkpoint PATH --config configs/cifar10.py --out DIR

PATH is an official `checkpoint.pt` (needs PyTorch: `pip install "denseflow-jax[torch]"`)
or an `.npz` holding one array per state-dict key. DIR receives a checkpoint
that every mode of `denseflow_jax.main` loads with `--config.checkpoint=DIR`.

Layout changes: conv kernels [out, in, kh, kw] -> [kh, kw, in, out]; per-channel
[1, C, 1, 1] tensors -> [C]; the modules of a unit are stacked along a leading
axis (our units are `nn.scan`s). The invertible 1x1 conv keeps [out, in].
Buffers that our code derives from the config (ActNorm `initialized`,
`ldj_per_dim`, the shift of the [-0.5, 0.5] mapping, the sigmoid temperature,
`num_batches_tracked`) are not copied. Reading the file and the report of missing,
unexpected and mis-shaped keys are `denseflow_jax.state_dict`'s.
"""

import re
import sys
from typing import Dict, Mapping, Optional, Tuple

import jax
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from denseflow_jax import checkpoint
from denseflow_jax.ablation import finalize_config
from denseflow_jax.config_path import prepare_config_import
from denseflow_jax.errors import ConvertError
from denseflow_jax.files import as_path
from denseflow_jax.spec import ModelSpec, spec_from_config
from denseflow_jax.summary import variable_shapes
from denseflow_jax.state_dict import (flatten, kernel_to_flax, read_state_dict, report_mismatches,
                                      unflatten)

# (pattern on the official key, replacement giving our path). Applied in order,
# each to the result of the previous one; the final string must be a full path.
_RENAMES = [
    # Inside coupling / context networks (shared by every place they appear).
    (r'\.dense\.(\d+)\.nn\.0\.', r'/dense/layer_\1/conv1x1/'),
    (r'\.dense\.(\d+)\.nn\.2\.', r'/dense/layer_\1/conv3x3/'),
    (r'\.dense\.(\d+)\.conv\.', r'/dense/gate/conv/'),
    (r'\.transform\.1/dense/', r'/dense/'),
    (r'\.transform\.1\.mha\.qkv\.', r'/attention/qkv/'),
    (r'\.transform\.1\.mha\.out_transform\.', r'/attention/out/'),
    (r'\.transform\.1\.mix_conv\.0\.', r'/mix_norm/'),
    (r'\.transform\.1\.mix_conv\.2\.', r'/mix_conv/'),
    (r'\.transform\.0\.', r'/in_proj/'),
    (r'\.transform\.2\.', r'/out_proj/'),
    # Dequantization flow.
    (r'^transforms\.0\.encoder\.base_dist\.', r'dequantization/base/'),
    (r'^transforms\.0\.encoder\.context_init\.1([./])', r'dequantization/context/block_in\1'),
    (r'^transforms\.0\.encoder\.context_init\.2\.', r'dequantization/context/down/'),
    (r'^transforms\.0\.encoder\.context_init\.3([./])', r'dequantization/context/block_out\1'),
    (r'(block_(?:in|out))\.(\d+)\.nn\.0\.', r'\1/layer_\2/conv1x1/'),
    (r'(block_(?:in|out))\.(\d+)\.nn\.2\.', r'\1/layer_\2/conv3x3/'),
    (r'(block_(?:in|out))\.(\d+)\.conv\.', r'\1/gate/conv/'),
    (r'^transforms\.0\.encoder\.transforms\.(\d+)\.coupling_net\.0',
     lambda m: f'dequantization/coupling_{(int(m[1]) - 1) // 2}/net'),
    (r'^transforms\.0\.encoder\.transforms\.(\d+)\.weight$', '<dequant-conv1x1>'),
    # DenseFlow blocks: transforms.(3 + 2b).
    (r'^transforms\.(\d+)\.noise_params\.(\d+)\.transformation\.0\.',
     lambda m: f'blocks_{(int(m[1]) - 3) // 2}/cross_unit_{m[2]}/g/conv3x3/'),
    (r'^transforms\.(\d+)\.noise_params\.(\d+)\.transformation\.2\.',
     lambda m: f'blocks_{(int(m[1]) - 3) // 2}/cross_unit_{m[2]}/g/conv1x1/'),
    (r'^transforms\.(\d+)\.blocks\.(\d+)\.transforms\.(\d+)\.transforms\.',
     lambda m: f'blocks_{(int(m[1]) - 3) // 2}/unit_{m[2]}/modules[{m[3]}]/'),
    (r'\]/0\.', r']/actnorm/'),
    (r'\]/1\.', r']/conv1x1/'),
    (r'\]/2\.coupling_net\.0\.dn', r']/coupling/net'),
    (r'^base_dist\.', r'prior/'),
]
_IGNORED = re.compile(r'(^transforms\.0\.ldj_per_dim$|^transforms\.1\._(shift|scale)$|\.initialized$'
                      r'|\.temperature$|\.num_batches_tracked$|\.dist\.buffer$)')
_LEAF_NAMES = {'weight': 'weight', 'bias': 'bias', 'loc': 'loc', 'log_scale': 'log_scale',
               'shift': 'shift', 'running_mean': 'mean', 'running_var': 'var'}


def official_model_fields(args: Mapping) -> Dict:
  """Our `model.*` fields for the official DenseFlow constructor's arguments (as the
  fixtures' meta.json record them): data_shape (C, H, W) -> image_shape (H, W, C),
  layer_mid_chnls -> mid_channels; block_config, layers_config, growth_rate as they are."""
  c, h, w = args['data_shape']
  return {'image_shape': (h, w, c), 'block_config': tuple(args['block_config']),
          'layers_config': tuple(args['layers_config']),
          'mid_channels': tuple(args['layer_mid_chnls']), 'growth_rate': args['growth_rate']}


def flax_location(key: str, ndim: int) -> Optional[Tuple[str, Tuple[str, ...], Optional[int]]]:
  """(collection, path, stacked index) of an official key; None for derived buffers."""
  if _IGNORED.search(key):
    return None
  path = key
  for pattern, repl in _RENAMES:
    path = re.sub(pattern, repl, path)
  if path == '<dequant-conv1x1>':
    index = int(key.split('.')[4])
    path = 'dequantization/' + (f'conv1x1_{index // 2}' if index < 8 else 'conv1x1_out') + '/weight'
  stack = None
  match = re.search(r'\[(\d+)\]', path)
  if match:
    stack = int(match[1])
    path = path.replace(match[0], '')
  *parent, leaf = path.replace('.', '/').split('/')
  if leaf not in _LEAF_NAMES:
    raise ConvertError(f'unrecognised key in the official state dict: {key!r}')
  name = _LEAF_NAMES[leaf]
  if name == 'weight' and ndim == 4:
    name = 'kernel'                                   # a convolution's [O, I, kh, kw]
  elif name == 'weight' and ndim == 1:
    name = 'scale'                                    # BatchNorm's weight
  collection = 'batch_stats' if name in ('mean', 'var') else 'params'
  return collection, tuple(parent) + (name,), stack


def _to_flax_layout(value: np.ndarray, name: str) -> np.ndarray:
  if name == 'kernel':
    return kernel_to_flax(value)                      # [O, I, kh, kw] -> [kh, kw, I, O]
  if name in ('loc', 'log_scale', 'shift'):
    return value.reshape(-1)                          # [1, C, 1, 1] -> [C]
  return value


def convert_state_dict(state_dict: Mapping[str, np.ndarray], spec: ModelSpec) -> Dict:
  """Our variables {'params', 'batch_stats'} (NumPy float32) from an official state dict.
  Every mismatch (unknown, missing or mis-shaped key) is reported in one ConvertError.

  Compared in our layout, by our names; a module of a unit (stacked along the leading axis
  of its variables) is one entry `.../modules/<path>[i]`."""
  target = flatten(variable_shapes(spec))
  expected, stacked = {}, {}
  for name, leaf in target.items():
    if '/modules/' in name:
      for i in range(leaf.shape[0]):
        expected[f'{name}[{i}]'] = leaf.shape[1:]
        stacked[f'{name}[{i}]'] = (name, i)
    else:
      expected[name] = leaf.shape
  got, labels = {}, {}
  for key, value in state_dict.items():
    try:
      location = flax_location(key, np.ndim(value))
    except ConvertError:                              # no such module in DenseFlow
      got[key], labels[key] = np.shape(value), f'{key!r} (not part of DenseFlow)'
      continue
    if location is None:
      continue                                        # a buffer our code derives
    collection, path, stack = location
    name = '/'.join((collection,) + path) + (f'[{stack}]' if stack is not None else '')
    if name not in expected:                          # e.g. a block this config lacks
      got[key], labels[key] = np.shape(value), f'{key!r} (would be {name})'
      continue
    got[name] = _to_flax_layout(np.asarray(value, np.float32), path[-1])
    labels[name] = repr(key)
  report_mismatches(
      expected, got, ConvertError,
      what='the official state dict does not match the config',
      fix='check block_config, layers_config, mid_channels, growth_rate and image_shape '
          '(shapes in our layout: conv kernels [kh, kw, in, out], per-channel [C])',
      labels=labels)
  out = {name: np.zeros(leaf.shape, np.float32) for name, leaf in target.items()}
  for name, value in got.items():
    if name in stacked:
      parent, i = stacked[name]
      out[parent][i] = value
    else:
      out[name] = value
  return unflatten(out)


# ---------------------------------------------------------------- command line

def convert_checkpoint(checkpoint_path: str, config, out: str, overwrite: bool = False,
                       allow_pickle: bool = False) -> Dict:
  """Official checkpoint -> our model checkpoint in `out`; returns the variables.
  Refuses to touch a non-empty `out` unless `overwrite`."""
  if as_path(out).exists() and any(as_path(out).iterdir()) and not overwrite:
    raise ConvertError(f'--out {out} already exists and is not empty; choose a new directory '
                       '(or pass --overwrite to replace it)')
  config = finalize_config(config)
  spec = spec_from_config(config.model)
  variables = convert_state_dict(read_state_dict(checkpoint_path, allow_pickle), spec)
  checkpoint.save_variables(out, variables, config, metadata={'converted_from': checkpoint_path})
  return variables


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  f = flags.FLAGS
  try:
    variables = convert_checkpoint(f.checkpoint, f.config, f.out, f.overwrite, f.allow_pickle)
  except ConvertError as e:
    raise SystemExit(f'error: {e}') from None
  count = sum(v.size for v in jax.tree.leaves(variables['params']))
  print(f'wrote {f.out}: {count:,} parameters from {f.checkpoint}; use it with '
        f'--config.checkpoint={f.out}')


if __name__ == '__main__':
  prepare_config_import(sys.argv)   # configs import each other as `configs.<name>`
  config_flags.DEFINE_config_file('config', None, 'Config of the model (configs/*.py).')
  flags.DEFINE_string('checkpoint', None, 'Official checkpoint.pt or .npz state dict.')
  flags.DEFINE_string('out', None, 'Directory to write the converted checkpoint to.')
  flags.DEFINE_bool('overwrite', False, 'Replace an existing --out directory.')
  flags.DEFINE_bool('allow_pickle', False, 'Let torch.load unpickle non-tensor objects.')
  flags.mark_flags_as_required(['config', 'checkpoint', 'out'])
  app.run(main)
