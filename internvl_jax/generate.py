"""Batched text generation with the KV cache: one jit-compiled program that prefills the prompt, then decodes one
token per step in a `jax.lax.while_loop` (which stops early once every row has produced EOS).

Works for language models (llm.Decoder) and chat models (internvl.InternVLChat: pixel_values fill the
image-token positions of the prompt during prefill). Prompts of different lengths are LEFT-padded (attention_mask
0 on the left); RoPE positions count real tokens, so a padded row decodes exactly as it would alone.

Stopping follows transformers' generate (which InternVL's chat() calls): a row stops at the first of any of its
stop ids, and `min_new_tokens` bans the stop ids until that many new tokens exist (MinNewTokensLengthLogitsProcessor).
A model whose parameters are sharded over a mesh (convert.load_pretrained(..., mesh=)) generates under that mesh.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from internvl_jax import sharding
from internvl_jax.models import internvl

STOP_SLOTS = 4  # stop-id arrays are padded with -1 to a multiple of this: one compiled program per bucket


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


@functools.partial(nnx.jit, static_argnames=("max_new_tokens", "mesh"))
def _generate(model, input_ids, pixel_values, attention_mask, key, greedy, temperature, top_p, stop_ids,
              min_new_tokens, *, max_new_tokens: int, mesh=None):
  # the mesh in context turns on the models' activation constraints (sharding.constrain) while tracing
  with contextlib.nullcontext() if mesh is None else jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
    return _decode(model, input_ids, pixel_values, attention_mask, key, greedy, temperature, top_p, stop_ids,
                   min_new_tokens, max_new_tokens)


def _decode(model, input_ids, pixel_values, attention_mask, key, greedy, temperature, top_p, stop_ids,
            min_new_tokens, max_new_tokens):
  # greedy / temperature / top_p / stop ids / min_new_tokens are traced values: greedy and sampled runs and every
  # stop set of one bucket share one compiled program, and lax.cond runs only the chosen branch. stop_ids [S] int32
  # is padded with -1 (never a token); finished rows are filled with stop_ids[0] (id 0 when there is none).
  chat = isinstance(model, internvl.InternVLChat)
  lm = model.language if chat else model
  b, t = input_ids.shape
  prefix = 0  # 'prefix'-mode chat models put the vision tokens in front of the prompt: they need cache slots too
  if chat and model.config.mode == "prefix" and pixel_values is not None:
    cell = model.config.vision.patch_size * round(1 / model.config.downsample_ratio)
    prefix = (pixel_values.shape[1] // cell) * (pixel_values.shape[2] // cell)
  out = _forward(model, input_ids, attention_mask, lm.init_cache(b, prefix + t + max_new_tokens), pixel_values)
  pad = jnp.maximum(stop_ids[0], 0).astype(jnp.int32)

  def pick(logits, i, k):
    # the stop ids are banned while fewer than min_new_tokens tokens were generated (i = tokens so far)
    vocab = jax.lax.broadcasted_iota(jnp.int32, logits.shape[-1:], 0)
    is_stop = jnp.any(vocab[None, :] == stop_ids[:, None], axis=0)  # [V]
    logits = jnp.where(is_stop & (i < min_new_tokens), -jnp.inf, logits)
    return jax.lax.cond(greedy, lambda: jnp.argmax(logits, axis=-1).astype(jnp.int32),
                        lambda: _top_p_sample(logits, k, temperature, top_p))

  def cond(carry):
    i, _, _, _, done, _ = carry
    return (i < max_new_tokens) & ~jnp.all(done)

  recompute_at = None if chat else longrope_recompute_step(lm.config, t, max_new_tokens)

  def step(tok, cache):
    out = _forward(model, tok[:, None], jnp.ones((b, 1), bool), cache, None)
    return out.logits[:, -1], out.cache

  def recompute(tokens):  # the whole sequence so far (static length) into a fresh cache
    ids = jnp.concatenate([input_ids, tokens[:, :recompute_at + 1]], axis=1)
    mask = jnp.concatenate([attention_mask.astype(bool), jnp.ones((b, recompute_at + 1), bool)], axis=1)
    out = _forward(model, ids, mask, lm.init_cache(b, t + max_new_tokens), None)
    return out.logits[:, -1], out.cache

  def body(carry):
    i, logits, cache, tokens, done, k = carry
    k, sub = jax.random.split(k)
    tok = jnp.where(done, pad, pick(logits, i, sub))
    tokens = jax.lax.dynamic_update_index_in_dim(tokens, tok, i, axis=1)
    done = done | jnp.any(tok[:, None] == stop_ids[None, :], axis=1)
    if recompute_at is None:
      logits, cache = step(tok, cache)
    else:
      logits, cache = jax.lax.cond(i == recompute_at, lambda: recompute(tokens), lambda: step(tok, cache))
    return i + 1, logits, cache, tokens, done, k

  carry = (jnp.zeros((), jnp.int32), out.logits[:, -1], out.cache, jnp.full((b, max_new_tokens), pad, jnp.int32),
           jnp.zeros((b,), bool), key)
  tokens = jax.lax.while_loop(cond, body, carry)[3]
  return jnp.concatenate([input_ids, tokens], axis=1)


def longrope_recompute_step(cfg, prompt_len: int, max_new_tokens: int) -> int | None:
  """The decode step (0-based new token) whose forward transformers' Phi-3 generate replaces by a forward of the
  whole sequence with a fresh cache, or None. Phi3ForCausalLM drops its cache when the sequence (padded prompt +
  new tokens) first holds original_max_position_embeddings + 1 tokens, so that every key is recomputed with the long
  longrope factors; generating a chat model (InternVLForConditionalGeneration) does not, and the decoder's
  per-call choice of factors (llm.rope_tables) is then what transformers computes."""
  if cfg.get("rope_type", "default") != "longrope":
    return None
  at = cfg.rope_original_max - prompt_len
  return at if 0 <= at < max_new_tokens else None


def stop_id_list(stop_ids) -> list[int]:
  """None | int | sequence (or array) of ints -> a list of ids (one-line error for a negative or non-integer id)."""
  if stop_ids is None:
    return []
  if isinstance(stop_ids, (np.ndarray, jax.Array)):
    stop_ids = np.asarray(stop_ids).reshape(-1).tolist()
  ids = list(stop_ids) if isinstance(stop_ids, (list, tuple)) else [stop_ids]
  for i in ids:
    if not isinstance(i, (int, np.integer)) or isinstance(i, bool) or i < 0:
      raise ValueError(f"eos_token_id must be token ids >= 0 (an int or a list of ints), got {stop_ids!r}")
  return [int(i) for i in ids]


def truncate_at_stop(ids, stop_ids) -> list[int] | list[list[int]]:
  """Cuts generated ids before the first stop id (any of `stop_ids`: None | int | sequence of ints).

  ids: one row (sequence / 1-D array of ints) -> list[int]; or rows [B, N] (2-D array / list of lists) ->
  B lists. The stop id itself is dropped, as the official chat() drops the separator from the answer."""
  stops = set(stop_id_list(stop_ids))
  if isinstance(ids, (list, tuple)) and ids and not isinstance(ids[0], (int, np.integer)):
    return [truncate_at_stop(row, stop_ids) for row in ids]  # rows of different lengths
  arr = np.asarray(ids)
  if arr.ndim == 2:
    return [truncate_at_stop(row, stop_ids) for row in arr]
  if arr.ndim != 1:
    raise ValueError(f"truncate_at_stop needs one row [N] or rows [B, N] of token ids, got shape {arr.shape}")
  row = [int(x) for x in arr.tolist()]
  for n, x in enumerate(row):
    if x in stops:
      return row[:n]
  return row


def generate(model: nnx.Module, input_ids, pixel_values=None, attention_mask=None, max_new_tokens: int = 16,
             temperature: float = 0.0, top_p: float = 1.0, eos_token_id: int | Sequence[int] | None = None,
             rng: jax.Array | None = None, min_new_tokens: int = 0) -> jax.Array:
  """Generates up to `max_new_tokens` tokens after each prompt.

  input_ids [B, T] int (left-padded); pixel_values [num_tiles, H, W, 3] float (chat models only);
  attention_mask [B, T] (1 = real token; default all ones); temperature 0 = greedy, otherwise top-p sampling with
  key `rng` (default jax.random.key(0)). eos_token_id: one stop id or several; a row stops at the first of any of
  them and the rest of it is filled with the FIRST id (id 0 when none is given). min_new_tokens: the stop ids
  cannot be produced before this many new tokens (transformers' rule). With a model sharded over a mesh, the batch
  is split over the mesh's batch axes ('data', 'fsdp', 'expert'; those whose product divides B), else replicated.
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
  if max_new_tokens < 0 or temperature < 0 or not 0 < top_p <= 1 or min_new_tokens < 0:
    raise ValueError(f"need max_new_tokens >= 0, temperature >= 0, 0 < top_p <= 1 and min_new_tokens >= 0; got "
                     f"{max_new_tokens}, {temperature}, {top_p}, {min_new_tokens}")
  if pixel_values is not None and not isinstance(model, internvl.InternVLChat):
    raise ValueError("pixel_values given to a text-only model")
  stops = stop_id_list(eos_token_id)
  if max_new_tokens == 0:
    return input_ids
  slots = max(STOP_SLOTS, -(-len(stops) // STOP_SLOTS) * STOP_SLOTS)
  stop_ids = np.full((slots,), -1, np.int32)
  stop_ids[:len(stops)] = stops
  key = jax.random.key(0) if rng is None else rng
  pixels = None if pixel_values is None else jnp.asarray(pixel_values)
  mesh = sharding.model_mesh(model)
  if mesh is not None:  # inputs live on the model's mesh: split over the batch where it divides
    place = lambda x: jax.device_put(x, sharding.leading_axis_sharding(mesh, x.shape))
    input_ids, mask = place(input_ids), place(mask)
    pixels = None if pixels is None else place(pixels)
  return _generate(model, input_ids, pixels, mask, key, jnp.bool_(temperature == 0),
                   jnp.float32(max(temperature, 1e-6)), jnp.float32(top_p), jnp.asarray(stop_ids),
                   jnp.int32(min_new_tokens), max_new_tokens=int(max_new_tokens), mesh=mesh)
