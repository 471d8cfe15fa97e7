"""What one gpu_bench.py run shares between its measurements: the config, the mesh, the
random images, the variables initialised once with the rolled model (step 1 of
gpu_bench.py's docstring), and what the plan has learnt so far (compile times, compiles
that outran their budget, the fastest train step for the profile). Part of
experiments/gpu_bench.py."""
import math
import time

import jax
import numpy as np

from bench_log import memory
from denseflow_jax import sharding, train_step
from denseflow_jax.settings import TrainSettings
from denseflow_jax.spec import spec_from_config

STEPS_PER_EPOCH = 1000


def tree_of(tree):
  """The (shape, dtype) of every leaf of `tree`."""
  return jax.tree.map(lambda a: (tuple(a.shape), str(a.dtype)), tree)


class Run:
  """The state of one run; the measurements (bench_train.py, bench_eval.py) read and
  update it in the plan's order."""

  def __init__(self, bench, base, device, steps):
    """`bench`: a bench_log.Bench; `base`: the config; `steps`: --steps."""
    self.bench = bench
    self.base = base
    self.device = device
    self.steps = steps
    # the config's scan_unroll, 0 (per platform) resolved for this backend: what runs
    self.unrolled = spec_from_config(base.model).unroll_for(jax.default_backend())
    self.eval_unroll = self.unrolled              # 1 once an unrolled compile was too slow
    self.mesh = sharding.make_mesh()
    self.rng = np.random.default_rng(0)
    self.key = jax.random.PRNGKey(0)
    self.variables = None      # initialised once, by init_variables
    self.shared_tree = None    # their tree_of
    self.to_state0 = None      # the rolled model's variables -> TrainState
    self.results = {}          # name -> its line
    self.verified = {(1, False)}   # (scan_unroll, remat) whose parameter tree was checked
    self.compile_seen = {}     # rolled? -> longest trace+lower+compile seen
    self.too_slow = {}         # rolled? -> the measurement whose compile outran its budget
    self.best = None           # (img/s, name, compiled, state, x) for the profile

  def setup(self, dtype, batch, remat, unroll):
    """(TrainSettings, ModelSpec) of the config with these settings."""
    config = self.base.copy_and_resolve_references()
    config.model.compute_dtype = dtype
    config.model.remat = remat
    config.model.scan_unroll = unroll
    config.train.batch_size = batch
    return TrainSettings.from_config(config), spec_from_config(config.model)

  def images(self, spec, batch):
    """A global batch of random images (never zeros) over the mesh."""
    local = batch // jax.process_count()
    return sharding.global_batch(
        self.rng.integers(0, 2 ** spec.num_bits, (local, *spec.image_shape), dtype=np.uint8),
        self.mesh)

  def eval_variables(self):
    """The shared variables as evaluation and sampling take them."""
    return {'params': self.variables['params'], 'batch_stats': self.variables['batch_stats']}

  def init_variables(self):
    """Step 1: the variables, once, with the rolled model, at the config's batch; emits
    the 'init' line."""
    self.bench.current = 'init'
    start = time.perf_counter()
    init_batch = int(self.base.train.batch_size)
    settings, spec = self.setup('float32', init_batch, False, 1)
    init, self.to_state0 = train_step.make_state_init(spec, settings, self.mesh,
                                                      STEPS_PER_EPOCH)
    self.variables = jax.block_until_ready(init(self.key, self.images(spec, init_batch)))
    self.shared_tree = tree_of(self.variables)
    parameters = sum(math.prod(a.shape) for a in jax.tree.leaves(self.variables['params']))
    self.bench.emit({'event': 'init', 'init_batch': init_batch, 'scan_unroll': 1,
                     'init_s': round(time.perf_counter() - start, 1),
                     'parameters': parameters, **memory(self.device)})

  def check_variables(self):
    """The shared variables must outlive every measurement (a train step donates its state)."""
    if any(a.is_deleted() for a in jax.tree.leaves(self.variables)):
      raise RuntimeError('the shared variables were donated away: copy them before to_state')

  def timed_calls(self, fn, t0, budget, then_again=False):
    """Bench.timed_calls with up to --steps calls."""
    return self.bench.timed_calls(fn, self.steps, t0, budget, then_again)
