"""The one attention entry point used by every attention in the package, plus mask builders.

impl: "xla" (portable), "cudnn" (flash attention on NVIDIA GPUs, bf16/fp16), "auto" (cuDNN where it can run,
XLA otherwise). Logits and softmax are float32 in every implementation.
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp

IMPLS = ("xla", "cudnn", "auto")
_logged_choice: set[str] = set()


def causal_mask(q_len: int, k_len: int, offset: int | jax.Array = 0) -> jax.Array:
  """[q_len, k_len] bool: query i (at absolute slot offset + i) sees keys at slots <= offset + i."""
  q = jnp.arange(q_len)[:, None] + offset
  k = jnp.arange(k_len)[None, :]
  return k <= q


def prefix_causal_mask(length: int, prefix_len: int | jax.Array) -> jax.Array:
  """[L, L] bool: bidirectional inside the first `prefix_len` positions, causal after (prefix-LM)."""
  k = jnp.arange(length)[None, :]
  return causal_mask(length, length) | (k < prefix_len)


def padding_mask(q_valid: jax.Array | None, k_valid: jax.Array) -> jax.Array:
  """q_valid [B, Tq] (or None), k_valid [B, Tk] -> [B, 1, Tq, Tk] bool. Padded queries see valid keys only."""
  m = k_valid[:, None, None, :].astype(bool)
  if q_valid is not None:
    m = m & q_valid[:, None, :, None].astype(bool)
  return m


def combine_masks(*masks: jax.Array | None) -> jax.Array | None:
  """Logical AND of broadcastable masks ([Tq, Tk] or [B, 1|H, Tq, Tk]); None entries are ignored."""
  out = None
  for m in masks:
    if m is None:
      continue
    m = m[None, None] if m.ndim == 2 else m
    out = m if out is None else (out & m)
  return out


def _cudnn_ok(q: jax.Array, k: jax.Array, mask) -> bool:
  if jax.default_backend() != "gpu" or mask is not None:
    return False
  head_dim = q.shape[-1]
  return q.dtype in (jnp.bfloat16, jnp.float16) and k.dtype == q.dtype and head_dim % 8 == 0 and head_dim <= 128


def choose_impl(impl: str, q: jax.Array, k: jax.Array, mask) -> str:
  """Resolves 'auto' to 'cudnn' or 'xla' for these shapes; logs the choice once per outcome."""
  if impl not in IMPLS:
    raise ValueError(f"attention impl {impl!r} is not one of {IMPLS}")
  if impl != "auto":
    return impl
  chosen = "cudnn" if _cudnn_ok(q, k, mask) else "xla"
  if chosen not in _logged_choice:
    _logged_choice.add(chosen)
    logging.info("attention impl 'auto' -> %s (backend %s, dtype %s)", chosen, jax.default_backend(), q.dtype)
  return chosen


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, mask: jax.Array | None = None,
                          causal: bool = False, scale: float | None = None, impl: str = "xla") -> jax.Array:
  """Multi-head attention.

  q: [B, T, H, hd]; k, v: [B, S, Hkv, hd] with H a multiple of Hkv (grouped-query attention).
  mask: bool, broadcastable to [B, H, T, S], True = attend. causal: adds the lower-triangular mask (T == S).
  Returns [B, T, H, hd] in q.dtype.
  """
  chosen = choose_impl(impl, q, k, mask)
  if chosen == "cudnn":
    return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, is_causal=causal, implementation="cudnn")
  # The XLA path of jax.nn.dot_product_attention computes logits and softmax in float32 and masks with a
  # large finite negative, so fully-masked rows (padding queries) give finite values rather than NaN.
  return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, is_causal=causal, implementation="xla")
