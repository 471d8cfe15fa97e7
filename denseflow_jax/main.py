"""DenseFlow in JAX: one command to train, evaluate, sample and inspect.

    python -m denseflow_jax.main --config configs/cifar10.py --workdir runs/c10 [--mode train]

Modes: train (default), eval, sample, summary. Any config field can be
overridden, e.g. --config.train.batch_size=128 --config.eval.k=1000;
--config.checkpoint=DIR runs any mode from a converted official checkpoint.
"""
import os
import sys

# Configs import each other as `configs.<name>`: make the project root importable
# when main runs from a checkout.
sys.path.insert(0, os.getcwd())

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Path of a config file (configs/*.py).',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and samples.')
_MODE = flags.DEFINE_enum('mode', 'train', ['train', 'eval', 'sample', 'summary'], 'What to run.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  from absl import logging
  from denseflow_jax import modes
  from denseflow_jax.checkpoint import CheckpointError
  from denseflow_jax.data import DataError
  from denseflow_jax.spec import ConfigError
  logging.set_verbosity(logging.WARNING)   # orbax logs every file it writes at INFO
  try:
    modes.run(_MODE.value, _CONFIG.value, _WORKDIR.value)
  except (ConfigError, DataError, CheckpointError) as e:   # bad input: the message says the fix
    raise SystemExit(f'error: {e}') from None


if __name__ == '__main__':
  flags.mark_flags_as_required(['config'])
  app.run(main)
