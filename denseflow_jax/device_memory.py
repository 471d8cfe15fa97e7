"""A program that does not fit the accelerator's memory, said in one line with the fix.

XLA:TPU refuses such a program when it compiles it ("RESOURCE_EXHAUSTED: Ran out of memory
on HBM, the total memory required for HLO temporaries (56.00G) exceeds available HBM
(15.75G)"); a GPU fails when the first step allocates ("RESOURCE_EXHAUSTED: Out of memory
while trying to allocate ..."). Either way a traceback of the XLA runtime tells a user
nothing they can act on. `out_of_memory(error, ...)` turns it into a DeviceMemoryError
naming the batch per chip, what the program needs, what the chip has, and the settings
that make it fit; any other error is left alone (it returns None).
"""
import re
from typing import Optional

import jax

from denseflow_jax.errors import DenseFlowError

_NEEDED = re.compile(r'required for HLO temporaries \(([\d.]+\s*[KMGT]?i?B?)\)')
_AVAILABLE = re.compile(r'available HBM \(([\d.]+\s*[KMGT]?i?B?)\)')
_EXCEEDED = re.compile(r'Used ([\d.]+[KMGT]) of ([\d.]+[KMGT]) hbm')


class DeviceMemoryError(DenseFlowError, RuntimeError):
  """A compiled program needs more accelerator memory than a chip has; `compiler_says`
  keeps the first line of XLA's own message (for the record: the compile tool prints it)."""
  compiler_says: str = ''


def _amounts(message: str):
  """(needed, available) as the compiler wrote them, or (None, None)."""
  needed, available = _NEEDED.search(message), _AVAILABLE.search(message)
  if needed and available:
    return needed.group(1), available.group(1)
  used = _EXCEEDED.search(message)
  return (used.group(1), used.group(2)) if used else (None, None)


def out_of_memory(error: Exception, program: str, batch: int, devices: int,
                  field: str, device_kind: str = '') -> Optional[DeviceMemoryError]:
  """The DeviceMemoryError for `error` if it says the accelerator ran out of memory.

  `program` names what was compiled ('the train step'), `batch` is the global batch of
  `field` ('train.batch_size') over `devices` chips."""
  message = str(error)
  if 'RESOURCE_EXHAUSTED' not in message:
    return None
  per_chip = max(1, batch // max(1, devices))
  first_line = message.strip().splitlines()[0]   # XLA's own summary of the failure
  needed, available = _amounts(message)
  chip = f'a {device_kind} chip' if device_kind else 'one chip'
  if needed:
    what = f'needs {needed} of memory per chip, and {chip} has {available}'
  else:
    what = f'does not fit the memory of {chip} ({first_line[:200]})'
  smaller = max(devices, batch // 2 // devices * devices)
  too_big = DeviceMemoryError(
      f'{program} at {per_chip} images per chip ({field} = {batch} over {devices} chips) '
      f'{what}. Make it fit: a smaller batch (--config.{field}={smaller}), '
      f'--config.model.remat=True (recompute the coupling networks in the backward pass), '
      f'or --config.model.compute_dtype=bfloat16')
  too_big.compiler_says = first_line
  return too_big


def run_or_explain(fn, args, program: str, batch: int, mesh, field: str):
  """``fn(*args)``; an out-of-memory error of XLA becomes the DeviceMemoryError of
  `out_of_memory` for `batch` (of `field`) over the devices of `mesh`; any other error
  passes."""
  try:
    return fn(*args)
  except jax.errors.JaxRuntimeError as error:
    too_big = out_of_memory(error, program, batch, mesh.size, field,
                            mesh.devices.flat[0].device_kind)
    if too_big is None:
      raise
    raise too_big from None
