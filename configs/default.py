"""Defaults shared by every experiment: DenseFlow-74-10 on 32x32x3 images.

Every other config imports this one and overrides fields; any field can also be
overridden on the command line, e.g. ``--config.train.batch_size=32``.
"""
import ml_collections


def get_config():
  config = ml_collections.ConfigDict()
  config.seed = 0

  # ---- model (official constructor: DenseFlow(data_shape, block_config, ...)) ----
  m = config.model = ml_collections.ConfigDict()
  m.image_shape = (32, 32, 3)          # H, W, C of the uint8 images
  m.num_bits = 8
  m.block_config = (6, 4, 1)           # units per block
  m.layers_config = (5, 6, 20)         # glow-like modules per unit, per block
  m.mid_channels = (48, 48, 48)        # coupling-network width, per block
  m.growth_rate = 10                   # channels each unit adds (cross-unit coupling)
  # Ablation switches (paper Table 4).
  m.cross_unit = True                  # False: no augmentation, units keep their width
  m.noise = 'preconditioned'           # 'preconditioned' (g network) or 'white' (N(0, I))
  m.coupling_net = 'dense_attention'   # 'dense_attention' (official) or 'glow'
  m.glow_channels = 256                # hidden width of the 'glow' coupling network
  m.dequantization = 'variational'     # 'variational' (official) or 'uniform'
  m.conv1x1 = 'full'                   # 'full' (official) or 'lu'
  # Performance knobs: they do not change the maths.
  m.compute_dtype = 'float32'          # dtype of convolutions / attention ('bfloat16')
  m.remat = False                      # rematerialise coupling networks (saves memory)
  # Modules of a unit per scan iteration. 0 follows the platform: rolled (1) on a TPU, where
  # the unrolled DenseFlow-74-10 train step did not compile within 24 GB of host memory;
  # unrolled on GPUs (45% fewer kernels) and CPUs (a rolled scan ran ~12-100x slower).
  # 1 keeps compile time flat in depth everywhere (experiments/RESULTS.md).
  m.scan_unroll = 0
  # Float32 convolutions and dots on an accelerator (jax.lax.Precision): 'default' is one
  # bfloat16 pass on a TPU and TF32 on an NVIDIA GPU; 'high' is three bfloat16 passes on a
  # TPU (about float32) and still TF32 on a GPU; 'highest' is float32 everywhere. CPUs compute
  # float32 whatever the value. 'high': one bfloat16 pass moved a trained model's bits/dim
  # by +0.005 and its invertibility error to 3 levels of an 8-bit image (README, "Precision").
  m.precision = 'high'

  # ---- data ----
  d = config.data = ml_collections.ConfigDict()
  d.dataset = 'cifar10'     # tfds name ('cifar10', 'imagenet_resized/32x32', ...),
                            # 'digits', or 'npz' / 'folder' with data.source
  d.source = ''             # path of an .npz (train/test uint8 [N,H,W,C]) or image folder
  d.tfds_data_dir = ''      # '' = TFDS default (~/tensorflow_datasets)
  d.augmentation = 'eta'    # 'none', 'horizontal_flip' or 'eta'
  d.worker_count = 0        # grain worker processes
  d.prefetch = 2

  # ---- training (official recipe) ----
  t = config.train = ml_collections.ConfigDict()
  t.batch_size = 64                    # global batch, divided over all devices
  t.epochs = 400
  t.optimizer = 'adamax'
  t.lr = 1e-3
  t.warmup_steps = 5000
  t.gamma = 0.9975                     # lr decay per epoch
  # 'official': the lr the official loop gives under its pinned torch 1.8.1: the base lr at
  # step 1, then the warm-up, then the base lr; gamma scales only the first step of each
  # epoch (its warm-up scheduler overwrites the decay: no compounding). 'official_torch2':
  # the same with step 1 at lr 0 (torch 2.x). 'exponential': lr * warm-up * gamma**epoch,
  # the paper's prose. Formulas: denseflow_jax/train_step.py.
  t.lr_schedule = 'official'
  t.phase = 'pretrain'                 # 'finetune': constant finetune_lr from a trained model
  t.finetune_lr = 2e-5                 # official train_more.py
  t.finetune_epochs = 20
  t.grad_clip = 0.0                    # 0 = off; global-norm clipping otherwise
  t.ema_decay = 0.0                    # 0 = off
  t.log_every = 100
  t.eval_every_epochs = 1
  t.sample_every_epochs = 10
  t.checkpoint_every_steps = 2000
  t.keep_checkpoints = 3
  # A step with a non-finite loss or gradient changes nothing; the run stops at the next log
  # line, evaluation or checkpoint after this many such steps in a row.
  t.max_nonfinite_in_row = 10
  t.best_metric = 'test_bpd'           # kept in WORKDIR/best when it improves (lower is better)
  t.num_steps = -1                     # > 0 stops after this many steps (tests, smoke runs)

  # ---- evaluation ----
  e = config.eval = ml_collections.ConfigDict()
  e.batch_size = 256
  e.k = 1000                           # importance samples for the IWBO
  e.k_chunk = 50                       # samples per pass
  # Which parameters every mode evaluates and samples (and training keeps in WORKDIR/best):
  # None (the default) follows the run: its EMA parameters where it kept them
  # (train.ema_decay > 0), else the raw ones, silently. True asks for the EMA parameters and
  # says so in one note: line where the run has none; False takes the raw ones. The default
  # follows the run, not train.ema_decay: --mode eval is usually run without the overrides
  # that trained the run. A reference typed bool: the command line takes true / false.
  e.use_ema = ml_collections.FieldReference(None, field_type=bool)
  e.num_examples = -1                  # -1 = whole test split
  e.which = 'latest'                   # every mode that loads a model: the latest checkpoint
                                       # of --workdir, or 'best' (WORKDIR/best: the best
                                       # periodic test bits/dim during training)

  # ---- sampling ----
  s = config.sample = ml_collections.ConfigDict()
  s.num = 64
  s.temperature = 1.0
  s.batch_size = 256

  # ---- latent tools (--mode interpolate / reconstruct / sweep; denseflow_jax/latent_tools.py) ----
  lt = config.latent = ml_collections.ConfigDict()
  lt.num_pairs = 4                     # interpolate: the first 2 * num_pairs test images
  lt.indices = ()                      # or these test indices, as pairs (i0, i1, i2, i3, ...)
  lt.steps = 8                         # points per interpolation, both end points included
  lt.method = 'linear'                 # 'linear' or 'slerp' (on prior-standardised latents)
  lt.num_images = 16                   # reconstruct: the first num_images test images
  lt.temperatures = (0.0, 0.25, 0.5, 0.75, 1.0)  # sweep: one grid row per temperature
  lt.num_per_row = 8                   # sweep samples per row; reconstruct images per row

  # ---- FID (--mode fid; paper Table 3: 50k samples at T=1 against train) ----
  f = config.fid = ml_collections.ConfigDict()
  f.num_samples = 50000
  f.temperature = 1.0
  f.batch_size = 500                   # samples (and data images) per Inception pass
  f.inception_weights = ''             # converted .npz: python -m denseflow_jax.inception --help
  f.splits = ('train', 'test')         # FID against each of these splits
  f.stats_dir = ''                     # cached data statistics; '' = WORKDIR/fid_stats

  config.checkpoint = ''               # run any mode from this (converted) checkpoint
  return config
