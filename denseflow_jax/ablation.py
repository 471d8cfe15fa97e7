"""The rows of the paper's Table 4 (DenseFlow-45-6 on CIFAR-10) as model switches.

Our reading of Table 4 (the official repository ships only row 6):
  row  coupling network   cross-unit augmentation   published bpd
  1    Glow               none                      3.42
  2    Glow               white noise               3.40
  3    Glow               preconditioned noise      3.37
  4    dense + attention  none                      3.14
  5    dense + attention  white noise               3.08
  6    dense + attention  preconditioned (full)     3.07

`config.ablation_row` sets the three switches (model.coupling_net, model.cross_unit,
model.noise). A switch overridden on the command line to a value other than the row's is
a conflict, reported as an error: nothing silently trains a different model than asked.
`finalize_config` applies it; every command that takes `--config` (main, convert) calls it
once the command-line overrides are in.
"""
from denseflow_jax.errors import ConfigError

SWITCHES = ('coupling_net', 'cross_unit', 'noise')
ROWS = {
    1: ('glow', False, 'preconditioned', 3.42),
    2: ('glow', True, 'white', 3.40),
    3: ('glow', True, 'preconditioned', 3.37),
    4: ('dense_attention', False, 'preconditioned', 3.14),
    5: ('dense_attention', True, 'white', 3.08),
    6: ('dense_attention', True, 'preconditioned', 3.07),
}
# The switches of configs/default.py (= row 6): a value other than these was set explicitly.
DEFAULTS = dict(zip(SWITCHES, ROWS[6][:3]))


def apply_row(config):
  """Set config.model's switches from `config.ablation_row`; ConfigError for an unknown
  row or a switch explicitly set to something else."""
  row = config.ablation_row
  if row not in ROWS:
    raise ConfigError(f'ablation_row must be one of {sorted(ROWS)} (paper Table 4), got {row!r}')
  wanted = dict(zip(SWITCHES, ROWS[row][:3]))
  conflicts = [f'--config.model.{name}={config.model[name]}' for name in SWITCHES
               if config.model[name] != DEFAULTS[name] and config.model[name] != wanted[name]]
  if conflicts:
    raise ConfigError(
        f'{" ".join(conflicts)} conflicts with --config.ablation_row={row}, which sets '
        + ', '.join(f'model.{n}={wanted[n]!r}' for n in SWITCHES)
        + '; drop the override or choose the row that has it (experiments/ablations.md)')
  for name in SWITCHES:
    config.model[name] = wanted[name]
  return config


def finalize_config(config):
  """Derived fields that depend on command-line overrides (e.g. the ablation row)."""
  if 'ablation_row' in config:
    with config.unlocked():
      apply_row(config)
  return config
