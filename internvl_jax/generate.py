"""Batched text generation with the KV cache: one jit-compiled program that prefills the prompt, then decodes one
token per step in a `jax.lax.while_loop` (which stops early once every row has produced EOS).

Works for language models (llm.Decoder) and chat models (internvl.InternVLChat: pixel_values fill the
image-token positions of the prompt during prefill). Prompts of different lengths are LEFT-padded (attention_mask
0 on the left); RoPE positions count real tokens, so a padded row decodes exactly as it would alone.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from internvl_jax.models import internvl


def _top_p_sample(logits: jax.Array, key: jax.Array, temperature: jax.Array, top_p: jax.Array) -> jax.Array:
  """Nucleus sampling. logits [B, V] float32 -> token ids [B] int32: keeps the smallest set of most likely tokens
  whose probability reaches top_p (always at least the most likely one) and samples among them."""
  logits = logits / temperature
  desc = jnp.sort(logits, axis=-1)[:, ::-1]
  probs = jax.nn.softmax(desc, axis=-1)
  keep = (jnp.cumsum(probs, axis=-1) - probs) < top_p  # mass before this token is still below top_p
  cutoff = jnp.min(jnp.where(keep, desc, jnp.inf), axis=-1, keepdims=True)
  logits = jnp.where(logits < cutoff, -jnp.inf, logits)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def _forward(model, ids, mask, cache, pixel_values):
  if isinstance(model, internvl.InternVLChat):
    return model(ids, pixel_values, mask, cache=cache)
  return model(ids, attention_mask=mask, cache=cache)


@functools.partial(nnx.jit, static_argnames=("max_new_tokens",))
def _generate(model, input_ids, pixel_values, attention_mask, key, greedy, temperature, top_p, eos_token_id, *,
              max_new_tokens: int):
  # greedy / temperature / top_p / eos are traced values: greedy and sampled runs share one compiled program, and
  # lax.cond runs only the chosen branch. eos_token_id < 0 means "no EOS" (rows then pad with nothing: id 0).
  chat = isinstance(model, internvl.InternVLChat)
  lm = model.language if chat else model
  b, t = input_ids.shape
  prefix = 0  # 'prefix'-mode chat models put the vision tokens in front of the prompt: they need cache slots too
  if chat and model.config.mode == "prefix" and pixel_values is not None:
    cell = model.config.vision.patch_size * round(1 / model.config.downsample_ratio)
    prefix = (pixel_values.shape[1] // cell) * (pixel_values.shape[2] // cell)
  out = _forward(model, input_ids, attention_mask, lm.init_cache(b, prefix + t + max_new_tokens), pixel_values)
  has_eos = eos_token_id >= 0
  pad = jnp.where(has_eos, eos_token_id, 0).astype(jnp.int32)

  def pick(logits, k):
    return jax.lax.cond(greedy, lambda: jnp.argmax(logits, axis=-1).astype(jnp.int32),
                        lambda: _top_p_sample(logits, k, temperature, top_p))

  def cond(carry):
    i, _, _, _, done, _ = carry
    return (i < max_new_tokens) & ~jnp.all(done)

  def body(carry):
    i, logits, cache, tokens, done, k = carry
    k, sub = jax.random.split(k)
    tok = jnp.where(done, pad, pick(logits, sub))
    tokens = jax.lax.dynamic_update_index_in_dim(tokens, tok, i, axis=1)
    done = done | (has_eos & (tok == eos_token_id))
    step = _forward(model, tok[:, None], jnp.ones((b, 1), bool), cache, None)
    return i + 1, step.logits[:, -1], step.cache, tokens, done, k

  carry = (jnp.zeros((), jnp.int32), out.logits[:, -1], out.cache, jnp.full((b, max_new_tokens), pad, jnp.int32),
           jnp.zeros((b,), bool), key)
  tokens = jax.lax.while_loop(cond, body, carry)[3]
  return jnp.concatenate([input_ids, tokens], axis=1)


def generate(model: nnx.Module, input_ids, pixel_values=None, attention_mask=None, max_new_tokens: int = 16,
             temperature: float = 0.0, top_p: float = 1.0, eos_token_id: int | None = None,
             rng: jax.Array | None = None) -> jax.Array:
  """Generates `max_new_tokens` tokens after each prompt.

  input_ids [B, T] int (left-padded); pixel_values [num_tiles, H, W, 3] float (chat models only);
  attention_mask [B, T] (1 = real token; default all ones); temperature 0 = greedy, otherwise top-p sampling with
  key `rng` (default jax.random.key(0)). After a row emits eos_token_id, the rest of that row is filled with it.
  Returns [B, T + max_new_tokens] int32: the prompt followed by the new tokens.
  """
  input_ids = jnp.asarray(input_ids, jnp.int32)
  if input_ids.ndim != 2:
    raise ValueError(f"input_ids must be [batch, length], got shape {input_ids.shape}")
  mask = jnp.ones(input_ids.shape, bool) if attention_mask is None else jnp.asarray(attention_mask).astype(bool)
  if mask.shape != input_ids.shape:
    raise ValueError(f"attention_mask shape {mask.shape} differs from input_ids shape {input_ids.shape}")
  if not bool(np.all(np.asarray(mask[:, -1]))):
    raise ValueError("prompts must be left-padded: the last position of every row must be a real token")
  if max_new_tokens < 0 or temperature < 0 or not 0 < top_p <= 1:
    raise ValueError(f"need max_new_tokens >= 0, temperature >= 0 and 0 < top_p <= 1; got {max_new_tokens}, "
                     f"{temperature}, {top_p}")
  if pixel_values is not None and not isinstance(model, internvl.InternVLChat):
    raise ValueError("pixel_values given to a text-only model")
  if max_new_tokens == 0:
    return input_ids
  key = jax.random.key(0) if rng is None else rng
  pixels = None if pixel_values is None else jnp.asarray(pixel_values)
  return _generate(model, input_ids, pixels, mask, key, jnp.bool_(temperature == 0),
                   jnp.float32(max(temperature, 1e-6)), jnp.float32(top_p),
                   jnp.int32(-1 if eos_token_id is None else eos_token_id), max_new_tokens=int(max_new_tokens))
