"""Training: train state, learning-rate schedule, the data-parallel train step, the loop.

    mesh = make_mesh()                                        # 1-D, axis 'data'
    settings = TrainSettings.from_config(config)
    init, to_state = make_state_init(spec, settings, mesh, steps_per_epoch)
    state = to_state(init(init_key, global_batch(first_local_batch, mesh)))
    step_fn = make_train_step(spec, settings, mesh, steps_per_epoch)  # jitted once, donates state
    state, metrics = step_fn(state, global_batch(local_batch, mesh), base_key)

or all of it, with checkpoints, logs and resumption: ``train_and_evaluate(config, workdir)``.

The loss is the mean bits/dim of the one-sample bound -log p(x) (model.log_prob with
fresh noise). The RNG is never stored: step n uses ``fold_in(base_key, n)``
(VDM style), so a resumed run draws the same noise as an uninterrupted one.

Data parallelism: a 1-D mesh over all devices (axis 'data'); the global batch is
sharded on its first axis, the state is replicated; XLA inserts the gradient
all-reduce, and BatchNorm / ActNorm-init statistics are over the global batch, so
results do not depend on the device count. Several processes (hosts): each reads
``train.batch_size // process_count`` rows (data.make_train_iterator) and the mesh is
process-major, so process p's rows are rows [p * b, (p + 1) * b) of the global batch:
the same global batches, hence the same results up to float rounding, on any number of
hosts (tests/test_multihost.py).

Non-finite steps: if the loss or any gradient is not finite the update is skipped
inside the step (params, batch_stats, opt_state and EMA stay bit-identical) and the
counters grow; the loop stops after ``train.max_nonfinite_in_row`` skipped steps in a row.

Learning rate (pretrain, official recipe):
    lr(step) = train.lr * min(1, step / train.warmup_steps) * train.gamma ** (step // steps_per_epoch)
Fine-tune (``train.phase = 'finetune'``, official train_more.py): constant
``train.finetune_lr`` for ``train.finetune_epochs`` epochs, continuing the latest
checkpoint of the workdir (params, optimizer moments, data stream) or starting from
``config.checkpoint``. The pretrained variables are first copied to WORKDIR/pretrained.
``train.num_steps > 0`` stops after that many steps (pretrain: at that global step;
fine-tune: that many fine-tuning steps).
"""
from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import pathlib
import signal
import threading
import time
from typing import Any, Callable, Mapping, Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from denseflow_jax import checkpoint as ckpt_lib
from denseflow_jax import data as data_lib
from denseflow_jax import model as model_lib
from denseflow_jax.model import DenseFlow
from denseflow_jax.errors import (CheckpointError, ConfigError, DataError, NonFiniteError,
                                  TrainingInterrupted)
from denseflow_jax.settings import EvalSettings, StepSettings, TrainSettings
from denseflow_jax.spec import spec_from_config

METRICS_FILE = 'metrics.jsonl'
TENSORBOARD_DIR = 'tensorboard'
PRETRAINED_DIR = 'pretrained'
BEST_DIR = 'best'


@contextlib.contextmanager
def _stop_signals():
  """Yields a dict whose 'signal' becomes the name of the first SIGTERM / SIGINT received
  (the loop then finishes its step, checkpoints and stops); a second SIGINT raises
  KeyboardInterrupt at once. The previous handlers are restored on exit. Outside the main
  thread (where handlers cannot be installed) nothing is installed."""
  flag = {'signal': None}
  if threading.current_thread() is not threading.main_thread():
    yield flag
    return

  def handler(signum, frame):
    del frame
    name = signal.Signals(signum).name
    if flag['signal'] is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt   # second Ctrl-C: abort now (the last checkpoint stays)
    if flag['signal'] is None:
      flag['signal'] = name
      logging.warning('%s received: finishing the current step, then checkpointing and '
                      'stopping (Ctrl-C again aborts without a checkpoint)', name)

  previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
  try:
    yield flag
  finally:
    for s, h in previous.items():
      signal.signal(s, h)


@flax.struct.dataclass
class TrainState:
  step: jax.Array                 # int32 []: batches consumed (including skipped updates)
  params: Any
  batch_stats: Any                # {} for models without BatchNorm
  opt_state: Any
  ema_params: Any                 # None when train.ema_decay == 0
  nonfinite_count: jax.Array      # int32 []: consecutive skipped updates
  skipped_total: jax.Array        # int32 []: all skipped updates


def create_train_state(variables: Mapping, tx: optax.GradientTransformation,
                       ema: bool = False, step: int = 0) -> TrainState:
  params = variables['params']
  return TrainState(
      step=jnp.asarray(step, jnp.int32),
      params=params,
      batch_stats=variables.get('batch_stats', {}),
      opt_state=tx.init(params),
      ema_params=jax.tree.map(jnp.array, params) if ema else None,
      nonfinite_count=jnp.zeros((), jnp.int32),
      skipped_total=jnp.zeros((), jnp.int32))


def eval_variables(state: TrainState, use_ema: bool = True) -> dict:
  """{'params', 'batch_stats'} for evaluation / sampling (EMA params where kept)."""
  params = state.ema_params if use_ema and state.ema_params is not None else state.params
  return {'params': params, 'batch_stats': state.batch_stats}


# ---------------------------------------------------------------------------
# Config, optimiser, schedule.
# ---------------------------------------------------------------------------


def make_optimizer(settings: StepSettings) -> optax.GradientTransformation:
  """Clipping (identity when grad_clip == 0) then Adamax, without the learning rate: the
  step multiplies by -lr(step) itself, so the schedule follows the data step (skipped
  updates included) and the optimizer state has one structure whatever the phase or
  clipping (a fine-tune continues the pretraining moments)."""
  if settings.optimizer == 'adam':
    scale = optax.scale_by_adam()
  else:
    scale = optax.scale_by_adamax()     # b1 0.9, b2 0.999, eps 1e-8 as torch.optim.Adamax
  clip = settings.grad_clip
  return optax.chain(optax.clip_by_global_norm(clip) if clip > 0 else optax.identity(), scale)


def make_lr_schedule(settings: StepSettings) -> Callable[[Any], jax.Array]:
  """lr as a function of the (global) step; see the module docstring."""
  if settings.phase == 'finetune':
    finetune_lr = settings.finetune_lr
    return lambda step: jnp.full((), finetune_lr, jnp.float32)
  lr, warmup, gamma = settings.lr, settings.warmup_steps, settings.gamma
  steps_per_epoch = settings.steps_per_epoch

  def schedule(step):
    step = jnp.asarray(step)
    warm = jnp.minimum(1.0, step.astype(jnp.float32) / warmup) if warmup > 0 else 1.0
    epoch = (step // steps_per_epoch).astype(jnp.float32)
    return (lr * warm * gamma ** epoch).astype(jnp.float32)
  return schedule


# ---------------------------------------------------------------------------
# Sharding.
# ---------------------------------------------------------------------------


def process_major(devices) -> list:
  """``devices`` ordered by (process_index, id): each process's devices form one block, in
  process order. :func:`global_batch` gives each device the rows of the global batch at its
  mesh position, so process p's local rows then land at rows [p * b, (p + 1) * b), the rows
  data.make_train_iterator gives it; with another order (jax.devices() sorts by id, which
  need not follow the hosts) the rows of the global batch would be permuted, and with them
  each row's noise, making results depend on the host layout."""
  return sorted(devices, key=lambda d: (d.process_index, d.id))


def make_mesh(devices=None) -> jax.sharding.Mesh:
  """1-D data-parallel mesh over all devices, process-major (:func:`process_major`). Auto
  axis: jax.make_mesh would default to Explicit."""
  devices = process_major(jax.devices()) if devices is None else devices
  return jax.sharding.Mesh(np.asarray(devices), ('data',))


def batch_sharding(mesh) -> NamedSharding:
  return NamedSharding(mesh, P('data'))


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def check_batch_divisible(batch_size: int, mesh) -> None:
  n = mesh.size
  if int(batch_size) % n:
    raise ConfigError(
        f'train.batch_size = {batch_size} (the global batch) does not divide over the {n} '
        f'devices; set --config.train.batch_size to a multiple of {n}, e.g. '
        f'{max(n, int(batch_size) // n * n)}')


def global_batch(local_batch: np.ndarray, mesh) -> jax.Array:
  """This process's rows -> the global batch, sharded over the mesh's 'data' axis."""
  sharding = batch_sharding(mesh)
  shape = (local_batch.shape[0] * jax.process_count(),) + local_batch.shape[1:]
  return jax.make_array_from_process_local_data(sharding, local_batch, shape)


# ---------------------------------------------------------------------------
# Train step.
# ---------------------------------------------------------------------------


def _all_finite(tree) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def train_loss(model: DenseFlow, params, batch_stats, batch, noise):
  """The training loss and the updated BatchNorm statistics, for given noise:

      loss = mean over the batch of -log p(x) / (D ln 2)     (official `elbo_bpd`)

  computed in training mode (BatchNorm on batch statistics, running statistics updated
  with momentum 0.1). Returns (loss, new batch_stats)."""
  log_p, updates = model.apply({'params': params, 'batch_stats': batch_stats}, batch, noise,
                               train=True, method=DenseFlow.log_prob, mutable=['batch_stats'])
  loss = jnp.mean(model_lib.bits_per_dim(log_p, model.spec))
  return loss, updates.get('batch_stats', batch_stats)


def train_step_fn(model: DenseFlow, settings: StepSettings):
  """The un-jitted train step ``(state, batch, base_key) -> (state, metrics)``."""
  spec = model.spec
  tx = make_optimizer(settings)
  schedule = make_lr_schedule(settings)
  ema_decay = settings.ema_decay

  def loss_fn(params, batch_stats, batch, key):
    noise = model_lib.draw_noise(spec, key, batch.shape[0])
    return train_loss(model, params, batch_stats, batch, noise)

  def step_fn(state: TrainState, batch, base_key):
    key = jax.random.fold_in(base_key, state.step)
    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, state.batch_stats, batch, key)
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(loss) & _all_finite(grads)
    lr = schedule(state.step)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = jax.tree.map(lambda p, u: p - lr * u, state.params, updates)
    # A non-finite step changes nothing but the counters (no host round trip).
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    params = keep(params, state.params)
    ema = state.ema_params
    if ema is not None:
      ema = keep(jax.tree.map(lambda e, p: ema_decay * e + (1 - ema_decay) * p, ema, params), ema)
    skipped = (~finite).astype(jnp.int32)
    new_state = state.replace(
        step=state.step + 1,
        params=params,
        batch_stats=keep(batch_stats, state.batch_stats),
        opt_state=keep(opt_state, state.opt_state),
        ema_params=ema,
        nonfinite_count=jnp.where(finite, 0, state.nonfinite_count + 1),
        skipped_total=state.skipped_total + skipped)
    metrics = {'step': state.step, 'lr': lr, 'train_bpd': loss, 'grad_norm': grad_norm,
               'skipped': skipped, 'nonfinite_count': new_state.nonfinite_count,
               'skipped_total': new_state.skipped_total}
    return new_state, metrics

  return step_fn


@functools.lru_cache(maxsize=16)
def _compiled_train_step(spec, settings: StepSettings, mesh):
  rep = replicated(mesh)
  fn = train_step_fn(model_lib.make_model(spec), settings)
  return jax.jit(fn, in_shardings=(rep, batch_sharding(mesh), rep), out_shardings=(rep, rep),
                 donate_argnums=(0,))


def make_train_step(spec, settings: TrainSettings, mesh, steps_per_epoch: int):
  """``jit``-compiled data-parallel train step ``(state, batch, base_key) -> (state, metrics)``.

  Args:
    spec: the ModelSpec (``model.spec``).
    settings: ``TrainSettings.from_config(config)`` (``batch_size`` is checked to divide
      over the mesh; the step is compiled for ``settings.step_settings(steps_per_epoch)``).
    mesh: from :func:`make_mesh`.
    steps_per_epoch: for the per-epoch lr decay.

  ``batch`` is the global uint8 batch [B, H, W, C] (from :func:`global_batch`),
  ``base_key`` the run's training key (step n uses ``fold_in(base_key, n)``). The state
  argument is donated: do not use it after the call. Cached: the same (spec, settings,
  mesh) returns the same compiled function.
  """
  check_batch_divisible(settings.batch_size, mesh)
  return _compiled_train_step(spec, settings.step_settings(steps_per_epoch), mesh)


@functools.lru_cache(maxsize=16)
def _compiled_init(spec, settings: StepSettings, mesh):
  """(init: (key, batch) -> variables, to_state: variables -> TrainState), jitted."""
  model = model_lib.make_model(spec)
  tx = make_optimizer(settings)
  rep = replicated(mesh)

  def init(key, x):
    variables = model_lib.init_variables(model, key, x)
    return {'params': variables['params'], 'batch_stats': variables.get('batch_stats', {})}

  def to_state(variables):
    return create_train_state(variables, tx, ema=settings.ema_decay > 0)

  return (jax.jit(init, in_shardings=(rep, batch_sharding(mesh)), out_shardings=rep),
          jax.jit(to_state, out_shardings=rep))


def make_state_init(spec, settings: TrainSettings, mesh, steps_per_epoch: int):
  """Jitted ``(init, to_state)``: ``init(key, global_batch) -> {'params', 'batch_stats'}``
  (data-dependent ActNorm initialisation) and ``to_state(variables) -> TrainState``, both
  replicated over the mesh. Cached like :func:`make_train_step`."""
  check_batch_divisible(settings.batch_size, mesh)
  return _compiled_init(spec, settings.step_settings(steps_per_epoch), mesh)


# ---------------------------------------------------------------------------
# The loop.
# ---------------------------------------------------------------------------


def _tree_summary(tree) -> dict:
  return {jax.tree_util.keystr(path): (tuple(x.shape), str(x.dtype))
          for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _check_variables_match(variables, abstract, where: str) -> None:
  got, want = _tree_summary(variables), _tree_summary(abstract)
  if got != want:
    missing = sorted(set(want) - set(got))
    extra = sorted(set(got) - set(want))
    shapes = sorted(k for k in set(got) & set(want) if got[k][0] != want[k][0])
    raise CheckpointError(
        f'the variables in {where} do not fit the configured model: missing {missing[:5]}, '
        f'unexpected {extra[:5]}, shape mismatches {[(k, got[k][0], want[k][0]) for k in shapes[:5]]}; '
        'check the model config')


class _MetricsLog:
  """metrics.jsonl and TensorBoard scalars (process 0 only)."""

  def __init__(self, workdir: pathlib.Path, resume_step: Optional[int], enabled: bool):
    self.enabled = enabled
    self.path = workdir / METRICS_FILE
    self.writer = None
    if not enabled:
      return
    workdir.mkdir(parents=True, exist_ok=True)
    if resume_step is not None and self.path.exists():
      # Drop records the interrupted run wrote after the checkpoint we resume from.
      kept = [line for line in self.path.read_text().splitlines()
              if line.strip() and json.loads(line).get('step', 0) <= resume_step]
      self.path.write_text(''.join(line + '\n' for line in kept))
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    # TensorBoard drops the events at steps >= purge_step: those after the checkpoint, not
    # the ones at its own step (a rerun of a finished run would lose its last points).
    purge = None if resume_step is None else resume_step + 1
    self.writer = SummaryWriter(str(workdir / TENSORBOARD_DIR), purge_step=purge)

  def write(self, record: Mapping, prefix: str) -> None:
    if not self.enabled:
      return
    record = {k: (v.item() if hasattr(v, 'item') else v) for k, v in record.items()}
    with self.path.open('a') as f:
      f.write(json.dumps(record, sort_keys=True) + '\n')
    for k, v in record.items():
      if k not in ('step',) and isinstance(v, (int, float)) and not isinstance(v, bool):
        self.writer.add_scalar(f'{prefix}/{k}', v, record['step'])
    self.writer.flush()

  def close(self):
    if self.writer is not None:
      self.writer.close()


_all_finite_jit = jax.jit(_all_finite)


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
  t = config.train
  workdir = pathlib.Path(workdir).resolve()
  # ---- everything that can fail on the config, before any compilation ----
  spec = spec_from_config(config.model)
  phase = TrainSettings.from_config(config).phase
  EvalSettings.from_config(config)   # the loop reads eval.use_ema
  mesh = make_mesh()
  check_batch_divisible(t.batch_size, mesh)
  with contextlib.ExitStack() as cleanup:
    checkpointer = ckpt_lib.TrainCheckpointer(workdir, keep=int(t.keep_checkpoints))
    cleanup.callback(checkpointer.close)
    latest = checkpointer.latest_step()
    if latest is not None:
      ckpt_lib.check_model_config(
          checkpointer.stored_config(latest), config, f'--workdir {workdir}',
          'Use a new --workdir for a different model (the old one is left untouched).')
    elif config.get('checkpoint', ''):
      ckpt_lib.check_model_config(
          ckpt_lib.read_config(config.checkpoint), config,
          f'config.checkpoint {config.checkpoint}',
          "Set the model fields to the checkpoint's values, or use another checkpoint.")
    elif phase == 'finetune':
      raise ConfigError(
          "train.phase='finetune' needs a trained model: a checkpoint in --workdir (the "
          'pretraining run) or --config.checkpoint')
    iterator = data_lib.make_train_iterator(config, jax.process_index(), jax.process_count())
    cleanup.callback(iterator.close)
    return _train_loop(config, workdir, spec, mesh, checkpointer, latest, iterator, eval_fn,
                       sample_fn)


def _start_message(workdir, checkpoints, phase, latest, start_step, total_steps) -> str:
  """The first line a run prints: new, resumed, or already finished."""
  if start_step >= total_steps:
    return (f'already finished at step {start_step} of {total_steps}: nothing to do '
            f'(checkpoints in {checkpoints}, metrics in {workdir / METRICS_FILE})')
  if latest is not None:
    return f'resuming from step {start_step} of {total_steps} (checkpoint {checkpoints})'
  return f'starting a new run in {workdir}: {total_steps} steps ({phase})'


def _finish_message(workdir, checkpoints, step, seconds, best_metric, last_value, meta) -> str:
  """The last line a run prints: steps, time, last and best metric, where things are."""
  parts = [f'finished {step} steps in {seconds:.0f} s']
  if last_value is not None:
    parts.append(f'last {best_metric} {last_value:.4f}')
  if meta.get('best') is not None:
    parts.append(f'best {meta["best"]:.4f} at step {meta.get("best_step")} ({workdir / BEST_DIR})')
  return ('; '.join(parts) + f'; checkpoints in {checkpoints}, metrics in '
          f'{workdir / METRICS_FILE}, samples in {workdir / "samples"}')


def _train_loop(config, workdir, spec, mesh, checkpointer, latest, iterator, eval_fn,
                sample_fn) -> TrainState:
  """The body of train_and_evaluate once the checkpointer and the data iterator exist."""
  t = config.train
  phase = t.phase
  is_main = jax.process_index() == 0
  steps_per_epoch = iterator.steps_per_epoch

  train_settings = TrainSettings.from_config(config)
  settings = train_settings.step_settings(steps_per_epoch)
  init_fn, to_state_fn = _compiled_init(spec, settings, mesh)
  rep = replicated(mesh)
  local_shape = (int(t.batch_size) // jax.process_count(), *spec.image_shape)
  batch_struct = jax.ShapeDtypeStruct((int(t.batch_size), *spec.image_shape), jnp.uint8)
  init_key, train_key = jax.random.split(jax.random.PRNGKey(int(config.seed)))
  abstract_variables = jax.eval_shape(init_fn, init_key, batch_struct)
  abstract_state = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=rep),
                                jax.eval_shape(to_state_fn, abstract_variables))

  # ---- initial state: resume, converted checkpoint, or data-dependent init ----
  meta = {}
  first_batch = None
  if latest is not None:
    state, data_state, meta = checkpointer.restore(latest, abstract_state)
    if phase == 'pretrain' and meta.get('phase') == 'finetune':
      raise ConfigError(f"--workdir {workdir} holds a fine-tuning run; resume it with "
                        "--config.train.phase=finetune")
    iterator.set_state(data_state)
    logging.info('resumed from %s step %d', checkpointer.directory, latest)
  elif config.get('checkpoint', ''):
    variables = ckpt_lib.load_variables(config.checkpoint)
    _check_variables_match(variables, abstract_variables, config.checkpoint)
    state = to_state_fn(jax.device_put(variables, rep))
    logging.info('starting from the variables in %s', config.checkpoint)
  else:
    # Data-dependent (ActNorm) initialisation on the first batch, which step 0 then trains on.
    first_batch = next(iterator)
    state = to_state_fn(init_fn(init_key, global_batch(first_batch, mesh)))
  start_step = int(jax.device_get(state.step))

  if phase == 'finetune':
    if meta.get('phase') == 'finetune':
      finetune_start = int(meta['finetune_start_step'])
    else:
      finetune_start = start_step
      if latest is not None:
        logging.info('saving the pretrained variables to %s', workdir / PRETRAINED_DIR)
        ckpt_lib.save_variables(workdir / PRETRAINED_DIR, eval_variables(state, use_ema=False),
                                config, {'step': start_step})
    length = int(t.num_steps) if int(t.num_steps) > 0 else int(t.finetune_epochs) * steps_per_epoch
    total_steps = finetune_start + length
    meta = dict(meta, phase='finetune', finetune_start_step=finetune_start)
  else:
    total_steps = int(t.num_steps) if int(t.num_steps) > 0 else int(t.epochs) * steps_per_epoch
    meta = dict(meta, phase='pretrain')
  best_metric = t.best_metric
  use_ema = config.eval.use_ema

  train_step = make_train_step(spec, train_settings, mesh, steps_per_epoch)
  # A fresh start also drops the records of an earlier attempt killed before its first
  # checkpoint.
  log = _MetricsLog(workdir, start_step, is_main)
  max_bad = int(t.max_nonfinite_in_row)
  log_every = int(t.log_every)
  eval_every = int(t.eval_every_epochs)
  sample_every = int(t.sample_every_epochs)

  from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top

  def say(message):
    """One line of the run's story on the console (process 0), above the progress bar."""
    if is_main:
      tqdm.write(message)

  started = time.perf_counter()
  say(_start_message(workdir, checkpointer.directory, phase, latest, start_step, total_steps))
  if start_step >= total_steps:
    log.close()
    return state
  progress = tqdm(total=total_steps, initial=start_step, disable=not is_main,
                  unit='step', dynamic_ncols=True, desc=f'{phase} (compiling)')
  window = {'bpd_sum': 0.0, 'finite': 0, 'skipped': 0, 'skipped_steps': [], 'steps': 0,
            'time': None, 'timed_steps': 0}
  saved = {'step': start_step if latest is not None else None}

  def save(step):
    if not _is_finite_tree((state.params, state.batch_stats, state.ema_params)):
      raise NonFiniteError(
          f'refusing to checkpoint step {step}: the parameters are not finite (the last '
          f'checkpoint in {checkpointer.directory} is kept). Lower train.lr, set '
          'train.grad_clip, or resume from that checkpoint')
    # orbax copies the arrays to the host before save() returns (the default, synchronous
    # device-to-host transfer), so the next step may donate the state's buffers.
    checkpointer.save(step, state, iterator.get_state(), config, meta)
    saved['step'] = step

  def handle(metrics):
    """Host side of one finished step (fetched one step late, so the device stays busy)."""
    m = jax.device_get(metrics)
    step = int(m['step']) + 1
    if int(m['skipped']):
      window['skipped'] += 1
      window['skipped_steps'].append(step)
      logging.warning('step %d: non-finite loss or gradient (loss %s), update skipped '
                      '(%d in a row)', step, m['train_bpd'], int(m['nonfinite_count']))
    else:
      window['bpd_sum'] += float(m['train_bpd'])
      window['finite'] += 1
    window['steps'] += 1
    now = time.perf_counter()
    if window['time'] is None:            # the first step includes compilation: not timed
      window['time'], window['timed_steps'] = now, 0
    else:
      window['timed_steps'] += 1
    if step % log_every == 0 or step == total_steps:
      elapsed = now - window['time']
      # None (JSON null) where undefined: no timed step yet, or every step skipped.
      img_per_s = (window['timed_steps'] * int(t.batch_size) / elapsed
                   if window['timed_steps'] and elapsed > 0 else None)
      bpd = window['bpd_sum'] / window['finite'] if window['finite'] else None
      record = {'step': step, 'epoch': step / steps_per_epoch, 'lr': float(m['lr']),
                'train_bpd': bpd, 'img_per_s': img_per_s, 'skipped': window['skipped'],
                'skipped_steps': list(window['skipped_steps']),
                'skipped_total': int(m['skipped_total']), 'grad_norm': float(m['grad_norm'])}
      log.write(record, 'train')
      progress.set_postfix(bpd=f'{bpd:.4f}' if bpd is not None else '-',
                           img_s=f'{img_per_s:.1f}' if img_per_s is not None else '-',
                           refresh=False)
      window.update(bpd_sum=0.0, finite=0, skipped=0, skipped_steps=[], steps=0, time=now,
                    timed_steps=0)
    if int(m['nonfinite_count']) >= max_bad:
      raise NonFiniteError(
          f'{int(m["nonfinite_count"])} consecutive steps (up to step {step}) had a non-finite '
          f'loss or gradient (train.max_nonfinite_in_row = {max_bad}); stopped without '
          'checkpointing them. Lower train.lr, set train.grad_clip, or resume from the last '
          f'checkpoint in {checkpointer.directory}')

  def run_hooks(step):
    epoch, rest = divmod(step, steps_per_epoch)
    end = step == total_steps
    if eval_fn is not None and ((rest == 0 and epoch % eval_every == 0) or end):
      results = eval_fn(state, step)
      if results:
        results = {k: float(v) for k, v in results.items()}
        log.write({'step': step, 'epoch': step / steps_per_epoch, **results}, 'eval')
        last_eval.update(results)
        say(f'step {step}: ' + ', '.join(f'{k} {v:.4f}' for k, v in results.items()))
        value = results.get(best_metric)
        if value is not None and math.isfinite(value) and value < meta.get('best', math.inf):
          meta['best'], meta['best_step'] = value, step
          ckpt_lib.save_variables(workdir / BEST_DIR, eval_variables(state, use_ema), config,
                                  {'step': step, best_metric: value})
    if sample_fn is not None and rest == 0 and epoch % sample_every == 0:
      sample_fn(state, step)

  last_eval = {}
  pending = None
  step = start_step
  stop = cleanup = None
  try:
    cleanup = _stop_signals()
    stop = cleanup.__enter__()
    while step < total_steps:
      if first_batch is not None:
        batch, first_batch = first_batch, None
      else:
        batch = next(iterator)
      if batch.shape != local_shape:
        raise DataError(f'training batch of shape {batch.shape}, expected {local_shape}')
      state, metrics = train_step(state, global_batch(batch, mesh), train_key)
      if step == start_step:
        progress.set_description(phase)   # the first call compiled the step
      step += 1
      progress.update(1)
      if pending is not None:
        handle(pending)
      pending = metrics
      at_epoch_end = step % steps_per_epoch == 0
      if step % int(t.checkpoint_every_steps) == 0 or step == total_steps or at_epoch_end:
        handle(pending)
        pending = None
        run_hooks(step)      # first, so that a new best metric is in the checkpoint's meta
        if step % int(t.checkpoint_every_steps) == 0 or step == total_steps:
          save(step)
        # img/s measures training only: restart the clock after hooks and checkpoints.
        window.update(time=time.perf_counter(), timed_steps=0)
      if stop['signal'] is not None and step < total_steps:
        if pending is not None:
          handle(pending)
          pending = None
        if saved['step'] != step:
          save(step)
        checkpointer.wait()
        raise TrainingInterrupted(stop['signal'], step, checkpointer.directory)
    if pending is not None:
      handle(pending)
    progress.close()
    say(_finish_message(workdir, checkpointer.directory, step, time.perf_counter() - started,
                        best_metric, last_eval.get(best_metric), meta))
  finally:
    progress.close()
    checkpointer.wait()
    log.close()
    if cleanup is not None:
      cleanup.__exit__(None, None, None)
  return state
