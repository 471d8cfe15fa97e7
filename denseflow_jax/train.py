"""Training: ``train_and_evaluate(config, workdir)`` runs the official recipe with
checkpoints, logs and resumption, around the compiled step of train_step.py.

The loop reads as a story (``_train_loop``): restore or initialise, plan the steps, then
after each step ask the plan whether it is time to log, evaluate, sample or save. What
stays fixed during a run (settings, spec, mesh, checkpointer, data iterator, hooks) is one
frozen record, ``_Run``.

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
import time
from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp
from etils import epath

from denseflow_jax import checkpoint as ckpt_lib
from denseflow_jax import data as data_lib
from denseflow_jax.console import Progress
from denseflow_jax.device_memory import run_or_explain
from denseflow_jax.errors import ConfigError, DataError, NonFiniteError, TrainingInterrupted
from denseflow_jax.files import as_path
from denseflow_jax.interrupt import stop_signals
from denseflow_jax.metrics_log import MetricsLog, MetricsWindow
from denseflow_jax.run_story import (compile_notice, finish_message, last_compile_seconds,
                                     start_event)
from denseflow_jax.settings import Settings, TrainSettings
from denseflow_jax.sharding import (BatchSplit, batch_divisor, divisors, mesh_devices,
                                    global_batch, make_mesh, multiples_text, replicated,
                                    split_batch)
from denseflow_jax.spec import ModelSpec
from denseflow_jax.training_data import write_data_record
from denseflow_jax.train_step import (TrainState, all_finite, eval_variables, make_state_init,
                                      make_train_step, uses_ema)



# ---------------------------------------------------------------------------
# The loop.
# ---------------------------------------------------------------------------


_all_finite_jit = jax.jit(all_finite)


def _is_finite_tree(tree) -> bool:
  return bool(_all_finite_jit(tree))


@dataclasses.dataclass(frozen=True)
class _Run:
  """Everything a training run needs besides its changing state, set up once by
  train_and_evaluate: the loop's helpers take this record, not a dozen arguments."""
  config: Any                       # only to record it with each checkpoint and saved model
  workdir: epath.Path
  train: TrainSettings
  use_ema: bool                     # what WORKDIR/best holds
  seed: int
  checkpoint: str                   # config.checkpoint: variables to start from ('' = none)
  spec: ModelSpec
  mesh: jax.sharding.Mesh
  batch: BatchSplit                 # train.batch_size over the mesh
  checkpointer: ckpt_lib.TrainCheckpointer
  latest: Optional[int]             # the workdir's latest checkpoint step, if any
  iterator: data_lib.TrainIterator
  eval_fn: Optional[Callable[[TrainState, int], Optional[Mapping]]]
  sample_fn: Optional[Callable[[TrainState, int], Any]]


def train_and_evaluate(config, workdir: str | os.PathLike,
                       eval_fn: Optional[Callable[[TrainState, int], Optional[Mapping]]] = None,
                       sample_fn: Optional[Callable[[TrainState, int], Any]] = None,
                       settings: Optional[Settings] = None) -> TrainState:
  """Trains (or resumes / fine-tunes) in ``workdir``; returns the final state.

  SIGTERM or SIGINT during the loop: the current step finishes, a checkpoint is written
  and :class:`TrainingInterrupted` is raised (``main`` prints how to resume and exits
  with its ``exit_code``); a second SIGINT aborts at once.

  Args:
    config: the full config (configs/default.py), recorded with every checkpoint.
    workdir: checkpoints, metrics.jsonl and tensorboard/ go here; a complete checkpoint
      in it is resumed exactly (its model config must match).
    eval_fn: called as ``eval_fn(state, step)`` every ``train.eval_every_epochs`` epochs
      and at the end; may return {name: float}, logged with prefix 'eval'. If it holds
      ``train.best_metric`` (default 'test_bpd', lower is better) and improves, the
      evaluation variables are saved to WORKDIR/best.
    sample_fn: called as ``sample_fn(state, step)`` every ``train.sample_every_epochs``.
    settings: the checked settings of ``config`` with the sections data, train and eval
      (``modes.run`` passes its own); None builds them here.

  The hooks run on every process and must not keep references to the state's arrays: the
  next step donates (reuses) their buffers.
  """
  workdir = as_path(workdir)
  # ---- everything that can fail on the config, before any compilation ----
  if settings is None:
    settings = Settings.from_config(config, ('data', 'train', 'eval'))
  mesh = make_mesh()
  batch = split_train_batch(settings.train.batch_size, workdir, mesh)
  with contextlib.ExitStack() as cleanup:
    checkpointer = ckpt_lib.TrainCheckpointer(workdir, keep=settings.train.keep_checkpoints)
    cleanup.callback(checkpointer.close)
    latest = checkpointer.latest_step()
    s = settings
    if latest is not None:
      ckpt_lib.check_model_config(
          checkpointer.stored_config(latest), config, f'--workdir {workdir}',
          'Use a new --workdir for a different model (the old one is left untouched).')
    elif s.run.checkpoint:
      ckpt_lib.check_model_config(
          ckpt_lib.read_config(s.run.checkpoint), config, f'config.checkpoint {s.run.checkpoint}',
          "Set the model fields to the checkpoint's values, or use another checkpoint.")
    elif s.train.phase == 'finetune':
      raise ConfigError(
          "train.phase='finetune' needs a trained model: a checkpoint in --workdir (the "
          'pretraining run) or --config.checkpoint')
    source = data_lib.load_split(s.data, 'train', model=s.model)
    iterator = data_lib.make_train_iterator(s.data, source, s.model.image_shape, batch,
                                            s.run.seed)
    # What later modes need of the data (the grids' white), now that the run will start.
    write_data_record(workdir, s.data.dataset, s.model.num_bits,
                      *data_lib.train_top_level(s.data, s.model.image_shape, s.model.num_bits))
    cleanup.callback(iterator.close)
    return _train_loop(_Run(
        config, workdir, s.train, s.eval.prefer_ema, s.run.seed, s.run.checkpoint, s.model, mesh,
        batch, checkpointer, latest, iterator, eval_fn, sample_fn))


def split_train_batch(size: int, workdir, mesh=None) -> BatchSplit:
  """``train.batch_size`` over the devices (sharding.split_batch); modes.run checks it before
  it takes the workdir lock, so a refusal writes nothing.

  A resumed run keeps its global batch (the data stream and the epochs of the lr schedule
  follow it), so where ``workdir`` holds a checkpoint the refusal says so and names the
  slice sizes the checkpoint's batch divides over: a preempted job may come back on a
  slice of another size."""
  try:
    return split_batch(size, 'train.batch_size', mesh)
  except ConfigError:
    stored = (ckpt_lib.resumed_config(workdir) or {}).get('train', {}).get('batch_size')
    if not isinstance(stored, int):
      raise
  n, over = batch_divisor(mesh_devices(mesh), jax.process_count())
  fix = (f'resume with --config.train.batch_size={stored}' if stored % n == 0 else
         f'resume on a slice whose device count divides {stored} '
         f'({", ".join(map(str, divisors(stored)))}), or start a new --workdir with '
         f'--config.train.batch_size {multiples_text(size, n)}')
  raise ConfigError(
      f'train.batch_size = {size} (the global batch) does not divide over {over} of '
      f'this slice, and --workdir {workdir} holds a run with train.batch_size = {stored}, '
      'which a resumed run keeps (its data stream and learning-rate schedule follow the '
      f'global batch): {fix}')


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


def _initial_state(run: _Run, init_fn, to_state_fn, init_key):
  """(state, meta, first_batch): the latest checkpoint of the workdir, else the variables
  of config.checkpoint, else the data-dependent (ActNorm) initialisation on the first
  batch, which step 0 then trains on (first_batch is None otherwise)."""
  batch_struct = jax.ShapeDtypeStruct((run.batch.size, *run.spec.image_shape), jnp.uint8)
  abstract_variables = jax.eval_shape(init_fn, init_key, batch_struct)
  if run.latest is not None:
    abstract_state = _replicated_structs(jax.eval_shape(to_state_fn, abstract_variables),
                                         run.mesh)
    state, data_state, meta = run.checkpointer.restore(run.latest, abstract_state)
    if run.train.phase == 'pretrain' and meta.get('phase') == 'finetune':
      raise ConfigError(f"--workdir {run.workdir} holds a fine-tuning run; resume it with "
                        "--config.train.phase=finetune")
    run.iterator.set_state(data_state)
    logging.info('resumed from %s step %d', run.checkpointer.directory, run.latest)
    return state, meta, None
  if run.checkpoint:
    variables = ckpt_lib.load_variables(run.checkpoint)
    ckpt_lib.check_variables(variables, abstract_variables, run.checkpoint)
    logging.info('starting from the variables in %s', run.checkpoint)
    return to_state_fn(jax.device_put(variables, replicated(run.mesh))), {}, None
  first_batch = next(run.iterator)
  return to_state_fn(init_fn(init_key, global_batch(first_batch, run.mesh))), {}, first_batch


def _plan_phase(run: _Run, state, start_step, meta):
  """(total_steps, meta) for this phase. A fine-tune that starts from a pretraining
  checkpoint of the workdir first copies the pretrained variables to WORKDIR/pretrained."""
  t, steps_per_epoch = run.train, run.iterator.steps_per_epoch
  if t.phase != 'finetune':
    total = t.num_steps if t.num_steps > 0 else t.epochs * steps_per_epoch
    return total, dict(meta, phase='pretrain')
  if meta.get('phase') == 'finetune':
    finetune_start = int(meta['finetune_start_step'])
  else:
    finetune_start = start_step
    if run.latest is not None:
      logging.info('saving the pretrained variables to %s', run.workdir / ckpt_lib.PRETRAINED_DIR)
      ckpt_lib.save_variables(run.workdir / ckpt_lib.PRETRAINED_DIR, eval_variables(state, use_ema=False),
                              run.config, {'step': start_step})
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


def _save(run: _Run, step, state, meta) -> None:
  if not _is_finite_tree((state.params, state.batch_stats, state.ema_params)):
    raise NonFiniteError(
        f'refusing to checkpoint step {step}: the parameters are not finite (the last '
        f'checkpoint in {run.checkpointer.directory} is kept). Lower train.lr, set '
        'train.grad_clip, or resume from that checkpoint')
  # orbax copies the arrays to the host before save() returns (synchronous device-to-host
  # transfer), so the next step may donate the state's buffers.
  run.checkpointer.save(step, state, run.iterator.get_state(), run.config, meta)


def _evaluate(run: _Run, state, step, meta, log) -> dict:
  """Runs eval_fn, logs and prints its results, and saves WORKDIR/best when the best metric
  improves (into ``meta``, which the next checkpoint stores)."""
  results = {k: float(v) for k, v in (run.eval_fn(state, step) or {}).items()}
  if not results:
    return results
  epoch = step / run.iterator.steps_per_epoch
  log.write({'step': step, 'epoch': epoch, **results}, 'eval')
  log.say(f'step {step}: ' + ', '.join(f'{k} {v:.4f}' for k, v in results.items()))
  best_metric = run.train.best_metric
  value = results.get(best_metric)
  if value is not None and math.isfinite(value) and value < meta.get('best', math.inf):
    meta['best'], meta['best_step'] = value, step
    ckpt_lib.save_variables(run.workdir / ckpt_lib.BEST_DIR, eval_variables(state, run.use_ema),
                            run.config, {'step': step, best_metric: value, 'parameters':
                                         'ema' if uses_ema(state, run.use_ema) else 'raw'})
  return results


def _train_loop(run: _Run) -> TrainState:
  """The body of train_and_evaluate once the checkpointer and the data iterator exist."""
  t, steps_per_epoch = run.train, run.iterator.steps_per_epoch
  is_main = jax.process_index() == 0
  init_fn, to_state_fn = make_state_init(run.spec, t, run.mesh, steps_per_epoch)
  init_key, train_key = jax.random.split(jax.random.PRNGKey(run.seed))
  directory = run.checkpointer.directory
  with contextlib.ExitStack() as stack:
    progress = stack.enter_context(Progress(0, desc=t.phase, enabled=is_main,
                                            plain_every=t.log_every))
    # ---- restore or initialise; plan the steps ----
    if run.latest is None and not run.checkpoint:
      progress.say('initialising the model on the first batch (data-dependent ActNorm; '
                   'compiles once)...')
    state, meta, first_batch = _initial_state(run, init_fn, to_state_fn, init_key)
    start_step = int(jax.device_get(state.step))
    total, meta = _plan_phase(run, state, start_step, meta)
    progress.total = total
    plan = _Plan(total, steps_per_epoch, t.log_every, t.checkpoint_every_steps,
                 t.eval_every_epochs, t.sample_every_epochs)
    last_compile = last_compile_seconds(run.workdir) if is_main else None
    log = stack.enter_context(MetricsLog(run.workdir, start_step, is_main,
                                         console=progress.say))
    log.event(start_step, *start_event(run.workdir, directory, t.phase, run.latest,
                                        start_step, total))
    if start_step >= total:
      return state
    # ---- train: after each step, is it time to log / evaluate / sample / save? ----
    train_step = make_train_step(run.spec, t, run.mesh, steps_per_epoch)
    window = MetricsWindow(t.log_every, t.batch_size, steps_per_epoch, replicated(run.mesh))
    started, step, last_eval, saved_step = time.perf_counter(), start_step, {}, run.latest
    previous, evaluated = None, False
    stop = stack.enter_context(stop_signals())
    progress.say(compile_notice(last_compile))
    for batch in _batches(first_batch, run.iterator, (run.batch.local_size, *run.spec.image_shape)):
      state, metrics = run_or_explain(train_step, (state, global_batch(batch, run.mesh), train_key),
                                      'the train step', t.batch_size, run.mesh, 'train.batch_size')
      window.add(metrics)
      step += 1
      if previous is None:                  # the first call compiled: time from here on
        seconds = time.perf_counter() - started
        log.event(step, 'compiled', f'compiled the train step in {seconds:.0f} s',
                  seconds=seconds)
        window.restart_clock()
        progress.start(step - 1)
      jax.block_until_ready(previous)       # the host runs one step ahead, no further
      previous = metrics
      hooks = plan.evaluate(step) or plan.sample(step) or plan.save(step)
      postfix = {}
      if plan.log(step):
        record = window.flush(step)
        log.write(record, 'train')
        postfix = {'bpd': _fmt(record['train_bpd'], 4), 'img_s': _fmt(record['img_per_s'], 1)}
      progress.update(step, **postfix)
      if plan.log(step) or hooks:
        _check_nonfinite(window, step, t.max_nonfinite_in_row, directory)
      if run.eval_fn is not None and plan.evaluate(step):
        progress.status('evaluating')
        progress.say(f'step {step}: evaluating' + ('' if evaluated else
                                                   ' (the first evaluation compiles)') + '...')
        last_eval = _evaluate(run, state, step, meta, log) or last_eval
        evaluated = True
      if run.sample_fn is not None and plan.sample(step):
        progress.status('sampling')
        run.sample_fn(state, step)
      if plan.save(step):
        _save(run, step, state, meta)
        saved_step = step
      if hooks:
        window.restart_clock()              # img/s measures training alone
      if stop['signal'] is not None and step < total:
        _stop(run, stop['signal'], step, state, meta, saved_step != step, log)
      if step >= total:
        break
    run.checkpointer.wait()
    progress.close()
    log.event(step, 'finish', finish_message(
        run.workdir, directory, step, time.perf_counter() - started, t.best_metric,
        last_eval.get(t.best_metric), meta))
  return state


def _stop(run: _Run, signal_name, step, state, meta, unsaved: bool, log) -> None:
  """Checkpoints (if this step is not saved yet) and raises TrainingInterrupted."""
  if unsaved:
    _save(run, step, state, meta)
  run.checkpointer.wait()
  interrupted = TrainingInterrupted(signal_name, step, run.checkpointer.directory)
  log.event(step, 'interrupt', str(interrupted), echo=False)   # main prints it
  raise interrupted


def _replicated_structs(tree, mesh):
  """``tree``'s shapes and dtypes, replicated over ``mesh`` (what restore fills in)."""
  return jax.tree.map(
      lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated(mesh)), tree)


def _fmt(value, digits: int) -> str:
  return '-' if value is None else f'{value:.{digits}f}'
