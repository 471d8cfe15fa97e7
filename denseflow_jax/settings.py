"""Every config section but `model` as a frozen, validated dataclass, and :class:`Settings`,
the checked sections of one run.

    train = TrainSettings.from_config(config)      # ConfigError naming the field and the fix
    step = train.step_settings(steps_per_epoch)    # what the compiled train step depends on
    s = Settings.from_config(config, ('data', 'eval'))   # s.run, s.model, s.data, s.eval

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
model (train) and the batch dividing over the devices (sharding.split_batch).

The checks of single fields and the reading of a section are in config_checks.py.

Nothing here reads data or builds a model: checking a config takes milliseconds
(`--mode eval --config.eval.k=0` fails before anything is loaded or compiled).
"""
import dataclasses
from typing import Optional, Tuple

from denseflow_jax.config_checks import (Checked, check_bool, check_choice, check_int, check_number,
                                         check_positive_int, check_sequence, check_str, fail,
                                         is_int, is_number)
from denseflow_jax.errors import ConfigError
from denseflow_jax.spec import ModelSpec, spec_from_config

PHASES = ('pretrain', 'finetune')
OPTIMIZERS = ('adamax', 'adam')
# train_step.make_lr_schedule implements them: the official loop under torch 1.8.1 (the
# version the official requirements.txt pins), the same under torch 2.x, and the compounding
# decay the paper's prose suggests.
LR_SCHEDULES = ('official', 'official_torch2', 'exponential')
LATENT_METHODS = ('linear', 'slerp')
AUGMENTATIONS = ('none', 'horizontal_flip', 'eta')     # data/augment.py implements them
# JAX (without x64) keeps only the low 32 bits of a seed: 2**32 would silently repeat
# seed 0. --mode train also uses seed + 1, which must stay below 2**32.
SEED_LIMIT = 2 ** 32 - 1

# ---------------------------------------------------------------- top level


def _seed(where, value):
  if not (is_int(value) and 0 <= value < SEED_LIMIT):
    fail(where, 'an integer in [0, 2**32 - 1) (JAX keeps 32 bits of it)', value)
  return int(value)


@dataclasses.dataclass(frozen=True)
class RunSettings(Checked):
  """The top-level fields: `seed` (every random key of a run derives from it) and
  `checkpoint` (run any mode from this converted or trained model; '' = the workdir's).
  Whether the checkpoint exists is checked where it is read."""
  seed: int
  checkpoint: str

  _CHECKS = {'seed': _seed, 'checkpoint': check_str}


# ---------------------------------------------------------------- train

_NOT_NEGATIVE = lambda x: x >= 0   # noqa: E731


def _num_steps(where, value):
  # <= 0 used to mean 'off' silently; only -1 says so, and 0 steps is no run.
  if not (is_int(value) and (value == -1 or value >= 1)):
    fail(where, '-1 (off: train.epochs / train.finetune_epochs decide) or a positive integer',
          value)
  return int(value)


def _best_metric(where, value):
  if not (isinstance(value, str) and value):
    fail(where, "the name of a metric the evaluation returns, such as 'test_bpd'", value)
  return value


# The fields the compiled train step depends on, shared by TrainSettings and StepSettings.
_STEP_CHECKS = {
    'phase': lambda w, v: check_choice(w, v, PHASES),
    'lr_schedule': lambda w, v: check_choice(w, v, LR_SCHEDULES),
    'optimizer': lambda w, v: check_choice(w, v, OPTIMIZERS),
    'lr': lambda w, v: check_number(w, v, _NOT_NEGATIVE, 'a number >= 0'),
    'warmup_steps': lambda w, v: check_int(w, v, 0),
    'gamma': lambda w, v: check_number(w + ' (lr decay per epoch)', v, lambda x: 0 < x <= 1,
                                  'in (0, 1]'),
    'finetune_lr': lambda w, v: check_number(w, v, _NOT_NEGATIVE, 'a number >= 0'),
    'grad_clip': lambda w, v: check_number(w, v, _NOT_NEGATIVE, 'a number >= 0 (0 = off)'),
    'ema_decay': lambda w, v: check_number(w, v, lambda x: 0 <= x < 1, 'in [0, 1) (0 = off)'),
}


@dataclasses.dataclass(frozen=True)
class StepSettings(Checked):
  """What the compiled train step depends on (hashable: compiled steps are cached on it,
  so repeated runs in one process compile once). Build it with
  :meth:`TrainSettings.step_settings`."""
  steps_per_epoch: int
  phase: str
  lr_schedule: str
  optimizer: str
  lr: float
  warmup_steps: int
  gamma: float
  finetune_lr: float
  grad_clip: float
  ema_decay: float

  SECTION = 'train'
  _CHECKS = {'steps_per_epoch': lambda w, v: check_positive_int('steps_per_epoch', v),
             **_STEP_CHECKS}


@dataclasses.dataclass(frozen=True)
class TrainSettings(Checked):
  """config.train: the official recipe (lr schedule, phase, optimizer, EMA, clipping), how
  long to train, and how often to log, evaluate, sample and checkpoint. The lr schedule is
  in the module docstring of train_step.py, the fine-tune phase in train.py's."""
  batch_size: int            # the global batch (dividing over the devices: sharding.split_batch)
  epochs: int
  optimizer: str
  lr: float
  lr_schedule: str
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
      'batch_size': check_positive_int,
      # >= 0 here; the one the phase uses must be positive unless num_steps decides.
      'epochs': lambda w, v: check_int(w, v, 0),
      'finetune_epochs': lambda w, v: check_int(w, v, 0),
      'log_every': check_positive_int,
      'eval_every_epochs': check_positive_int,
      'sample_every_epochs': check_positive_int,
      'checkpoint_every_steps': check_positive_int,
      # 0 keeps every checkpoint (orbax max_to_keep=None).
      'keep_checkpoints': lambda w, v: check_int(w, v, 0, 'an integer >= 0 (0 = keep all)'),
      'max_nonfinite_in_row': check_positive_int,
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
  if not (is_int(value) and (value == -1 or value >= 1)):
    fail(where, '-1 (the whole split) or a positive integer', value)
  return int(value)


@dataclasses.dataclass(frozen=True)
class EvalSettings(Checked):
  """config.eval: test bits/dim (--mode eval, and the periodic one-sample evaluation during
  training) and which parameters every mode evaluates or samples from (`use_ema`: None
  follows the run, True asks for the EMA parameters, False takes the raw ones)."""
  batch_size: int
  k: int                     # importance samples of the IWBO (1: the one-sample bound)
  k_chunk: int               # samples per pass: memory, not the result
  use_ema: Optional[bool]    # None: the EMA parameters where the run kept them, silently
  num_examples: int          # the first this many test examples; -1 = all
  which: str                 # 'latest' checkpoint of the workdir, or WORKDIR/'best'

  SECTION = 'eval'
  _CHECKS = {
      'batch_size': check_positive_int,
      'k': lambda w, v: check_int(w, v, 1, 'a positive integer (importance samples of the IWBO)'),
      'k_chunk': check_positive_int,
      'use_ema': lambda w, v: v if v is None else check_bool(w, v),
      # 0 examples has no mean; data.iterate_eval checks the split holds enough.
      'num_examples': _num_examples,
      'which': lambda w, v: check_choice(w, v, ('latest', 'best')),
  }

  @property
  def prefer_ema(self) -> bool:
    """Whether to take the EMA parameters where the run kept them (use_ema None or True)."""
    return self.use_ema is not False


@dataclasses.dataclass(frozen=True)
class SampleSettings(Checked):
  """config.sample: `num` samples at `temperature` (--mode sample, and the sample grids
  during training), drawn `batch_size` at a time (also --mode sweep's batch)."""
  num: int
  temperature: float
  batch_size: int

  SECTION = 'sample'
  _CHECKS = {
      'num': lambda w, v: check_int(w, v, 1, 'at least 1'),
      'temperature': lambda w, v: check_number(
          w, v, lambda x: x > 0, 'positive',
          ' (1.0 is the model; 0.7 is a common choice for nicer samples)'),
      'batch_size': check_positive_int,
  }


# ---------------------------------------------------------------- latent tools


def _indices(where, value):
  indices = check_sequence(where, value, 'a list of test indices, as pairs (i0, i1, i2, i3, ...)')
  for i in indices:
    check_int(where, i, 0, 'test indices: integers >= 0')
  if len(indices) % 2:
    raise ConfigError(f'{where} must hold pairs of test indices (an even number), got '
                      f'{len(indices)}: {indices}')
  return tuple(int(i) for i in indices)


def _temperatures(where, value):
  temperatures = check_sequence(where, value, 'a list of numbers')
  if not temperatures:
    raise ConfigError(f'{where} is empty; give at least one, e.g. (0.0, 0.5, 1.0)')
  bad = [t for t in temperatures if not (is_number(t) and t >= 0)]
  if bad:
    raise ConfigError(f'{where} must be finite and >= 0 (0 is the mode, 1 the model), got '
                      f'{bad}')
  return tuple(float(t) for t in temperatures)


@dataclasses.dataclass(frozen=True)
class LatentSettings(Checked):
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
      'num_pairs': lambda w, v: check_int(w, v, 1),
      'indices': _indices,
      'steps': lambda w, v: check_int(w, v, 2),
      'method': lambda w, v: check_choice(w, v, LATENT_METHODS),
      'num_images': lambda w, v: check_int(w, v, 1),
      'temperatures': _temperatures,
      'num_per_row': lambda w, v: check_int(w, v, 1),
  }


# ---------------------------------------------------------------- FID


def _splits(where, value):
  splits = (value,) if isinstance(value, str) else value
  ok = isinstance(splits, (list, tuple)) and splits and all(
      isinstance(s, str) and s for s in splits) and len(set(splits)) == len(splits)
  if not ok:
    fail(where, "distinct split names such as ('train', 'test')", value)
  return tuple(splits)


@dataclasses.dataclass(frozen=True)
class FidSettings(Checked):
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
      'num_samples': lambda w, v: check_int(
          w, v, 2, 'an integer >= 2 (a covariance needs two samples; the paper uses 50000)'),
      'temperature': lambda w, v: check_number(w, v, lambda x: x > 0, 'positive',
                                          " (the paper's FID is at 1.0)"),
      'batch_size': check_positive_int,
      'inception_weights': check_str,
      'splits': _splits,
      'stats_dir': check_str,
  }


# ---------------------------------------------------------------- data


def _dataset(where, value):
  if not (isinstance(value, str) and value):
    fail(where, "a data set name: 'digits', 'npz', 'folder' or a TFDS name such as "
          "'cifar10'", value)
  return value


def _data_path(where, value):
  """data.source / data.tfds_data_dir: a file-system path. The readers (NumPy, PIL,
  array_record's C++ reader) open local files; a bucket is read through a gcsfuse mount."""
  check_str(where, value)
  if value.startswith('gs://'):
    fail(where, 'a file-system path: data is not read from gs:// URLs (copy it to local '
         'disk, or mount the bucket with gcsfuse and give the mounted path)', value)
  return value


@dataclasses.dataclass(frozen=True)
class DataSettings(Checked):
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
      'source': _data_path,
      'tfds_data_dir': _data_path,
      'augmentation': lambda w, v: check_choice(w, v, AUGMENTATIONS),
      'worker_count': lambda w, v: check_int(w, v, 0, 'an integer >= 0 (0 = no worker processes)'),
      # data used to turn 0 or less into 1 silently.
      'prefetch': check_positive_int,
  }


SECTIONS = {cls.SECTION: cls for cls in (TrainSettings, EvalSettings, SampleSettings,
                                         LatentSettings, FidSettings, DataSettings)}


@dataclasses.dataclass(frozen=True)
class Settings:
  """The checked settings of one run: the top level (`run`) and the model always, each
  other section where the run reads it (None where it does not). Built once, by
  `modes.run` (or `train.train_and_evaluate` called as a library), and passed down."""
  run: RunSettings
  model: ModelSpec
  train: Optional[TrainSettings] = None
  eval: Optional[EvalSettings] = None
  sample: Optional[SampleSettings] = None
  latent: Optional[LatentSettings] = None
  fid: Optional[FidSettings] = None
  data: Optional[DataSettings] = None

  @classmethod
  def from_config(cls, config, sections: Tuple[str, ...] = tuple(SECTIONS)) -> 'Settings':
    """Each of `sections` (names of SECTIONS) built, and so checked, once from `config`."""
    return cls(run=RunSettings.from_config(config), model=spec_from_config(config.model),
               **{name: SECTIONS[name].from_config(config) for name in sections})
