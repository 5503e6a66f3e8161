"""Ring-buffer KV cache for sliding-window layers (GPT-OSS): a layer that only ever looks `window` slots back keeps
only its last `window` keys and values, so its cache does not grow with the sequence (half of GPT-OSS's layers).

Slots are the cache's absolute positions (llm.py: one `index` for the batch, pads included, as transformers'
cache positions). Ring entry j holds the newest absolute slot a < index with a = j (mod W). A call with T new tokens
attends to [ring (W) ; new (T)] keys, then writes its last min(T, W) tokens into the ring.

Layers run grouped by the period of their window pattern (GPT-OSS: [sliding, full] pairs), so that one scan still
runs all layers while full layers carry [.., S, ..] caches and sliding ones [.., W, ..] rings.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from internvl_jax.models import attention


def period(windows: tuple[int, ...]) -> int:
  """The smallest p dividing len(windows) with windows[i] == windows[i % p] for every layer i."""
  n = len(windows)
  for p in range(1, n + 1):
    if n % p == 0 and all(windows[i] == windows[i % p] for i in range(n)):
      return p
  return n


def slots(index: jax.Array, size: int) -> jax.Array:
  """Absolute slot held by each ring entry [size] int32 before writing at `index` (negative: never written)."""
  j = jnp.arange(size, dtype=jnp.int32)
  return index - 1 - jnp.mod(index - 1 - j, size)


def write(ring: jax.Array, new: jax.Array, index: jax.Array) -> jax.Array:
  """ring [B, W, ...], new [B, T, ...] written at absolute slots [index, index + T): the last min(T, W) of them
  land at entries slot mod W (a permutation of distinct entries, so the scatter has no collisions)."""
  size, t = ring.shape[1], new.shape[1]
  if t > size:
    new, index, t = new[:, t - size:], index + t - size, size
  entries = jnp.mod(index + jnp.arange(t, dtype=jnp.int32), size)
  return ring.at[:, entries].set(new.astype(ring.dtype))


def key_mask(key_valid: jax.Array, attention_mask: jax.Array, index: jax.Array, size: int,
             window: int) -> jax.Array:
  """The mask of T queries at slots [index, index + T) over keys [ring (size) ; new (T)]: [B, 1, T, size + T] bool.
  key_valid [B, S]: which absolute slots hold real tokens (this call's included); attention_mask [B, T]."""
  t = attention_mask.shape[1]
  held = slots(index, size)
  ring_valid = jnp.take(key_valid, jnp.maximum(held, 0), axis=1) & (held >= 0)[None]
  keys = jnp.concatenate([held, index + jnp.arange(t, dtype=jnp.int32)])  # absolute slot of every key
  q = index + jnp.arange(t, dtype=jnp.int32)[:, None]
  order = (keys[None] <= q) & (keys[None] > q - window)
  valid = jnp.concatenate([ring_valid, attention_mask.astype(bool)], axis=1)
  return attention.combine_masks(attention.padding_mask(None, valid), order)
