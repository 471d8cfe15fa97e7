"""A program that does not fit the accelerator's memory ends in one line with the fix
(denseflow_jax/device_memory.py). The real TPU compile that overflows a v5e chip is in
tests/test_accel_compile.py; here, the message XLA:TPU writes (copied from that compile)
and XLA:GPU's allocation failure, and training's handling of them."""
import jax
import pytest

from denseflow_jax import device_memory, train
from denseflow_jax.device_memory import DeviceMemoryError

TPU_MESSAGE = ('RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for '
               'HLO temporaries (56.00G) exceeds available HBM (15.75G).')
GPU_MESSAGE = ('RESOURCE_EXHAUSTED: Out of memory while trying to allocate 85899345920 bytes.')


def test_tpu_compile_error_names_batch_per_chip_need_capacity_and_fixes():
  error = device_memory.out_of_memory(jax.errors.JaxRuntimeError(TPU_MESSAGE), 'the train step',
                                      2048, 4, 'train.batch_size', 'TPU v5 lite')
  text = str(error)
  assert isinstance(error, DeviceMemoryError)
  assert 'the train step at 512 images per chip (train.batch_size = 2048 over 4 chips)' in text
  assert 'needs 56.00G of memory per chip, and a TPU v5 lite chip has 15.75G' in text
  assert '--config.train.batch_size=1024' in text
  assert '--config.model.remat=True' in text and '--config.model.compute_dtype=bfloat16' in text
  assert '\n' not in text
  assert error.compiler_says == TPU_MESSAGE     # XLA's own line, kept for the record


def test_gpu_allocation_failure_is_explained_too():
  text = str(device_memory.out_of_memory(jax.errors.JaxRuntimeError(GPU_MESSAGE), 'the train step',
                                         64, 1, 'train.batch_size'))
  assert '64 images per chip' in text and 'Out of memory while trying to allocate' in text


def test_other_runtime_errors_are_left_alone():
  assert device_memory.out_of_memory(jax.errors.JaxRuntimeError('INTERNAL: oops'), 'x', 8, 8,
                                     'train.batch_size') is None


def test_training_ends_in_the_one_line_error(make_config, tmp_path, monkeypatch):
  """The step of a real (tiny) run raises what XLA:TPU raises: train_and_evaluate raises
  DeviceMemoryError (main prints it as one error: line), not the runtime's error."""
  def step_that_does_not_fit(*args):
    raise jax.errors.JaxRuntimeError(TPU_MESSAGE)
  monkeypatch.setattr(train, 'make_train_step', lambda *args, **kwargs: step_that_does_not_fit)
  config = make_config({'train.num_steps': 2})
  with pytest.raises(DeviceMemoryError, match=r'at 2 images per chip \(train\.batch_size = 16 '
                                               r'over 8 chips\) needs 56\.00G'):
    train.train_and_evaluate(config, tmp_path / 'run')
