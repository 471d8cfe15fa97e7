"""DenseFlow-74-10 on downsampled ImageNet 64x64 (paper: 3.35 bits/dim, IWBO k=200).

    python -m denseflow_jax.prepare_data --dataset imagenet_resized/64x64   # once, needs TF
    python -m denseflow_jax.main --config configs/imagenet64.py --workdir runs/imagenet64

Official recipe: 10 epochs, batch 32, decay 0.95 per epoch, eta augmentation;
then 1 epoch at lr 2e-5 (official: --new_epochs 11). Same 130.6M parameters as 32x32.
"""
from configs import default


def get_config():
  config = default.get_config()
  config.model.image_shape = (64, 64, 3)
  config.data.dataset = 'imagenet_resized/64x64'
  config.data.augmentation = 'eta'
  config.train.batch_size = 32
  config.train.epochs = 10
  config.train.gamma = 0.95
  config.train.finetune_epochs = 1
  config.eval.k = 200
  config.eval.k_chunk = 25
  return config
