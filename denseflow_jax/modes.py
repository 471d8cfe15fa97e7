"""What each `--mode` of `denseflow_jax.main` does."""
from denseflow_jax import ablation
from denseflow_jax.spec import spec_from_config


def finalize_config(config):
  """Derived fields that depend on command-line overrides (e.g. the ablation row)."""
  if 'ablation_row' in config:
    with config.unlocked():
      ablation.apply_row(config)
  return config


def summary(config):
  from denseflow_jax.summary import format_table, parameter_table
  spec = spec_from_config(config.model)
  print(format_table(parameter_table(spec), spec))


def run(mode: str, config, workdir):
  config = finalize_config(config)
  if mode == 'summary':
    return summary(config)
  if not workdir:
    raise SystemExit(f'--workdir is required for --mode={mode}')
  raise SystemExit(f'--mode={mode} is not available yet')
