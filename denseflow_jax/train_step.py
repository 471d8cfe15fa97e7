"""The train state and the compiled, data-parallel train step.

    mesh = sharding.make_mesh()                               # 1-D, axis 'data'
    settings = TrainSettings.from_config(config)
    init, to_state = make_state_init(spec, settings, mesh, steps_per_epoch)
    state = to_state(init(init_key, sharding.global_batch(first_local_batch, mesh)))
    step_fn = make_train_step(spec, settings, mesh, steps_per_epoch)  # jitted once, donates state
    state, metrics = step_fn(state, sharding.global_batch(local_batch, mesh), base_key)

The loss is the mean bits/dim of the one-sample bound -log p(x) (DenseFlow.log_prob with
noise drawn by model.draw_noise). The RNG is never stored: step n uses
``fold_in(base_key, n)`` (VDM style), so a resumed run draws the same noise as an
uninterrupted one. The global batch is sharded over all devices of all processes
(sharding.py), the state replicated; results do not depend on the device or host count.

Non-finite steps: if the loss or any gradient is not finite the update is skipped inside
the step (params, batch_stats, opt_state and EMA stay bit-identical) and the counters
``nonfinite_count`` (in a row) and ``skipped_total`` grow.

Learning rate of the step that runs with ``state.step == s`` (s steps already taken),
with lr, W, g, E = train.lr, train.warmup_steps, train.gamma, steps_per_epoch:

    'official' (default):  lr(0) = lr
                           lr(s) = lr * min(1, s / W) * (g if s % E == 0 else 1)     s >= 1
    'official_torch2':     the same with lr(0) = 0
    'exponential':         lr(s) = lr * min(1, s / W) * g ** (s // E)
    W = 0, every schedule: lr(s) = lr * g ** (s // E)

'official' is what the official loop (experiments/image/experiment/baseline_flow.py,
optim/expdecay_flow.py) does under torch 1.8.1, the version its requirements.txt pins: a
warm-up scheduler stepped after every batch and ExponentialLR after every epoch drive one
lr. The warm-up sets ``base_lr * min(1, s / W)`` from the *base* lr after each step, so it
overwrites the decay, which multiplies the *current* lr: gamma scales only the first step
of each epoch and never compounds. Built second, ExponentialLR's constructor resets the lr
to the base lr under torch 1.8.1 (0 under torch 2.x, whose constructor keeps the lr the
warm-up set): hence step 1. Without ``--warmup`` the official code builds no warm-up
scheduler and ExponentialLR alone compounds: W = 0. 'exponential' is the paper's prose
(and this project before December 7). ../shared/fixtures/lockstep holds both official
sequences (tests/test_lockstep.py).

Fine-tune: constant ``train.finetune_lr`` from its first step, whatever the schedule, as
the official train_more.py: it builds no scheduler and sets the lr after loading the
checkpoint (the Adamax state continues, here as there).
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, Optional

import flax
import jax
import jax.numpy as jnp
import optax

from denseflow_jax import model as model_lib
from denseflow_jax.model import DenseFlow
from denseflow_jax.settings import StepSettings, TrainSettings
from denseflow_jax.sharding import batch_sharding, replicated


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


def uses_ema(state: TrainState, use_ema: bool) -> bool:
  """Whether :func:`eval_variables` gives the EMA parameters: asked for, and kept by the run."""
  return use_ema and state.ema_params is not None


def eval_variables(state: TrainState, use_ema: bool = True) -> dict:
  """{'params', 'batch_stats'} for evaluation / sampling (EMA params where kept)."""
  params = state.ema_params if uses_ema(state, use_ema) else state.params
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
  """lr as a pure function of the (global) step ``state.step``; the formulas are in the
  module docstring (a resumed run continues the schedule: the step is in the state)."""
  if settings.phase == 'finetune':
    finetune_lr = settings.finetune_lr
    return lambda step: jnp.full((), finetune_lr, jnp.float32)
  lr, warmup, gamma = settings.lr, settings.warmup_steps, settings.gamma
  steps_per_epoch, kind = settings.steps_per_epoch, settings.lr_schedule
  first_lr = 0.0 if kind == 'official_torch2' else lr

  def compounding(step):
    warm = jnp.minimum(1.0, step.astype(jnp.float32) / warmup) if warmup > 0 else 1.0
    epoch = (step // steps_per_epoch).astype(jnp.float32)
    return (lr * warm * gamma ** epoch).astype(jnp.float32)

  def official(step):
    warm = jnp.minimum(1.0, step.astype(jnp.float32) / warmup)
    epoch_start = (step > 0) & (step % steps_per_epoch == 0)
    later = lr * warm * jnp.where(epoch_start, gamma, 1.0)
    return jnp.where(step == 0, first_lr, later).astype(jnp.float32)

  chosen = compounding if kind == 'exponential' or warmup == 0 else official
  return lambda step: chosen(jnp.asarray(step))


# ---------------------------------------------------------------------------
# Train step.
# ---------------------------------------------------------------------------


def all_finite(tree) -> jax.Array:
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


def train_step_fn(model: DenseFlow, settings: StepSettings,
                  schedule: Optional[Callable[[Any], jax.Array]] = None,
                  noise_fn: Callable = model_lib.draw_noise):
  """The un-jitted train step ``(state, batch, base_key) -> (state, metrics)``.

  ``schedule(step) -> lr`` defaults to :func:`make_lr_schedule` of the settings, and
  ``noise_fn(spec, key, batch_size) -> noise`` to ``model.draw_noise``; a test hands in a
  recorded lr sequence or recorded noise through them (tests/test_lockstep.py). Training
  uses the defaults."""
  spec = model.spec
  tx = make_optimizer(settings)
  schedule = make_lr_schedule(settings) if schedule is None else schedule
  ema_decay = settings.ema_decay

  def loss_fn(params, batch_stats, batch, key):
    noise = noise_fn(spec, key, batch.shape[0])
    return train_loss(model, params, batch_stats, batch, noise)

  def step_fn(state: TrainState, batch, base_key):
    key = jax.random.fold_in(base_key, state.step)
    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, state.batch_stats, batch, key)
    grad_norm = optax.global_norm(grads)
    # A NaN or inf anywhere in the gradients makes their global norm NaN or inf: one
    # check instead of a reduction per parameter (~400 kernels per step on a GPU). It
    # also skips a step whose squared norm overflows float32 (|g| > 1.8e19), which no
    # useful step has.
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
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
    settings: the ``TrainSettings`` (the step is compiled for
      ``settings.step_settings(steps_per_epoch)``).
    mesh: from :func:`make_mesh`.
    steps_per_epoch: for the per-epoch lr decay.

  ``batch`` is the global uint8 batch [B, H, W, C] (from :func:`global_batch`; B divides
  over the mesh: ``sharding.split_batch`` checks it),
  ``base_key`` the run's training key (step n uses ``fold_in(base_key, n)``). The state
  argument is donated: do not use it after the call. Cached: the same (spec, settings,
  mesh) returns the same compiled function.
  """
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
  return _compiled_init(spec, settings.step_settings(steps_per_epoch), mesh)
