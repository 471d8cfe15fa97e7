"""One process of tests/test_multihost.py: configures JAX for CPU, then runs
``python -m denseflow_jax.main`` (its ``main``) with the other flags.

    python tests/multihost_worker.py --num_cpu_devices=4 [--first_run_steps=2] \\
        --config tests/multihost_worker.py --workdir DIR [--multihost ...]

main.py cannot set what a CPU test needs before JAX starts: ``jax_num_cpu_devices``
(before the backend initialises), gloo as the CPU collectives (before
``jax.distributed.initialize()``; without it a computation over the devices of several
processes fails: the default CPU backend has no cross-process collectives) and
``jax_disable_most_optimizations`` (as in tests/conftest.py: compile time).

``--first_run_steps=K`` trains to step K first (main, which checkpoints there), then
runs the train mode again with the config's ``train.num_steps``, which resumes from that
checkpoint in the same process (the compiled steps are cached: no second compilation).

The file is also the config file of the runs (``--config tests/multihost_worker.py``):
:func:`get_config` is helpers.tiny_config with one unit of one Glow-coupling module and
uniform dequantization, on the digits: it compiles in seconds.
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def get_config():
  sys.path.insert(0, os.path.join(ROOT, 'tests'))
  from helpers import GLOW, tiny_config   # pylint: disable=import-outside-toplevel
  return tiny_config({
      **GLOW, 'model.block_config': (1,),
      'data.augmentation': 'horizontal_flip',      # seeded per example of the global stream
      'train.batch_size': 16,                      # the global batch: 8 rows per process of 2
      'train.num_steps': 3,                        # no epoch ends: no sample grids
      'train.lr': 1e-3, 'train.warmup_steps': 2, 'train.grad_clip': 1.0,
      'train.ema_decay': 0.9, 'train.log_every': 1, 'train.checkpoint_every_steps': 2,
      'eval.batch_size': 16, 'eval.num_examples': 16})   # the final evaluation: one batch


def main():
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  sys.path.insert(0, ROOT)
  from absl import app, flags   # pylint: disable=import-outside-toplevel
  from denseflow_jax import main as entry   # pylint: disable=import-outside-toplevel
  num_devices = flags.DEFINE_integer('num_cpu_devices', 8, 'CPU devices of this process.')
  first_run_steps = flags.DEFINE_integer(
      'first_run_steps', 0, 'If > 0: train to this step, then resume to train.num_steps.')

  def run(argv):
    import jax   # pylint: disable=import-outside-toplevel
    jax.config.update('jax_num_cpu_devices', num_devices.value)
    jax.config.update('jax_disable_most_optimizations', True)
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    if not first_run_steps.value:
      return entry.main(argv)
    from denseflow_jax import modes   # pylint: disable=import-outside-toplevel
    config = flags.FLAGS.config
    total = config.train.num_steps
    config.train.num_steps = first_run_steps.value
    entry.main(argv)
    config.train.num_steps = total
    modes.run('train', config, flags.FLAGS.workdir)

  flags.mark_flags_as_required(['config'])
  app.run(run, flags_parser=entry._parse_flags)   # pylint: disable=protected-access


if __name__ == '__main__':
  main()
