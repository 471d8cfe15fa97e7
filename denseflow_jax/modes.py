"""What each `--mode` of `denseflow_jax.main` does: one table, :data:`MODES`.

    modes.run('eval', config, workdir)

`run` applies `ablation.finalize_config`, then builds the settings of each section the
mode reads, once (settings.py / spec.py: a ConfigError naming the field), and checks
--workdir, before any data or model is loaded: a bad value never waits for a load. The
mode then gets those typed settings; only the loaders of trained models
(`loading.load_model`) and of training (`train.train_and_evaluate`, which records the
config in its checkpoints) see the config itself. `main.py` reads its choices and its
help from the same table.
"""
import contextlib
import dataclasses
import functools
import json
import os
import time
from typing import Any, Callable, Optional, Tuple

import jax
import numpy as np
from jax.experimental import multihost_utils

from denseflow_jax import data, latent_tools, outputs, sampling
from denseflow_jax import evaluate as evaluate_lib
from denseflow_jax import fid as fid_lib
from denseflow_jax import model as model_lib
from denseflow_jax import train as train_lib
from denseflow_jax.ablation import finalize_config
from denseflow_jax.bucket_lock import bucket_lock
from denseflow_jax.errors import ConfigError, DenseFlowError, WorkdirBusyError
from denseflow_jax.files import as_path, is_bucket, unused_stem
from denseflow_jax.loading import load_model, loaded_label
from denseflow_jax.run_story import SAMPLES_DIR
from denseflow_jax.settings import Settings
from denseflow_jax.summary import format_table, parameter_table
from denseflow_jax.train_step import eval_variables
from denseflow_jax.training_data import read_data_top_level
from denseflow_jax.workdir_lock import workdir_lock


def _load_trained(config, s: Settings, workdir):
  """(model, variables, loaded) of every mode that runs a trained model: loading.load_model
  with eval.use_ema and eval.which."""
  return load_model(config, workdir, s.eval.use_ema, s.eval.which)


def _test_split(s: Settings):
  return data.load_split(s.data, 'test', model=s.model)


# ---------------------------------------------------------------- the modes
# Each takes (config, settings, workdir); config only for the loaders named above.


def summary(config, s: Settings, workdir):
  """Trainable-parameter table of config.model, from shapes only (no --workdir needed)."""
  del config, workdir
  print(format_table(parameter_table(s.model), s.model))


def evaluate(config, s: Settings, workdir):
  """Bits/dim on the test split: one-sample bound and IWBO with eval.k samples."""
  model, variables, loaded = _load_trained(config, s, workdir)
  key = jax.random.PRNGKey(s.run.seed)
  test = _test_split(s)
  result = evaluate_lib.evaluate_dataset(model, variables, test, key, s.eval,
                                         prefetch=s.data.prefetch)
  first = data.eval_examples(test, s.eval.num_examples)
  images = np.stack([test[i] for i in range(min(first, s.eval.batch_size))])  # 1st batch
  result['reconstruction_error'] = evaluate_lib.reconstruction_error(
      model, variables, images, jax.random.fold_in(key, 10**6))
  result.update(loaded, seed=s.run.seed)
  path = outputs.write_eval_json(workdir, result,
                                 name=f'test_k{result["k"]}_{loaded_label(loaded)}')
  print(json.dumps(result, indent=1))
  print(f'wrote {path}')
  return result


def sample(config, s: Settings, workdir):
  """sample.num images at sample.temperature -> PNG grid and .npz in WORKDIR/samples."""
  num, temperature = s.sample.num, s.sample.temperature
  model, variables, loaded = _load_trained(config, s, workdir)
  start = time.perf_counter()
  images = sampling.sample_images(model, variables, jax.random.PRNGKey(s.run.seed), num,
                                  temperature, s.sample.batch_size)
  seconds = time.perf_counter() - start
  stem = unused_stem(as_path(workdir) / SAMPLES_DIR /
                     f'samples_T{temperature:g}_n{num}_{loaded_label(loaded)}', ('.png', '.npz'))
  outputs.save_sample_grid(stem + '.png', images, num_bits=model.spec.num_bits,
                           top=loaded['data_top_level'])
  outputs.save_samples_npz(stem + '.npz', images, temperature, seconds)
  print(f'{num} samples at temperature {temperature:g} in {seconds:.2f} s '
        f'(including compilation) -> {stem}.png, {stem}.npz')
  return images


def latent_mode(tool: Callable):
  """interpolate / reconstruct: `tool` of latent_tools on the test split, from a trained
  model -> WORKDIR/latent/."""
  def run_tool(config, s: Settings, workdir):
    return tool(_test_split(s), s.latent, s.run.seed, workdir,
                lambda: _load_trained(config, s, workdir))
  run_tool.__doc__ = tool.__doc__
  return run_tool


def sweep(config, s: Settings, workdir):
  """Samples at latent.temperatures (0 included), the same noise per column."""
  return latent_tools.sweep(s.latent, s.run.seed, workdir,
                            lambda: _load_trained(config, s, workdir), s.sample.batch_size)


def fid(config, s: Settings, workdir):
  """FID of fid.num_samples samples against each of fid.splits (the data statistics are
  cached); writes WORKDIR/fid_T<temperature>_n<num>_<loaded>.json."""
  fid_lib.require_inception_weights(s.fid)
  return fid_lib.run_fid(s.fid, s.data, s.run.seed, workdir,
                         lambda: _load_trained(config, s, workdir))


# What --mode train's evaluation returns: the names train.best_metric may take.
TRAIN_METRICS = ('test_bpd',)


def train(config, s: Settings, workdir):
  """The official recipe with periodic test bits/dim (one-sample bound) and sample grids."""
  if s.train.best_metric not in TRAIN_METRICS:
    # Any other name would never be found: WORKDIR/best would silently never be written.
    raise ConfigError(f'train.best_metric must be one of {TRAIN_METRICS} (what --mode train '
                      f'evaluates), got {s.train.best_metric!r}')
  model = model_lib.make_model(s.model)
  key = jax.random.PRNGKey(s.run.seed + 1)
  log_prob_fn = evaluate_lib.make_log_prob_fn(model)
  samples_dir = as_path(workdir) / SAMPLES_DIR
  # The periodic evaluation is the one-sample bound (k = 1), with eval's batches.
  periodic = dataclasses.replace(s.eval, k=1)
  test_split = functools.cache(lambda: _test_split(s))   # at the first evaluation, once

  def eval_fn(state, step):
    variables = eval_variables(state, s.eval.prefer_ema)
    result = evaluate_lib.evaluate_dataset(model, variables, test_split(), key, periodic,
                                           prefetch=s.data.prefetch, log_prob_fn=log_prob_fn,
                                           progress=False)
    return {'test_bpd': result['elbo_bpd']}

  def sample_fn(state, step):
    variables = eval_variables(state, s.eval.prefer_ema)
    images = sampling.sample_images(model, variables, jax.random.fold_in(key, step),
                                    s.sample.num, s.sample.temperature, s.sample.batch_size)
    outputs.save_sample_grid(samples_dir / f'step_{step:08d}.png', images,
                             num_bits=model.spec.num_bits,
                             top=read_data_top_level(workdir, model.spec.num_bits))

  return train_lib.train_and_evaluate(config, workdir, eval_fn=eval_fn, sample_fn=sample_fn,
                                      settings=s)


@dataclasses.dataclass(frozen=True)
class Mode:
  """One --mode: what it runs, the config sections it reads besides the model and the top
  level, its line in --help, and whether it writes into --workdir (needs one)."""
  run: Callable[[Any, Settings, str], Any]
  sections: Tuple[str, ...]
  help: str
  writes: bool = True
  # Checks that need the devices or the workdir's checkpoint, run before the workdir lock
  # is taken: a refusal writes nothing.
  check: Optional[Callable[[Settings, str], Any]] = None


MODES = {
    'train': Mode(train, ('data', 'train', 'eval', 'sample'),
                  "train (default); the same command resumes from DIR's latest checkpoint",
                  check=lambda s, workdir: train_lib.split_train_batch(s.train.batch_size,
                                                                       workdir)),
    'eval': Mode(evaluate, ('data', 'eval'),
                 'test bits/dim: one-sample bound and IWBO with config.eval.k samples'),
    'sample': Mode(sample, ('eval', 'sample'), 'config.sample.num images to DIR/samples/'),
    'summary': Mode(summary, (), 'parameter table (no --workdir needed)', writes=False),
    'interpolate': Mode(latent_mode(latent_tools.interpolate), ('data', 'eval', 'latent'),
                        'latent interpolations between test images (DIR/latent/)'),
    'reconstruct': Mode(latent_mode(latent_tools.reconstruct), ('data', 'eval', 'latent'),
                        'test images and their reconstructions (DIR/latent/)'),
    'sweep': Mode(sweep, ('eval', 'latent', 'sample'),
                  'samples at several temperatures (DIR/latent/)'),
    'fid': Mode(fid, ('data', 'eval', 'fid'),
                'FID against the data (needs converted Inception weights, README "FID")'),
}


def check_workdir_writable(workdir):
  """ConfigError if --workdir cannot be created or written (checked without creating it:
  the nearest existing ancestor must be a writable directory). A gs:// workdir is checked
  by taking its lock (bucket_lock: a missing bucket, credentials, permissions)."""
  if is_bucket(workdir):
    return
  path = os.path.abspath(workdir)
  existing = path
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    raise ConfigError(f'--workdir {workdir} cannot be created: {existing} is a file, not a '
                      'directory; choose another --workdir')
  if not os.access(existing, os.W_OK | os.X_OK):
    raise ConfigError(f'--workdir {workdir} cannot be written: no write permission on '
                      f'{existing}; choose another --workdir or fix the permissions')


def run(mode: str, config, workdir):
  """Runs `mode` (a key of MODES) with `config` in `workdir`; returns what the mode returns."""
  if mode not in MODES:
    raise ConfigError(f'unknown mode {mode!r}; choose one of {sorted(MODES)}')
  spec = MODES[mode]
  config = finalize_config(config)
  if spec.writes and not workdir:
    raise ConfigError(f'--workdir is required for --mode={mode}')
  settings = Settings.from_config(config, spec.sections)   # every check before a load
  if not spec.writes:       # reads nothing from a workdir: no lock
    return spec.run(config, settings, workdir)
  check_workdir_writable(workdir)
  if spec.check is not None:
    spec.check(settings, workdir)
  with _one_run(workdir, mode):
    return spec.run(config, settings, workdir)


@contextlib.contextmanager
def _one_run(workdir, mode: str):
  """One run per workdir (workdir_lock.py; bucket_lock.py for gs://): process 0 takes the
  lock and tells the other processes of a multi-host job whether it could, so that a
  refused job stops on every host (not only on process 0, leaving the others waiting at
  their first collective)."""
  with contextlib.ExitStack() as stack:
    refused = None
    try:
      lock = bucket_lock if is_bucket(workdir) else workdir_lock
      stack.enter_context(lock(workdir, mode, is_primary=jax.process_index() == 0))
    except DenseFlowError as error:
      refused = error
    if jax.process_count() > 1:
      taken = int(multihost_utils.broadcast_one_to_all(np.int32(refused is None)))
      if not taken and refused is None:
        refused = WorkdirBusyError(
            f'--workdir {workdir}: process 0 of this job could not take the workdir lock '
            '(its error line says why, e.g. another run holding it); every process stops')
    if refused is not None:
      raise refused
    yield
