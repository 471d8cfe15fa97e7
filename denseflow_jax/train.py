"""Training: ``train_and_evaluate(config, workdir)`` runs the official recipe with
checkpoints, logs and resumption, around the compiled step of train_step.py.

The loop reads as a story (``_train_loop``): restore or initialise, plan the steps, then
after each step ask the plan whether it is time to log, evaluate, sample or save.

Non-finite steps are skipped inside the step (train_step.py); the loop looks at the
counter where it syncs anyway (log lines, evaluations, samples, checkpoints) and stops once
``train.max_nonfinite_in_row`` updates in a row were skipped. It never checkpoints
parameters that are not finite.

Fine-tune (``train.phase = 'finetune'``, official train_more.py): constant
``train.finetune_lr`` for ``train.finetune_epochs`` epochs, continuing the latest
checkpoint of the workdir (params, optimizer moments, data stream) or starting from
``config.checkpoint``. The pretrained variables are first copied to WORKDIR/pretrained.
``train.num_steps > 0`` stops after that many steps (pretrain: at that global step;
fine-tune: that many fine-tuning steps).
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import pathlib
import time
from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp
from tqdm.auto import tqdm

from denseflow_jax import checkpoint as ckpt_lib
from denseflow_jax import data as data_lib
from denseflow_jax.errors import ConfigError, DataError, NonFiniteError, TrainingInterrupted
from denseflow_jax.interrupt import stop_signals
from denseflow_jax.metrics_log import METRICS_FILE, MetricsLog, MetricsWindow
from denseflow_jax.settings import EvalSettings, TrainSettings
from denseflow_jax.sharding import check_batch_divisible, global_batch, make_mesh, replicated
from denseflow_jax.train_step import (TrainState, all_finite, eval_variables, make_state_init,
                                      make_train_step, uses_ema)
from denseflow_jax.spec import spec_from_config

PRETRAINED_DIR = 'pretrained'


# ---------------------------------------------------------------------------
# The loop.
# ---------------------------------------------------------------------------


_all_finite_jit = jax.jit(all_finite)


def _is_finite_tree(tree) -> bool:
  return bool(_all_finite_jit(tree))


def train_and_evaluate(config, workdir: str | os.PathLike,
                       eval_fn: Optional[Callable[[TrainState, int], Optional[Mapping]]] = None,
                       sample_fn: Optional[Callable[[TrainState, int], Any]] = None
                       ) -> TrainState:
  """Trains (or resumes / fine-tunes) in ``workdir``; returns the final state.

  SIGTERM or SIGINT during the loop: the current step finishes, a checkpoint is written
  and :class:`TrainingInterrupted` is raised (``main`` prints how to resume and exits
  with its ``exit_code``); a second SIGINT aborts at once.

  Args:
    config: the full config (configs/default.py).
    workdir: checkpoints, metrics.jsonl and tensorboard/ go here; a complete checkpoint
      in it is resumed exactly (its model config must match).
    eval_fn: called as ``eval_fn(state, step)`` every ``train.eval_every_epochs`` epochs
      and at the end; may return {name: float}, logged with prefix 'eval'. If it holds
      ``train.best_metric`` (default 'test_bpd', lower is better) and improves, the
      evaluation variables are saved to WORKDIR/best.
    sample_fn: called as ``sample_fn(state, step)`` every ``train.sample_every_epochs``.

  The hooks run on every process and must not keep references to the state's arrays: the
  next step donates (reuses) their buffers.
  """
  workdir = pathlib.Path(workdir).resolve()
  # ---- everything that can fail on the config, before any compilation ----
  spec = spec_from_config(config.model)
  settings = TrainSettings.from_config(config)
  use_ema = EvalSettings.from_config(config).use_ema    # what WORKDIR/best holds
  mesh = make_mesh()
  check_batch_divisible(settings.batch_size, mesh)
  with contextlib.ExitStack() as cleanup:
    checkpointer = ckpt_lib.TrainCheckpointer(workdir, keep=settings.keep_checkpoints)
    cleanup.callback(checkpointer.close)
    latest = checkpointer.latest_step()
    if latest is not None:
      ckpt_lib.check_model_config(
          checkpointer.stored_config(latest), config, f'--workdir {workdir}',
          'Use a new --workdir for a different model (the old one is left untouched).')
    elif config.checkpoint:
      ckpt_lib.check_model_config(
          ckpt_lib.read_config(config.checkpoint), config,
          f'config.checkpoint {config.checkpoint}',
          "Set the model fields to the checkpoint's values, or use another checkpoint.")
    elif settings.phase == 'finetune':
      raise ConfigError(
          "train.phase='finetune' needs a trained model: a checkpoint in --workdir (the "
          'pretraining run) or --config.checkpoint')
    iterator = data_lib.make_train_iterator(config, jax.process_index(), jax.process_count())
    cleanup.callback(iterator.close)
    return _train_loop(config, settings, use_ema, workdir, spec, mesh, checkpointer, latest,
                       iterator, eval_fn, sample_fn)


def _start_event(workdir, checkpoints, phase, latest, start_step, total_steps):
  """(event, message): the first line a run prints, new, resumed or already finished."""
  if start_step >= total_steps:
    return 'already_finished', (
        f'already finished at step {start_step} of {total_steps}: nothing to do '
        f'(checkpoints in {checkpoints}, metrics in {workdir / METRICS_FILE})')
  if latest is not None:
    return 'resume', f'resuming from step {start_step} of {total_steps} (checkpoint {checkpoints})'
  return 'start', f'starting a new run in {workdir}: {total_steps} steps ({phase})'


def _finish_message(workdir, checkpoints, step, seconds, best_metric, last_value, meta) -> str:
  """The last line a run prints: steps, time, last and best metric, where things are."""
  parts = [f'finished {step} steps in {seconds:.0f} s']
  if last_value is not None:
    parts.append(f'last {best_metric} {last_value:.4f}')
  if meta.get('best') is not None:
    parts.append(f'best {meta["best"]:.4f} at step {meta.get("best_step")} '
                 f'({workdir / ckpt_lib.BEST_DIR})')
  return ('; '.join(parts) + f'; checkpoints in {checkpoints}, metrics in '
          f'{workdir / METRICS_FILE}, samples in {workdir / "samples"}')


@dataclasses.dataclass(frozen=True)
class _Plan:
  """When the loop logs, evaluates, samples and saves (one place for the step arithmetic).

  Log every ``log_every`` steps; evaluate every ``eval_every`` epochs; sample every
  ``sample_every`` epochs; checkpoint every ``checkpoint_every`` steps; and at the last
  step log, evaluate and checkpoint in any case."""
  total: int
  steps_per_epoch: int
  log_every: int
  checkpoint_every: int
  eval_every: int
  sample_every: int

  def _every_epochs(self, step: int, epochs: int) -> bool:
    epoch, rest = divmod(step, self.steps_per_epoch)
    return rest == 0 and epoch % epochs == 0

  def log(self, step: int) -> bool:
    return step % self.log_every == 0 or step == self.total

  def evaluate(self, step: int) -> bool:
    return self._every_epochs(step, self.eval_every) or step == self.total

  def sample(self, step: int) -> bool:
    return self._every_epochs(step, self.sample_every)

  def save(self, step: int) -> bool:
    return step % self.checkpoint_every == 0 or step == self.total


def _initial_state(config, phase, workdir, checkpointer, latest, iterator, init_fn, to_state_fn,
                   abstract_state, abstract_variables, init_key, mesh):
  """(state, meta, first_batch): the latest checkpoint of the workdir, else the variables
  of config.checkpoint, else the data-dependent (ActNorm) initialisation on the first
  batch, which step 0 then trains on (first_batch is None otherwise)."""
  if latest is not None:
    state, data_state, meta = checkpointer.restore(latest, abstract_state)
    if phase == 'pretrain' and meta.get('phase') == 'finetune':
      raise ConfigError(f"--workdir {workdir} holds a fine-tuning run; resume it with "
                        "--config.train.phase=finetune")
    iterator.set_state(data_state)
    logging.info('resumed from %s step %d', checkpointer.directory, latest)
    return state, meta, None
  if config.checkpoint:
    variables = ckpt_lib.load_variables(config.checkpoint)
    ckpt_lib.check_variables(variables, abstract_variables, config.checkpoint)
    logging.info('starting from the variables in %s', config.checkpoint)
    return to_state_fn(jax.device_put(variables, replicated(mesh))), {}, None
  first_batch = next(iterator)
  return to_state_fn(init_fn(init_key, global_batch(first_batch, mesh))), {}, first_batch


def _plan_phase(config, t: TrainSettings, workdir, state, start_step, latest, meta,
                steps_per_epoch):
  """(total_steps, meta) for this phase. A fine-tune that starts from a pretraining
  checkpoint of the workdir first copies the pretrained variables to WORKDIR/pretrained."""
  if t.phase != 'finetune':
    total = t.num_steps if t.num_steps > 0 else t.epochs * steps_per_epoch
    return total, dict(meta, phase='pretrain')
  if meta.get('phase') == 'finetune':
    finetune_start = int(meta['finetune_start_step'])
  else:
    finetune_start = start_step
    if latest is not None:
      logging.info('saving the pretrained variables to %s', workdir / PRETRAINED_DIR)
      ckpt_lib.save_variables(workdir / PRETRAINED_DIR, eval_variables(state, use_ema=False),
                              config, {'step': start_step})
  length = t.num_steps if t.num_steps > 0 else t.finetune_epochs * steps_per_epoch
  return finetune_start + length, dict(meta, phase='finetune', finetune_start_step=finetune_start)


def _batches(first_batch, iterator, local_shape):
  """The training batches: the init batch first (if any), then the stream; each checked."""
  if first_batch is not None:
    yield first_batch
  for batch in iterator:
    if batch.shape != local_shape:
      raise DataError(f'training batch of shape {batch.shape}, expected {local_shape}')
    yield batch


def _check_nonfinite(window: MetricsWindow, step: int, max_bad: int, directory) -> None:
  bad = window.nonfinite_in_row()
  if bad >= max_bad:
    raise NonFiniteError(
        f'{bad} consecutive steps (up to step {step}) had a non-finite loss or gradient '
        f'(train.max_nonfinite_in_row = {max_bad}); stopped without checkpointing them. '
        'Lower train.lr, set train.grad_clip, or resume from the last checkpoint in '
        f'{directory}')


def _save(checkpointer, step, state, iterator, config, meta) -> None:
  if not _is_finite_tree((state.params, state.batch_stats, state.ema_params)):
    raise NonFiniteError(
        f'refusing to checkpoint step {step}: the parameters are not finite (the last '
        f'checkpoint in {checkpointer.directory} is kept). Lower train.lr, set '
        'train.grad_clip, or resume from that checkpoint')
  # orbax copies the arrays to the host before save() returns (synchronous device-to-host
  # transfer), so the next step may donate the state's buffers.
  checkpointer.save(step, state, iterator.get_state(), config, meta)


def _evaluate(eval_fn, state, step, epoch, config, best_metric, use_ema, workdir, meta,
              log) -> dict:
  """Runs eval_fn, logs and prints its results, and saves WORKDIR/best when the best metric
  improves (into ``meta``, which the next checkpoint stores)."""
  results = {k: float(v) for k, v in (eval_fn(state, step) or {}).items()}
  if not results:
    return results
  log.write({'step': step, 'epoch': epoch, **results}, 'eval')
  log.say(f'step {step}: ' + ', '.join(f'{k} {v:.4f}' for k, v in results.items()))
  value = results.get(best_metric)
  if value is not None and math.isfinite(value) and value < meta.get('best', math.inf):
    meta['best'], meta['best_step'] = value, step
    ckpt_lib.save_variables(workdir / ckpt_lib.BEST_DIR, eval_variables(state, use_ema),
                            config, {'step': step, best_metric: value,
                                     'parameters': 'ema' if uses_ema(state, use_ema) else 'raw'})
  return results


def _train_loop(config, t: TrainSettings, use_ema: bool, workdir, spec, mesh, checkpointer,
                latest, iterator, eval_fn, sample_fn) -> TrainState:
  """The body of train_and_evaluate once the checkpointer and the data iterator exist."""
  is_main = jax.process_index() == 0
  steps_per_epoch = iterator.steps_per_epoch
  init_fn, to_state_fn = make_state_init(spec, t, mesh, steps_per_epoch)
  init_key, train_key = jax.random.split(jax.random.PRNGKey(int(config.seed)))
  batch_struct = jax.ShapeDtypeStruct((t.batch_size, *spec.image_shape), jnp.uint8)
  abstract_variables = jax.eval_shape(init_fn, init_key, batch_struct)
  abstract_state = _replicated_structs(jax.eval_shape(to_state_fn, abstract_variables), mesh)

  # ---- restore or initialise; plan the steps ----
  state, meta, first_batch = _initial_state(
      config, t.phase, workdir, checkpointer, latest, iterator, init_fn, to_state_fn,
      abstract_state, abstract_variables, init_key, mesh)
  start_step = int(jax.device_get(state.step))
  total, meta = _plan_phase(config, t, workdir, state, start_step, latest, meta, steps_per_epoch)
  plan = _Plan(total, steps_per_epoch, t.log_every, t.checkpoint_every_steps,
               t.eval_every_epochs, t.sample_every_epochs)
  with contextlib.ExitStack() as stack:
    log = stack.enter_context(MetricsLog(workdir, start_step, is_main, console=tqdm.write))
    log.event(start_step, *_start_event(workdir, checkpointer.directory, t.phase, latest,
                                        start_step, total))
    if start_step >= total:
      return state
    # ---- train: after each step, is it time to log / evaluate / sample / save? ----
    train_step = make_train_step(spec, t, mesh, steps_per_epoch)
    window = MetricsWindow(t.log_every, t.batch_size, steps_per_epoch, replicated(mesh))
    local_shape = (t.batch_size // jax.process_count(), *spec.image_shape)
    started, step, last_eval, saved_step = time.perf_counter(), start_step, {}, latest
    previous = None
    stop = stack.enter_context(stop_signals())
    progress = stack.enter_context(tqdm(
        total=total, initial=start_step, disable=not is_main, unit='step',
        dynamic_ncols=True, desc=f'{t.phase} (compiling)'))
    for batch in _batches(first_batch, iterator, local_shape):
      state, metrics = train_step(state, global_batch(batch, mesh), train_key)
      window.add(metrics)
      step += 1
      if previous is None:                  # the first call compiled: time from here on
        window.restart_clock()
        progress.set_description(t.phase)
      jax.block_until_ready(previous)       # the host runs one step ahead, no further
      previous = metrics
      progress.update(1)
      hooks = plan.evaluate(step) or plan.sample(step) or plan.save(step)
      if plan.log(step):
        record = window.flush(step)
        log.write(record, 'train')
        progress.set_postfix(bpd=_fmt(record['train_bpd'], 4),
                             img_s=_fmt(record['img_per_s'], 1), refresh=False)
      if plan.log(step) or hooks:
        _check_nonfinite(window, step, t.max_nonfinite_in_row, checkpointer.directory)
      if eval_fn is not None and plan.evaluate(step):
        last_eval = _evaluate(eval_fn, state, step, step / steps_per_epoch, config,
                              t.best_metric, use_ema, workdir, meta, log) or last_eval
      if sample_fn is not None and plan.sample(step):
        sample_fn(state, step)
      if plan.save(step):
        _save(checkpointer, step, state, iterator, config, meta)
        saved_step = step
      if hooks:
        window.restart_clock()              # img/s measures training alone
      if stop['signal'] is not None and step < total:
        if saved_step != step:
          _save(checkpointer, step, state, iterator, config, meta)
        checkpointer.wait()
        interrupted = TrainingInterrupted(stop['signal'], step, checkpointer.directory)
        log.event(step, 'interrupt', str(interrupted), echo=False)   # main prints it
        raise interrupted
      if step >= total:
        break
    checkpointer.wait()
    log.event(step, 'finish', _finish_message(
        workdir, checkpointer.directory, step, time.perf_counter() - started, t.best_metric,
        last_eval.get(t.best_metric), meta))
  return state


def _replicated_structs(tree, mesh):
  """``tree``'s shapes and dtypes, replicated over ``mesh`` (what restore fills in)."""
  return jax.tree.map(
      lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated(mesh)), tree)


def _fmt(value, digits: int) -> str:
  return '-' if value is None else f'{value:.{digits}f}'
