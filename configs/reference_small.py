"""The small official configuration of ../shared/fixtures/reference-small (9,741,584
parameters): DenseFlow(data_shape=(3, 16, 16), block_config=[2, 2, 1],
layers_config=[1, 1, 2], layer_mid_chnls=[8, 8, 8], growth_rate=4).

    python -m denseflow_jax.convert --config configs/reference_small.py \
        --checkpoint ../shared/fixtures/reference-small/state_dict.npz --out runs/ref-small
"""
from configs import default


def get_config():
  config = default.get_config()
  config.model.image_shape = (16, 16, 3)
  config.model.block_config = (2, 2, 1)
  config.model.layers_config = (1, 1, 2)
  config.model.mid_channels = (8, 8, 8)
  config.model.growth_rate = 4
  return config
