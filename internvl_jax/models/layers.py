"""Small building blocks shared by every tower: dtypes, dense layers with logical axes, norms, MLPs, RoPE.

Norms and RoPE compute in float32 whatever the activation dtype (DESIGN §3).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from internvl_jax.models import cpu_layout, lora as lora_lib

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def auto_dtype(platform: str | None = None) -> str:
  """The compute dtype 'auto' means on a platform ('cpu' | 'gpu' | 'tpu'; default: JAX's backend): bfloat16 on
  accelerators (their matrix units' native type; master weights stay float32), float32 on CPU (no bfloat16 speed-up
  there, and the parity tests' precision)."""
  platform = platform or jax.default_backend()
  return "float32" if platform == "cpu" else "bfloat16"


def to_dtype(name_or_dtype) -> jnp.dtype:
  """'bfloat16' | 'float32' | 'float16' | 'auto' (auto_dtype) | a dtype -> a jnp dtype, with a clear error for
  anything else."""
  if isinstance(name_or_dtype, str):
    if name_or_dtype == "auto":
      name_or_dtype = auto_dtype()
    if name_or_dtype not in DTYPES:
      raise ValueError(f"unknown dtype {name_or_dtype!r}; use one of {sorted(DTYPES) + ['auto']}")
    return DTYPES[name_or_dtype]
  return jnp.dtype(name_or_dtype)


def logical(init, names: Sequence[str | None]):
  """Wraps an initializer so that its Param carries logical axis names (mapped to a mesh in sharding.py)."""
  return nnx.with_partitioning(init, tuple(names))


class Linear(nnx.Linear):
  """nnx.Linear whose input [..., in] runs as one [N, in] matrix on CPU (cpu_layout.as_rows); same parameters."""

  def __call__(self, x: jax.Array, out_sharding=None) -> jax.Array:
    if out_sharding is not None:
      return super().__call__(x, out_sharding=out_sharding)
    return cpu_layout.as_rows(super().__call__, x)


def dense(in_features: int, out_features: int, names: tuple[str | None, str | None], *, rngs: nnx.Rngs,
          use_bias: bool = True, dtype=jnp.float32, param_dtype=jnp.float32, init_std: float | None = None,
          lora: tuple[int, float, float] | None = None) -> nnx.Linear:
  """nnx.Linear with a [in, out] kernel named `names` and a bias named names[1]; lora=(rank, alpha, dropout)
  (lora.lora_args) adds a LoRA adapter (lora.LoRALinear, same base parameters)."""
  kinit = (nnx.initializers.normal(init_std) if init_std is not None else nnx.initializers.lecun_normal())
  kw = dict(use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, kernel_init=logical(kinit, names),
            bias_init=logical(nnx.initializers.zeros, (names[1],)), rngs=rngs)
  if lora:
    return lora_lib.LoRALinear(in_features, out_features, names, rank=lora[0], alpha=lora[1],
                               dropout=lora[2] if len(lora) > 2 else 0.0, **kw)
  return Linear(in_features, out_features, **kw)


class RMSNorm(nnx.Module):
  """x / rms(x) * scale over the last axis, computed in float32. [..., D] -> [..., D] in `dtype`."""

  def __init__(self, dim: int, *, eps: float = 1e-6, dtype=jnp.float32, param_dtype=jnp.float32):
    self.eps = eps
    self.dtype = dtype
    self.scale = nnx.Param(jnp.ones((dim,), param_dtype), out_sharding=("norm",))

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (y * self.scale[...].astype(jnp.float32)).astype(self.dtype)


class LayerNorm(nnx.Module):
  """Standard LayerNorm over the last axis with scale and bias, computed in float32."""

  def __init__(self, dim: int, *, eps: float = 1e-6, dtype=jnp.float32, param_dtype=jnp.float32):
    self.eps = eps
    self.dtype = dtype
    self.scale = nnx.Param(jnp.ones((dim,), param_dtype), out_sharding=("norm",))
    self.bias = nnx.Param(jnp.zeros((dim,), param_dtype), out_sharding=("norm",))

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
    return (y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(self.dtype)


def make_norm(kind: str, dim: int, eps: float, *, dtype=jnp.float32, param_dtype=jnp.float32) -> nnx.Module:
  """kind: 'layer_norm' | 'rms_norm'."""
  if kind == "layer_norm":
    return LayerNorm(dim, eps=eps, dtype=dtype, param_dtype=param_dtype)
  if kind == "rms_norm":
    return RMSNorm(dim, eps=eps, dtype=dtype, param_dtype=param_dtype)
  raise ValueError(f"unknown norm_type {kind!r}; use 'layer_norm' or 'rms_norm'")


def gelu_exact(x: jax.Array) -> jax.Array:
  # InternViT and the InternVL projector use the erf GELU; jax.nn.gelu defaults to the tanh approximation.
  return jax.nn.gelu(x, approximate=False)


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
  """Inverted dropout; identity when rate == 0 or key is None (evaluation)."""
  if rate <= 0.0 or key is None:
    return x
  keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def drop_path(x: jax.Array, rate: jax.Array | float, key: jax.Array | None) -> jax.Array:
  """Stochastic depth: drops the whole residual branch per sample. x: [B, ...]; rate may be traced."""
  if key is None:
    return x
  keep_prob = 1.0 - jnp.asarray(rate, jnp.float32)
  keep = jax.random.bernoulli(key, keep_prob, (x.shape[0],) + (1,) * (x.ndim - 1))
  return jnp.where(keep, x / jnp.maximum(keep_prob, 1e-6).astype(x.dtype), 0).astype(x.dtype)


class MLP(nnx.Module):
  """fc1 -> exact GELU -> dropout -> fc2, with biases (InternViT block MLP with dropout_rate 0, the seed
  projection head). [..., D] -> [..., D_out]."""

  def __init__(self, dim: int, hidden: int, out_dim: int | None = None, *, rngs: nnx.Rngs, use_bias: bool = True,
               dropout_rate: float = 0.0, dtype=jnp.float32, param_dtype=jnp.float32,
               lora: tuple[int, float, float] | None = None):
    kw = dict(use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, lora=lora, rngs=rngs)
    self.fc1 = dense(dim, hidden, ("embed", "mlp"), **kw)
    self.fc2 = dense(hidden, out_dim or dim, ("mlp", "embed"), **kw)
    self.dropout_rate = dropout_rate

  def __call__(self, x: jax.Array, dropout_key: jax.Array | None = None) -> jax.Array:
    return self.fc2(dropout(gelu_exact(self.fc1(x)), self.dropout_rate, dropout_key))


class SwiGLU(nnx.Module):
  """down(silu(gate(x)) * up(x)), no biases (LLaMA / Qwen2 MLP). [..., D] -> [..., D]."""

  def __init__(self, dim: int, hidden: int, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32,
               init_std: float = 0.02, lora: tuple[int, float, float] | None = None):
    kw = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, init_std=init_std, lora=lora, rngs=rngs)
    self.gate = dense(dim, hidden, ("embed", "mlp"), **kw)
    self.up = dense(dim, hidden, ("embed", "mlp"), **kw)
    self.down = dense(hidden, dim, ("mlp", "embed"), **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.down(jax.nn.silu(self.gate(x)) * self.up(x))


def rope_cos_sin(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
  """Rotary tables for integer positions [B, T] -> cos, sin [B, T, head_dim] float32 (HF half-split layout)."""
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, hd/2]
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """x [B, T, H, hd] rotated by cos/sin [B, T, rd]; computed in float32, returned in x.dtype.
  rd < hd is partial rotary (Phi-3's partial_rotary_factor): the first rd channels rotate, the rest pass."""
  x32 = x.astype(jnp.float32)
  rd = cos.shape[-1]
  x_rot, x_pass = x32[..., :rd], x32[..., rd:]
  half = rd // 2
  rotated = jnp.concatenate([-x_rot[..., half:], x_rot[..., :half]], axis=-1)
  out = x_rot * cos[:, :, None, :] + rotated * sin[:, :, None, :]
  if rd < x.shape[-1]:
    out = jnp.concatenate([out, x_pass], axis=-1)
  return out.astype(x.dtype)
