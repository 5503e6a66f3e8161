"""LLaMA and Qwen2 causal LMs loaded from transformers folders: logits and greedy generation equal PyTorch's."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import hf_refs
from internvl_jax import convert
from internvl_jax.generate import generate

jax.config.update("jax_default_matmul_precision", "highest")
REL_TOL = 1e-4  # max |ours - torch| / max |torch| over the logits of real tokens
NEW = 16


@pytest.fixture(scope="module", params=["qwen2", "llama"])
def pair(request, tmp_path_factory):
  folder = str(tmp_path_factory.mktemp(request.param))
  text = {"qwen2": hf_refs.QWEN2, "llama": hf_refs.LLAMA}[request.param]
  ref = hf_refs.causal_lm(text, folder)
  return request.param, ref, convert.load_pretrained(folder)


def prompts(pad: bool):
  """Two prompts of length 7 and (left-padded) 4, or two unpadded ones."""
  ids = np.random.default_rng(2).integers(0, 95, (2, 7)).astype(np.int64)
  mask = np.ones_like(ids)
  if pad:
    mask[1, :3] = 0
    ids[1, :3] = 0
  return ids, mask


def hf_generate(ref, ids, mask, **kw):
  with torch.no_grad():
    out = ref.generate(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), do_sample=False,
                       max_new_tokens=NEW, **kw)
  return out.numpy()


def test_config(pair):
  family, ref, ours = pair
  c = ours.config
  assert (c.num_kv_heads, c.qkv_bias, c.tie_embeddings) == (2, family == "qwen2", False)
  assert c.rope_theta == ref.config.rope_parameters["rope_theta"]
  assert c.norm_eps == ref.config.rms_norm_eps


@pytest.mark.parametrize("pad", [False, True], ids=["unpadded", "left_padded"])
def test_logits_match_torch(pair, pad):
  family, ref, ours = pair
  ids, mask = prompts(pad)
  with torch.no_grad():
    want = ref(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.numpy()
  got = np.asarray(ours(jnp.asarray(ids), pixel_values=None, attention_mask=jnp.asarray(mask)).logits)
  real = mask.astype(bool)
  abs_err, rel_err = hf_refs.errors(got[real], want[real])
  print(f"{family} logits pad={pad}: max abs {abs_err:.2e}, max rel {rel_err:.2e}")
  assert rel_err < REL_TOL


@pytest.mark.parametrize("pad", [False, True], ids=["unpadded", "left_padded"])
def test_greedy_generate_equals_torch(pair, pad):
  family, ref, ours = pair
  ids, mask = prompts(pad)
  want = hf_generate(ref, ids, mask)
  got = np.asarray(generate(ours, ids, attention_mask=mask, max_new_tokens=NEW))
  assert got.dtype == np.int32 and got.shape == (2, 7 + NEW)
  np.testing.assert_array_equal(got, want)


def test_generate_stops_at_eos(pair):
  family, ref, ours = pair
  ids, mask = prompts(True)
  free = hf_generate(ref, ids, mask)
  eos = int(free[0, 7 + 4])  # the 5th new token of row 0 becomes EOS: row 0 stops there
  want = hf_generate(ref, ids, mask, eos_token_id=eos, pad_token_id=eos)
  want = np.pad(want, ((0, 0), (0, 7 + NEW - want.shape[1])), constant_values=eos)  # HF stops when all are done
  got = np.asarray(generate(ours, ids, attention_mask=mask, max_new_tokens=NEW, eos_token_id=eos))
  np.testing.assert_array_equal(got, want)
  assert np.all(got[0, 7 + 4:] == eos)


def test_sampling_is_seeded_and_top_p_small_is_greedy(pair):
  family, ref, ours = pair
  ids, mask = prompts(True)
  a = generate(ours, ids, attention_mask=mask, max_new_tokens=NEW, temperature=1.0, top_p=0.9, rng=jax.random.key(3))
  b = generate(ours, ids, attention_mask=mask, max_new_tokens=NEW, temperature=1.0, top_p=0.9, rng=jax.random.key(3))
  np.testing.assert_array_equal(a, b)
  # top_p close to 0 keeps only the most likely token: sampling collapses to greedy.
  g = generate(ours, ids, attention_mask=mask, max_new_tokens=NEW)
  s = generate(ours, ids, attention_mask=mask, max_new_tokens=NEW, temperature=0.7, top_p=1e-6, rng=jax.random.key(1))
  np.testing.assert_array_equal(g, s)


def test_right_padding_is_refused(pair):
  _, _, ours = pair
  ids, mask = prompts(False)
  mask[0, -1] = 0
  with pytest.raises(ValueError, match="left-padded"):
    generate(ours, ids, attention_mask=mask)
