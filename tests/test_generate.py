"""generate() with the KV cache equals a cache-free greedy loop (full forward each step), for a decoder, a
'replace'-mode chat model and a 'prefix'-mode (seed) chat model with random weights; and it stops like
transformers' generate (several stop ids, min_new_tokens) on tiny Qwen2 / LLaMA models with random weights."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from internvl_jax.generate import _generate, generate, truncate_at_stop
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


# ---------------------------------------------------------------------------------------- stopping vs transformers

STOP_NEW = 8


@pytest.fixture(scope="module", params=["qwen2", "llama"])
def lm_pair(request, tmp_path_factory):
  import hf_refs
  from internvl_jax import convert
  folder = str(tmp_path_factory.mktemp(request.param))
  ref = hf_refs.causal_lm({"qwen2": hf_refs.QWEN2, "llama": hf_refs.LLAMA}[request.param], folder)
  return ref, convert.load_pretrained(folder), _stop_case(ref)


def _hf_generate(ref, ids, mask, **kw):
  import torch
  with torch.no_grad():
    return ref.generate(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), do_sample=False,
                        max_new_tokens=STOP_NEW, **kw).numpy()[:, ids.shape[1]:]


def _stop_case(ref):
  """Three left-padded prompts and two stop ids (a, b) that transformers' unconstrained greedy run produces first
  at step 2 of row 0 (a) and step 4 of row 1 (b), while row 2 produces neither: so stopping only at the first id,
  or ignoring min_new_tokens, changes the tokens. The first fitting prompt seed of 40, all run in one batch."""
  cases = []
  for seed in range(40):
    ids = np.random.default_rng(seed).integers(0, 95, (3, 7)).astype(np.int64)
    mask = np.ones_like(ids)
    ids[1, :3] = mask[1, :3] = 0
    ids[2, :1] = mask[2, :1] = 0
    cases.append((ids, mask))
  outs = _hf_generate(ref, np.concatenate([c[0] for c in cases]), np.concatenate([c[1] for c in cases])).tolist()
  for n, (ids, mask) in enumerate(cases):
    out = outs[3 * n:3 * n + 3]
    a, b = out[0][2], out[1][4]
    if (a != b and a not in out[0][:2] + out[1][:5] + out[2] and b not in out[0][:3] + out[1][:4] + out[2]):
      return ids, mask, a, b
  raise AssertionError("no prompt seed gives distinct first-time stop ids; widen the search")


def _meaningful(row, stops):
  """New tokens up to and including the first stop id (transformers pads after it)."""
  row = list(row)
  hits = [n for n, x in enumerate(row) if x in stops]
  return row[:hits[0] + 1] if hits else row


@pytest.mark.parametrize("min_new", [0, 3, 5])
def test_stops_at_any_stop_id_like_transformers(lm_pair, min_new):
  ref, ours, (ids, mask, a, b) = lm_pair
  want = _hf_generate(ref, ids, mask, eos_token_id=[a, b], min_new_tokens=min_new, pad_token_id=0)
  got = np.asarray(generate(ours, ids, attention_mask=mask, max_new_tokens=STOP_NEW, eos_token_id=[a, b],
                            min_new_tokens=min_new))
  assert got.shape == (3, 7 + STOP_NEW)
  np.testing.assert_array_equal(got[:, :7], ids)
  lengths = []
  for r in range(3):
    ref_row = _meaningful(want[r], (a, b))
    new = got[r, 7:]
    np.testing.assert_array_equal(new[:len(ref_row)], ref_row)
    np.testing.assert_array_equal(new[len(ref_row):], a)  # our fill rule: the first stop id
    assert a not in ref_row[:min_new] and b not in ref_row[:min_new]
    lengths.append(len(ref_row))
  # the case is meaningful: each row stops where the chosen ids and min_new_tokens say it must
  if min_new == 0:
    assert lengths == [3, 5, STOP_NEW] and (want[0][2], want[1][4]) == (a, b)
  else:
    assert lengths[0] > 3 and lengths[0] > min_new


def test_one_compiled_program_for_stop_sets_of_one_bucket(lm_pair):
  _, ours, _ = lm_pair
  ids = np.arange(1, 15, dtype=np.int32).reshape(2, 7)
  generate(ours, ids, max_new_tokens=4, eos_token_id=5)
  size = _generate.jitted_fn._cache_size()
  for stops, min_new in (([7, 9], 0), ([1, 2, 3], 2), (None, 1), (4, 3)):
    generate(ours, ids, max_new_tokens=4, eos_token_id=stops, min_new_tokens=min_new)
  assert _generate.jitted_fn._cache_size() == size


def test_truncate_at_stop_and_bad_stop_ids():
  assert truncate_at_stop([5, 6, 7, 6], [7, 6]) == [5]
  assert truncate_at_stop(np.array([5, 6, 7]), 9) == [5, 6, 7]
  assert truncate_at_stop(np.array([[1, 2, 3], [3, 1, 1]]), 3) == [[1, 2], []]
  assert truncate_at_stop([[1, 2], [2]], None) == [[1, 2], [2]]
  model = llm.Decoder(presets.language("tiny"), rngs=nnx.Rngs(1))
  with pytest.raises(ValueError, match="eos_token_id must be token ids"):
    generate(model, np.ones((1, 3), np.int32), eos_token_id=[3, -1])
  with pytest.raises(ValueError, match="min_new_tokens >= 0"):
    generate(model, np.ones((1, 3), np.int32), min_new_tokens=-1)


# ---------------------------------------------------------------------------------------- repetition penalty

def test_penalize_equals_transformers_processor():
  import torch
  from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor
  from internvl_jax.generate import penalize, seen_tokens
  rng = np.random.default_rng(0)
  ids = rng.integers(0, 20, (3, 6))
  mask = np.ones_like(ids)
  mask[1, :2] = mask[2, :4] = 0  # left padding: transformers ignores it (prompt_ignore_length)
  logits = rng.standard_normal((3, 20)).astype(np.float32) * 3
  proc = RepetitionPenaltyLogitsProcessor(1.7, prompt_ignore_length=torch.tensor([0, 2, 4]))
  want = proc(torch.from_numpy(ids), torch.from_numpy(logits.copy())).numpy()
  got = np.asarray(penalize(jnp.asarray(logits), seen_tokens(jnp.asarray(ids), jnp.asarray(mask), 20), 1.7))
  np.testing.assert_allclose(got, want, rtol=1e-6)
  assert np.sum(got != logits) >= 8  # positive and negative logits of several rows were changed


def test_repetition_penalty_generate_like_transformers(lm_pair):
  ref, ours, (ids, mask, _, _) = lm_pair
  want = _hf_generate(ref, ids, mask, repetition_penalty=1.8, pad_token_id=0)
  plain = _hf_generate(ref, ids, mask, pad_token_id=0)
  assert (want != plain).any()  # the penalty changes the greedy tokens of this case
  got = np.asarray(generate(ours, ids, attention_mask=mask, max_new_tokens=STOP_NEW, repetition_penalty=1.8))
  np.testing.assert_array_equal(got[:, 7:], want)
  with pytest.raises(ValueError, match="repetition_penalty > 0"):
    generate(ours, ids, repetition_penalty=0.0)
