"""Nystrom self-attention as in the official DenseFlow coupling network.

With q, k, v = the 1x1-conv projections (embed_dim each), n = H*W tokens and
L landmarks (means of n/L consecutive tokens, divided by sqrt(n)):

    A1 = softmax(q  kL^T),  A2 = softmax(qL kL^T),  A3 = softmax(qL k^T)
    out = (A1 pinv(A2)) (A3 v) + v,      then a 1x1 conv back to the input width

where pinv is the 6-step iterative Moore-Penrose approximation of Nystromformer.

Official-code details reproduced on purpose (they differ from the usual
Nystromformer and from the paper's words):
  * tokens come from a raw reshape of the NCHW tensor [B, 3E, H, W] to
    [B, H*W, 3E], not from a transpose, so a "token" mixes channels and pixels;
    the output is reshaped back the same way;
  * every softmax normalises over axis -2 (the query axis), not the key axis;
  * the residual `+ v` is added before the output projection.
The attention core runs in float32 whatever the compute dtype: it is tiny
(L = 4) and the iterative inverse is sensitive to rounding.
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from denseflow_jax.precision import flow_float

from denseflow_jax.nets.layers import conv


def small_matmul(a, b):
  """a @ b for tiny matrices ([..., I, J] @ [..., J, K], J = the few landmarks) as
  broadcast products summed over J.

  Why not `@`: on a GPU each L x L `dot` becomes a kernel of its own, and the six
  iterations of `iterative_pinv` made ~120 kernels per attention call (forward and
  backward). Written as a product and a small sum, XLA fuses each product with the
  elementwise work around it: ~40 kernels (experiments/RESULTS.md, "The GPU program").
  """
  return jnp.sum(a[..., :, :, None] * b[..., None, :, :], axis=-2)


def iterative_pinv(k, num_iter: int = 6):
  """Approximate inverse of a batch of square matrices [..., L, L] (Razavi et al. 2019):

      v_0 = k^T / (max_j sum_i |k_ij| * max_i sum_j |k_ij|)
      v_{t+1} = 1/4 v_t (13 I - k v_t (15 I - k v_t (7 I - k v_t)))
  """
  eye = jnp.eye(k.shape[-1], dtype=k.dtype)
  abs_k = jnp.abs(k)
  max_col_sum = jnp.max(jnp.sum(abs_k, axis=-2, keepdims=True), axis=-1, keepdims=True)
  max_row_sum = jnp.max(jnp.sum(abs_k, axis=-1, keepdims=True), axis=-2, keepdims=True)
  v = jnp.swapaxes(k, -1, -2) / (max_col_sum * max_row_sum)
  for _ in range(num_iter):
    kv = small_matmul(k, v)
    inner = 15 * eye - small_matmul(kv, 7 * eye - kv)
    v = small_matmul(0.25 * v, 13 * eye - small_matmul(kv, inner))
  return v


def nystrom_attention_core(q, k, v, num_landmarks: int):
  """q, k, v: [B, n, E] -> [B, n, E] (see module docstring)."""
  b, n, e = q.shape
  q_land = q.reshape(b, num_landmarks, n // num_landmarks, e).mean(axis=2) / jnp.sqrt(n)
  k_land = k.reshape(b, num_landmarks, n // num_landmarks, e).mean(axis=2) / jnp.sqrt(n)
  a1 = jax.nn.softmax(jnp.einsum('bie,ble->bil', q, k_land), axis=-2)       # [B, n, L]
  a2 = jax.nn.softmax(jnp.einsum('bie,bje->bij', q_land, k_land), axis=-2)  # [B, L, L]
  a3 = jax.nn.softmax(jnp.einsum('ble,bne->bln', q_land, k), axis=-2)       # [B, L, n]
  return small_matmul(a1, iterative_pinv(a2)) @ (a3 @ v) + v


class NystromAttention(nn.Module):
  """Single-head Nystrom attention on NHWC maps: [B, H, W, C] -> [B, H, W, C]."""
  embed_dim: int
  num_landmarks: int = 4
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, h, w, c = x.shape
    n, e = h * w, self.embed_dim
    if n % self.num_landmarks:
      raise ValueError(f'Nystrom attention needs H*W ({h}x{w}) divisible by '
                       f'{self.num_landmarks} landmarks; use larger images or fewer blocks.')
    qkv = conv(3 * e, 1, name='qkv', dtype=self.dtype)(x)                # [B, H, W, 3E]
    tokens = jnp.transpose(qkv, (0, 3, 1, 2)).reshape(b, n, 3 * e)      # raw NCHW reshape
    q, k, v = jnp.split(flow_float(tokens), 3, axis=-1)
    out = nystrom_attention_core(q, k, v, self.num_landmarks)           # [B, n, E]
    out = jnp.transpose(out.reshape(b, e, h, w), (0, 2, 3, 1))          # raw reshape back
    return conv(c, 1, name='out', dtype=self.dtype)(out.astype(x.dtype))
