"""Loading `--config FILE` from any working directory.

Config files import their siblings as a package (`from configs import default`), so the
folder that holds `configs/` must be importable. `prepare_config_import(argv)` finds the
`--config` argument, checks that the file exists (one-line error naming the available
configs otherwise) and puts the folder above the config's package first on `sys.path`.
Used by the commands that take `--config` (main, convert).
"""
import pathlib
import sys
from typing import Optional, Sequence


def config_argument(argv: Sequence[str]) -> Optional[str]:
  """The value of `--config=FILE` / `--config FILE` in argv (None if absent)."""
  for i, arg in enumerate(argv):
    if arg.startswith('--config='):
      return arg.split('=', 1)[1]
    if arg == '--config' and i + 1 < len(argv):
      return argv[i + 1]
  return None


CONFIGS_DIR = pathlib.Path(__file__).resolve().parents[1] / 'configs'


def shipped_configs() -> list:
  """Names of the config files beside the package (empty for a non-editable install)."""
  return sorted(p.name for p in CONFIGS_DIR.glob('*.py') if not p.name.startswith('_'))


def shipped_configs_text() -> str:
  """Where the shipped configs are and their names, for help and error messages: their
  folder in full, since a command may run from any working directory."""
  names = shipped_configs()
  if not names:   # a non-editable install has no configs/ beside the package
    return 'configs/*.py in the repository'
  return f'the shipped configs, in {CONFIGS_DIR}: {", ".join(names)}'


def prepare_config_import(argv: Sequence[str]) -> None:
  """Raise SystemExit('error: ...') for a missing config file; make its package importable."""
  value = config_argument(argv)
  if value is None:
    return
  path = pathlib.Path(value.split(':', 1)[0]).expanduser()   # FILE[:overrides] form
  if not path.is_file():
    raise SystemExit(f'error: --config {value}: no such file; {shipped_configs_text()}')
  folder = path.resolve().parent
  root = folder.parent if (folder / '__init__.py').exists() else folder
  if str(root) not in sys.path:
    sys.path.insert(0, str(root))
