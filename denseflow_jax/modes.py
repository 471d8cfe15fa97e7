"""What each `--mode` of `denseflow_jax.main` does."""
import functools
import json
import os
import time

from denseflow_jax import ablation
from denseflow_jax.errors import ConfigError
from denseflow_jax.spec import spec_from_config


def finalize_config(config):
  """Derived fields that depend on command-line overrides (e.g. the ablation row)."""
  if 'ablation_row' in config:
    with config.unlocked():
      ablation.apply_row(config)
  return config


def summary(config, workdir=None):
  from denseflow_jax.summary import format_table, parameter_table
  del workdir
  spec = spec_from_config(config.model)
  print(format_table(parameter_table(spec), spec))


def _model_and_variables(config, workdir):
  """The model and the variables to evaluate: `config.checkpoint` (e.g. a converted
  official model) when set, else the latest checkpoint of the workdir."""
  from denseflow_jax import checkpoint, model as model_lib
  model = model_lib.make_model(config.model)
  source = config.checkpoint or workdir
  if not config.checkpoint and not checkpoint.holds_model(workdir):
    raise checkpoint.CheckpointError(
        f'no checkpoint in {os.path.abspath(workdir)}: train first (python -m '
        f'denseflow_jax.main --config CONFIG --workdir {workdir}) or point '
        '--config.checkpoint at a converted model (python -m denseflow_jax.convert --help)')
  variables = checkpoint.load_variables(source, config, use_ema=config.eval.use_ema)
  return model, variables, source


def evaluate(config, workdir):
  """Bits/dim on the test split: one-sample bound and IWBO with config.eval.k samples."""
  import jax
  from denseflow_jax import data, evaluate as evaluate_lib
  model, variables, source = _model_and_variables(config, workdir)
  key = jax.random.PRNGKey(config.seed)
  test = data.load_split(config, 'test')
  result = evaluate_lib.evaluate_dataset(model, variables, config, key, k=config.eval.k,
                                         source=test)
  images, mask = next(iter(data.iterate_eval(config, 'test', source=test)))  # first (padded) batch
  result['reconstruction_error'] = evaluate_lib.reconstruction_error(
      model, variables, images[mask], jax.random.fold_in(key, 10**6))
  result['checkpoint'] = os.fspath(source)
  path = evaluate_lib.write_eval_json(workdir, result, name=f'test_k{result["k"]}')
  print(json.dumps(result, indent=1))
  print(f'wrote {path}')
  return result


def sample(config, workdir):
  """config.sample.num images at config.sample.temperature -> PNG grid and .npz."""
  import jax
  from denseflow_jax import evaluate as evaluate_lib
  num, temperature = int(config.sample.num), float(config.sample.temperature)
  if num < 1:
    raise ConfigError(f'sample.num must be at least 1, got {num}')
  if not temperature > 0:
    raise ConfigError(f'sample.temperature must be positive, got {temperature} '
                      '(1.0 is the model; 0.7 is a common choice for nicer samples)')
  model, variables, _ = _model_and_variables(config, workdir)
  key = jax.random.PRNGKey(config.seed)
  start = time.perf_counter()
  images = evaluate_lib.sample_images(model, variables, key, num, temperature,
                                      config.sample.batch_size)
  seconds = time.perf_counter() - start
  out_dir = os.path.join(workdir, 'samples')
  os.makedirs(out_dir, exist_ok=True)
  stem = os.path.join(out_dir, f'samples_T{temperature:g}_n{num}')
  evaluate_lib.save_sample_grid(stem + '.png', images, num_bits=model.spec.num_bits)
  evaluate_lib.save_samples_npz(stem + '.npz', images, temperature, seconds)
  print(f'{num} samples at temperature {temperature:g} in {seconds:.2f} s '
        f'(including compilation) -> {stem}.png, {stem}.npz')
  return images


def interpolate(config, workdir):
  """Latent interpolation between pairs of test images -> WORKDIR/latent/ (latent_tools)."""
  from denseflow_jax import latent_tools
  return latent_tools.interpolate(config, workdir, _model_and_variables)


def reconstruct(config, workdir):
  """Test images next to inverse(encode(x)) and the largest error -> WORKDIR/latent/."""
  from denseflow_jax import latent_tools
  return latent_tools.reconstruct(config, workdir, _model_and_variables)


def sweep(config, workdir):
  """Samples at config.latent.temperatures (0 included), same noise per column."""
  from denseflow_jax import latent_tools
  return latent_tools.sweep(config, workdir, _model_and_variables)


def fid(config, workdir):
  """FID of config.fid.num_samples samples against each of config.fid.splits (the data
  statistics are cached); writes WORKDIR/fid_T<temperature>_n<num>.json."""
  from denseflow_jax import fid as fid_lib
  return fid_lib.run_fid(config, workdir, _model_and_variables)


def train(config, workdir):
  """The official recipe with periodic test bits/dim (one-sample bound) and sample grids."""
  import jax
  from denseflow_jax import data, evaluate as evaluate_lib, model as model_lib, train as train_lib
  model = model_lib.make_model(config.model)
  key = jax.random.PRNGKey(config.seed + 1)
  log_prob_fn = evaluate_lib.make_log_prob_fn(model)
  samples_dir = os.path.join(workdir, 'samples')

  @functools.cache
  def test_split():
    """Loaded at the first evaluation (after the training data's checks), then reused."""
    return data.load_split(config, 'test')

  def eval_fn(state, step):
    variables = train_lib.eval_variables(state, config.eval.use_ema)
    result = evaluate_lib.evaluate_dataset(model, variables, config, key, k=1,
                                           log_prob_fn=log_prob_fn, progress=False,
                                           source=test_split())
    return {'test_bpd': result['elbo_bpd']}

  def sample_fn(state, step):
    variables = train_lib.eval_variables(state, config.eval.use_ema)
    images = evaluate_lib.sample_images(model, variables, jax.random.fold_in(key, step),
                                        config.sample.num, config.sample.temperature,
                                        config.sample.batch_size)
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
  if mode != 'summary':
    check_workdir_writable(workdir)
  return MODES[mode](config, workdir)
