"""The training-mode loss at initialisation, split into its terms, over several seeds.

    python experiments/init_loss.py [--seeds 12] [--batch ../shared/fixtures/init-stats/first_batch.npz]

Model: the small official configuration of ../shared/fixtures/init-stats (blocks (2, 2, 1),
modules (2, 2, 4), mid 16, growth 4, 32x32). For each seed: initialise on the batch (the
data-dependent ActNorm pass), then one training-mode pass on the same batch with the same
noise, as the official first pass computes both at once. Prints one line per seed: the
loss in bits/dim, each term's share (dequantization, each block's log-det, each
squeeze-and-drop, the prior) and the mean log-scale of block 0's second ActNorm, which
records how well the first random rotation decorrelated the colour channels.
The official losses for seeds 0-3 are in official_init.json ('first_forward_loss_bpd').
"""
import argparse
import dataclasses
import math
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))     # configs.default, from any working directory

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from configs import default  # noqa: E402
from denseflow_jax import model as model_lib  # noqa: E402
from denseflow_jax.flows.squeeze import squeeze  # noqa: E402
from denseflow_jax.flows.squeeze_drop import squeeze_drop_forward  # noqa: E402
from denseflow_jax.model import DenseFlow  # noqa: E402
from denseflow_jax.spec import spec_from_config  # noqa: E402

SPEC = dataclasses.replace(
    spec_from_config(default.get_config().model), image_shape=(32, 32, 3),
    block_config=(2, 2, 1), layers_config=(2, 2, 4), mid_channels=(16, 16, 16), growth_rate=4)


def terms(module, x, noise):
  """Every log-likelihood term of a training-mode pass, as mean bits/dim (positive = cost)."""
  out = {}
  y, out['dequantization'] = module.dequantization(x, noise['dequantization'])
  h = squeeze(y - 0.5)
  for b, block in enumerate(module.blocks):
    h, out[f'block{b}'] = block(h, noise['cross_unit'][b], train=True)
    if b < len(module.blocks) - 1:
      h, out[f'drop{b}'], _ = squeeze_drop_forward(h)
  out['prior'] = module.prior.log_prob(h)
  return {k: -jnp.mean(v) / (SPEC.dims * math.log(2)) for k, v in out.items()}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--seeds', type=int, default=12)
  parser.add_argument('--batch', default=str(ROOT.parent / 'shared' / 'fixtures' / 'init-stats'
                                             / 'first_batch.npz'))
  args = parser.parse_args()
  x = jnp.asarray(np.load(args.batch)['x_nhwc'])
  model = DenseFlow(SPEC)

  @jax.jit
  def first_pass(key):
    noise = model_lib.draw_noise(SPEC, jax.random.fold_in(key, 1), x.shape[0])
    variables = model_lib.init_variables(model, key, x, noise)
    parts, _ = model.apply(variables, x, noise, method=terms, mutable=['batch_stats'])
    log_scale = variables['params']['blocks_0']['unit_0']['modules']['actnorm']['log_scale']
    return parts, jnp.mean(log_scale[1])

  losses = []
  for seed in range(args.seeds):
    parts, log_scale = first_pass(jax.random.PRNGKey(seed))
    loss = sum(float(v) for v in parts.values())
    losses.append(loss)
    print(f'seed {seed}: loss {loss:.3f}  ' + '  '.join(f'{k} {float(v):.3f}' for k, v in parts.items())
          + f'  block0 module1 mean log-scale {float(log_scale):.3f}', flush=True)
  print(f'mean {np.mean(losses):.3f}  sd {np.std(losses, ddof=1):.3f}  '
        f'min {min(losses):.3f}  max {max(losses):.3f}')


if __name__ == '__main__':
  main()
