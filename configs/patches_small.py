"""The learning-curve protocol against the official code (issue #13): the small official
DenseFlow on 32x32 photo tiles, 300 steps, on a 2-core CPU.

    python ../shared/data/make_patches.py runs/tiles.npz --mixed     # 2,101 / 370 tiles
    python -m denseflow_jax.main --config configs/patches_small.py --workdir runs/patches-s0
    python -m denseflow_jax.main --config configs/patches_small.py --workdir runs/patches-s0 \
        --mode eval

Model: DenseFlow(data_shape=(3, 32, 32), block_config=[2, 2, 1], layers_config=[2, 2, 4],
layer_mid_chnls=[16, 16, 16], growth_rate=4) (official constructor). Recipe: batch 32,
Adamax 1e-3, linear warm-up over 100 steps, no decay, horizontal flip, 300 steps; then
the test split with k=10, EMA off. Official figures and ours: experiments/RESULTS.md
("Learning from scratch"). Use `--config.seed=N` for other seeds and
`--config.data.source=PATH` for tiles elsewhere.
"""
import pathlib

from configs import default

REPO = pathlib.Path(__file__).resolve().parents[1]


def get_config():
  config = default.get_config()
  m = config.model
  m.image_shape = (32, 32, 3)
  m.block_config = (2, 2, 1)
  m.layers_config = (2, 2, 4)
  m.mid_channels = (16, 16, 16)
  m.growth_rate = 4

  d = config.data
  d.dataset = 'npz'
  d.source = str(REPO / 'runs' / 'tiles.npz')
  d.augmentation = 'horizontal_flip'

  t = config.train
  t.batch_size = 32
  t.num_steps = 300
  t.lr = 1e-3
  t.warmup_steps = 100
  t.gamma = 1.0
  t.log_every = 50
  t.checkpoint_every_steps = 50
  t.eval_every_epochs = 1000           # only at the end (one-sample bound)
  t.sample_every_epochs = 1000

  e = config.eval
  e.batch_size = 74                    # the 370 test tiles in 5 batches
  e.k = 10
  e.k_chunk = 10
  e.use_ema = False

  s = config.sample
  s.num = 16
  s.batch_size = 16
  return config
