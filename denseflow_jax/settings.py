"""Every config section but `model` as a frozen, validated dataclass.

    train = TrainSettings.from_config(config)      # ConfigError naming the field and the fix
    step = train.step_settings(steps_per_epoch)    # what the compiled train step depends on

One dataclass per section of configs/default.py (`model` is `spec.ModelSpec`), plus
:class:`RunSettings` for the top-level fields. ``from_config(config)`` reads every field
of its section and nothing else: configs/default.py is the only place a default lives,
so a field the section lacks is a ConfigError (build the config on
``default.get_config()``), and so is a field the dataclass does not know (a misspelling in
a config file; the command line refuses those itself).

The checks run in ``__post_init__``, so a dataclass built directly or by
``dataclasses.replace`` is checked the same way. Each message names the field as
``section.field``, what is allowed and what was given, e.g.
``train.gamma (lr decay per epoch) must be in (0, 1], got 2.0``.

Only checks that need nothing but the config live here. Those that need more stay where
that is known: test indices against the size of the test split (latent_tools), the
Inception weights file (fid.require_inception_weights), whether the data files exist and
which data.* fields the chosen data set reads (data.load_split), a fine-tune's trained
model and the batch dividing over the devices (train).

Nothing here imports JAX or the data pipeline: checking a config takes milliseconds
(`--mode eval --config.eval.k=0` fails in the time it takes to start Python).
"""
import dataclasses
import math
import numbers
from typing import Any, Callable, ClassVar, Dict, Mapping, Tuple

from denseflow_jax.errors import ConfigError

PHASES = ('pretrain', 'finetune')
OPTIMIZERS = ('adamax', 'adam')
LATENT_METHODS = ('linear', 'slerp')
# data.AUGMENTATIONS, repeated so that checking a config does not import the data
# pipeline (grain); tests/test_settings.py checks that the two agree.
AUGMENTATIONS = ('none', 'horizontal_flip', 'eta')
# JAX (without x64) keeps only the low 32 bits of a seed: 2**32 would silently repeat
# seed 0. --mode train also uses seed + 1, which must stay below 2**32.
SEED_LIMIT = 2 ** 32 - 1

DEFAULTS_HINT = ('configs/default.py defines every field: build the config on '
                 'default.get_config() (or add the field to it)')


# ---------------------------------------------------------------- field checks
# Each returns the value normalised (int, float, tuple) or raises ConfigError.


def _fail(where: str, allowed: str, value, hint: str = ''):
  raise ConfigError(f'{where} must be {allowed}, got {value!r}{hint}')


def _is_int(value) -> bool:
  # bool is an int to Python (and to ConfigDict), never to us.
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value) -> bool:
  return (isinstance(value, numbers.Real) and not isinstance(value, bool)
          and math.isfinite(value))


def _int(where, value, minimum, allowed=None, hint=''):
  if not (_is_int(value) and value >= minimum):
    _fail(where, allowed or f'an integer >= {minimum}', value, hint)
  return int(value)


def _positive_int(where, value):
  return _int(where, value, 1, 'a positive integer')


def _number(where, value, ok: Callable[[float], bool], allowed: str, hint=''):
  if not (_is_number(value) and ok(float(value))):
    _fail(where, allowed, value, hint)
  return float(value)


def _choice(where, value, options):
  if not (isinstance(value, str) and value in options):
    _fail(where, f'one of {options}', value)
  return value


def _bool(where, value):
  if not isinstance(value, bool):
    _fail(where, 'True or False', value)
  return value


def _str(where, value, allowed='a string (a path, or empty)'):
  if not isinstance(value, str):
    _fail(where, allowed, value)
  return value


def _sequence(where, value, allowed):
  """A list or tuple as a tuple (a string is a sequence too, but never meant as one)."""
  if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
    _fail(where, allowed, value)
  return tuple(value)


# ---------------------------------------------------------------- reading a section


def _read_section(config, name, fields):
  """{field: value} of config[name] for exactly `fields`: ConfigError if the section or a
  field is missing, or the section holds a field nobody reads."""
  try:
    section = config[name]
  except (KeyError, AttributeError, TypeError):
    raise ConfigError(f'the config has no {name} section; {DEFAULTS_HINT}') from None
  if not isinstance(section, Mapping) and not hasattr(section, 'keys'):
    raise ConfigError(f'config.{name} must be a section (ConfigDict) of fields, got '
                      f'{section!r}; {DEFAULTS_HINT}')
  keys = set(section.keys())
  missing = [f for f in fields if f not in keys]
  if missing:
    raise ConfigError(f'the config lacks {", ".join(f"{name}.{f}" for f in missing)}; '
                      f'{DEFAULTS_HINT}')
  unknown = sorted(keys - set(fields))
  if unknown:
    raise ConfigError(f'unknown config field(s) {", ".join(f"{name}.{f}" for f in unknown)}; '
                      f'the {name} section has {", ".join(fields)} (configs/default.py)')
  return {f: section[f] for f in fields}


def _read_top_level(config, fields):
  missing = [f for f in fields if f not in config]
  if missing:
    raise ConfigError(f'the config lacks the top-level field(s) {", ".join(missing)}; '
                      f'{DEFAULTS_HINT}')
  return {f: config[f] for f in fields}


class _Checked:
  """Mixin: ``__post_init__`` runs ``_CHECKS[field](where, value)`` on every field (where
  = ``SECTION.field``) and stores what it returns, then :meth:`_check_together`."""
  SECTION: ClassVar[str] = ''
  _CHECKS: ClassVar[Dict[str, Callable[[str, Any], Any]]] = {}

  def __post_init__(self):
    for field in dataclasses.fields(self):
      where = f'{self.SECTION}.{field.name}' if self.SECTION else field.name
      value = self._CHECKS[field.name](where, getattr(self, field.name))
      object.__setattr__(self, field.name, value)   # frozen: normalised once, here
    self._check_together()

  def _check_together(self):
    """Rules between fields of the section."""

  @classmethod
  def from_config(cls, config):
    """The section of the full `config` (ConfigDict or nested dict), checked."""
    names = [f.name for f in dataclasses.fields(cls)]
    if cls.SECTION:
      return cls(**_read_section(config, cls.SECTION, names))
    return cls(**_read_top_level(config, names))


# ---------------------------------------------------------------- top level


def _seed(where, value):
  if not (_is_int(value) and 0 <= value < SEED_LIMIT):
    _fail(where, 'an integer in [0, 2**32 - 1) (JAX keeps 32 bits of it)', value)
  return int(value)


@dataclasses.dataclass(frozen=True)
class RunSettings(_Checked):
  """The top-level fields: `seed` (every random key of a run derives from it) and
  `checkpoint` (run any mode from this converted or trained model; '' = the workdir's).
  Whether the checkpoint exists is checked where it is read."""
  seed: int
  checkpoint: str

  _CHECKS = {'seed': _seed, 'checkpoint': _str}


# ---------------------------------------------------------------- train

_NOT_NEGATIVE = lambda x: x >= 0   # noqa: E731


def _num_steps(where, value):
  # <= 0 used to mean 'off' silently; only -1 says so, and 0 steps is no run.
  if not (_is_int(value) and (value == -1 or value >= 1)):
    _fail(where, '-1 (off: train.epochs / train.finetune_epochs decide) or a positive integer',
          value)
  return int(value)


def _best_metric(where, value):
  if not (isinstance(value, str) and value):
    _fail(where, "the name of a metric the evaluation returns, such as 'test_bpd'", value)
  return value


# The fields the compiled train step depends on, shared by TrainSettings and StepSettings.
_STEP_CHECKS = {
    'phase': lambda w, v: _choice(w, v, PHASES),
    'optimizer': lambda w, v: _choice(w, v, OPTIMIZERS),
    'lr': lambda w, v: _number(w, v, _NOT_NEGATIVE, 'a number >= 0'),
    'warmup_steps': lambda w, v: _int(w, v, 0),
    'gamma': lambda w, v: _number(w + ' (lr decay per epoch)', v, lambda x: 0 < x <= 1,
                                  'in (0, 1]'),
    'finetune_lr': lambda w, v: _number(w, v, _NOT_NEGATIVE, 'a number >= 0'),
    'grad_clip': lambda w, v: _number(w, v, _NOT_NEGATIVE, 'a number >= 0 (0 = off)'),
    'ema_decay': lambda w, v: _number(w, v, lambda x: 0 <= x < 1, 'in [0, 1) (0 = off)'),
}


@dataclasses.dataclass(frozen=True)
class StepSettings(_Checked):
  """What the compiled train step depends on (hashable: compiled steps are cached on it,
  so repeated runs in one process compile once). Build it with
  :meth:`TrainSettings.step_settings`."""
  steps_per_epoch: int
  phase: str
  optimizer: str
  lr: float
  warmup_steps: int
  gamma: float
  finetune_lr: float
  grad_clip: float
  ema_decay: float

  SECTION = 'train'
  _CHECKS = {'steps_per_epoch': lambda w, v: _positive_int('steps_per_epoch', v),
             **_STEP_CHECKS}


@dataclasses.dataclass(frozen=True)
class TrainSettings(_Checked):
  """config.train: the official recipe (lr schedule, phase, optimizer, EMA, clipping), how
  long to train, and how often to log, evaluate, sample and checkpoint. See the module
  docstring of train.py for the schedule and the fine-tune phase."""
  batch_size: int            # the global batch (dividing over the devices: train checks)
  epochs: int
  optimizer: str
  lr: float
  warmup_steps: int
  gamma: float
  phase: str
  finetune_lr: float
  finetune_epochs: int
  grad_clip: float
  ema_decay: float
  log_every: int
  eval_every_epochs: int
  sample_every_epochs: int
  checkpoint_every_steps: int
  keep_checkpoints: int
  max_nonfinite_in_row: int
  best_metric: str
  num_steps: int

  SECTION = 'train'
  _CHECKS = {
      **_STEP_CHECKS,
      'batch_size': _positive_int,
      # >= 0 here; the one the phase uses must be positive unless num_steps decides.
      'epochs': lambda w, v: _int(w, v, 0),
      'finetune_epochs': lambda w, v: _int(w, v, 0),
      'log_every': _positive_int,
      'eval_every_epochs': _positive_int,
      'sample_every_epochs': _positive_int,
      'checkpoint_every_steps': _positive_int,
      # 0 keeps every checkpoint (orbax max_to_keep=None).
      'keep_checkpoints': lambda w, v: _int(w, v, 0, 'an integer >= 0 (0 = keep all)'),
      'max_nonfinite_in_row': _positive_int,
      'best_metric': _best_metric,
      'num_steps': _num_steps,
  }

  def _check_together(self):
    if self.num_steps <= 0:
      name = 'finetune_epochs' if self.phase == 'finetune' else 'epochs'
      if getattr(self, name) <= 0:
        raise ConfigError(f'train.{name} must be positive (or set train.num_steps > 0), '
                          f'got {getattr(self, name)}')

  def step_settings(self, steps_per_epoch: int) -> StepSettings:
    """The compiled step's key, for a data set of `steps_per_epoch` batches per epoch."""
    return StepSettings(steps_per_epoch=steps_per_epoch,
                        **{name: getattr(self, name) for name in _STEP_CHECKS})


# ---------------------------------------------------------------- eval and sample


def _num_examples(where, value):
  if not (_is_int(value) and (value == -1 or value >= 1)):
    _fail(where, '-1 (the whole split) or a positive integer', value)
  return int(value)


@dataclasses.dataclass(frozen=True)
class EvalSettings(_Checked):
  """config.eval: test bits/dim (--mode eval, and the periodic one-sample evaluation during
  training) and which parameters every mode evaluates or samples from (`use_ema`: the EMA
  parameters where the run kept them)."""
  batch_size: int
  k: int                     # importance samples of the IWBO (1: the one-sample bound)
  k_chunk: int               # samples per pass: memory, not the result
  use_ema: bool
  num_examples: int          # the first this many test examples; -1 = all

  SECTION = 'eval'
  _CHECKS = {
      'batch_size': _positive_int,
      'k': lambda w, v: _int(w, v, 1, 'a positive integer (importance samples of the IWBO)'),
      'k_chunk': _positive_int,
      'use_ema': _bool,
      # 0 examples has no mean; data.iterate_eval checks the split holds enough.
      'num_examples': _num_examples,
  }


@dataclasses.dataclass(frozen=True)
class SampleSettings(_Checked):
  """config.sample: `num` samples at `temperature` (--mode sample, and the sample grids
  during training), drawn `batch_size` at a time (also --mode sweep's batch)."""
  num: int
  temperature: float
  batch_size: int

  SECTION = 'sample'
  _CHECKS = {
      'num': lambda w, v: _int(w, v, 1, 'at least 1'),
      'temperature': lambda w, v: _number(
          w, v, lambda x: x > 0, 'positive',
          ' (1.0 is the model; 0.7 is a common choice for nicer samples)'),
      'batch_size': _positive_int,
  }


# ---------------------------------------------------------------- latent tools


def _indices(where, value):
  indices = _sequence(where, value, 'a list of test indices, as pairs (i0, i1, i2, i3, ...)')
  for i in indices:
    _int(where, i, 0, 'test indices: integers >= 0')
  if len(indices) % 2:
    raise ConfigError(f'{where} must hold pairs of test indices (an even number), got '
                      f'{len(indices)}: {indices}')
  return tuple(int(i) for i in indices)


def _temperatures(where, value):
  temperatures = _sequence(where, value, 'a list of numbers')
  if not temperatures:
    raise ConfigError(f'{where} is empty; give at least one, e.g. (0.0, 0.5, 1.0)')
  bad = [t for t in temperatures if not (_is_number(t) and t >= 0)]
  if bad:
    raise ConfigError(f'{where} must be finite and >= 0 (0 is the mode, 1 the model), got '
                      f'{bad}')
  return tuple(float(t) for t in temperatures)


@dataclasses.dataclass(frozen=True)
class LatentSettings(_Checked):
  """config.latent: --mode interpolate (pairs of test images: `indices`, or the first
  2 * `num_pairs`; `steps` points by `method`), reconstruct (the first `num_images` test
  images) and sweep (one grid row per entry of `temperatures`); `num_per_row` images per
  grid row. Whether the indices and counts fit the test split is checked by latent_tools,
  which knows its size."""
  num_pairs: int
  indices: Tuple[int, ...]   # () = the first 2 * num_pairs test images
  steps: int                 # both end points included
  method: str
  num_images: int
  temperatures: Tuple[float, ...]
  num_per_row: int

  SECTION = 'latent'
  _CHECKS = {
      'num_pairs': lambda w, v: _int(w, v, 1),
      'indices': _indices,
      'steps': lambda w, v: _int(w, v, 2),
      'method': lambda w, v: _choice(w, v, LATENT_METHODS),
      'num_images': lambda w, v: _int(w, v, 1),
      'temperatures': _temperatures,
      'num_per_row': lambda w, v: _int(w, v, 1),
  }


# ---------------------------------------------------------------- FID


def _splits(where, value):
  splits = (value,) if isinstance(value, str) else value
  ok = isinstance(splits, (list, tuple)) and splits and all(
      isinstance(s, str) and s for s in splits) and len(set(splits)) == len(splits)
  if not ok:
    _fail(where, "distinct split names such as ('train', 'test')", value)
  return tuple(splits)


@dataclasses.dataclass(frozen=True)
class FidSettings(_Checked):
  """config.fid: FID of `num_samples` samples at `temperature` against each of `splits`,
  `batch_size` images per Inception pass, data statistics cached in `stats_dir` ('' =
  WORKDIR/fid_stats). Whether `inception_weights` exists is checked by
  fid.require_inception_weights (a test may inject its own features instead)."""
  num_samples: int
  temperature: float
  batch_size: int
  inception_weights: str
  splits: Tuple[str, ...]
  stats_dir: str

  SECTION = 'fid'
  _CHECKS = {
      # A covariance needs two rows.
      'num_samples': lambda w, v: _int(
          w, v, 2, 'an integer >= 2 (a covariance needs two samples; the paper uses 50000)'),
      'temperature': lambda w, v: _number(w, v, lambda x: x > 0, 'positive',
                                          " (the paper's FID is at 1.0)"),
      'batch_size': _positive_int,
      'inception_weights': _str,
      'splits': _splits,
      'stats_dir': _str,
  }


# ---------------------------------------------------------------- data


def _dataset(where, value):
  if not (isinstance(value, str) and value):
    _fail(where, "a data set name: 'digits', 'npz', 'folder' or a TFDS name such as "
          "'cifar10'", value)
  return value


@dataclasses.dataclass(frozen=True)
class DataSettings(_Checked):
  """config.data, field by field. Which fields the chosen data set reads (data.source only
  for 'npz' / 'folder', data.tfds_data_dir only for TFDS), whether the files exist and hold
  the configured images stay in data.load_split: they need the loader's knowledge and the
  file system, and library callers of data get them too."""
  dataset: str
  source: str
  tfds_data_dir: str
  augmentation: str
  worker_count: int          # grain worker processes; 0 = none
  prefetch: int

  SECTION = 'data'
  _CHECKS = {
      'dataset': _dataset,
      'source': _str,
      'tfds_data_dir': _str,
      'augmentation': lambda w, v: _choice(w, v, AUGMENTATIONS),
      'worker_count': lambda w, v: _int(w, v, 0, 'an integer >= 0 (0 = no worker processes)'),
      # data used to turn 0 or less into 1 silently.
      'prefetch': _positive_int,
  }


SECTIONS = {cls.SECTION: cls for cls in (TrainSettings, EvalSettings, SampleSettings,
                                         LatentSettings, FidSettings, DataSettings)}
