"""DenseFlow assembled from a `ModelSpec`: log-likelihood bound, latents, sampling.

Data -> latent (official `DenseFlow` transform order):

    y  = dequantize(x)                       [B, H, W, C] uint8 -> [0, 1)
    h  = squeeze(y - 0.5)
    for each block b:  h = block_b(h);  if not last: h = squeeze_drop(h)
    log p(x) >= sum of all terms + log N(h; loc, exp(log_scale))   (per-channel prior)

Randomness is explicit. `log_prob` takes a `noise` pytree
    {'dequantization': [B, H/2, W/2, 4C] N(0,1) (or [B, H, W, C] U[0,1) for uniform),
     'cross_unit': ((e_1, ..., e_{M_b - 1}) for each block b)}   e: [B, h_b, w_b, growth]
and `inverse` takes the latent and the dropped halves, so tests can hand in
recorded noise; `draw_noise` / `draw_sample_noise` make them from a key. Evaluation and
sampling with keys live in evaluate.py (one key per row: a row's bound or image does not
depend on the batch it is computed in); the train step draws per batch (train_step.py).
"""
import functools
import math
from typing import Any, Dict, Sequence

import flax.linen as nn
import jax

from denseflow_jax.flows.dense_block import DenseFlowBlock
from denseflow_jax.flows.dequantization import UniformDequantization, VariationalDequantization
from denseflow_jax.flows.gaussian import ChannelGaussian
from denseflow_jax.flows.squeeze import squeeze, unsqueeze
from denseflow_jax.flows.squeeze_drop import squeeze_drop_forward, squeeze_drop_inverse
from denseflow_jax.nets.coupling_net import DenseAttentionNet, GlowNet
from denseflow_jax.precision import with_matmul_precision
from denseflow_jax.spec import ModelSpec, spec_from_config


def coupling_net_factory(spec: ModelSpec, mid_channels: int):
  """`make_net(features, name=...)` for the intra-module couplings of one block."""
  if spec.coupling_net == 'glow':
    net_cls = functools.partial(GlowNet, hidden=spec.glow_channels, dtype=spec.dtype)
  else:
    net_cls = functools.partial(DenseAttentionNet, mid_channels=mid_channels, dtype=spec.dtype)
  if spec.remat:
    # Recompute the network's activations in the backward pass (argument 2 = `train`).
    return functools.partial(nn.remat(net_cls.func, static_argnums=(2,)), **net_cls.keywords)
  return net_cls


class DenseFlow(nn.Module):
  spec: ModelSpec

  def setup(self):
    spec = self.spec
    if spec.dequantization == 'variational':
      self.dequantization = VariationalDequantization(spec.num_bits, dtype=spec.dtype)
    else:
      self.dequantization = UniformDequantization(spec.num_bits)
    self.blocks = [
        DenseFlowBlock(units, modules, coupling_net_factory(spec, mid), growth=spec.growth,
                       noise=spec.noise, conv1x1=spec.conv1x1, dtype=spec.dtype,
                       unroll=spec.unroll_for(jax.default_backend()))
        for units, modules, mid in zip(spec.block_config, spec.layers_config, spec.mid_channels)]
    self.prior = ChannelGaussian(spec.latent_shape()[-1])

  @with_matmul_precision
  def encode(self, x, noise, train: bool = False):
    """uint8 images -> (continuous y in [0,1), final latent [B, h, w, c],
    dropped halves (data-side order), sum of all log-p terms but the prior [B])."""
    y, logdet = self.dequantization(x, noise['dequantization'])
    h = squeeze(y - 0.5)
    dropped = []
    for b, block in enumerate(self.blocks):
      h, ld = block(h, noise['cross_unit'][b], train=train)
      logdet += ld
      if b < len(self.blocks) - 1:
        h, log_p_drop, drop = squeeze_drop_forward(h)
        logdet += log_p_drop
        dropped.append(drop)
    return y, h, dropped, logdet

  @with_matmul_precision
  def forward(self, x, noise, train: bool = False):
    """uint8 images -> (final latent, sum of all log-p terms but the prior [B])."""
    _, z, _, logdet = self.encode(x, noise, train)
    return z, logdet

  @with_matmul_precision
  def log_prob(self, x, noise, train: bool = False):
    """One-sample lower bound on log P(x) in nats, [B]."""
    z, logdet = self.forward(x, noise, train)
    return logdet + self.prior.log_prob(z)

  @with_matmul_precision
  def inverse(self, z, dropped: Sequence[Any]):
    """Latent and dropped halves (data-side order) -> continuous image in [0, 1)."""
    h = z
    for b in reversed(range(len(self.blocks))):
      if b < len(self.blocks) - 1:
        h = squeeze_drop_inverse(h, dropped[b])
      h = self.blocks[b](h, inverse=True)
    return unsqueeze(h) + 0.5

  @with_matmul_precision
  def sample_continuous(self, eps, dropped_eps: Sequence[Any], temperature=1.0):
    """Standard-normal draws -> continuous samples; every draw is scaled by `temperature`."""
    z = self.prior.sample(temperature * eps)
    return self.inverse(z, [temperature * d for d in dropped_eps])


# ---------------------------------------------------------------- functional API

def make_model(model_config) -> DenseFlow:
  spec = model_config if isinstance(model_config, ModelSpec) else spec_from_config(model_config)
  return DenseFlow(spec)


def noise_shapes(spec: ModelSpec, batch: int) -> Dict[str, Any]:
  h, w, c = spec.image_shape
  if spec.dequantization == 'variational':
    dequant = (batch, h // 2, w // 2, 4 * c)
  else:
    dequant = (batch, h, w, c)
  cross = tuple(tuple((batch, bh, bw, spec.growth) for _ in range(units - 1)) if spec.growth else ()
                for (bh, bw, _, _), units in zip(spec.block_shapes(), spec.block_config))
  return {'dequantization': dequant, 'cross_unit': cross}


def draw_noise(spec: ModelSpec, rng, batch: int):
  """Noise for one `log_prob` evaluation of a batch (see module docstring)."""
  shapes = noise_shapes(spec, batch)
  k_deq, k_cross = jax.random.split(rng)
  if spec.dequantization == 'variational':
    dequant = jax.random.normal(k_deq, shapes['dequantization'])
  else:
    dequant = jax.random.uniform(k_deq, shapes['dequantization'])
  cross, i = [], 0
  for block_shapes in shapes['cross_unit']:
    cross.append(tuple(jax.random.normal(jax.random.fold_in(k_cross, i + j), s)
                       for j, s in enumerate(block_shapes)))
    i += len(block_shapes)
  return {'dequantization': dequant, 'cross_unit': tuple(cross)}


def draw_sample_noise(spec: ModelSpec, rng, num: int):
  """(eps of the final latent, [eps of each dropped half, data-side order])."""
  keys = jax.random.split(rng, len(spec.block_config))
  eps = jax.random.normal(keys[0], (num, *spec.latent_shape()))
  dropped = [jax.random.normal(k, (num, *s)) for k, s in zip(keys[1:], spec.dropped_shapes())]
  return eps, dropped


def init_with_log_prob(model: DenseFlow, rng, x, noise=None):
  """``(log_p, variables)`` of the initialising pass: parameters and BatchNorm statistics,
  with ActNorm initialised from the batch `x` (data-dependent initialisation: the official
  first training-mode pass, which also updates the BatchNorm running statistics once), and
  that same pass's one-sample lower bound on log P(x) in nats, [B] (as
  `DenseFlow.log_prob`). `noise` defaults to a draw from `rng`."""
  k_params, k_noise = jax.random.split(rng)
  if noise is None:
    noise = draw_noise(model.spec, k_noise, x.shape[0])
  return model.init_with_output({'params': k_params}, x, noise, train=True,
                                method=DenseFlow.log_prob)


def init_variables(model: DenseFlow, rng, x, noise=None):
  """The variables of :func:`init_with_log_prob`, without the log-likelihood."""
  return init_with_log_prob(model, rng, x, noise)[1]


def bits_per_dim(log_prob_nats, spec: ModelSpec):
  return -log_prob_nats / (spec.dims * math.log(2.0))
