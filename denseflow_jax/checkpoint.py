"""Checkpoints with orbax: training checkpoints of a workdir, standalone model variables.

Training checkpoints (:class:`TrainCheckpointer`) live in ``WORKDIR/checkpoints/<step>/``,
one orbax ``CheckpointManager`` step each, with four items:

    state    the train state pytree (step, params, batch_stats, opt_state, ema_params,
             counters)                                     orbax StandardSave
    data     the training iterator's state                 JSON (data.TrainIterator.get_state())
    config   the full config                               JSON (config.to_json_best_effort())
    meta     phase, fine-tune start, best metric, format   JSON

orbax writes each step into a temporary directory and renames it when complete, so an
interrupted save never looks like a checkpoint; on top of that, :meth:`latest_step` only
returns steps whose directory holds orbax's metadata file and every item, so a
half-copied or hand-made directory is skipped (with a warning), never restored.

Standalone variables (:func:`save_variables` / :func:`load_variables`), what
``python -m denseflow_jax.convert`` writes and what the eval and sample modes read:

    DIR/variables/      {'params': ..., 'batch_stats': ...}  orbax StandardSave
    DIR/config.json     the full config the variables belong to
    DIR/metadata.json   optional free-form metadata (e.g. step, metric)

:func:`load_variables` also accepts a training workdir (or its ``checkpoints/``
folder) and then returns the latest checkpoint's variables (EMA parameters with
``use_ema=True`` where the run kept them). It also reads checkpoints written on other
devices, e.g. by several hosts (``--multihost``) read on one machine.

A stored config whose ``model`` section differs from the current one is refused with
:class:`CheckpointError` naming every differing field; the performance knobs that do
not change the parameters (``model.compute_dtype``, ``model.remat``, ``model.scan_unroll``,
``model.precision``) may differ.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Mapping, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from denseflow_jax.errors import CheckpointError
from denseflow_jax.files import as_path, is_bucket, write_json_atomic
from denseflow_jax.state_dict import flatten, report_mismatches

CHECKPOINTS_DIR = 'checkpoints'
VARIABLES_DIR = 'variables'
CONFIG_FILE = 'config.json'
METADATA_FILE = 'metadata.json'
PRETRAINED_DIR = 'pretrained'    # WORKDIR/pretrained: a fine-tune's starting variables
BEST_DIR = 'best'                # WORKDIR/best: the variables at the best periodic test bpd
ORBAX_METADATA_FILE = '_CHECKPOINT_METADATA'
# In a bucket orbax writes a step in place (no rename) and marks it complete last with
# this file: a step directory without it was cut short.
ORBAX_COMMIT_FILE = 'commit_success.txt'
TRAIN_ITEMS = ('state', 'data', 'config', 'meta')
FORMAT = 'denseflow_jax.checkpoint/1'

# model.* fields that change speed or memory, not the parameters: they may differ on resume.
MODEL_FIELDS_FREE_TO_CHANGE = ('compute_dtype', 'remat', 'scan_unroll', 'precision')


# ---------------------------------------------------------------------------
# Configs.
# ---------------------------------------------------------------------------


def config_to_dict(config) -> dict:
  """A ConfigDict (or mapping) as plain JSON data (tuples become lists)."""
  if hasattr(config, 'to_json_best_effort'):
    return json.loads(config.to_json_best_effort())
  return json.loads(json.dumps(config, default=str))


def model_config_diff(stored: Mapping, current: Mapping) -> dict:
  """{field: (stored, current)} of the ``model`` sections that differ (JSON-normalised)."""
  stored = config_to_dict(dict(stored)).get('model', {})
  current = config_to_dict(current).get('model', {})
  return {k: (stored.get(k, '<missing>'), current.get(k, '<missing>'))
          for k in sorted(set(stored) | set(current))
          if k not in MODEL_FIELDS_FREE_TO_CHANGE and stored.get(k) != current.get(k)}


def check_model_config(stored: Mapping, config, where: str, fix: str) -> None:
  """Raises CheckpointError if the model sections of ``stored`` and ``config`` differ.

  Args:
    stored: the config saved with the checkpoint (JSON data).
    config: the current config (ConfigDict or JSON data).
    where: the checkpoint, for the message.
    fix: what the user should do, appended to the message.
  """
  diff = model_config_diff(stored, config)
  if diff:
    fields = '; '.join(f'model.{k}: checkpoint {a!r}, config {b!r}' for k, (a, b) in diff.items())
    raise CheckpointError(f'{where} holds a different model than the config ({fields}). {fix}')


# ---------------------------------------------------------------------------
# Training checkpoints.
# ---------------------------------------------------------------------------


def is_complete_step_dir(path: epath.Path) -> bool:
  """True for a finalised orbax step directory holding every training item."""
  if not path.is_dir() or '.orbax-checkpoint-tmp' in path.name:
    return False
  if not (path / ORBAX_METADATA_FILE).is_file():
    return False
  if is_bucket(path) and not (path / ORBAX_COMMIT_FILE).is_file():
    return False
  return all((path / item).is_dir() for item in TRAIN_ITEMS)


class TrainCheckpointer:
  """Save / restore training checkpoints in ``workdir/checkpoints`` (last ``keep`` kept).

  Every process must call save/restore (orbax coordinates the hosts).
  """

  def __init__(self, workdir: str | os.PathLike, keep: int = 3, async_save: bool = True):
    self.directory = as_path(workdir) / CHECKPOINTS_DIR
    self._options = ocp.CheckpointManagerOptions(
        max_to_keep=max(1, int(keep)) if keep else None, create=True,
        enable_async_checkpointing=async_save)
    self._manager = None

  def _get_manager(self, create: bool = False):
    """The orbax manager; created (with the directory) only when needed, so that reading
    an empty workdir leaves no trace."""
    if self._manager is None:
      if not create and not self.directory.is_dir():
        return None
      self._manager = ocp.CheckpointManager(self.directory, options=self._options,
                                            item_names=TRAIN_ITEMS)
    return self._manager

  def all_steps(self) -> list[int]:
    """Complete checkpoints, ascending."""
    manager = self._get_manager()
    if manager is None:
      return []
    manager.reload()
    steps = []
    for step in manager.all_steps():
      if is_complete_step_dir(self.directory / str(step)):
        steps.append(int(step))
      else:
        logging.warning('ignoring incomplete checkpoint directory %s',
                        self.directory / str(step))
    return sorted(steps)

  def latest_step(self) -> Optional[int]:
    steps = self.all_steps()
    return steps[-1] if steps else None

  def save(self, step: int, state, data_state: Mapping, config, meta: Mapping) -> None:
    """Starts writing checkpoint ``step`` (asynchronously where enabled; see :meth:`wait`).

    The arrays are copied off the device before this returns, so the caller may donate
    the state's buffers right after.
    """
    meta = dict(meta, format=FORMAT, step=int(step))
    self._get_manager(create=True).save(int(step), args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave(dict(data_state)),
        config=ocp.args.JsonSave(config_to_dict(config)),
        meta=ocp.args.JsonSave(meta)), force=True)

  def _restore(self, step: int, **items):
    manager = self._get_manager()
    if manager is None:
      raise CheckpointError(f'no checkpoints in {self.directory}')
    try:
      return manager.restore(int(step), args=ocp.args.Composite(**items))
    except (ValueError, KeyError, TypeError):
      raise                  # mismatched structure: restore() words it
    except Exception as e:   # pylint: disable=broad-except
      raise CheckpointError(self._damaged(step, e)) from e

  def _damaged(self, step: int, error: Exception) -> str:
    """The message for a checkpoint that cannot be read (truncated / garbled file)."""
    path = self.directory / str(step)
    others = [s for s in self.all_steps() if s != int(step)]
    fallback = (f'the previous complete checkpoint (step {others[-1]}) is then used'
                if others else 'training then starts from scratch')
    return (f'checkpoint {path} cannot be read ({type(error).__name__}: {error}); it is '
            f'damaged (e.g. a truncated or garbled file). Move {path} out of '
            f'{self.directory} to resume without it ({fallback}), or use a new --workdir')

  def stored_config(self, step: int) -> dict:
    return self.stored_json(step, 'config')

  def stored_json(self, step: int, item: str) -> dict:
    """A JSON item of checkpoint ``step``: 'config', 'data' (the data stream's position) or
    'meta'."""
    try:
      return self._restore(step, **{item: ocp.args.JsonRestore()})[item]
    except (ValueError, KeyError, TypeError) as e:
      raise CheckpointError(self._damaged(step, e)) from e

  def restore(self, step: int, abstract_state):
    """(state, data_state, meta) of checkpoint ``step``.

    Args:
      step: a step from :meth:`all_steps`.
      abstract_state: a pytree of ``jax.ShapeDtypeStruct`` (with shardings) of the same
        structure as the saved state; the restored arrays take their shardings.
    """
    try:
      restored = self._restore(step, state=ocp.args.StandardRestore(abstract_state),
                               data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore())
    except (ValueError, KeyError, TypeError) as e:
      damaged = ('OUT_OF_RANGE', 'DATA_LOSS', 'Error reading', 'Error opening')
      if (isinstance(e, (json.JSONDecodeError, UnicodeDecodeError))
          or any(m in str(e) for m in damaged)):   # tensorstore: truncated / garbled file
        raise CheckpointError(self._damaged(step, e)) from e
      raise CheckpointError(
          f'cannot restore checkpoint {self.directory / str(step)} into the current train '
          f'state ({type(e).__name__}: {e}); it is damaged, or was written with other '
          'training settings (e.g. train.optimizer, train.ema_decay on/off): resume with '
          'those, move the step directory out of the way to use the previous checkpoint, '
          'or use a new --workdir') from e
    return restored['state'], restored['data'], restored['meta']

  def restore_raw_state(self, step: int) -> dict:
    """The saved state as a nested dict of arrays, without a target structure (on this
    process's first device where the saved devices do not exist here)."""
    return self._restore(step, state=ocp.args.StandardRestore(
        fallback_sharding=_local_fallback_sharding()))['state']

  def wait(self) -> None:
    """Blocks until pending asynchronous saves are on disk."""
    if self._manager is not None:
      self._manager.wait_until_finished()

  def close(self) -> None:
    if self._manager is not None:
      self._manager.close()


# ---------------------------------------------------------------------------
# Standalone variables.
# ---------------------------------------------------------------------------


def _local_fallback_sharding() -> jax.sharding.Sharding:
  """Where a target-less restore puts arrays whose saved sharding names devices that do not
  exist here: a checkpoint written by several hosts (a TPU pod slice, --multihost) read on
  one machine, e.g. by --mode eval. orbax otherwise refuses with 'Topology mismatch'."""
  return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])


def _plain(tree):
  """Nested dicts (FrozenDicts, orbax restores) -> plain dicts, arrays unchanged."""
  if isinstance(tree, Mapping):
    return {k: _plain(v) for k, v in tree.items()}
  return tree


def save_variables(directory: str | os.PathLike, variables: Mapping, config,
                   metadata: Optional[Mapping] = None) -> None:
  """Writes ``{'params', 'batch_stats'}`` and the config as a standalone model checkpoint.

  An existing checkpoint in ``directory`` is replaced. Call on every process.
  """
  directory = as_path(directory)
  variables = _plain(variables)
  unknown = set(variables) - {'params', 'batch_stats'}
  if 'params' not in variables or unknown:
    raise CheckpointError(f"variables must be {{'params', 'batch_stats'}}, got keys "
                          f'{sorted(variables)}')
  variables = {'params': variables['params'], 'batch_stats': variables.get('batch_stats', {})}
  directory.mkdir(parents=True, exist_ok=True)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(directory / VARIABLES_DIR, variables, force=True)
    checkpointer.wait_until_finished()
  if jax.process_index() == 0:
    write_json_atomic(directory / CONFIG_FILE, config_to_dict(config))
    write_json_atomic(directory / METADATA_FILE, dict(metadata or {}, format=FORMAT))


def read_config(directory: str | os.PathLike) -> dict:
  """The config stored with standalone variables or with a training workdir's latest
  checkpoint (JSON data)."""
  directory = as_path(directory)
  if (directory / CONFIG_FILE).is_file():
    return json.loads((directory / CONFIG_FILE).read_text())
  checkpointer = _workdir_checkpointer(directory)
  step = checkpointer.latest_step()
  return checkpointer.stored_config(step)


def read_metadata(directory: str | os.PathLike) -> dict:
  path = as_path(directory) / METADATA_FILE
  return json.loads(path.read_text()) if path.is_file() else {}


def holds_model(directory: str | os.PathLike) -> bool:
  """Whether `directory` is something `load_variables` can read: a model checkpoint
  (variables/) or a training workdir (checkpoints/)."""
  directory = as_path(directory)
  return ((directory / VARIABLES_DIR).is_dir() or (directory / CHECKPOINTS_DIR).is_dir()
          or directory.name == CHECKPOINTS_DIR and directory.is_dir())


def _workdir_checkpointer(directory: epath.Path) -> TrainCheckpointer:
  workdir = directory.parent if directory.name == CHECKPOINTS_DIR else directory
  if not (workdir / CHECKPOINTS_DIR).is_dir():
    raise CheckpointError(
        f'{directory} is neither a model checkpoint (no {VARIABLES_DIR}/ and {CONFIG_FILE}: '
        'write one with save_variables or python -m denseflow_jax.convert) nor a training '
        f'workdir (no {CHECKPOINTS_DIR}/)')
  checkpointer = TrainCheckpointer(workdir, keep=0, async_save=False)
  if checkpointer.latest_step() is None:
    raise CheckpointError(f'training workdir {workdir} holds no complete checkpoint')
  return checkpointer


def resumed_config(workdir: str | os.PathLike) -> Optional[dict]:
  """The config stored with the checkpoint a training run in ``workdir`` would resume (its
  latest complete one), or None where there is none or it cannot be read (the restore
  words that). Reads only: nothing is created."""
  checkpointer = TrainCheckpointer(workdir, keep=0, async_save=False)
  try:
    step = checkpointer.latest_step()
    return None if step is None else checkpointer.stored_config(step)
  except CheckpointError:
    return None
  finally:
    checkpointer.close()


def load_variables(directory: str | os.PathLike, config=None, use_ema: bool = False) -> dict:
  """``{'params', 'batch_stats'}`` (nested dicts of arrays) from a checkpoint.

  Args:
    directory: written by :func:`save_variables`, or a training workdir (its latest
      checkpoint is read).
    config: if given, its ``model`` section must match the stored one (CheckpointError
      naming the differing fields otherwise).
    use_ema: for a training workdir, return the EMA parameters where the run kept them.
  """
  return read_variables(directory, config, use_ema)[0]


def read_variables(directory, config=None, use_ema: bool = False):
  """(variables, {'step', 'parameters'}): :func:`load_variables` and the training step the
  variables are from and 'ema' or 'raw' (None where the checkpoint does not say)."""
  directory = as_path(directory)
  if not directory.exists():
    raise CheckpointError(f'checkpoint {directory} does not exist; set --config.checkpoint '
                          'to a directory written by python -m denseflow_jax.convert or a '
                          'training workdir')
  if config is not None:
    check_model_config(read_config(directory), config, f'checkpoint {directory}',
                       'Use a checkpoint of this model, or set the model fields to the '
                       "checkpoint's values.")
  if (directory / VARIABLES_DIR).is_dir():
    with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as checkpointer:
      variables = checkpointer.restore(directory / VARIABLES_DIR, args=ocp.args.StandardRestore(
          fallback_sharding=_local_fallback_sharding()))
    metadata = read_metadata(directory)
    info = {'step': metadata.get('step'), 'parameters': metadata.get('parameters')}
  else:
    checkpointer = _workdir_checkpointer(directory)
    step = checkpointer.latest_step()
    state = checkpointer.restore_raw_state(step)
    ema = use_ema and state.get('ema_params') is not None
    params = state['ema_params'] if ema else state['params']
    variables = {'params': params, 'batch_stats': state.get('batch_stats') or {}}
    info = {'step': int(step), 'parameters': 'ema' if ema else 'raw'}
  variables = _plain(variables)
  variables.setdefault('batch_stats', {})
  return jax.tree.map(np.asarray, variables), info


def check_variables(variables: Mapping, abstract: Mapping, where: str) -> None:
  """CheckpointError unless loaded ``variables`` have exactly the names, shapes and dtypes of
  the model's ``abstract`` ones (``jax.ShapeDtypeStruct``s, e.g. from ``jax.eval_shape``).

  Args:
    variables: ``{'params', 'batch_stats'}`` as :func:`load_variables` returns them.
    abstract: the same structure for the configured model.
    where: the checkpoint, for the message.
  """
  got, want = flatten(variables), flatten(abstract)
  dtypes = [f'dtype of {k}: got {np.dtype(got[k].dtype)}, expected {np.dtype(want[k].dtype)}'
            for k in sorted(set(got) & set(want))
            if np.dtype(got[k].dtype) != np.dtype(want[k].dtype)]
  report_mismatches(want, got, CheckpointError,
                    what=f'the variables in {where} do not fit the configured model',
                    fix='check the model config', other=dtypes)
