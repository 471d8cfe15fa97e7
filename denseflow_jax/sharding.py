"""The data-parallel layout: a 1-D mesh over every device of every process, the global
batch sharded on its first axis ('data'), everything else replicated.

    mesh = make_mesh()                                   # process-major, axis 'data'
    x = global_batch(local_rows, mesh)                   # this process's rows -> global array

XLA inserts the gradient all-reduce; BatchNorm and ActNorm-init statistics are over the
global batch, so results do not depend on the device or host count
(tests/test_multihost.py).
"""
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from denseflow_jax.errors import ConfigError


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
