"""generate() with the KV cache equals a cache-free greedy loop (full forward each step), for a decoder, a
'replace'-mode chat model and a 'prefix'-mode (seed) chat model with random weights."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from internvl_jax.generate import generate
from internvl_jax.models import internvl, llm, presets

jax.config.update("jax_default_matmul_precision", "highest")
NEW = 6


def naive_greedy(model, ids, mask, pixels):
  """Re-runs the whole sequence for every new token (no cache): the reference for generate(). The sequence lives
  in a fixed [B, T + NEW] buffer (one compile): causal attention keeps the not-yet-written slots from affecting
  the position being read."""
  forward = nnx.jit(lambda m, i, a, p: m(i, pixel_values=p, attention_mask=a).logits)
  t = ids.shape[1]
  buf = jnp.concatenate([ids, jnp.zeros((ids.shape[0], NEW), ids.dtype)], axis=1)
  full_mask = jnp.concatenate([mask, jnp.ones((ids.shape[0], NEW), mask.dtype)], axis=1)
  for step in range(NEW):
    nxt = jnp.argmax(forward(model, buf, full_mask, pixels)[:, t - 1 + step], axis=-1).astype(buf.dtype)
    buf = buf.at[:, t + step].set(nxt)
  return np.asarray(buf)


@pytest.mark.parametrize("kind", ["decoder", "chat_replace", "chat_prefix"])
def test_cached_generation_equals_full_recompute(kind):
  rng = np.random.default_rng(0)
  ids = rng.integers(0, 120, (2, 9)).astype(np.int32)
  mask = np.ones_like(ids)
  ids[1, :2], mask[1, :2] = 0, 0  # left padding
  pixels = None
  if kind == "decoder":
    model = llm.Decoder(presets.language("tiny"), rngs=nnx.Rngs(1))
  else:
    cfg = presets.chat("tiny")
    cfg.mode = "replace" if kind == "chat_replace" else "prefix"
    model = internvl.InternVLChat(cfg, rngs=nnx.Rngs(1))
    # prefix mode: a 112x112 image gives 16 vision tokens in front of the 9-token prompt, more than the new
    # tokens, so a cache sized for the prompt alone would not even hold the prefill.
    size = 56 if kind == "chat_replace" else 112
    pixels = jnp.asarray(rng.standard_normal((2, size, size, 3)), jnp.float32)
    if kind == "chat_replace":  # one 56x56 tile per row = 4 image tokens
      ids[0, 3:7] = ids[1, 4:8] = cfg.image_token_id
  want = naive_greedy(model, jnp.asarray(ids), jnp.asarray(mask), pixels)
  got = np.asarray(generate(model, ids, pixel_values=pixels, attention_mask=mask, max_new_tokens=NEW))
  np.testing.assert_array_equal(got, want)
