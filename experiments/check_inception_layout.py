"""Our FID Inception's variables against torchvision's Inception3 state dict.

    pip install torchvision && python experiments/check_inception_layout.py

pytorch-fid's FID network is torchvision's Inception3 with some blocks replaced by
subclasses that keep every sub-module, so the names and shapes of its release
(pt_inception-2015-12-05) are torchvision's with fc at 1008 classes. Prints the
counts and every missing, extra or misshapen key; exits 1 on any difference.
"""
import os
import sys

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from denseflow_jax import inception  # noqa: E402

TORCH_LEAF = {'scale': 'weight', 'bias': 'bias', 'mean': 'running_mean', 'var': 'running_var'}


def ours_in_torch_layout():
  out = {}
  for key, shape in inception.expected_shapes().items():
    _, *module, leaf = key.split('/')
    name = '.'.join(module)
    if leaf == 'kernel':   # [kh, kw, I, O] -> [O, I, kh, kw]
      out[f'{name}.weight'] = (shape[3], shape[2], shape[0], shape[1])
    else:
      out[f'{name}.{TORCH_LEAF[leaf]}'] = tuple(shape)
  return out


def main():
  try:
    from torchvision.models.inception import Inception3
  except ImportError as e:
    sys.exit(f'this check needs torchvision (pip install torchvision): {e}')
  model = Inception3(num_classes=1008, aux_logits=False, init_weights=False)
  theirs = {k: tuple(v.shape) for k, v in model.state_dict().items()
            if not k.endswith('num_batches_tracked') and not k.startswith('fc.')}
  ours = ours_in_torch_layout()
  missing, extra = sorted(set(theirs) - set(ours)), sorted(set(ours) - set(theirs))
  misshapen = [f'{k}: ours {ours[k]}, torchvision {theirs[k]}'
               for k in sorted(theirs) if k in ours and ours[k] != theirs[k]]
  print(f'ours {len(ours)} keys, torchvision {len(theirs)} (without fc and num_batches_tracked)')
  for title, rows in (('missing', missing), ('extra', extra), ('misshapen', misshapen)):
    for row in rows:
      print(f'{title}: {row}')
  sys.exit(1 if missing or extra or misshapen else 0)


if __name__ == '__main__':
  main()
