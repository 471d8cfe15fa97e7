"""The data-parallel layout: a 1-D mesh over every device of every process, the global
batch sharded on its first axis ('data'), everything else replicated.

    mesh = make_mesh()                                   # process-major, axis 'data'
    x = global_batch(local_rows, mesh)                   # this process's rows -> global array

XLA inserts the gradient all-reduce; BatchNorm and ActNorm-init statistics are over the
global batch, so results do not depend on the device or host count
(tests/test_multihost.py).
"""
import dataclasses
import math

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


@dataclasses.dataclass(frozen=True)
class BatchSplit:
  """A global batch of ``size`` rows and this process's share of it.

  The one check that a batch divides over the devices (``device_count``, over all
  processes; a multiple of ``process_count``), and the one computation of the rows a
  process feeds: process p gets rows ``[p * local_size, (p + 1) * local_size)``. ``field``
  names the setting the size comes from, for the error (a ConfigError naming the fix).
  Build it for a run with :func:`split_batch`.
  """
  size: int
  field: str = 'the batch size'
  process_index: int = 0
  process_count: int = 1
  device_count: int = 1

  def __post_init__(self):
    if not 0 <= self.process_index < self.process_count:
      raise ValueError(f'process_index {self.process_index} is not in [0, {self.process_count})')
    n, over = batch_divisor(self.device_count, self.process_count)
    if int(self.size) <= 0 or int(self.size) % n:
      raise ConfigError(
          f'{self.field} = {self.size} (the global batch) does not divide over {over}; '
          f'set --config.{self.field} to {multiples_text(self.size, n)}')

  @property
  def local_size(self) -> int:
    """The rows this process feeds: size // process_count."""
    return int(self.size) // self.process_count

  @property
  def start(self) -> int:
    """This process's first row in the global batch."""
    return self.process_index * self.local_size


def batch_divisor(device_count: int, process_count: int) -> tuple:
  """(n, 'the 8 devices'): a global batch must be a multiple of n (every device gets the
  same number of rows, every process too), and what it is divided over, for messages."""
  n = math.lcm(device_count, process_count)
  return n, f'the {n} devices' if n == device_count else f'{n} devices / processes'


def multiples_text(size: int, n: int) -> str:
  """'a multiple of 8 (e.g. 8 or 16)': the multiples of ``n`` next to ``size``."""
  below = int(size) // n * n
  near = [m for m in (below, below + n) if m > 0]
  return f'a multiple of {n} (e.g. {" or ".join(map(str, near))})'


def divisors(n: int) -> list:
  """The device counts a global batch of ``n`` rows divides over, ascending."""
  return [d for d in range(1, int(n) + 1) if n % d == 0]


def split_batch(size: int, field: str, mesh=None) -> BatchSplit:
  """``size`` split over ``mesh`` (default: every device of every process) for this process."""
  return BatchSplit(int(size), field, jax.process_index(), jax.process_count(),
                    mesh_devices(mesh))


def mesh_devices(mesh=None) -> int:
  """The devices ``mesh`` spans (default: every device of every process)."""
  return jax.device_count() if mesh is None else mesh.size


def global_batch(local_batch: np.ndarray, mesh) -> jax.Array:
  """This process's rows -> the global batch, sharded over the mesh's 'data' axis."""
  sharding = batch_sharding(mesh)
  shape = (local_batch.shape[0] * jax.process_count(),) + local_batch.shape[1:]
  return jax.make_array_from_process_local_data(sharding, local_batch, shape)
