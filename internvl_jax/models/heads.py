"""Projectors and pooling heads: the seed projection MLP, InternVL-Chat pixel shuffle + projector, and the
InternVL-C attention-pooling block (DESIGN §5)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from internvl_jax.models import attention, layers


class ProjectionMLP(nnx.Module):
  """`num_layers` Linears with exact GELU (and dropout) between them; the last maps to `out_dim`.
  [..., in_dim] -> [..., out_dim]."""

  def __init__(self, in_dim: int, out_dim: int, num_layers: int = 2, hidden_dim: int | None = None, *,
               rngs: nnx.Rngs, dropout_rate: float = 0.0, dtype=jnp.float32):
    if num_layers < 1:
      raise ValueError(f"num_proj_layers must be >= 1, got {num_layers}")
    hidden_dim = hidden_dim or out_dim
    dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
    self.linears = nnx.List([layers.dense(a, b, ("embed", "mlp") if i < num_layers - 1 else ("mlp", "embed"),
                                          dtype=dtype, rngs=rngs) for i, (a, b) in enumerate(zip(dims, dims[1:]))])
    self.dropout_rate = dropout_rate

  def __call__(self, x: jax.Array, dropout_key: jax.Array | None = None) -> jax.Array:
    keys = [None] * len(self.linears) if dropout_key is None else list(jax.random.split(dropout_key, len(self.linears)))
    for i, lin in enumerate(self.linears):
      x = lin(x)
      if i < len(self.linears) - 1:
        x = layers.dropout(layers.gelu_exact(x), self.dropout_rate, keys[i])
    return x


def pixel_shuffle(x: jax.Array, grid_hw: tuple[int, int], downsample_ratio: float = 0.5,
                  version: str = "v2") -> jax.Array:
  """Merges f x f neighbouring patches (f = 1 / downsample_ratio) into one token of width f*f*C.

  x: [B, h*w, C] patch tokens in row-major (h, w) order -> [B, (h/f)*(w/f), f*f*C].
  v2 (released chat models): token (i, j) = concat_{r, s} x(f*i + r, f*j + s), r slowest.
  v1: the same tokens with the output grid transposed ((j, i) order), as old checkpoints expect.
  """
  f = round(1 / downsample_ratio)
  b, n, c = x.shape
  h, w = grid_hw
  if h * w != n or h % f or w % f:
    raise ValueError(f"pixel shuffle needs a {h}x{w} grid divisible by {f}; got {n} tokens")
  y = x.reshape(b, h // f, f, w // f, f, c)  # [b, i, r, j, s, c]
  if version == "v2":
    y = y.transpose(0, 1, 3, 2, 4, 5)  # [b, i, j, r, s, c]
  elif version == "v1":
    y = y.transpose(0, 3, 1, 2, 4, 5)  # [b, j, i, r, s, c]
  else:
    raise ValueError(f"ps_version {version!r} is not 'v1' or 'v2'")
  return y.reshape(b, (h // f) * (w // f), f * f * c)


class ChatProjector(nnx.Module):
  """InternVL-Chat `mlp1`: LayerNorm(eps 1e-5) -> Linear -> exact GELU -> Linear. [..., in_dim] -> [..., out_dim]."""

  def __init__(self, in_dim: int, out_dim: int, *, rngs: nnx.Rngs, dtype=jnp.float32):
    self.norm = layers.LayerNorm(in_dim, eps=1e-5, dtype=dtype)
    self.linear_1 = layers.dense(in_dim, out_dim, ("embed", "mlp"), dtype=dtype, rngs=rngs)
    self.linear_2 = layers.dense(out_dim, out_dim, ("mlp", "embed"), dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.linear_2(layers.gelu_exact(self.linear_1(self.norm(x))))


class AttentionPooling(nnx.Module):
  """InternVL-C pooling: one query (the mean token) attends over all tokens; separate LayerNorms (eps 1e-5) on
  query, keys and values; q/k/v projections with biases; head_dim = dim / heads; output Linear to out_dim.
  [B, N, dim] -> [B, out_dim]."""

  def __init__(self, dim: int, num_heads: int, out_dim: int, *, rngs: nnx.Rngs, dtype=jnp.float32,
               attention_impl: str = "xla"):
    if dim % num_heads:
      raise ValueError(f"attention pooling width {dim} is not divisible by {num_heads} heads")
    self.num_heads = num_heads
    self.impl = attention_impl
    self.norm_q = layers.LayerNorm(dim, eps=1e-5, dtype=dtype)
    self.norm_k = layers.LayerNorm(dim, eps=1e-5, dtype=dtype)
    self.norm_v = layers.LayerNorm(dim, eps=1e-5, dtype=dtype)
    self.q = layers.dense(dim, dim, ("embed", "heads"), dtype=dtype, rngs=rngs)
    self.k = layers.dense(dim, dim, ("embed", "heads"), dtype=dtype, rngs=rngs)
    self.v = layers.dense(dim, dim, ("embed", "heads"), dtype=dtype, rngs=rngs)
    self.proj = layers.dense(dim, out_dim, ("heads", "embed"), dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    b, n, d = x.shape
    query = jnp.mean(x.astype(jnp.float32), axis=1, keepdims=True).astype(x.dtype)
    heads = lambda t: t.reshape(b, t.shape[1], self.num_heads, d // self.num_heads)
    q = heads(self.q(self.norm_q(query)))
    k = heads(self.k(self.norm_k(x)))
    v = heads(self.v(self.norm_v(x)))
    out = attention.dot_product_attention(q, k, v, impl=self.impl)
    return self.proj(out.reshape(b, d))
