"""InceptionV3 pool3 features for the FID, as pytorch-fid computes them.

The network is the FID Inception (the TF graph `inception-2015-12-05` that the
original TTUR FID code uses), in the layout of pytorch-fid's `InceptionV3`
(mseitzer/pytorch-fid, `fid_inception_v3`): torchvision's InceptionV3 with the
blocks Mixed_5b..5d, 6b..6e, 7b, 7c replaced by `FIDInceptionA/C/E_1/E_2`.
Differences from torchvision's ImageNet InceptionV3, all reproduced here:

  * the 3x3 / stride 1 average pools inside the A, C, E blocks ignore the zero
    padding (TF semantics; torch `count_include_pad=False`);
  * the pool branch of the last block (Mixed_7c, `E_2`) is a 3x3 max pool;
  * every convolution is `conv (no bias) -> BatchNorm(eps=1e-3) -> ReLU`; the
    BatchNorm uses its stored statistics (inference mode):
        y = relu((conv(x) - mean) / sqrt(var + 1e-3) * scale + bias).

Input: uint8 images [B, H, W, C] with values 0..255 (C = 1 is tiled to 3
channels), resized bilinearly to 299x299 (half-pixel centres, no antialiasing:
torch `F.interpolate(mode='bilinear', align_corners=False)`) and mapped to
[-1, 1] by x / 255 * 2 - 1. Output: the 2048-d mean of the last 8x8 feature
map ("pool3"); the classifier (`fc`) is not used.

Weights are never downloaded. The standard ones are pytorch-fid's port of the TF
FID graph,

    https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth

(a plain torch state dict). Convert them once (needs PyTorch:
`pip install "denseflow-jax[torch]"`) to the .npz that `load_inception_params`
reads:

    python -m denseflow_jax.inception --convert pt_inception-2015-12-05-6726825d.pth --out inception_fid.npz

The conversion renames `A.B.conv.weight` [O, I, kh, kw] -> `params/A/B/conv/kernel`
[kh, kw, I, O]; `bn.weight` / `bn.bias` -> `params/.../bn/scale` / `bias`;
`bn.running_mean` / `running_var` -> `batch_stats/.../bn/mean` / `var`; and drops
`num_batches_tracked` and `fc.*`.
"""
import argparse
import functools
import hashlib
import os
import sys
from typing import Dict, Mapping, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from denseflow_jax.errors import ConvertError, InceptionWeightsError
from denseflow_jax.files import write_npz_atomic
from denseflow_jax.state_dict import (flatten, kernel_to_flax, read_state_dict, report_mismatches,
                                      unflatten)

INPUT_SIZE = 299
MIN_INPUT_SIZE = 75        # the smallest input the strided stages reduce to >= 1 pixel
FEATURE_DIM = 2048
BN_EPSILON = 1e-3
WEIGHTS_FILE = 'pt_inception-2015-12-05-6726825d.pth'
WEIGHTS_URL = f'https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{WEIGHTS_FILE}'
CONVERT_COMMAND = f'python -m denseflow_jax.inception --convert {WEIGHTS_FILE} --out inception_fid.npz'
# pytorch-fid's classifier has 1008 outputs; torchvision's ImageNet InceptionV3 (a different
# network whose weights would silently give non-standard FIDs) has 1000.
_FID_NUM_CLASSES = 1008

Padding = Union[int, Tuple[int, int]]


def _pair(value: Padding) -> Tuple[int, int]:
  return (value, value) if isinstance(value, int) else tuple(value)


class BasicConv(nn.Module):
  """conv (no bias) -> BatchNorm(eps=1e-3, stored statistics) -> ReLU; torch `BasicConv2d`."""
  features: int
  kernel: Padding
  stride: int = 1
  padding: Padding = 0       # torch-style symmetric padding per spatial axis
  precision: str = 'highest'

  @nn.compact
  def __call__(self, x):
    ph, pw = _pair(self.padding)
    x = nn.Conv(self.features, _pair(self.kernel), strides=self.stride,
                padding=((ph, ph), (pw, pw)), use_bias=False, precision=self.precision,
                name='conv')(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=BN_EPSILON, name='bn')(x)
    return nn.relu(x)


def _avg_pool_3x3(x):
  # TF average pooling: padded zeros are not counted (torch count_include_pad=False).
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3(x, stride: int, padding: int):
  return nn.max_pool(x, (3, 3), strides=(stride, stride),
                     padding=((padding, padding), (padding, padding)))


class InceptionA(nn.Module):
  """Mixed_5b..5d (FIDInceptionA): 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1."""
  pool_features: int
  precision: str = 'highest'

  @nn.compact
  def __call__(self, x):
    conv = lambda f, k, name, p=0: BasicConv(f, k, padding=p, precision=self.precision, name=name)
    b1 = conv(64, 1, 'branch1x1')(x)
    b5 = conv(64, 5, 'branch5x5_2', 2)(conv(48, 1, 'branch5x5_1')(x))
    b3 = conv(64, 1, 'branch3x3dbl_1')(x)
    b3 = conv(96, 3, 'branch3x3dbl_3', 1)(conv(96, 3, 'branch3x3dbl_2', 1)(b3))
    bp = conv(self.pool_features, 1, 'branch_pool')(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
  """Mixed_6a: stride-2 3x3 | 1x1-3x3-3x3/2 | maxpool/2 (35x35 -> 17x17)."""
  precision: str = 'highest'

  @nn.compact
  def __call__(self, x):
    p = self.precision
    b3 = BasicConv(384, 3, stride=2, precision=p, name='branch3x3')(x)
    bd = BasicConv(64, 1, precision=p, name='branch3x3dbl_1')(x)
    bd = BasicConv(96, 3, padding=1, precision=p, name='branch3x3dbl_2')(bd)
    bd = BasicConv(96, 3, stride=2, precision=p, name='branch3x3dbl_3')(bd)
    return jnp.concatenate([b3, bd, _max_pool_3x3(x, 2, 0)], axis=-1)


class InceptionC(nn.Module):
  """Mixed_6b..6e (FIDInceptionC): factorised 7x7 convolutions, avgpool branch."""
  channels_7x7: int
  precision: str = 'highest'

  @nn.compact
  def __call__(self, x):
    c7, p = self.channels_7x7, self.precision
    row = lambda f, name: BasicConv(f, (1, 7), padding=(0, 3), precision=p, name=name)
    col = lambda f, name: BasicConv(f, (7, 1), padding=(3, 0), precision=p, name=name)
    b1 = BasicConv(192, 1, precision=p, name='branch1x1')(x)
    b7 = BasicConv(c7, 1, precision=p, name='branch7x7_1')(x)
    b7 = col(192, 'branch7x7_3')(row(c7, 'branch7x7_2')(b7))
    bd = BasicConv(c7, 1, precision=p, name='branch7x7dbl_1')(x)
    bd = row(c7, 'branch7x7dbl_3')(col(c7, 'branch7x7dbl_2')(bd))
    bd = row(192, 'branch7x7dbl_5')(col(c7, 'branch7x7dbl_4')(bd))
    bp = BasicConv(192, 1, precision=p, name='branch_pool')(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
  """Mixed_7a: 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool/2 (17x17 -> 8x8)."""
  precision: str = 'highest'

  @nn.compact
  def __call__(self, x):
    p = self.precision
    b3 = BasicConv(192, 1, precision=p, name='branch3x3_1')(x)
    b3 = BasicConv(320, 3, stride=2, precision=p, name='branch3x3_2')(b3)
    b7 = BasicConv(192, 1, precision=p, name='branch7x7x3_1')(x)
    b7 = BasicConv(192, (1, 7), padding=(0, 3), precision=p, name='branch7x7x3_2')(b7)
    b7 = BasicConv(192, (7, 1), padding=(3, 0), precision=p, name='branch7x7x3_3')(b7)
    b7 = BasicConv(192, 3, stride=2, precision=p, name='branch7x7x3_4')(b7)
    return jnp.concatenate([b3, b7, _max_pool_3x3(x, 2, 0)], axis=-1)


class InceptionE(nn.Module):
  """Mixed_7b (FIDInceptionE_1, avg pool) and Mixed_7c (FIDInceptionE_2, max pool)."""
  pool: str = 'avg'
  precision: str = 'highest'

  @nn.compact
  def __call__(self, x):
    p = self.precision
    row = lambda name: BasicConv(384, (1, 3), padding=(0, 1), precision=p, name=name)
    col = lambda name: BasicConv(384, (3, 1), padding=(1, 0), precision=p, name=name)
    b1 = BasicConv(320, 1, precision=p, name='branch1x1')(x)
    b3 = BasicConv(384, 1, precision=p, name='branch3x3_1')(x)
    b3 = jnp.concatenate([row('branch3x3_2a')(b3), col('branch3x3_2b')(b3)], axis=-1)
    bd = BasicConv(448, 1, precision=p, name='branch3x3dbl_1')(x)
    bd = BasicConv(384, 3, padding=1, precision=p, name='branch3x3dbl_2')(bd)
    bd = jnp.concatenate([row('branch3x3dbl_3a')(bd), col('branch3x3dbl_3b')(bd)], axis=-1)
    # The FID graph max-pools in its last block (pytorch-fid: "likely an error" of that
    # graph, but it is what the published FIDs were computed with).
    pooled = _max_pool_3x3(x, 1, 1) if self.pool == 'max' else _avg_pool_3x3(x)
    bp = BasicConv(192, 1, precision=p, name='branch_pool')(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


def preprocess(images, size: int = INPUT_SIZE):
  """uint8 [B, H, W, C] (0..255, C in {1, 3}) -> float32 [B, size, size, 3] in [-1, 1]."""
  x = jnp.asarray(images).astype(jnp.float32)
  if x.ndim != 4 or x.shape[-1] not in (1, 3):
    raise ValueError(f'Inception expects images [B, H, W, 1 or 3], got shape {x.shape}')
  if x.shape[-1] == 1:
    x = jnp.tile(x, (1, 1, 1, 3))
  if x.shape[1:3] != (size, size):
    # Bilinear weights sum to one, so resizing before the affine map equals resizing after.
    x = jax.image.resize(x, (x.shape[0], size, size, 3), 'bilinear', antialias=False)
  return x * (2.0 / 255.0) - 1.0


class InceptionV3(nn.Module):
  """`images` uint8 [B, H, W, C] -> pool3 features float32 [B, 2048].

  `input_size` is 299 for real FIDs; tests use smaller sizes (>= 75) to compile
  faster. `precision` is that of the convolutions ('highest': no TF32/bf16
  passes on accelerators, the features of the float32 reference).
  """
  input_size: int = INPUT_SIZE
  precision: str = 'highest'

  @nn.compact
  def __call__(self, images):
    if self.input_size < MIN_INPUT_SIZE:
      raise ValueError(f'InceptionV3 input_size must be at least {MIN_INPUT_SIZE}, '
                       f'got {self.input_size}')
    p = self.precision
    x = preprocess(images, self.input_size)
    x = BasicConv(32, 3, stride=2, precision=p, name='Conv2d_1a_3x3')(x)    # 149
    x = BasicConv(32, 3, precision=p, name='Conv2d_2a_3x3')(x)              # 147
    x = BasicConv(64, 3, padding=1, precision=p, name='Conv2d_2b_3x3')(x)   # 147
    x = _max_pool_3x3(x, 2, 0)                                              # 73
    x = BasicConv(80, 1, precision=p, name='Conv2d_3b_1x1')(x)              # 73
    x = BasicConv(192, 3, precision=p, name='Conv2d_4a_3x3')(x)             # 71
    x = _max_pool_3x3(x, 2, 0)                                              # 35
    x = InceptionA(32, precision=p, name='Mixed_5b')(x)                     # 256 channels
    x = InceptionA(64, precision=p, name='Mixed_5c')(x)                     # 288
    x = InceptionA(64, precision=p, name='Mixed_5d')(x)                     # 288
    x = InceptionB(precision=p, name='Mixed_6a')(x)                         # 768, 17x17
    x = InceptionC(128, precision=p, name='Mixed_6b')(x)
    x = InceptionC(160, precision=p, name='Mixed_6c')(x)
    x = InceptionC(160, precision=p, name='Mixed_6d')(x)
    x = InceptionC(192, precision=p, name='Mixed_6e')(x)                    # 768
    x = InceptionD(precision=p, name='Mixed_7a')(x)                         # 1280, 8x8
    x = InceptionE('avg', precision=p, name='Mixed_7b')(x)                  # 2048
    x = InceptionE('max', precision=p, name='Mixed_7c')(x)                  # 2048
    return jnp.mean(x, axis=(1, 2))                                         # pool3


# ---------------------------------------------------------------- weights

@functools.lru_cache(maxsize=None)
def variable_shapes(input_size: int = INPUT_SIZE) -> Dict[str, Dict]:
  """ShapeDtypeStructs of {'params', 'batch_stats'} (no compile, nothing allocated; traced
  once per input size, a few seconds: treat the result as read-only)."""
  model = InceptionV3(input_size)
  x = jax.ShapeDtypeStruct((1, input_size, input_size, 3), jnp.uint8)
  return jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x), x)


def expected_shapes() -> Dict[str, Tuple[int, ...]]:
  """'params/Mixed_5b/branch1x1/conv/kernel' -> shape, for every variable (they do not
  depend on the input size)."""
  return {k: tuple(v.shape) for k, v in flatten(variable_shapes()).items()}


def load_inception_params(path) -> Dict:
  """{'params', 'batch_stats'} (float32 NumPy) from a converted .npz; InceptionWeightsError
  naming the file and the fix when it is missing, unreadable or not the FID Inception."""
  path = os.fspath(path)
  fix = (f'download {WEIGHTS_URL} and convert it once with: {CONVERT_COMMAND} (then pass '
         '--config.fid.inception_weights=inception_fid.npz)')
  if not os.path.isfile(path):
    raise InceptionWeightsError(f'Inception weights file {path} does not exist; {fix}')
  if path.endswith(('.pth', '.pt')):
    raise InceptionWeightsError(f'{path} is a PyTorch file; convert it first: '
                                f'python -m denseflow_jax.inception --convert {path} '
                                '--out inception_fid.npz')
  try:
    with np.load(path, allow_pickle=False) as data:
      flat = {k: np.asarray(data[k], np.float32) for k in data.files}
  except Exception as e:   # zipfile / pickle / format errors all mean "not our .npz"
    raise InceptionWeightsError(f'could not read Inception weights {path} as .npz ({e}); {fix}') \
        from None
  report_mismatches(expected_shapes(), flat, InceptionWeightsError,
                    what=f'{path} is not a converted FID Inception', fix=fix)
  return unflatten(flat)


def weights_digest(path) -> str:
  """First 12 hex digits of the file's SHA-256: names the feature extractor in caches."""
  sha = hashlib.sha256()
  with open(path, 'rb') as f:
    for chunk in iter(lambda: f.read(1 << 20), b''):
      sha.update(chunk)
  return sha.hexdigest()[:12]


def make_feature_fn(weights_path, input_size: int = INPUT_SIZE):
  """`features(images uint8 [B, H, W, C]) -> [B, 2048]`: the network jit-compiled once per
  batch shape, with the weights of `weights_path` on the default device."""
  variables = jax.device_put(load_inception_params(weights_path))
  apply = jax.jit(InceptionV3(input_size).apply)
  return lambda images: apply(variables, images)


def convert_state_dict(state_dict: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
  """pytorch-fid's state dict -> flat {'params/...': array} in our layout (float32).
  Every unknown, missing or mis-shaped key is reported in one InceptionWeightsError."""
  want = expected_shapes()
  other = []
  fc = state_dict.get('fc.weight')
  if fc is not None and np.shape(fc)[0] != _FID_NUM_CLASSES:
    other.append(f'fc.weight has {np.shape(fc)[0]} classes, the FID Inception has '
                 f'{_FID_NUM_CLASSES}: this looks like torchvision\'s ImageNet InceptionV3, '
                 'whose features give non-standard FIDs')
  names = {('conv', 'weight'): ('params', 'kernel'), ('bn', 'weight'): ('params', 'scale'),
           ('bn', 'bias'): ('params', 'bias'), ('bn', 'running_mean'): ('batch_stats', 'mean'),
           ('bn', 'running_var'): ('batch_stats', 'var')}
  got, labels = {}, {}
  for key, value in state_dict.items():
    *module, kind, leaf = ['', ''] + key.split('.')
    if key.startswith(('fc.', 'AuxLogits.')) or leaf == 'num_batches_tracked':
      continue   # classifier heads and a BatchNorm counter: not part of pool3
    collection, name = names.get((kind, leaf), (None, None))
    flat_key = '/'.join([str(collection), *module[2:], kind, str(name)])
    if flat_key not in want:
      got[key], labels[key] = np.shape(value), f'key {key!r}'
      continue
    value = np.asarray(value, np.float32)
    if name == 'kernel' and value.ndim == 4:
      value = kernel_to_flax(value)                    # [O, I, kh, kw] -> [kh, kw, I, O]
    got[flat_key], labels[flat_key] = value, f'{key!r}'
  report_mismatches(want, got, InceptionWeightsError,
                    what='not pytorch-fid\'s FID Inception state dict',
                    fix=f'use {WEIGHTS_URL} (shapes in our layout: conv kernels '
                        '[kh, kw, in, out])',
                    labels=labels, other=other)
  return got


def convert_file(src, out) -> int:
  """pytorch-fid's .pth (or an .npz of its state dict) -> our .npz at `out` (atomic).
  Returns the number of arrays written."""
  src, out = os.fspath(src), os.fspath(out)
  if not os.path.isfile(src):
    raise InceptionWeightsError(f'--convert {src} does not exist; download it from {WEIGHTS_URL}')
  try:
    state_dict = read_state_dict(src)   # plain tensors: torch.load(weights_only=True) suffices
  except ConvertError as e:
    raise InceptionWeightsError(str(e)) from None
  flat = convert_state_dict(state_dict)
  write_npz_atomic(out, **flat)
  return len(flat)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(
      prog='python -m denseflow_jax.inception',
      description=f'Convert pytorch-fid\'s FID Inception weights ({WEIGHTS_URL}) to the .npz '
                  'that --mode fid reads (--config.fid.inception_weights).')
  parser.add_argument('--convert', required=True, metavar='PTH',
                      help=f'pytorch-fid state dict ({WEIGHTS_FILE})')
  parser.add_argument('--out', required=True, metavar='NPZ', help='the .npz to write')
  args = parser.parse_args(argv)
  try:
    count = convert_file(args.convert, args.out)
  except InceptionWeightsError as e:
    raise SystemExit(f'error: {e}') from None
  print(f'wrote {args.out}: {count} arrays from {args.convert}; use it with '
        f'--config.fid.inception_weights={args.out}')


if __name__ == '__main__':
  main(sys.argv[1:])
