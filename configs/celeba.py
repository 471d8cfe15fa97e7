"""DenseFlow-74-10 on CelebA 64x64 (paper: 1.99 bits/dim, IWBO k=200).

    python -m denseflow_jax.prepare_data --dataset celeb_a   # once, needs TF
    python -m denseflow_jax.main --config configs/celeba.py --workdir runs/celeba

Images: centre crop 148x148, resized to 64x64 (see `data.celeba_crop_resize`).
Official recipe: 50 epochs, batch 32, decay 0.95, horizontal flips; then 5
epochs at lr 2e-5 (official: --new_epochs 55).
"""
from configs import default


def get_config():
  config = default.get_config()
  config.model.image_shape = (64, 64, 3)
  config.data.dataset = 'celeb_a'
  config.data.augmentation = 'horizontal_flip'
  config.train.batch_size = 32
  config.train.epochs = 50
  config.train.gamma = 0.95
  config.train.finetune_epochs = 5
  config.eval.k = 200
  config.eval.k_chunk = 25
  return config
