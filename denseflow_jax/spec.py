"""The model's hyper-parameters as a frozen, validated dataclass.

`spec_from_config(config.model)` checks everything that can be checked before
any array is allocated and raises `ConfigError` naming the field and the fix.
"""
import dataclasses
import math
from typing import Tuple

import jax.numpy as jnp

from denseflow_jax.errors import ConfigError

NUM_LANDMARKS = 4
NOISE_KINDS = ('preconditioned', 'white')
COUPLING_NETS = ('dense_attention', 'glow')
DEQUANTIZATIONS = ('variational', 'uniform')
CONV1X1_KINDS = ('full', 'lu')
DTYPES = ('float32', 'bfloat16', 'float16')
# jax.lax.Precision names: how a float32 convolution or dot runs on an accelerator (README,
# "Precision"): 'default' one bfloat16 pass on a TPU, TF32 on an NVIDIA GPU; 'high' three
# bfloat16 passes on a TPU (about float32), TF32 on a GPU; 'highest' float32 everywhere.
PRECISIONS = ('default', 'high', 'highest')


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """config.model, checked (`spec_from_config`). No field has a default here: the defaults
  live in configs/default.py only (`dataclasses.replace` a spec to vary one)."""
  image_shape: Tuple[int, int, int]     # H, W, C
  num_bits: int
  block_config: Tuple[int, ...]
  layers_config: Tuple[int, ...]
  mid_channels: Tuple[int, ...]
  growth_rate: int
  cross_unit: bool
  noise: str
  coupling_net: str
  glow_channels: int
  dequantization: str
  conv1x1: str
  compute_dtype: str
  remat: bool
  scan_unroll: int              # modules per scan iteration; 0: per platform (unroll_for)
  precision: str                # float32 convolutions and dots (PRECISIONS)

  @property
  def growth(self) -> int:
    """Channels appended per unit: 0 when cross-unit augmentation is off."""
    return self.growth_rate if self.cross_unit else 0

  def unroll_for(self, platform: str) -> int:
    """Modules per scan iteration on `platform` (jax.default_backend(): 'tpu', 'gpu', 'cpu').

    `scan_unroll` when set (>= 1). 0 follows the platform: rolled (1) on a TPU, where the
    unrolled DenseFlow-74-10 train step could not be compiled in 24 GB of host memory and
    the rolled one compiles in minutes (experiments/RESULTS.md, "The TPU program");
    unrolled elsewhere: on a GPU it launches 45% fewer kernels, on XLA:CPU a rolled scan
    ran 12-100x slower."""
    if self.scan_unroll:
      return self.scan_unroll
    return 1 if platform == 'tpu' else max(self.layers_config)

  @property
  def dims(self) -> int:
    return math.prod(self.image_shape)

  @property
  def dtype(self):
    return jnp.dtype(self.compute_dtype)

  def block_shapes(self):
    """[(H, W, C_in, C_out)] of every block (after the initial squeeze)."""
    h, w, c = self.image_shape
    h, w, c = h // 2, w // 2, 4 * c
    shapes = []
    for units in self.block_config:
      c_out = c + self.growth * (units - 1)
      shapes.append((h, w, c, c_out))
      h, w, c = h // 2, w // 2, 2 * c_out
    return shapes

  def latent_shape(self):
    h, w, _, c_out = self.block_shapes()[-1]
    return (h, w, c_out)

  def dropped_shapes(self):
    """Shapes of the halves dropped by squeeze-and-drop, from the data side."""
    return [(h // 2, w // 2, 2 * c_out) for h, w, _, c_out in self.block_shapes()[:-1]]


def _ints(name, value):
  try:
    values = tuple(int(v) for v in value)
  except TypeError:
    raise ConfigError(f'model.{name} must be a list of integers, got {value!r}') from None
  return values


def spec_from_config(model_config) -> ModelSpec:
  """Validated `ModelSpec` from the `config.model` section (a ConfigDict or dict)."""
  cfg = dict(model_config)
  known = {f.name for f in dataclasses.fields(ModelSpec)}
  unknown = sorted(set(cfg) - known)
  if unknown:
    raise ConfigError(f'unknown model config keys {unknown}; valid keys are {sorted(known)}')
  missing = sorted(known - set(cfg))
  if missing:
    raise ConfigError(f'model config lacks {missing}; build the config on '
                      'configs/default.py (default.get_config()), which sets every field')
  for key in ('image_shape', 'block_config', 'layers_config', 'mid_channels'):
    if key in cfg:
      cfg[key] = _ints(key, cfg[key])
  spec = ModelSpec(**cfg)

  if len(spec.image_shape) != 3 or min(spec.image_shape) <= 0:
    raise ConfigError(f'model.image_shape must be (height, width, channels), got {spec.image_shape}')
  n = len(spec.block_config)
  if n == 0:
    raise ConfigError('model.block_config is empty; give the number of units of each block, e.g. (6, 4, 1)')
  if len(spec.layers_config) != n or len(spec.mid_channels) != n:
    raise ConfigError(f'model.block_config, layers_config and mid_channels need one entry per block; '
                      f'got lengths {n}, {len(spec.layers_config)}, {len(spec.mid_channels)}')
  for key in ('block_config', 'layers_config', 'mid_channels'):
    if min(getattr(spec, key)) <= 0:
      raise ConfigError(f'model.{key} entries must be positive, got {getattr(spec, key)}')
  if spec.cross_unit and spec.growth_rate <= 0 and max(spec.block_config) > 1:
    raise ConfigError(f'model.growth_rate must be positive with cross-unit coupling, got '
                      f'{spec.growth_rate}; set model.cross_unit=False to switch augmentation off')
  if spec.scan_unroll < 0:
    raise ConfigError(f'model.scan_unroll must be 0 (per platform) or at least 1, got '
                      f'{spec.scan_unroll}')
  if not 1 <= spec.num_bits <= 8:
    raise ConfigError(f'model.num_bits must be in 1..8 (uint8 images), got {spec.num_bits}')
  for key, allowed in (('noise', NOISE_KINDS), ('coupling_net', COUPLING_NETS),
                       ('dequantization', DEQUANTIZATIONS), ('conv1x1', CONV1X1_KINDS),
                       ('compute_dtype', DTYPES), ('precision', PRECISIONS)):
    if getattr(spec, key) not in allowed:
      raise ConfigError(f'model.{key} must be one of {allowed}, got {getattr(spec, key)!r}')

  h, w, _ = spec.image_shape
  factor = 2 ** n   # the initial squeeze and one squeeze-and-drop per block boundary
  if h % factor or w % factor:
    raise ConfigError(f'model.image_shape {h}x{w} cannot be divided by the {n}-block multi-scale '
                      f'architecture: height and width must be multiples of {factor}; '
                      f'resize the images or use fewer blocks')
  if spec.coupling_net == 'dense_attention':
    for b, (bh, bw, _, _) in enumerate(spec.block_shapes()):
      if (bh * bw) % NUM_LANDMARKS:
        raise ConfigError(f'block {b} works on {bh}x{bw} maps, but Nystrom attention needs H*W '
                          f'divisible by {NUM_LANDMARKS}; use fewer blocks or larger images')
    for b, mid in enumerate(spec.mid_channels):
      if mid % 2:
        raise ConfigError(f'model.mid_channels[{b}]={mid} must be even (attention uses mid/2)')
  return spec
