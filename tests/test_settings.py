"""denseflow_jax.settings: every user-settable field of configs/default.py is checked before
anything loads, with a ConfigError naming it as `section.field`.

The walker feeds each field of each section one invalid value (BAD, below) and None (the
wrong type for every field), on configs/default.py and on configs/digits.py. BAD must
name exactly the fields of configs/default.py: a new field without a check fails
`test_bad_values_cover_every_field`.
"""
import dataclasses
import importlib
import pathlib
import re
import subprocess
import sys
import time

import pytest

from configs import default
from denseflow_jax import modes, settings
from denseflow_jax.config_path import shipped_configs
from denseflow_jax.errors import ConfigError

ROOT = pathlib.Path(__file__).resolve().parents[1]
TOP = ''   # the section key of the top-level fields (RunSettings)
CLASSES = {TOP: settings.RunSettings, **settings.SECTIONS}

# One invalid value per field: out of range where a range exists, else the wrong type.
BAD = {
    TOP: {'seed': 2 ** 32, 'checkpoint': 3},
    'train': {
        'batch_size': 0, 'epochs': -1, 'optimizer': 'sgd', 'lr': -1e-3, 'lr_schedule': 'cosine',
        'warmup_steps': -1,
        'gamma': 2.0, 'phase': 'warmup', 'finetune_lr': float('nan'), 'finetune_epochs': -1,
        'grad_clip': -1.0, 'ema_decay': 1.0, 'log_every': 0, 'eval_every_epochs': 0,
        'sample_every_epochs': 0, 'checkpoint_every_steps': 0, 'keep_checkpoints': -1,
        'max_nonfinite_in_row': 0, 'best_metric': '', 'num_steps': 0},
    'eval': {'batch_size': 0, 'k': 0, 'k_chunk': 0, 'use_ema': 1, 'num_examples': 0,
             'which': 'newest'},
    'sample': {'num': 0, 'temperature': 0.0, 'batch_size': -4},
    'latent': {'num_pairs': 0, 'indices': (0, 1, 2), 'steps': 1, 'method': 'cubic',
               'num_images': 0, 'temperatures': (0.5, -0.25), 'num_per_row': 0},
    'fid': {'num_samples': 1, 'temperature': -1.0, 'batch_size': 0, 'inception_weights': 7,
            'splits': ('train', 'train'), 'stats_dir': None},
    'data': {'dataset': '', 'source': 1, 'tfds_data_dir': 2, 'augmentation': 'rotate',
             'worker_count': -1, 'prefetch': 0},
}
CASES = [(section, field, value) for section, fields in BAD.items()
         for field, value in fields.items()]


def name(section, field):
  return f'{section}.{field}' if section else field


def get_config(config_name):
  return importlib.import_module(f'configs.{config_name}').get_config()


def assign(config, section, field, value):
  with config.ignore_type():    # a wrong type, as a config file (not the CLI) may set it
    (config[section] if section else config)[field] = value


def test_bad_values_cover_every_field():
  config = default.get_config()
  sections = {k for k, v in config.items() if hasattr(v, 'keys')}
  assert sections == {'model', *settings.SECTIONS}, 'a section without a settings class'
  top_level = {k for k in config.keys() if k not in sections}
  for section, cls in CLASSES.items():
    fields = [f.name for f in dataclasses.fields(cls)]
    in_config = top_level if section == TOP else set(config[section].keys())
    assert set(fields) == in_config, f'{cls.__name__} does not read every field of {section!r}'
    assert set(BAD[section]) == set(fields), f'BAD lacks a bad value of some {section!r} field'
    assert set(cls._CHECKS) == set(fields), f'{cls.__name__} has a field without a check'


@pytest.mark.parametrize('config_name', ['default', 'digits'])
def test_real_configs_are_valid(config_name):
  config = get_config(config_name)
  for cls in CLASSES.values():
    cls.from_config(config)


def test_every_shipped_config_is_valid():
  for config_file in shipped_configs():
    config = get_config(config_file[:-3])
    for cls in CLASSES.values():
      cls.from_config(config)


@pytest.mark.parametrize('config_name', ['default', 'digits'])
@pytest.mark.parametrize('section, field, value', CASES,
                         ids=[f'{name(s, f)}={v!r}' for s, f, v in CASES])
def test_each_bad_value_names_its_field(config_name, section, field, value):
  config = get_config(config_name)
  assign(config, section, field, value)
  with pytest.raises(ConfigError) as info:
    CLASSES[section].from_config(config)
  message = str(info.value)
  print(message)
  assert re.match(rf'{re.escape(name(section, field))}\b', message), message
  assert '\n' not in message


# The fields where None is a value with a meaning (configs/default.py says which).
NONE_MEANS = {('eval', 'use_ema'): 'follow the run: EMA parameters where it kept them'}


@pytest.mark.parametrize('section, field', [(s, f) for s, f, _ in CASES],
                         ids=[name(s, f) for s, f, _ in CASES])
def test_none_is_refused_for_every_field(section, field):
  config = default.get_config()
  assign(config, section, field, None)
  if (section, field) in NONE_MEANS:
    assert getattr(CLASSES[section].from_config(config), field) is None
    return
  with pytest.raises(ConfigError, match=rf'^{re.escape(name(section, field))}\b.*got None'):
    CLASSES[section].from_config(config)


@pytest.mark.parametrize('section', sorted(settings.SECTIONS))
def test_missing_and_unknown_fields_are_refused(section):
  config = default.get_config().to_dict()
  del config[section][next(iter(config[section]))]
  with pytest.raises(ConfigError, match=rf'the config lacks {section}\.\w+; configs/default'):
    settings.SECTIONS[section].from_config(config)
  config = default.get_config().to_dict()
  config[section]['colour'] = 'blue'
  with pytest.raises(ConfigError, match=rf'unknown config field\(s\) {section}\.colour'):
    settings.SECTIONS[section].from_config(config)
  del config[section]
  with pytest.raises(ConfigError, match=f'the config has no {section} section'):
    settings.SECTIONS[section].from_config(config)
  config = default.get_config().to_dict()
  del config['seed']
  with pytest.raises(ConfigError, match='lacks the top-level field.* seed'):
    settings.RunSettings.from_config(config)


def test_cross_field_rules():
  config = default.get_config()
  config.train.epochs = 0
  with pytest.raises(ConfigError, match=re.escape(
      'train.epochs must be positive (or set train.num_steps > 0), got 0')):
    settings.TrainSettings.from_config(config)
  config.train.num_steps = 5               # num_steps decides: epochs is not read
  settings.TrainSettings.from_config(config)
  config.train.num_steps, config.train.phase, config.train.finetune_epochs = -1, 'finetune', 0
  with pytest.raises(ConfigError, match=r'train\.finetune_epochs must be positive'):
    settings.TrainSettings.from_config(config)


def test_values_are_normalised_and_step_settings_hashable():
  config = default.get_config()
  config.train.lr = 1                      # ConfigDict keeps float fields float; a dict may not
  config.latent.temperatures = [0, 1]
  config.latent.indices = [3, 0]
  train = settings.TrainSettings.from_config(config)
  assert isinstance(train.lr, float) and train.lr == 1.0
  latent = settings.LatentSettings.from_config(config)
  assert latent.temperatures == (0.0, 1.0) and latent.indices == (3, 0)
  step = train.step_settings(781)
  assert hash(step) == hash(train.step_settings(781))
  assert {f.name for f in dataclasses.fields(step)} - {'steps_per_epoch'} < set(
      f.name for f in dataclasses.fields(train))
  with pytest.raises(dataclasses.FrozenInstanceError):
    step.lr = 0.1
  # dataclasses.replace checks too.
  with pytest.raises(ConfigError, match=r'train\.gamma \(lr decay per epoch\) must be in '
                                        r'\(0, 1\], got 2\.0'):
    dataclasses.replace(step, gamma=2.0)
  with pytest.raises(ConfigError, match=r"^train\.lr_schedule must be one of \('official', "
                                        r"'official_torch2', 'exponential'\), got 'cosine'$"):
    dataclasses.replace(step, lr_schedule='cosine')
  with pytest.raises(ConfigError, match='steps_per_epoch must be a positive integer'):
    train.step_settings(0)
  fid = dict(default.get_config().fid)
  fid['splits'] = 'test'
  assert settings.FidSettings(**fid).splits == ('test',)



# ---------------------------------------------------------------- the modes check first

# The sections each mode reads besides `model`: a bad value in any of them is reported
# before anything loads, even with an empty workdir (loading would raise CheckpointError).
MODE_SECTIONS = {
    'train': (TOP, 'data', 'train', 'eval', 'sample'),
    'eval': (TOP, 'data', 'eval'),
    'sample': (TOP, 'eval', 'sample'),
    'interpolate': (TOP, 'data', 'eval', 'latent'),
    'reconstruct': (TOP, 'data', 'eval', 'latent'),
    'sweep': (TOP, 'eval', 'latent', 'sample'),
    'fid': (TOP, 'data', 'eval', 'fid'),
}
MODE_CASES = [(mode, section, field) for mode, sections in MODE_SECTIONS.items()
              for section in sections for field in BAD[section]]


def test_mode_cases_cover_every_mode():
  assert set(MODE_SECTIONS) | {'summary'} == set(modes.MODES)


@pytest.mark.parametrize('mode, section, field', MODE_CASES,
                         ids=[f'{m}-{name(s, f)}' for m, s, f in MODE_CASES])
def test_modes_check_their_settings_before_loading(tmp_path, mode, section, field):
  config = get_config('digits')
  config.train.num_steps, config.eval.num_examples = 1, 8   # a missed check fails fast
  assign(config, section, field, BAD[section][field])
  workdir = tmp_path / 'run'
  with pytest.raises(ConfigError) as info:
    modes.run(mode, config, str(workdir))
  assert re.match(rf'{re.escape(name(section, field))}\b', str(info.value)), \
      str(info.value)
  assert not workdir.exists()


def test_train_best_metric_must_be_what_train_evaluates(tmp_path):
  config = get_config('digits')
  config.train.best_metric = 'test_bdp'
  with pytest.raises(ConfigError, match=r"train\.best_metric must be one of \('test_bpd',\)"):
    modes.run('train', config, str(tmp_path / 'run'))


def test_command_line_eval_k_zero_fails_before_loading(tmp_path):
  """--mode eval with eval.k=0 and an empty workdir: one error line about eval.k (not the
  missing checkpoint, which a load would report first), before any model is built."""
  start = time.perf_counter()
  proc = subprocess.run([sys.executable, '-m', 'denseflow_jax.main', '--config',
                         'configs/digits.py', '--workdir', str(tmp_path), '--mode', 'eval',
                         '--config.eval.k=0'],
                        cwd=ROOT, capture_output=True, text=True, timeout=120)
  seconds = time.perf_counter() - start
  print(proc.stderr, f'{seconds:.1f} s')
  assert proc.returncode != 0
  lines = proc.stderr.strip().splitlines()
  assert lines == ['error: eval.k must be a positive integer (importance samples of the '
                   'IWBO), got 0'], lines
  assert proc.stdout == ''
  assert list(tmp_path.iterdir()) == []
