"""Token-by-token generation for interactive use: a Python generator that yields each new token as it is produced.

  for tok in stream(model, ids, pixel_values, max_new_tokens=256, stop_ids=fmt.stop_ids):   # ids [T] -> ints
    print(tokenizer.decode([tok]), end="")

It runs generate.py's pieces (prefill, pick, step, the LongRoPE recompute) as separately compiled programs: one
prefill, then one single-token step per new token with the KV cache, the sampling state and the key carried
between calls as device arrays. The tokens equal generate()'s for the same settings. So that new requests rarely
compile, prompts are LEFT-padded to a bucket length (powers of two from MIN_BUCKET: RoPE positions count real
tokens, so padding changes nothing) and the cache has bucket + max_new_tokens slots: each (bucket, max_new_tokens,
number of image tiles, batch) compiles the prefill and the step once, and every later prompt of that shape reuses
them. Sampling settings, stop ids (STOP_SLOTS per bucket) and the key are traced values and never recompile.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from internvl_jax import generate as gen
from internvl_jax import sharding
from internvl_jax.models import internvl

MIN_BUCKET = 16


def bucket_length(t: int, minimum: int = MIN_BUCKET) -> int:
  """The padded prompt length for a prompt of t tokens: the smallest power of two >= max(t, minimum)."""
  return max(minimum, 1 << max(t - 1, 0).bit_length())


class _Programs:
  """The jitted prefill / step / recompute of one model object (its graph fixed, its parameters an argument, so
  an updated model reuses them). jax.jit keys each on the shapes it sees: `cache_size()` counts the compiled
  variants."""

  def __init__(self, model: nnx.Module):
    graphdef = nnx.graphdef(model)
    self.mesh = sharding.model_mesh(model)
    ctx = lambda: (contextlib.nullcontext() if self.mesh is None
                   else jax.sharding.use_abstract_mesh(self.mesh.abstract_mesh))

    def prefill(state, ids, mask, pixels, key, max_new_tokens):
      # -> the step's carry; every piece made here, so the step sees the same input kinds at every call
      with ctx():
        m = nnx.merge(graphdef, state)
        b, t = ids.shape
        logits, cache = gen.prefill(m, ids, pixels, mask, t + max_new_tokens)
        return (jnp.zeros((), jnp.int32), logits, cache, jnp.zeros((b, max_new_tokens), jnp.int32),
                jnp.zeros((b,), bool), key, gen.seen_tokens(ids, mask, logits.shape[-1]))

    def step(state, carry, s, ids, mask, recompute_at):
      # carry: (i, logits, cache, tokens [B, N], done [B], key, seen [B, V]) as in generate._decode's loop
      with ctx():
        m = nnx.merge(graphdef, state)
        i, logits, cache, tokens, done, key, seen = carry
        key, sub = jax.random.split(key)
        tok = jnp.where(done, gen.fill_id(s), gen.pick(logits, i, sub, seen, s))
        seen = gen.mark_seen(seen, tok)
        tokens = jax.lax.dynamic_update_index_in_dim(tokens, tok, i, axis=1)
        done = done | jnp.any(tok[:, None] == s.stop_ids[None, :], axis=1)
        if recompute_at is None:
          logits, cache = gen.step(m, tok, cache)
        else:  # this step only (a separate program): the whole sequence into a fresh cache
          logits, cache = gen.recompute(m, ids, mask, tokens, recompute_at + 1, ids.shape[1] + tokens.shape[1])
        return tok, (i + 1, logits, cache, tokens, done, key, seen)

    self.prefill = jax.jit(prefill, static_argnames=("max_new_tokens",))
    # the carry is replaced every step: donating it lets the cache be updated in place where the backend can
    self.step = jax.jit(step, static_argnames=("recompute_at",), donate_argnums=(1,))

  def cache_size(self) -> int:
    """How many programs were compiled so far (prefill and step variants together)."""
    return self.prefill._cache_size() + self.step._cache_size()


_PROGRAMS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def programs(model: nnx.Module) -> _Programs:
  """The compiled programs of `model` (made on first use, kept while the model lives)."""
  if model not in _PROGRAMS:
    _PROGRAMS[model] = _Programs(model)
  return _PROGRAMS[model]


def stream(model: nnx.Module, input_ids, pixel_values=None, attention_mask=None, *, max_new_tokens: int = 256,
           stop_ids: int | Sequence[int] | None = None, temperature: float = 0.0, top_p: float = 1.0,
           repetition_penalty: float = 1.0, min_new_tokens: int = 0, key: jax.Array | None = None,
           bucket: bool = True) -> Iterator:
  """Yields new tokens one step at a time, as generate() would produce them (same arguments, same tokens).

  input_ids: one prompt [T] int -> yields int token ids; or left-padded prompts [B, T] (attention_mask [B, T],
  1 = real token) -> yields int32 arrays [B], a finished row holding the first stop id. pixel_values
  [num_tiles, H, W, 3] float (chat models). stop_ids: one id or several; a row stops after yielding the first of
  them (the stop id is yielded), the generator ends when every row has stopped or after max_new_tokens.
  temperature 0 = greedy, else top-p sampling with `key` (default jax.random.key(0)); repetition_penalty as
  transformers' (1.0 = off); min_new_tokens bans the stop ids before that many tokens. bucket: left-pad the prompt
  to bucket_length() (False: compile for the exact length, as generate() does)."""
  single = np.ndim(input_ids) == 1
  if single:
    input_ids = np.asarray(input_ids)[None]
    attention_mask = None if attention_mask is None else np.asarray(attention_mask)[None]
  ids, mask, pixels = gen.check_prompt(model, input_ids, attention_mask, pixel_values)
  if max_new_tokens < 0:
    raise ValueError(f"need max_new_tokens >= 0, got {max_new_tokens}")
  s = gen.sampling(temperature, top_p, stop_ids, min_new_tokens, repetition_penalty)
  if max_new_tokens == 0:
    return
  b, t = ids.shape
  if bucket and bucket_length(t) > t:  # left padding: the padded ids are masked out
    extra = bucket_length(t) - t
    ids = jnp.pad(ids, ((0, 0), (extra, 0)))
    mask = jnp.pad(mask, ((0, 0), (extra, 0)))
  progs = programs(model)
  ids, mask, pixels = gen.place_on_mesh(progs.mesh, ids, mask, pixels)
  state = nnx.state(model)
  carry = progs.prefill(state, ids, mask, pixels, jax.random.key(0) if key is None else key,
                        max_new_tokens=max_new_tokens)
  chat = isinstance(model, internvl.InternVLChat)
  # transformers counts the prompt as given (t), not our bucket padding: the recompute step follows the caller's t
  recompute_at = None if chat else gen.longrope_recompute_step(model.config, t, max_new_tokens)
  stops = set(gen.stop_id_list(stop_ids))
  done = np.zeros((b,), bool)
  for i in range(max_new_tokens):
    tok, carry = progs.step(state, carry, s, ids, mask, recompute_at=recompute_at if i == recompute_at else None)
    tok = np.asarray(tok)
    yield int(tok[0]) if single else tok
    done |= np.isin(tok, list(stops))
    if done.all():
      return
