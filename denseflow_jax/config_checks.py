"""The building blocks of settings.py: one check per kind of field, reading a config
section, and the `Checked` mixin that runs the checks when a settings dataclass is made.

Each check takes ``where`` (the field as ``section.field``, for the message) and the value,
and returns the value normalised (int, float, tuple) or raises ConfigError:
``train.gamma (lr decay per epoch) must be in (0, 1], got 2.0``.
"""
import dataclasses
import math
import numbers
from typing import Any, Callable, ClassVar, Dict, Mapping

from denseflow_jax.errors import ConfigError

DEFAULTS_HINT = ('configs/default.py defines every field: build the config on '
                 'default.get_config() (or add the field to it)')


# ---------------------------------------------------------------- field checks
# Each returns the value normalised (int, float, tuple) or raises ConfigError.


def fail(where: str, allowed: str, value, hint: str = ''):
  raise ConfigError(f'{where} must be {allowed}, got {value!r}{hint}')


def is_int(value) -> bool:
  # bool is an int to Python (and to ConfigDict), never to us.
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_number(value) -> bool:
  return (isinstance(value, numbers.Real) and not isinstance(value, bool)
          and math.isfinite(value))


def check_int(where, value, minimum, allowed=None, hint=''):
  if not (is_int(value) and value >= minimum):
    fail(where, allowed or f'an integer >= {minimum}', value, hint)
  return int(value)


def check_positive_int(where, value):
  return check_int(where, value, 1, 'a positive integer')


def check_number(where, value, ok: Callable[[float], bool], allowed: str, hint=''):
  if not (is_number(value) and ok(float(value))):
    fail(where, allowed, value, hint)
  return float(value)


def check_choice(where, value, options):
  if not (isinstance(value, str) and value in options):
    fail(where, f'one of {options}', value)
  return value


def check_bool(where, value):
  if not isinstance(value, bool):
    fail(where, 'True or False', value)
  return value


def check_str(where, value, allowed='a string (a path, or empty)'):
  if not isinstance(value, str):
    fail(where, allowed, value)
  return value


def check_sequence(where, value, allowed):
  """A list or tuple as a tuple (a string is a sequence too, but never meant as one)."""
  if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
    fail(where, allowed, value)
  return tuple(value)


# ---------------------------------------------------------------- reading a section


def read_section(config, name, fields):
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


def read_top_level(config, fields):
  missing = [f for f in fields if f not in config]
  if missing:
    raise ConfigError(f'the config lacks the top-level field(s) {", ".join(missing)}; '
                      f'{DEFAULTS_HINT}')
  return {f: config[f] for f in fields}


class Checked:
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
      return cls(**read_section(config, cls.SECTION, names))
    return cls(**read_top_level(config, names))
