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
from typing import NamedTuple

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


class Sampling(NamedTuple):
  """How the next token is chosen, as traced values (greedy and sampled runs, every stop set of one STOP_SLOTS
  bucket and every penalty share one compiled program): greedy bool []; temperature, top_p, repetition_penalty
  float32 []; stop_ids int32 [S] padded with -1 (never a token); min_new_tokens int32 []."""
  greedy: jax.Array
  temperature: jax.Array
  top_p: jax.Array
  stop_ids: jax.Array
  min_new_tokens: jax.Array
  repetition_penalty: jax.Array


def sampling(temperature: float = 0.0, top_p: float = 1.0, eos_token_id=None, min_new_tokens: int = 0,
             repetition_penalty: float = 1.0) -> Sampling:
  """Checked Python settings -> Sampling (temperature 0 = greedy). One-line errors for values out of range."""
  if temperature < 0 or not 0 < top_p <= 1 or min_new_tokens < 0 or not repetition_penalty > 0:
    raise ValueError(f"need temperature >= 0, 0 < top_p <= 1, min_new_tokens >= 0 and repetition_penalty > 0; got "
                     f"{temperature}, {top_p}, {min_new_tokens}, {repetition_penalty}")
  stops = stop_id_list(eos_token_id)
  slots = max(STOP_SLOTS, -(-len(stops) // STOP_SLOTS) * STOP_SLOTS)
  stop_ids = np.full((slots,), -1, np.int32)
  stop_ids[:len(stops)] = stops
  return Sampling(jnp.bool_(temperature == 0), jnp.float32(max(temperature, 1e-6)), jnp.float32(top_p),
                  jnp.asarray(stop_ids), jnp.int32(min_new_tokens), jnp.float32(repetition_penalty))


def seen_tokens(input_ids: jax.Array, attention_mask: jax.Array, vocab_size: int) -> jax.Array:
  """bool [B, V]: which ids the real (unmasked) prompt tokens hold, for the repetition penalty. Left padding does
  not count, as transformers' generate ignores it (prompt_ignore_length)."""
  b = input_ids.shape[0]
  rows = jnp.broadcast_to(jnp.arange(b)[:, None], input_ids.shape)
  return jnp.zeros((b, vocab_size), bool).at[rows, input_ids].max(attention_mask.astype(bool))


def penalize(logits: jax.Array, seen: jax.Array, penalty: jax.Array) -> jax.Array:
  """transformers' RepetitionPenaltyLogitsProcessor: logits [B, V] float32 of the ids marked in seen [B, V] bool
  divided by `penalty` where positive, multiplied where negative (penalty 1 leaves them exactly as they are)."""
  return jnp.where(seen, jnp.where(logits < 0, logits * penalty, logits / penalty), logits)


def pick(logits: jax.Array, i: jax.Array, key: jax.Array, seen: jax.Array, s: Sampling) -> jax.Array:
  """The next token ids [B] int32 from logits [B, V] float32 after i new tokens; seen [B, V] bool: the ids in the
  sequence so far. transformers' order: repetition penalty (a seen id's logit divided by the penalty when
  positive, multiplied when negative), stop ids banned while i < min_new_tokens, then argmax or top-p sampling."""
  logits = penalize(logits, seen, s.repetition_penalty)
  vocab = jax.lax.broadcasted_iota(jnp.int32, logits.shape[-1:], 0)
  is_stop = jnp.any(vocab[None, :] == s.stop_ids[:, None], axis=0)  # [V]
  logits = jnp.where(is_stop & (i < s.min_new_tokens), -jnp.inf, logits)
  return jax.lax.cond(s.greedy, lambda: jnp.argmax(logits, axis=-1).astype(jnp.int32),
                      lambda: _top_p_sample(logits, key, s.temperature, s.top_p))


def mark_seen(seen: jax.Array, tok: jax.Array) -> jax.Array:
  """seen [B, V] bool with tok [B] added."""
  return seen.at[jnp.arange(tok.shape[0]), tok].set(True)


def fill_id(s: Sampling) -> jax.Array:
  """What a finished row holds: the first stop id (0 when there is none)."""
  return jnp.maximum(s.stop_ids[0], 0).astype(jnp.int32)


def prefix_tokens(model, pixel_values) -> int:
  """Cache slots the vision tokens take in front of the prompt ('prefix'-mode chat models), else 0."""
  if isinstance(model, internvl.InternVLChat) and model.config.mode == "prefix" and pixel_values is not None:
    cell = model.config.vision.patch_size * round(1 / model.config.downsample_ratio)
    return (pixel_values.shape[1] // cell) * (pixel_values.shape[2] // cell)
  return 0


def prefill(model, input_ids, pixel_values, attention_mask, cache_len: int):
  """The prompt into a fresh cache of cache_len slots (+ the vision prefix) -> (last logits [B, V] f32, cache)."""
  lm = model.language if isinstance(model, internvl.InternVLChat) else model
  out = _forward(model, input_ids, attention_mask,
                 lm.init_cache(input_ids.shape[0], prefix_tokens(model, pixel_values) + cache_len), pixel_values)
  return out.logits[:, -1], out.cache


def step(model, tok, cache):
  """One token per row (tok [B] int32) through the cache -> (logits [B, V] f32, cache)."""
  out = _forward(model, tok[:, None], jnp.ones((tok.shape[0], 1), bool), cache, None)
  return out.logits[:, -1], out.cache


def recompute(model, input_ids, attention_mask, tokens, upto: int, cache_len: int):
  """LongRoPE (see longrope_recompute_step): the prompt and new tokens[:, :upto] (static) into a fresh cache."""
  b = input_ids.shape[0]
  ids = jnp.concatenate([input_ids, tokens[:, :upto]], axis=1)
  mask = jnp.concatenate([attention_mask.astype(bool), jnp.ones((b, upto), bool)], axis=1)
  out = _forward(model, ids, mask, model.init_cache(b, cache_len), None)
  return out.logits[:, -1], out.cache


@functools.partial(nnx.jit, static_argnames=("max_new_tokens", "mesh"))
def _generate(model, input_ids, pixel_values, attention_mask, key, s, *, max_new_tokens: int, mesh=None):
  # the mesh in context turns on the models' activation constraints (sharding.constrain) while tracing
  with contextlib.nullcontext() if mesh is None else jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
    return _decode(model, input_ids, pixel_values, attention_mask, key, s, max_new_tokens)


def _decode(model, input_ids, pixel_values, attention_mask, key, s: Sampling, max_new_tokens):
  # lax.cond runs only the chosen branch; finished rows are filled with fill_id
  chat = isinstance(model, internvl.InternVLChat)
  lm = model.language if chat else model
  b, t = input_ids.shape
  logits, cache = prefill(model, input_ids, pixel_values, attention_mask, t + max_new_tokens)
  seen = seen_tokens(input_ids, attention_mask, logits.shape[-1])
  pad = fill_id(s)

  def cond(carry):
    i, _, _, _, done, _, _ = carry
    return (i < max_new_tokens) & ~jnp.all(done)

  recompute_at = None if chat else longrope_recompute_step(lm.config, t, max_new_tokens)

  def body(carry):
    i, logits, cache, tokens, done, k, seen = carry
    k, sub = jax.random.split(k)
    tok = jnp.where(done, pad, pick(logits, i, sub, seen, s))
    seen = mark_seen(seen, tok)
    tokens = jax.lax.dynamic_update_index_in_dim(tokens, tok, i, axis=1)
    done = done | jnp.any(tok[:, None] == s.stop_ids[None, :], axis=1)
    if recompute_at is None:
      logits, cache = step(model, tok, cache)
    else:
      logits, cache = jax.lax.cond(
          i == recompute_at, lambda: recompute(lm, input_ids, attention_mask, tokens, recompute_at + 1,
                                               t + max_new_tokens),
          lambda: step(model, tok, cache))
    return i + 1, logits, cache, tokens, done, k, seen

  carry = (jnp.zeros((), jnp.int32), logits, cache, jnp.full((b, max_new_tokens), pad, jnp.int32),
           jnp.zeros((b,), bool), key, seen)
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


def check_prompt(model, input_ids, attention_mask, pixel_values):
  """input_ids [B, T] -> (ids int32 [B, T], mask bool [B, T], pixels or None), with one-line errors for a wrong
  shape, a right-padded row or pixels given to a text-only model."""
  input_ids = jnp.asarray(input_ids, jnp.int32)
  if input_ids.ndim != 2:
    raise ValueError(f"input_ids must be [batch, length], got shape {input_ids.shape}")
  mask = jnp.ones(input_ids.shape, bool) if attention_mask is None else jnp.asarray(attention_mask).astype(bool)
  if mask.shape != input_ids.shape:
    raise ValueError(f"attention_mask shape {mask.shape} differs from input_ids shape {input_ids.shape}")
  if not bool(np.all(np.asarray(mask[:, -1]))):
    raise ValueError("prompts must be left-padded: the last position of every row must be a real token")
  if pixel_values is not None and not isinstance(model, internvl.InternVLChat):
    raise ValueError("pixel_values given to a text-only model")
  return input_ids, mask, None if pixel_values is None else jnp.asarray(pixel_values)


def place_on_mesh(mesh, *arrays):
  """Inputs onto the model's mesh, split over the batch where it divides (None stays None)."""
  if mesh is None:
    return arrays
  return tuple(None if x is None else jax.device_put(x, sharding.leading_axis_sharding(mesh, x.shape))
               for x in arrays)


def generate(model: nnx.Module, input_ids, pixel_values=None, attention_mask=None, max_new_tokens: int = 16,
             temperature: float = 0.0, top_p: float = 1.0, eos_token_id: int | Sequence[int] | None = None,
             rng: jax.Array | None = None, min_new_tokens: int = 0, repetition_penalty: float = 1.0) -> jax.Array:
  """Generates up to `max_new_tokens` tokens after each prompt.

  input_ids [B, T] int (left-padded); pixel_values [num_tiles, H, W, 3] float (chat models only);
  attention_mask [B, T] (1 = real token; default all ones); temperature 0 = greedy, otherwise top-p sampling with
  key `rng` (default jax.random.key(0)). eos_token_id: one stop id or several; a row stops at the first of any of
  them and the rest of it is filled with the FIRST id (id 0 when none is given). min_new_tokens: the stop ids
  cannot be produced before this many new tokens (transformers' rule). repetition_penalty: transformers'
  RepetitionPenaltyLogitsProcessor over the row's real prompt tokens and its new tokens (1.0 = off). With a model
  sharded over a mesh, the batch is split over the mesh's batch axes ('data', 'fsdp', 'expert'; those whose
  product divides B), else replicated. Returns [B, T + max_new_tokens] int32: the prompt followed by the new tokens.
  """
  input_ids, mask, pixels = check_prompt(model, input_ids, attention_mask, pixel_values)
  if max_new_tokens < 0:
    raise ValueError(f"need max_new_tokens >= 0, got {max_new_tokens}")
  s = sampling(temperature, top_p, eos_token_id, min_new_tokens, repetition_penalty)
  if max_new_tokens == 0:
    return input_ids
  key = jax.random.key(0) if rng is None else rng
  mesh = sharding.model_mesh(model)
  input_ids, mask, pixels = place_on_mesh(mesh, input_ids, mask, pixels)
  return _generate(model, input_ids, pixels, mask, key, s, max_new_tokens=int(max_new_tokens), mesh=mesh)
