"""What each `--mode` of `denseflow_jax.main` does.

Every mode first builds the settings of each section it reads (settings.py: a ConfigError
naming the field), then loads data and the model: a bad value never waits for a load.
The modes that run a trained model get it from `loading.load_model`; `run` applies
`ablation.finalize_config` and checks the model and --workdir before any mode starts.
"""
import dataclasses
import functools
import json
import os
import time

import jax

from denseflow_jax import data, latent_tools
from denseflow_jax import evaluate as evaluate_lib
from denseflow_jax import fid as fid_lib
from denseflow_jax import model as model_lib
from denseflow_jax import train as train_lib
from denseflow_jax.ablation import finalize_config
from denseflow_jax.errors import ConfigError
from denseflow_jax.files import unused_stem
from denseflow_jax.loading import load_model, loaded_label
from denseflow_jax.settings import (DataSettings, EvalSettings, FidSettings, LatentSettings,
                                    RunSettings, SampleSettings, TrainSettings)
from denseflow_jax.spec import spec_from_config
from denseflow_jax.summary import format_table, parameter_table
from denseflow_jax.train_step import eval_variables
from denseflow_jax.workdir_lock import workdir_lock


def summary(config, workdir=None):
  """Trainable-parameter table of config.model, from shapes only (no --workdir needed)."""
  del workdir
  spec = spec_from_config(config.model)
  print(format_table(parameter_table(spec), spec))


def _loader(eval_settings: EvalSettings):
  """`load_model(config, workdir)` for every mode: loading.load_model with eval.use_ema
  and eval.which."""
  return lambda config, workdir: load_model(config, workdir, eval_settings.use_ema,
                                            eval_settings.which)


# Every mode that loads a model reads eval.use_ema; those that read images read data.*.


def evaluate(config, workdir):
  """Bits/dim on the test split: one-sample bound and IWBO with config.eval.k samples."""
  run = RunSettings.from_config(config)
  DataSettings.from_config(config)
  settings = EvalSettings.from_config(config)
  model, variables, loaded = _loader(settings)(config, workdir)
  key = jax.random.PRNGKey(run.seed)
  test = data.load_split(config, 'test')
  result = evaluate_lib.evaluate_dataset(model, variables, config, key, settings, source=test)
  images, mask = next(iter(data.iterate_eval(config, 'test', settings.batch_size,
                                             settings.num_examples, source=test)))  # first batch
  result['reconstruction_error'] = evaluate_lib.reconstruction_error(
      model, variables, images[mask], jax.random.fold_in(key, 10**6))
  result.update(loaded, seed=run.seed)
  path = evaluate_lib.write_eval_json(workdir, result,
                                      name=f'test_k{result["k"]}_{loaded_label(loaded)}')
  print(json.dumps(result, indent=1))
  print(f'wrote {path}')
  return result


def sample(config, workdir):
  """config.sample.num images at config.sample.temperature -> PNG grid and .npz."""
  run = RunSettings.from_config(config)
  eval_settings = EvalSettings.from_config(config)
  settings = SampleSettings.from_config(config)
  num, temperature = settings.num, settings.temperature
  model, variables, loaded = _loader(eval_settings)(config, workdir)
  key = jax.random.PRNGKey(run.seed)
  start = time.perf_counter()
  images = evaluate_lib.sample_images(model, variables, key, num, temperature,
                                      settings.batch_size)
  seconds = time.perf_counter() - start
  out_dir = os.path.join(workdir, 'samples')
  os.makedirs(out_dir, exist_ok=True)
  stem = unused_stem(os.path.join(
      out_dir, f'samples_T{temperature:g}_n{num}_{loaded_label(loaded)}'), ('.png', '.npz'))
  evaluate_lib.save_sample_grid(stem + '.png', images, num_bits=model.spec.num_bits)
  evaluate_lib.save_samples_npz(stem + '.npz', images, temperature, seconds)
  print(f'{num} samples at temperature {temperature:g} in {seconds:.2f} s '
        f'(including compilation) -> {stem}.png, {stem}.npz')
  return images


def interpolate(config, workdir):
  """Latent interpolation between pairs of test images -> WORKDIR/latent/ (latent_tools)."""
  RunSettings.from_config(config)
  DataSettings.from_config(config)
  eval_settings = EvalSettings.from_config(config)
  settings = LatentSettings.from_config(config)
  return latent_tools.interpolate(config, settings, workdir, _loader(eval_settings))


def reconstruct(config, workdir):
  """Test images next to inverse(encode(x)) and the largest error -> WORKDIR/latent/."""
  RunSettings.from_config(config)
  DataSettings.from_config(config)
  eval_settings = EvalSettings.from_config(config)
  settings = LatentSettings.from_config(config)
  return latent_tools.reconstruct(config, settings, workdir, _loader(eval_settings))


def sweep(config, workdir):
  """Samples at config.latent.temperatures (0 included), same noise per column."""
  RunSettings.from_config(config)
  eval_settings = EvalSettings.from_config(config)
  settings = LatentSettings.from_config(config)
  sample_settings = SampleSettings.from_config(config)
  return latent_tools.sweep(config, settings, workdir, _loader(eval_settings),
                            sample_settings.batch_size)


def fid(config, workdir):
  """FID of config.fid.num_samples samples against each of config.fid.splits (the data
  statistics are cached); writes WORKDIR/fid_T<temperature>_n<num>.json."""
  RunSettings.from_config(config)
  DataSettings.from_config(config)
  eval_settings = EvalSettings.from_config(config)
  settings = FidSettings.from_config(config)
  fid_lib.require_inception_weights(settings)
  return fid_lib.run_fid(config, settings, workdir, _loader(eval_settings))


# What --mode train's evaluation returns: the names train.best_metric may take.
TRAIN_METRICS = ('test_bpd',)


def train(config, workdir):
  """The official recipe with periodic test bits/dim (one-sample bound) and sample grids."""
  run = RunSettings.from_config(config)
  DataSettings.from_config(config)
  train_settings = TrainSettings.from_config(config)
  eval_settings = EvalSettings.from_config(config)
  sample_settings = SampleSettings.from_config(config)
  if train_settings.best_metric not in TRAIN_METRICS:
    # Any other name would never be found: WORKDIR/best would silently never be written.
    raise ConfigError(f'train.best_metric must be one of {TRAIN_METRICS} (what --mode train '
                      f'evaluates), got {train_settings.best_metric!r}')
  model = model_lib.make_model(config.model)
  key = jax.random.PRNGKey(run.seed + 1)
  log_prob_fn = evaluate_lib.make_log_prob_fn(model)
  samples_dir = os.path.join(workdir, 'samples')
  # The periodic evaluation is the one-sample bound (k = 1), with eval's batches.
  periodic = dataclasses.replace(eval_settings, k=1)

  @functools.cache
  def test_split():
    """Loaded at the first evaluation (after the training data's checks), then reused."""
    return data.load_split(config, 'test')

  def eval_fn(state, step):
    variables = eval_variables(state, eval_settings.use_ema)
    result = evaluate_lib.evaluate_dataset(model, variables, config, key, periodic,
                                           log_prob_fn=log_prob_fn, progress=False,
                                           source=test_split())
    return {'test_bpd': result['elbo_bpd']}

  def sample_fn(state, step):
    variables = eval_variables(state, eval_settings.use_ema)
    images = evaluate_lib.sample_images(model, variables, jax.random.fold_in(key, step),
                                        sample_settings.num, sample_settings.temperature,
                                        sample_settings.batch_size)
    os.makedirs(samples_dir, exist_ok=True)
    evaluate_lib.save_sample_grid(os.path.join(samples_dir, f'step_{step:08d}.png'), images,
                                  num_bits=model.spec.num_bits)

  return train_lib.train_and_evaluate(config, workdir, eval_fn=eval_fn, sample_fn=sample_fn)


def check_workdir_writable(workdir):
  """ConfigError if --workdir cannot be created or written (checked without creating it:
  the nearest existing ancestor must be a writable directory)."""
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


MODES = {'train': train, 'eval': evaluate, 'sample': sample, 'summary': summary,
         'interpolate': interpolate, 'reconstruct': reconstruct, 'sweep': sweep, 'fid': fid}


def run(mode: str, config, workdir):
  config = finalize_config(config)
  if mode not in MODES:
    raise ConfigError(f'unknown mode {mode!r}; choose one of {sorted(MODES)}')
  if mode != 'summary' and not workdir:
    raise ConfigError(f'--workdir is required for --mode={mode}')
  spec_from_config(config.model)   # every model error before anything is loaded or compiled
  if mode == 'summary':     # reads nothing from a workdir: no lock
    return MODES[mode](config, workdir)
  check_workdir_writable(workdir)
  # One run per workdir (workdir_lock.py): a second one is refused, naming the first.
  with workdir_lock(workdir, mode, is_primary=jax.process_index() == 0):
    return MODES[mode](config, workdir)
