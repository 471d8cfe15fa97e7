"""Every error denseflow-jax raises on purpose, under one base.

`main` catches :class:`DenseFlowError` and prints its message as one ``error:`` line (no
traceback): each message names what is wrong and the fix. Each class also derives from
the built-in exception a Python user would expect (ValueError for bad input), so
``except ValueError`` keeps working.
"""


class DenseFlowError(Exception):
  """Base of all errors of ours; the message is written for the user, with the fix."""


class ConfigError(DenseFlowError, ValueError):
  """A configuration that cannot work (checked before anything loads or compiles)."""


class DataError(DenseFlowError, ValueError):
  """Bad data or data settings."""


class CheckpointError(DenseFlowError, ValueError):
  """A checkpoint that cannot be used with this config."""


class ConvertError(DenseFlowError, ValueError):
  """An official state dict that does not match the configured model."""


class InceptionWeightsError(ConfigError):
  """A missing or wrong Inception weights file for FID."""


class FIDError(DenseFlowError, ValueError):
  """Statistics from which no Fréchet distance can be computed."""


class NonFiniteError(DenseFlowError, RuntimeError):
  """Training produced too many non-finite losses / gradients in a row, or parameters that
  are not finite at a checkpoint."""


class TrainingInterrupted(DenseFlowError):
  """SIGTERM (preemption) or SIGINT (Ctrl-C) stopped training after a checkpoint.

  Attributes: ``signal_name`` ('SIGTERM' / 'SIGINT'), ``step`` (the checkpointed step),
  ``exit_code`` (0 for SIGTERM, 130 for SIGINT: what ``main`` exits with).
  """

  def __init__(self, signal_name: str, step: int, directory):
    self.signal_name, self.step = signal_name, int(step)
    self.exit_code = 130 if signal_name == 'SIGINT' else 0
    super().__init__(f'training stopped by {signal_name} after step {step}; checkpoint saved '
                     f'in {directory}. Run the same command again (same --config, overrides '
                     'and --workdir) to resume from it.')


class WorkdirBusyError(DenseFlowError, RuntimeError):
  """Another run holds --workdir's lock (workdir_lock.py); the message names it (host, pid,
  since when, mode and command) and the fix."""
