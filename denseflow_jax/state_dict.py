"""State dicts: reading official PyTorch ones and checking any against a network's shapes.

What the converters of official PyTorch weights and the checkpoint loader share:

  read_state_dict      an official `checkpoint.pt` / `.pth` (PyTorch, an optional
                       dependency imported only here) or an `.npz` of one array per key
  report_mismatches    THE report of missing, unexpected and mis-shaped entries: a list
                       of problems, or the caller's error with the first few of each
                       kind and the caller's fix
  kernel_to_flax       a convolution kernel [out, in, kh, kw] -> [kh, kw, in, out]
  flatten, unflatten   nested variable dicts <-> {'params/a/b/kernel': leaf}

Users: `denseflow_jax.convert` (official DenseFlow -> our variables),
`denseflow_jax.inception` (pytorch-fid's Inception -> our .npz, and loading that .npz),
`denseflow_jax.checkpoint.check_variables` (variables loaded to start training from, against
the configured model). Nothing here imports the rest of the package but its errors.
"""
import os
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple

import numpy as np

from denseflow_jax.errors import ConvertError

SHOWN_PER_KIND = 10   # problems of each kind (missing, unexpected, shape) listed in a message


def read_state_dict(path: str, allow_pickle: bool = False) -> Dict[str, np.ndarray]:
  """An official state dict from a `.npz` (one array per key) or a `checkpoint.pt`."""
  if not os.path.isfile(path):
    raise ConvertError(f'--checkpoint {path} does not exist')
  if path.endswith('.npz'):
    with np.load(path) as data:
      return {k: data[k] for k in data.files}
  try:
    import torch  # optional dependency (denseflow-jax[torch]): only .pt/.pth files need it
  except ImportError:
    raise ConvertError('reading an official checkpoint.pt needs PyTorch: '
                       'pip install "denseflow-jax[torch]" (or convert it to .npz elsewhere '
                       'with {k: v.numpy() for k, v in state_dict.items()})') from None
  try:
    checkpoint = torch.load(path, map_location='cpu', weights_only=not allow_pickle)
  except Exception as e:  # torch raises several types for pickled extras
    raise ConvertError(f'could not read {path} with torch.load(weights_only=True): {e}. If you '
                       'trust the file (e.g. the official release), pass --allow_pickle') from e
  state_dict = checkpoint.get('model', checkpoint) if isinstance(checkpoint, dict) else checkpoint
  return {k: v.detach().cpu().numpy() for k, v in state_dict.items() if hasattr(v, 'numpy')}


def kernel_to_flax(value: np.ndarray) -> np.ndarray:
  """A PyTorch convolution kernel [out, in, kh, kw] in Flax's layout [kh, kw, in, out]."""
  return np.transpose(value, (2, 3, 1, 0))


def flatten(tree: Mapping, prefix: Tuple[str, ...] = ()) -> Dict[str, Any]:
  """Nested mappings -> {'a/b/c': leaf}."""
  out = {}
  for name, value in tree.items():
    if isinstance(value, Mapping):
      out.update(flatten(value, prefix + (str(name),)))
    else:
      out['/'.join(prefix + (str(name),))] = value
  return out


def unflatten(flat: Mapping[str, Any]) -> Dict:
  """{'a/b/c': leaf} -> nested dicts."""
  tree: Dict = {}
  for key, value in flat.items():
    *parents, leaf = key.split('/')
    node = tree
    for part in parents:
      node = node.setdefault(part, {})
    node[leaf] = value
  return tree


def _shape(value) -> Tuple[int, ...]:
  """The shape of an array (or ShapeDtypeStruct), or a shape given as a sequence."""
  return tuple(int(d) for d in (value.shape if hasattr(value, 'shape') else value))


def _listed(problems: List[str], kind: str) -> List[str]:
  if len(problems) <= SHOWN_PER_KIND:
    return problems
  return problems[:SHOWN_PER_KIND] + [f'... and {len(problems) - SHOWN_PER_KIND} more {kind}']


def report_mismatches(expected: Mapping[str, Any], got: Mapping[str, Any],
                      error: Optional[type] = None, *, what: str = '', fix: str = '',
                      labels: Optional[Mapping[str, str]] = None,
                      other: Iterable[str] = ()) -> List[str]:
  """Compares the entries of a state dict with those a network expects.

  Args:
    expected: {name: shape} (a shape, an array or a ShapeDtypeStruct) the network needs.
    got: {name: array or shape} that was read.
    error: the caller's error class; raised (if there is any problem) with
      `"{what} (N problems); {fix}"` and the problems below it, at most
      SHOWN_PER_KIND of each kind. None: nothing is raised.
    what, fix: the first sentence of the message, and what the user should do.
    labels: {name in got: how the message names it} (e.g. the official key a name
      came from); names absent here are shown as they are.
    other: problems the caller found itself, listed first (and counted).

  Returns:
    Every problem (when `error` is None or there is none): `missing NAME`,
    `unexpected NAME`, `shape of NAME: got (..), expected (..)`.
  """
  labels = labels or {}
  show = lambda name: labels.get(name, name)   # noqa: E731
  missing = [f'missing {k}' for k in sorted(set(expected) - set(got))]
  unexpected = [f'unexpected {show(k)}' for k in sorted(set(got) - set(expected))]
  shapes = []
  for k in sorted(set(expected) & set(got)):
    want, have = _shape(expected[k]), _shape(got[k])
    if want != have:
      shapes.append(f'shape of {show(k)}: got {have}, expected {want}')
  other = list(other)
  problems = other + missing + unexpected + shapes
  if problems and error is not None:
    lines = (other + _listed(missing, 'missing') + _listed(unexpected, 'unexpected')
             + _listed(shapes, 'shape mismatches'))
    count = f'{len(problems)} problem' + ('s' if len(problems) != 1 else '')
    raise error(f'{what} ({count}); {fix}\n  ' + '\n  '.join(lines))
  return problems
