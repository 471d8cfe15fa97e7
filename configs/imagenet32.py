"""DenseFlow-74-10 on downsampled ImageNet 32x32 (paper: 3.63 bits/dim, IWBO k=200).

    python -m denseflow_jax.prepare_data --dataset imagenet_resized/32x32   # once, needs TF
    python -m denseflow_jax.main --config configs/imagenet32.py --workdir runs/imagenet32

Official recipe: 20 epochs, batch 64, decay 0.95 per epoch, eta augmentation;
then 2 epochs at lr 2e-5 (official train_more.py: --new_epochs 22).
"""
from configs import default


def get_config():
  config = default.get_config()
  config.data.dataset = 'imagenet_resized/32x32'
  config.data.augmentation = 'eta'
  config.train.epochs = 20
  config.train.gamma = 0.95
  config.train.finetune_epochs = 2
  config.eval.k = 200
  return config
