"""Tests of denseflow_jax.checkpoint (no model compilation: arrays made by hand)."""
import json
import shutil

import jax
import jax.numpy as jnp
import pytest

from denseflow_jax import errors
from denseflow_jax import checkpoint as ckpt_lib
from denseflow_jax import loading
from denseflow_jax import training_data
from denseflow_jax import train
from denseflow_jax import train_step
from helpers import assert_trees_equal, fake_state, random_variables, tiny_config


@pytest.mark.parametrize('batch_stats', [True, False])
def test_variables_round_trip(tmp_path, batch_stats):
  variables = random_variables(batch_stats=batch_stats)
  config = tiny_config()
  ckpt_lib.save_variables(tmp_path / 'model', variables, config, {'step': 7})
  loaded = ckpt_lib.load_variables(tmp_path / 'model', config)
  assert_trees_equal(loaded, variables)
  assert ckpt_lib.read_metadata(tmp_path / 'model')['step'] == 7
  assert ckpt_lib.read_config(tmp_path / 'model')['model']['block_config'] == [2]
  # Saving again replaces the checkpoint.
  other = random_variables(seed=1, batch_stats=batch_stats)
  ckpt_lib.save_variables(tmp_path / 'model', other, config)
  assert_trees_equal(ckpt_lib.load_variables(tmp_path / 'model'), other)


def test_load_variables_refuses_other_model(tmp_path):
  config = tiny_config()
  ckpt_lib.save_variables(tmp_path / 'model', random_variables(), config)
  config.model.growth_rate = 4
  config.model.mid_channels = (16,)
  config.model.remat = True        # a performance knob: allowed to differ
  with pytest.raises(errors.CheckpointError) as info:
    ckpt_lib.load_variables(tmp_path / 'model', config)
  message = str(info.value)
  assert 'model.growth_rate: checkpoint 2, config 4' in message
  assert 'model.mid_channels: checkpoint [8], config [16]' in message
  assert 'remat' not in message


def test_load_variables_errors(tmp_path):
  with pytest.raises(errors.CheckpointError, match='does not exist'):
    ckpt_lib.load_variables(tmp_path / 'nothing')
  (tmp_path / 'empty').mkdir()
  with pytest.raises(errors.CheckpointError, match='neither a model checkpoint'):
    ckpt_lib.load_variables(tmp_path / 'empty')
  with pytest.raises(errors.CheckpointError, match='batch_stats'):
    ckpt_lib.save_variables(tmp_path / 'x', {'params': {}, 'cache': {}}, tiny_config())


def test_train_checkpoint_round_trip_and_retention(tmp_path):
  config = tiny_config()
  variables = jax.tree.map(jnp.asarray, random_variables())
  checkpointer = ckpt_lib.TrainCheckpointer(tmp_path, keep=2)
  assert checkpointer.latest_step() is None
  states = {}
  for step in (2, 4, 6):
    states[step] = fake_state(jax.tree.map(lambda x: x * step, variables), step=step)
    checkpointer.save(step, states[step], {'step': step, 'format': 'x'}, config,
                      {'phase': 'pretrain'})
  checkpointer.wait()
  assert checkpointer.all_steps() == [4, 6]
  abstract = jax.eval_shape(lambda: fake_state(variables))
  state, data_state, meta = checkpointer.restore(6, abstract)
  assert isinstance(state, train_step.TrainState)
  assert_trees_equal(jax.device_get(state), jax.device_get(states[6]))
  assert data_state == {'step': 6, 'format': 'x'}
  assert meta['phase'] == 'pretrain' and meta['step'] == 6
  assert checkpointer.stored_config(6) == ckpt_lib.config_to_dict(config)

  # EMA on / off changes the state's structure: a clear error, not a crash.
  with pytest.raises(errors.CheckpointError, match='train.ema_decay'):
    checkpointer.restore(6, jax.eval_shape(lambda: fake_state(variables, ema=False)))

  # The latest checkpoint's variables, plain or EMA, read as standalone variables.
  loaded = ckpt_lib.load_variables(tmp_path, config)
  assert_trees_equal(loaded['params'], jax.device_get(states[6].params))
  assert_trees_equal(loaded['batch_stats'], jax.device_get(states[6].batch_stats))
  ema = ckpt_lib.load_variables(tmp_path / ckpt_lib.CHECKPOINTS_DIR, use_ema=True)
  assert_trees_equal(ema['params'], jax.device_get(states[6].ema_params))


def test_incomplete_checkpoints_are_never_restored(tmp_path):
  config = tiny_config()
  checkpointer = ckpt_lib.TrainCheckpointer(tmp_path, keep=3)
  checkpointer.save(4, fake_state(random_variables()), {}, config, {})
  checkpointer.wait()
  directory = tmp_path / ckpt_lib.CHECKPOINTS_DIR
  # An interrupted orbax save (temporary name) and a half-copied step directory.
  (directory / '9.orbax-checkpoint-tmp-1234' / 'state').mkdir(parents=True)
  shutil.copytree(directory / '4', directory / '8')
  shutil.rmtree(directory / '8' / 'data')
  (directory / '7' / 'state').mkdir(parents=True)
  assert ckpt_lib.TrainCheckpointer(tmp_path).latest_step() == 4
  assert ckpt_lib.TrainCheckpointer(tmp_path).all_steps() == [4]


def test_workdir_with_other_model_is_refused(tmp_path):
  """train_and_evaluate checks the stored model config before any data or compilation."""
  config = tiny_config()
  config.train.num_steps = 1
  checkpointer = ckpt_lib.TrainCheckpointer(tmp_path, keep=3)
  checkpointer.save(1, fake_state(random_variables()), {}, config, {'phase': 'pretrain'})
  checkpointer.wait()
  before = sorted(str(p) for p in tmp_path.rglob('*'))
  config.model.block_config = (3,)
  config.model.layers_config = (2,)
  with pytest.raises(errors.CheckpointError) as info:
    train.train_and_evaluate(config, tmp_path)
  message = str(info.value)
  assert 'model.block_config: checkpoint [2], config [3]' in message
  assert 'model.layers_config: checkpoint [1], config [2]' in message
  assert 'new --workdir' in message
  assert sorted(str(p) for p in tmp_path.rglob('*')) == before


def test_model_config_diff_ignores_tuple_vs_list():
  config = tiny_config()
  stored = json.loads(config.to_json_best_effort())
  assert ckpt_lib.model_config_diff(stored, config) == {}
  config.model.compute_dtype = 'bfloat16'
  assert ckpt_lib.model_config_diff(stored, config) == {}
  config.model.noise = 'white'
  assert ckpt_lib.model_config_diff(stored, config) == {
      'noise': ('preconditioned', 'white')}


def test_load_model_says_what_it_loaded_from_config_checkpoint(tmp_path):
  config = tiny_config()
  variables = random_variables()
  ckpt_lib.save_variables(tmp_path / 'converted', variables, config)   # says nothing more
  ckpt_lib.save_variables(tmp_path / 'best', variables, config, {'step': 7, 'parameters': 'ema'})
  for name, step, parameters, label in (('converted', None, None, 'checkpoint'),
                                        ('best', 7, 'ema', 'checkpoint_ema')):
    config.checkpoint = str(tmp_path / name)
    _, got, loaded = loading.load_model(config, str(tmp_path / 'unused'), use_ema=False)
    assert_trees_equal(got, variables)
    assert loaded == {'checkpoint': str(tmp_path / name), 'which': 'config.checkpoint',
                      'step': step, 'parameters': parameters, 'data_top_level': None}
    assert loading.loaded_label(loaded) == label


def _fake_run(workdir, ema: bool):
  """A training workdir with one checkpoint (EMA parameters or none) and WORKDIR/best."""
  config = tiny_config()
  checkpointer = ckpt_lib.TrainCheckpointer(workdir, keep=3)
  checkpointer.save(2, fake_state(random_variables(), ema=ema, step=2), {}, config,
                    {'phase': 'pretrain'})
  checkpointer.wait()
  checkpointer.close()
  ckpt_lib.save_variables(workdir / ckpt_lib.BEST_DIR, random_variables(), config,
                          {'step': 2, 'parameters': 'ema' if ema else 'raw'})
  return config


def test_data_top_level_is_read_from_the_run_or_falls_back(tmp_path, caplog):
  """The top level --mode train records in WORKDIR/training_data.json reaches load_model for
  the latest checkpoint, WORKDIR/best and a --config.checkpoint into the run; without the
  record (old runs, converted models) or with one of another num_bits it is None, and the
  grids fall back to 2^bits - 1."""
  workdir = tmp_path / 'run'
  config = _fake_run(workdir, ema=False)
  ckpt_lib.save_variables(tmp_path / 'converted', random_variables(), config)

  def top(which='latest', checkpoint=''):
    config.checkpoint = checkpoint
    return loading.load_model(config, str(workdir), use_ema=False, which=which)[2][
        'data_top_level']

  assert top() is None and top('best') is None               # no record: the fallback
  training_data.write_data_record(workdir, 'digits', 5, 16, 'digits: values 0..16')
  assert json.loads((workdir / training_data.DATA_RECORD_FILE).read_text())['top_level'] == 16
  assert top() == 16 and top('best') == 16
  assert top(checkpoint=str(workdir / ckpt_lib.BEST_DIR)) == 16
  assert top(checkpoint=str(workdir / ckpt_lib.CHECKPOINTS_DIR)) == 16
  assert top(checkpoint=str(tmp_path / 'converted')) is None
  training_data.write_data_record(workdir, 'npz', 4, 12, 'the largest value of the npz train array')
  with caplog.at_level('WARNING'):
    assert top() is None
  assert 'does not fit this 5-bit model' in caplog.text
  (workdir / training_data.DATA_RECORD_FILE).write_text('{"top_')
  assert top() is None


@pytest.mark.parametrize('ema', [False, True])
def test_ema_asked_for_but_absent_is_said_on_stderr(tmp_path, capsys, ema):
  """eval.use_ema=True on a checkpoint without EMA parameters: one line on stderr, for the
  latest checkpoint and for a WORKDIR/best saved from the raw parameters; nothing when the
  EMA parameters exist or when they were not asked for. The default (None) takes the EMA
  parameters where the run kept them, the raw ones otherwise, silently."""
  workdir = tmp_path / 'run'
  config = _fake_run(workdir, ema=ema)
  assert config.eval.use_ema is None       # the default: follow the run
  for which in ('latest', 'best'):
    for use_ema in (None, False, True):
      _, _, loaded = loading.load_model(config, str(workdir), use_ema=use_ema, which=which)
      err = capsys.readouterr().err
      # (WORKDIR/best holds what training chose, whatever is asked now.)
      kept = ema and (use_ema is not False or which == 'best')
      assert loaded['parameters'] == ('ema' if kept else 'raw'), (which, use_ema)
      if use_ema and not ema:
        assert err.splitlines() == [loading.no_ema_note(loaded['checkpoint'])], err
      else:
        assert 'note:' not in err, err
  if not ema:
    assert loading.no_ema_note(workdir) == (
        f'note: eval.use_ema=True but {workdir} holds no EMA parameters (trained with '
        'train.ema_decay=0); using the raw parameters')
    assert 'eval.use_ema=False' in loading.no_ema_note(workdir / ckpt_lib.BEST_DIR)
