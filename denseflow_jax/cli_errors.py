"""One `error:` line for every mistake on the command line (issue #21).

absl reports a flag it cannot parse as `FATAL Flags parsing error: flag --X=V: <Python's
message>` plus a second line about --helpfull; ml_collections passes a tuple override it
cannot read as a string element on to the model code. `flag_error(error, argv)` turns an
absl `flags.Error` into the project's one line, naming the flag, what it allows and what it
got; `check_tuple_overrides(argv)` checks that the elements of a `--config.<tuple field>`
override have the type of the config's own elements. Both return / raise
`SystemExit('error: ...')`, which exits with status 1 like every other error of the
command line (main.py). `ConfigFileParser` loads `--config FILE` and reports a file that does
not load (a syntax error, an exception in get_config(), no get_config()) as one line too.
"""
import difflib
import pathlib
import traceback
from typing import List, Optional, Sequence

from absl import flags
from ml_collections import config_dict
from ml_collections.config_flags import config_flags  # the module: ConfigFileFlagParser
from ml_collections.config_flags import tuple_parser

from denseflow_jax.config_path import config_argument, shipped_configs_text

HELP_HINT = 'python -m denseflow_jax.main --help'


def usage_error(message: str) -> SystemExit:
  """SystemExit('error: <message>') on one line (exit status 1)."""
  return SystemExit('error: ' + ' '.join(line.strip() for line in message.splitlines()))


def given_values(argv: Sequence[str], name: str) -> List[str]:
  """The values written for --name on the command line (`--name=V`, `--name V`, one dash
  too), in order."""
  values = []
  for i, arg in enumerate(argv):
    for dashes in ('--', '-'):
      if arg.startswith(f'{dashes}{name}='):
        values.append(arg.split('=', 1)[1])
      elif arg == f'{dashes}{name}' and i + 1 < len(argv):
        values.append(argv[i + 1])
  return values


def _got(argv, name, fallback) -> str:
  values = given_values(argv, name)
  return ', '.join(repr(v) for v in values) if values else repr(fallback)


def _config_file(argv) -> str:
  value = config_argument(argv)
  return value.split(':', 1)[0] if value else 'the config file'


def _element_kind(values) -> Optional[type]:
  """bool, int, float or str when every element of the tuple `values` is one; else None."""
  if not values:
    return None
  for kind in (bool, int, float, str):
    if all(type(v) is kind or (kind is float and type(v) is int) for v in values):
      return kind
  return None


_KIND_WORDS = {bool: 'true or false', int: 'integers', float: 'numbers', str: 'strings'}


def _allows(flag, argv) -> str:
  """What the flag's parser accepts, in words, with the config's value for a config field."""
  parser = flag.parser
  if isinstance(parser, flags.BooleanParser):
    allows = 'true or false'
  elif isinstance(parser, flags.IntegerParser):
    allows = 'an integer'
    low, high = parser.lower_bound, parser.upper_bound
    if low is not None and high is not None:
      allows += f' in {low}..{high}'
    elif low is not None:
      allows += f' >= {low}'
    elif high is not None:
      allows += f' <= {high}'
  elif isinstance(parser, flags.FloatParser):
    allows = 'a number'
  elif isinstance(parser, flags.EnumParser):
    return 'one of ' + ', '.join(parser.enum_values) + ';'
  elif isinstance(parser, flags.EnumClassParser):
    return 'one of ' + ', '.join(parser.member_names) + ';'
  elif isinstance(parser, tuple_parser.TupleParser):
    default = tuple(flag.default or ())
    kind = _element_kind(default)
    allows = 'a tuple' + (f' of {_KIND_WORDS[kind]}' if kind else '')
    if default:
      written = ','.join(str(value) for value in default)   # as the README writes them
      return f'{allows} written like {written} ({default!r} in {_config_file(argv)}),'
    return allows + ','
  else:
    allows = f'a {parser.flag_type()}'
  if flag.name.startswith('config.') and flag.default is not None:
    allows += f' ({flag.default!r} in {_config_file(argv)})'
  return allows + ','


def _is_section(name: str, flag_values) -> bool:
  """Whether --<name> (config.a.b) names a section (a ConfigDict) of the loaded config."""
  if not (name.startswith('config.') and flag_values['config'].present):
    return False
  value = flag_values['config'].value
  try:
    for key in name.split('.')[1:]:
      value = value[key]
  except (KeyError, TypeError, AttributeError):
    return False
  return isinstance(value, (config_dict.ConfigDict, dict))


class ConfigFileError(flags.Error):
  """`--config FILE` did not load; absl passes a flags.Error through unchanged."""

  def __init__(self, path: str, error: BaseException):
    self.path, self.error = path, error
    super().__init__(f'--config {path} could not be loaded: {describe_load_error(path, error)}')


def describe_load_error(path: str, error: BaseException) -> str:
  """`Type: message (FILE, line N)` for an exception raised while loading a config file."""
  if isinstance(error, AttributeError) and 'get_config' in str(error):
    return 'it defines no get_config() function returning the config'
  where = ''
  if isinstance(error, SyntaxError) and error.filename:
    where = f' ({error.filename}, line {error.lineno})'
  else:
    frames = traceback.extract_tb(error.__traceback__)
    config_file = str(pathlib.Path(path.split(':', 1)[0]).expanduser().resolve())
    mine = [f for f in frames if f.filename == config_file]
    if mine:
      where = f' ({mine[-1].filename}, line {mine[-1].lineno})'
  text = error.msg if isinstance(error, SyntaxError) else str(error)
  return f'{type(error).__name__}: {text}{where}'


class ConfigFileParser(config_flags.ConfigFileFlagParser):
  """ml_collections' parser of `--config FILE`, raising ConfigFileError for a file that does
  not load: ml_collections re-raises a TypeError / ValueError with the traceback as its text,
  lets other exceptions through (a traceback) and keeps an IOError for the first access to
  the config (a traceback later, in the middle of the run)."""

  def parse(self, path):
    try:
      config = super().parse(path)
    except Exception as e:   # noqa: BLE001 -- whatever the config file raises
      original = e.__context__ if str(e).startswith('Error whilst parsing config file') else e
      raise ConfigFileError(path, original or e) from None
    try:
      getattr(config, '_denseflow_load_probe', None)   # a config that failed raises here
    except OSError as e:
      raise ConfigFileError(path, e.__cause__ or e) from None
    return config


def required_config() -> SystemExit:
  return usage_error('--config is required: pass a config file, e.g. --config '
                     f'configs/digits.py ({shipped_configs_text()})')


def flag_error(error: Exception, argv: Sequence[str],
               own_flags: Sequence[str], flag_values=flags.FLAGS) -> SystemExit:
  """The one `error:` line for an absl flags.Error (or ValueError) raised by parsing argv."""
  text = ' '.join(str(error).split())
  if isinstance(error, ConfigFileError):
    return usage_error(text)
  if isinstance(error, flags.UnrecognizedFlagError):
    name = error.flagname
    if name.startswith('config.') and not flag_values['config'].present:
      return required_config()
    close = difflib.get_close_matches(name, own_flags, n=2, cutoff=0.6)
    hint = (f'did you mean {" or ".join("--" + c for c in close)}?' if close else
            'the flags are ' + ', '.join('--' + f for f in own_flags))
    return usage_error(f'unknown flag {error.flagvalue or "--" + name}; {hint} ({HELP_HINT})')
  if isinstance(error, flags.IllegalFlagValueError) and text.startswith('flag --'):
    name, rest = text[len('flag --'):].split('=', 1)
    if name in flag_values:
      flag = flag_values[name]
      if name == 'config' and not given_values(argv, name):
        return required_config()
      value = rest.split(': ', 1)[0]
      if _is_section(name, flag_values):
        return usage_error(f'--{name} is a section of the config, not a value: override its '
                           f'fields, e.g. --{name}.FIELD=VALUE; got {_got(argv, name, value)}')
      if given_values(argv, name):
        return usage_error(f'--{name} must be {_allows(flag, argv)} '
                           f'got {_got(argv, name, value)}')
  if text.startswith('Missing value for flag '):
    name = text.split()[-1]
    return usage_error(f'{name} needs a value: {name}=VALUE ({HELP_HINT})')
  return usage_error(f'{text} ({HELP_HINT})')


def check_tuple_overrides(argv: Sequence[str], flag_values=flags.FLAGS) -> None:
  """Raise SystemExit('error: ...') if a `--config.<field>` override of a tuple field has
  elements of another type than the config's tuple (ml_collections keeps `abc` as the
  string element 'abc' of an integer tuple)."""
  for name in list(flag_values):
    flag = flag_values[name]
    if not (name.startswith('config.') and flag.present and
            isinstance(flag.parser, tuple_parser.TupleParser)):
      continue
    kind = _element_kind(tuple(flag.default or ()))
    if kind is None:
      continue
    values = flag.value or []
    if not all(type(v) is kind or (kind is float and type(v) is int) for v in values):
      raise usage_error(f'--{name} must be {_allows(flag, argv)} '
                        f'got {_got(argv, name, tuple(values))}')
