"""DenseFlow-45-6 ablations on CIFAR-10 (paper Table 4), one row per override:

    python -m denseflow_jax.main --config configs/ablation.py --config.ablation_row=6 --workdir runs/abl6

Rows 1-3 use Glow's coupling network, rows 4-6 the dense+attention one; within
each, no augmentation / white noise / preconditioned noise (see
`denseflow_jax/ablation.py`; published 3.42, 3.40, 3.37, 3.14, 3.08, 3.07 bpd
after 300 + 10 epochs). Row 6 (the full model) has 75,020,522 trainable
parameters. `main` applies the row after command-line overrides; overriding one of the
row's switches (model.coupling_net, model.cross_unit, model.noise) to another value is an
error, not a silent change of model.
"""
from configs import cifar10


def get_config():
  config = cifar10.get_config()
  config.model.block_config = (5, 3, 1)
  config.model.layers_config = (3, 5, 15)
  config.model.growth_rate = 6
  config.train.epochs = 300
  config.train.finetune_epochs = 10
  config.ablation_row = 6              # applied by main (ablation.finalize_config)
  return config
