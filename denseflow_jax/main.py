"""DenseFlow in JAX: one command to train, evaluate, sample and inspect.

    python -m denseflow_jax.main --config configs/cifar10.py --workdir runs/c10 [--mode train]

Modes: the table `modes.MODES` (choices and help lines come from it). Any config field can be
overridden, e.g. --config.train.batch_size=128 --config.eval.k=1000;
--config.checkpoint=DIR runs any mode from a converted official checkpoint.
--multihost (one process per host: TPU pod slices, several GPU hosts; see README.md,
"Multi-host") calls jax.distributed.initialize() first.
"""
import os
import shlex
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from denseflow_jax import cli_errors, modes
from denseflow_jax.config_path import prepare_config_import, shipped_configs_text
from denseflow_jax.errors import DenseFlowError, TrainingInterrupted

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Path of a config file (configs/*.py).',
                                          lock_config=True)
# A config file that does not load is one error line (cli_errors.py), not a traceback.
flags.FLAGS['config'].parser = cli_errors.ConfigFileParser('config', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and samples.')
_MODE = flags.DEFINE_enum('mode', 'train', list(modes.MODES), 'What to run.')
_MULTIHOST = flags.DEFINE_bool(
    'multihost', False, 'Call jax.distributed.initialize() first: one process per host of a TPU '
    'pod slice or per GPU host. On Cloud TPU, SLURM, Open MPI and Kubernetes jobs JAX finds '
    'the coordinator, process count and process id itself; elsewhere pass the three flags '
    'below (or set JAX_COORDINATOR_ADDRESS and pass the other two).')
_COORDINATOR = flags.DEFINE_string(
    'coordinator_address', None, 'With --multihost: HOST:PORT of process 0, reachable from every '
    'host (default: $JAX_COORDINATOR_ADDRESS or auto-detected).')
_NUM_PROCESSES = flags.DEFINE_integer(
    'num_processes', None, 'With --multihost: the number of processes (default: auto-detected).',
    lower_bound=1)
_PROCESS_ID = flags.DEFINE_integer(
    'process_id', None, 'With --multihost: this process, 0 .. num_processes - 1 (default: '
    'auto-detected).', lower_bound=0)


HELP = """usage: python -m denseflow_jax.main --config CONFIG [--workdir DIR] [--mode MODE] [--config.FIELD=VALUE ...]

modes (--mode):
{modes}

{configs}

common overrides:
  --config.train.batch_size=64  --config.train.num_steps=N  --config.seed=1
  --config.eval.k=1000  --config.eval.use_ema=False  --config.eval.which=best
  --config.checkpoint=DIR
  --config.data.dataset=npz --config.data.source=data.npz
  --config.model.compute_dtype=bfloat16  --config.model.remat=True
every field: configs/default.py; all flags: --helpfull; documentation: README.md
"""


def _help_text() -> str:
  lines = '\n'.join(f'  {name:<12} {mode.help}' for name, mode in modes.MODES.items())
  return HELP.format(modes=lines, configs=shipped_configs_text())


def main(argv):
  if len(argv) > 1:
    hint = (f'; did you mean --mode {argv[1]}?' if argv[1] in modes.MODES else
            '; options are written --name=value (python -m denseflow_jax.main --help)')
    raise SystemExit(f'error: unexpected argument {argv[1]!r}{hint}')
  logging.set_verbosity(logging.WARNING)   # orbax logs every file it writes at INFO
  if _MULTIHOST.value and _MODE.value != 'train':
    # The other modes are not split over processes: each would repeat the whole job and
    # write its own numbered copy of every result.
    raise SystemExit(f'error: --multihost is for --mode train; run --mode {_MODE.value} on '
                     'one host, without --multihost (it reads the shared --workdir)')
  if _MULTIHOST.value:
    # None lets JAX auto-detect (TPU metadata, SLURM, Open MPI, Kubernetes) or read
    # $JAX_COORDINATOR_ADDRESS; it reads no environment variable for the other two.
    jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                               num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value)
  elif any(f.present for f in (flags.FLAGS['coordinator_address'], flags.FLAGS['num_processes'],
                               flags.FLAGS['process_id'])):
    given = [f'--{name}' for name in ('coordinator_address', 'num_processes', 'process_id')
             if flags.FLAGS[name].present]
    raise SystemExit(f'error: {" and ".join(given)} need{"s" if len(given) == 1 else ""} '
                     f'--multihost; add it (or drop {"it" if len(given) == 1 else "them"} '
                     'for a single-host run)')
  try:
    modes.run(_MODE.value, _CONFIG.value, _WORKDIR.value)
  except TrainingInterrupted as e:   # SIGTERM / Ctrl-C: checkpointed, say how to resume
    command = ' '.join(shlex.quote(a) for a in [os.path.basename(sys.executable), '-m',
                                                 'denseflow_jax.main', *sys.argv[1:]])
    print(f'{e}\n  resume: {command}', file=sys.stderr, flush=True)
    raise SystemExit(e.exit_code) from None
  except DenseFlowError as e:
    # The message names the problem and the fix: one line, no traceback.
    raise SystemExit(f'error: {e}') from None


OWN_FLAGS = ('config', 'workdir', 'mode', 'multihost', 'coordinator_address', 'num_processes',
             'process_id')


def _parse_flags(argv):
  """absl's parser, with every mistake as one `error:` line and exit status 1 (absl prints
  `FATAL Flags parsing error: ...` and a hint line; ml_collections raises AttributeError /
  KeyError, with a traceback, for a misspelled --config.<field>): cli_errors.py."""
  if any(a in ('-h', '--help', '-help') for a in argv[1:]):
    try:
      print(_help_text())
    except BrokenPipeError:       # `... --help | head`
      pass
    raise SystemExit(0)
  prepare_config_import(argv)     # configs load from any working directory
  try:
    rest = flags.FLAGS(argv)
  except (flags.Error, ValueError) as e:
    raise cli_errors.flag_error(e, argv, OWN_FLAGS) from None
  except (AttributeError, KeyError) as e:
    if isinstance(e, AttributeError) and isinstance(e.__context__, KeyError):
      e = e.__context__       # the KeyError holds the plain text
    text = str(e.args[0] if e.args else e).replace('\n', ' ')
    key = text.split("'")[1] if text.count("'") >= 2 else text
    args = [a.split('=')[0] for a in argv[1:]
            if a.startswith('--config.') and key in a.split('=')[0].split('.')]
    raise SystemExit(
        f'error: unknown config field in {args[0] if args else "a --config override"} '
        f'({text}); check the spelling against the config file (configs/default.py lists '
        'every field); nothing was run') from None
  cli_errors.check_tuple_overrides(argv)
  return rest


if __name__ == '__main__':
  flags.mark_flags_as_required(['config'])
  app.run(main, flags_parser=_parse_flags)
