"""Every figure of tests/test_lockstep.py, printed: our train step against 40 recorded
official training steps (../shared/fixtures/lockstep).

    python experiments/lockstep_report.py a b      # parts (a) and (b) of the test

(a) feeds the recorded (torch 2.x) lr into the step, (b) runs our default schedule against
the official run under torch 1.8.1. For each part: every step's lr, loss and the
official loss; the parameter and BatchNorm measures after steps 1, 10, 20 and 40 beside
the limits the test applies; the test's verdict; for (a) the Adamax state after step 40.
Uses the test's own functions (and its settings: CPU, XLA optimisations on for the step).
About 3 min to compile and 4-6 s per step on 2 busy cores; ~2.5 GB of memory.
"""
import os
import sys
import time

sys.path[:0] = [os.getcwd(), os.path.join(os.getcwd(), 'tests')]

import conftest  # noqa: E402  (the tests' JAX settings, the fixture's path)
import numpy as np  # noqa: E402

import test_lockstep as lockstep  # noqa: E402
from denseflow_jax.state_dict import flatten  # noqa: E402


def adamax_figures(fx, opt_state, trainable):
  """||d|| / ||official|| of the Adamax moments after step 40, over the stored entries."""
  summary, adam = fx['summaries'][40], opt_state[1]
  for name, tree in (('exp_avg', adam.mu), ('exp_inf', adam.nu)):
    flat, d2, n2 = flatten({'params': tree}), 0.0, 0.0
    for key in sorted(trainable):
      if lockstep.NOISE_ONLY in key:
        continue
      ours = lockstep.official_view(flat, key, fx['s0'][key].shape).astype(np.float64)
      official, mine = lockstep.stored(summary, f'adamax/{name}/', fx['index'], key, ours)
      d2 += np.sum((mine - official) ** 2)
      n2 += np.sum(official ** 2)
    print(f'  Adamax {name} after step 40: ||d|| / ||official|| = {np.sqrt(d2 / n2):.3g}')
  print(f'  Adamax step count: {int(adam.count)}')


def report(fx, one_step, part):
  start = time.time()
  if part == 'a':
    run = lockstep.replay(fx, one_step, lr_table=fx['trajectory']['lr'])
    official, prefix = fx['trajectory'], None
  else:
    run = lockstep.replay(fx, one_step)
    official, prefix = fx['variant'], (lambda t: f'T{t}/')
  print(f'== part {part}: 40 steps in {time.time() - start:.1f} s', flush=True)
  losses, lrs, states, opt_state = run
  rel = np.abs(losses - official['loss']) / np.abs(official['loss'])
  for i in range(len(losses)):
    print(f"step {i + 1:2d} lr {lrs[i]:.6g} (official {official['lr'][i]:.6g}) loss "
          f"{losses[i]:.7f} official {official['loss'][i]:.7f} rel {rel[i]:.2e}")
  print(f'largest relative loss difference {rel.max():.3g} (step {rel.argmax() + 1})')
  trainable, meta = set(fx['meta']['trainable_keys']), fx['meta']
  for t in lockstep.CHECKPOINTS:
    summary = fx['summaries'][t] if prefix is None else fx['variant']
    m = lockstep.state_measures(fx, states[t], summary, prefix(t) if prefix else '', trainable)
    ratio = m['d'] / m['moved'] if m['moved'] else m['d']
    print(f"T={t}: ||d||/||p_T-p_0|| {ratio:.3g} (limit "
          f"{lockstep.FACTOR * lockstep.floor(meta, 'global_norm_rel', t):.3g}); whole-tensor "
          f"||p_T-p_0|| rel {m['whole_moved_rel']:.3g}; BN {m['bn_max_rel'][0]:.3g} (limit "
          f"{lockstep.BN_FACTOR * lockstep.floor(meta, 'bn_max_rel', t):.3g}, "
          f"{m['bn_max_rel'][1]})")
  print('\n'.join(lockstep.disagreements(fx, run, official, prefix)) or 'in lockstep')
  if part == 'a':
    adamax_figures(fx, opt_state, trainable)


def main(parts):
  fx = lockstep.fixture.__wrapped__(conftest.FIXTURES / 'lockstep')
  start = time.time()
  one_step = lockstep.one_step.__wrapped__(fx)
  print(f'compiled in {time.time() - start:.1f} s', flush=True)
  for part in parts:
    report(fx, one_step, part)


if __name__ == '__main__':
  main(sys.argv[1:] or ['a', 'b'])
