"""Which trained variables a mode runs, and how its result files say so.

:func:`load_model` is the one loader of every mode that runs a trained model (eval,
sample, the latent tools, fid). It reads, in this order of precedence:

    config.checkpoint          a converted official model or another run     'config.checkpoint'
    WORKDIR/best               with eval.which='best': the parameters saved at
                               the best periodic test bits/dim of training    'best'
    WORKDIR/checkpoints/<N>    the latest training checkpoint (default)       'latest'

and returns what it read as ``loaded``: ``{'checkpoint', 'which', 'step', 'parameters',
'data_top_level'}`` ('ema' or 'raw'; step and parameters None where a checkpoint does
not say). Result files carry ``loaded`` in their JSON and :func:`loaded_label`
('latest_ema', 'best_raw', 'checkpoint', ...) at the end of their name.

``eval.use_ema`` picks the parameters. The default, None, follows the run: the EMA
parameters where it kept them, else the raw ones, with nothing printed (the defaults,
``train.ema_decay=0``, keep none, and a note on every load would only repeat that).
``eval.use_ema=True`` on variables that hold no EMA parameters (a run with
``train.ema_decay=0``, or a WORKDIR/best saved from the raw parameters) prints one
``note:`` line on stderr (:func:`no_ema_note`): the user asked for what is not there. Either
way the result files say ``raw``.

``data_top_level`` is the largest value of the training images (16 for the digits),
which the grids show as white (outputs.py), or None where nothing recorded it (runs from
before the record, converted official models): ``--mode train`` writes it to
``WORKDIR/training_data.json`` (training_data.py) once its start checks pass, and
``training_data.read_data_top_level`` reads it from the directory the variables come from, or
from the training workdir around it (its best/, pretrained/ or checkpoints/), without
loading any data.
"""
from __future__ import annotations

import logging
import sys
from typing import Optional

import jax

from denseflow_jax import checkpoint as ckpt_lib
from denseflow_jax import model as model_lib
from denseflow_jax.errors import CheckpointError, ConfigError
from denseflow_jax.files import as_path
from denseflow_jax.training_data import read_data_top_level


def load_model(config, workdir, use_ema: Optional[bool], which: str = 'latest'):
  """(model, variables, loaded): the model of ``config.model`` and the variables chosen as
  the module docstring says; ``use_ema`` (``eval.use_ema``: None or True) picks the EMA
  parameters of a training checkpoint where the run kept them, and True notes where it
  did not (WORKDIR/best holds what training chose with its own ``eval.use_ema``)."""
  best = as_path(workdir) / ckpt_lib.BEST_DIR
  if config.checkpoint and which == 'best':
    raise ConfigError(
        f'--config.eval.which=best reads {best}, but --config.checkpoint='
        f'{config.checkpoint} names other variables: drop one of the two')
  model = model_lib.make_model(config.model)
  if config.checkpoint:
    source, which = config.checkpoint, 'config.checkpoint'
  elif which == 'best' and ckpt_lib.holds_model(best):
    source = best
  elif not ckpt_lib.holds_model(workdir):
    raise CheckpointError(
        f'no checkpoint in {as_path(workdir)}: train first (python -m '
        f'denseflow_jax.main --config CONFIG --workdir {workdir}) or point '
        '--config.checkpoint at a converted model (python -m denseflow_jax.convert --help)')
  elif which == 'best':
    raise CheckpointError(
        f'no best model in {best}: training writes it when a periodic '
        'test bits/dim improves (train.eval_every_epochs). Use --config.eval.which=latest '
        'for the latest checkpoint')
  else:
    source = workdir
  variables, info = ckpt_lib.read_variables(source, config, use_ema is not False)
  if which == 'best' and use_ema is False and info['parameters'] == 'ema':
    logging.warning('%s holds the EMA parameters (training ran with eval.use_ema unset or True); '
                    'eval.use_ema=False does not change that', best)
  if use_ema is True and info['parameters'] == 'raw' and jax.process_index() == 0:
    print(no_ema_note(source), file=sys.stderr, flush=True)
  top = read_data_top_level(source, model.spec.num_bits)
  return model, variables, {'checkpoint': str(as_path(source)), 'which': which, **info,
                            'data_top_level': top}


def no_ema_note(source) -> str:
  """The line load_model prints when eval.use_ema=True finds no EMA parameters."""
  source = as_path(source)
  if (source / ckpt_lib.VARIABLES_DIR).is_dir():   # best/, saved variables
    why = ('saved from the raw parameters: training ran with train.ema_decay=0 or '
           'eval.use_ema=False')
  else:                                            # a training checkpoint
    why = 'trained with train.ema_decay=0'
  return (f'note: eval.use_ema=True but {source} holds no EMA parameters ({why}); using the '
          'raw parameters')


def loaded_label(loaded) -> str:
  """What was loaded, for the end of a result file's name: 'latest_ema', 'best_raw',
  'checkpoint' (a converted model that does not say), ..."""
  which = 'checkpoint' if loaded['which'] == 'config.checkpoint' else loaded['which']
  return '_'.join(part for part in (which, loaded['parameters']) if part)
