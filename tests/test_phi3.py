"""Phi-3 (InternVL2-4B / Mini-InternVL-Chat-4B language model) against transformers' Phi3ForCausalLM on tiny
random configs: fused qkv_proj / gate_up_proj split at load, longrope (short and long factors, attention factor),
partial rotary, sliding window; logits, greedy generation with left padding, KV-cache decode, export."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import hf_refs
from internvl_jax import convert
from internvl_jax.generate import generate

jax.config.update("jax_default_matmul_precision", "highest")
REL_TOL = 1e-5  # max |ours - torch| / max |torch| over the logits of real tokens (float32)
NEW = 16
PHI3 = dict(model_type="phi3", vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, intermediate_size=64, rms_norm_eps=1e-5, tie_word_embeddings=False,
            bos_token_id=None, eos_token_id=None, pad_token_id=None)  # Phi3Config defaults lie outside 96 ids
VARIANTS = {
    # 128k-style: longrope with 16 'original' positions (prompt + NEW fit; 24-token prompts use the long factors),
    # max_position_embeddings / original = 4 -> attention factor sqrt(1 + ln 4 / ln 16); half the head rotates.
    "longrope": dict(PHI3, max_position_embeddings=64, original_max_position_embeddings=16, sliding_window=None,
                     rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                                      "short_factor": [1.0, 1.5], "long_factor": [2.0, 4.0]}),
    # 4k-style: plain RoPE and a sliding window (4 here, so that it cuts into the 7 + NEW tokens).
    "window": dict(PHI3, max_position_embeddings=64, sliding_window=4,
                   rope_parameters={"rope_type": "default", "rope_theta": 500.0}),
}


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def pair(request, tmp_path_factory):
  folder = str(tmp_path_factory.mktemp(request.param))
  ref = hf_refs.causal_lm(VARIANTS[request.param], folder)
  return request.param, folder, ref, convert.load_pretrained(folder)






def test_config(pair):
  name, _, ref, ours = pair
  c = ours.config
  assert c.hf_model_type == "phi3" and not c.qkv_bias
  if name == "longrope":
    assert (c.rope_type, c.rotary_dim, c.rope_original_max) == ("longrope", 4, 16)
    assert c.rope_attention_factor == pytest.approx(ref.model.rotary_emb.attention_scaling, rel=1e-12)
  else:
    assert (c.rope_type, c.sliding_window, c.rotary_dim) == ("default", 4, 0)


@pytest.mark.parametrize("length", [7, 24], ids=["short", "long"])
@pytest.mark.parametrize("pad", [False, True], ids=["unpadded", "left_padded"])
def test_logits_match_torch(pair, pad, length):
  name, _, ref, ours = pair
  ids, mask = hf_refs.prompts(pad, length)
  got = np.asarray(ours(jnp.asarray(ids), attention_mask=jnp.asarray(mask)).logits)
  real = mask.astype(bool)
  abs_err, rel_err = hf_refs.errors(got[real], hf_refs.torch_logits(ref, ids, mask)[real])
  print(f"phi3 {name} T={length} pad={pad}: max abs {abs_err:.2e}, max rel {rel_err:.2e}")
  assert rel_err < REL_TOL


@pytest.mark.parametrize("pad", [False, True], ids=["unpadded", "left_padded"])
def test_greedy_generate_equals_torch(pair, pad):
  """7 + 16 tokens: the longrope variant crosses its 16 original positions, where Phi3ForCausalLM's generate
  recomputes the whole sequence with the long factors (generate.longrope_recompute_step); with these prompts,
  decoding on without the recompute picks other tokens after the crossing."""
  _, _, ref, ours = pair
  ids, mask = hf_refs.prompts(pad, seed=0)
  with torch.no_grad():
    want = ref.generate(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), do_sample=False,
                        max_new_tokens=NEW).numpy()
  np.testing.assert_array_equal(np.asarray(generate(ours, ids, attention_mask=mask, max_new_tokens=NEW)), want)


def test_cache_decode_equals_full_forward(pair):
  """Prefill 7 tokens, then feed 5 more one at a time: each step's logits equal the full forward's."""
  _, _, _, ours = pair
  ids, mask = hf_refs.prompts(True, 12)
  full = np.asarray(ours(jnp.asarray(ids), attention_mask=jnp.asarray(mask)).logits)
  out = ours(jnp.asarray(ids[:, :7]), attention_mask=jnp.asarray(mask[:, :7]), cache=ours.init_cache(2, 12))
  steps = [out.logits[:, -1]]
  cache = out.cache
  for i in range(7, 11):
    out = ours(jnp.asarray(ids[:, i:i + 1]), attention_mask=jnp.ones((2, 1), bool), cache=cache)
    steps.append(out.logits[:, -1])
    cache = out.cache
  np.testing.assert_allclose(np.stack(steps, 1), full[:, 6:11], rtol=1e-5, atol=1e-5)


def test_longrope_recompute_step():
  from internvl_jax.convert import configs
  from internvl_jax.generate import longrope_recompute_step
  cfg = configs.language_from_hf(VARIANTS["longrope"], "phi3")
  # the forward of new token i sees t + i + 1 tokens: the first time that is 17 = 16 + 1 is i = 16 - t
  assert [longrope_recompute_step(cfg, t, 16) for t in (7, 16, 17, 0)] == [9, 0, None, None]
  assert longrope_recompute_step(cfg, 7, 9) is None
  assert longrope_recompute_step(configs.language_from_hf(VARIANTS["window"], "phi3"), 7, 16) is None


def test_save_pretrained_writes_phi3(pair, tmp_path):
  from transformers import Phi3ForCausalLM
  name, _, ref, ours = pair
  convert.save_pretrained(ours, str(tmp_path))
  back, info = Phi3ForCausalLM.from_pretrained(str(tmp_path), output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"]
  for key, value in ref.state_dict().items():
    np.testing.assert_array_equal(back.state_dict()[key].numpy(), value.numpy(), err_msg=key)
  ids, mask = hf_refs.prompts(True, 24)
  np.testing.assert_allclose(hf_refs.torch_logits(back.eval(), ids, mask), hf_refs.torch_logits(ref, ids, mask),
                             rtol=1e-6, atol=1e-6)


def test_presets_match_the_released_sizes():
  """Phi-3-mini (3.8B: hidden 3072, 32 layers, 32 heads, MLP 8192, vocab 32064) and InternVL2-4B (4.2B)."""
  from flax import nnx
  from internvl_jax.models import internvl, llm, presets, summary
  assert summary.count_params(lambda: llm.Decoder(presets.language("phi3_mini"), rngs=nnx.Rngs(0)))["total"] \
      == 3_821_079_552
  chat = summary.count_params(lambda: internvl.InternVLChat(presets.chat("internvl2_4b"), rngs=nnx.Rngs(0)))
  assert chat["total"] == 4_147_126_272 and chat["vision"] == 304_012_288


def test_unsupported_phi3_configs_are_refused():
  from internvl_jax.convert import configs
  base = dict(VARIANTS["longrope"], architectures=["Phi3ForCausalLM"])
  rope = base["rope_parameters"]
  for edit, message in ((dict(rope_parameters=dict(rope, rope_type="dynamic")), "Phi-3 RoPE scaling 'dynamic'"),
                        (dict(rope_parameters=dict(rope, short_factor=[1.0])),
                         "short_factor and long_factor of length 2"),
                        (dict(attention_bias=True), "Phi-3 attention_bias=True")):
    with pytest.raises(configs.ConversionError, match=message):
      configs.language_from_hf(dict(base, **edit), "phi3")
  cfg = configs.language_from_hf(base, "phi3")
  cfg.hf_model_type = ""  # a longrope decoder has no LLaMA / Qwen2 layout
  with pytest.raises(configs.ConversionError, match="export only as Phi-3"):
    configs.language_to_hf(cfg)


def test_phi3_mini_4k_config_gives_the_preset():
  """microsoft/Phi-3-mini-4k-instruct's config.json fields (remote-code spelling: rope_scaling null, top-level
  rope_theta, sliding_window 2047) parse to the phi3_mini preset."""
  from internvl_jax.convert import configs
  from internvl_jax.models import presets
  published = dict(architectures=["Phi3ForCausalLM"], model_type="phi3", hidden_size=3072, intermediate_size=8192,
                   num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, vocab_size=32064,
                   rms_norm_eps=1e-5, rope_scaling=None, rope_theta=10000.0, sliding_window=2047,
                   max_position_embeddings=4096, original_max_position_embeddings=4096, hidden_act="silu",
                   tie_word_embeddings=False, attention_bias=False, resid_pdrop=0.0, embd_pdrop=0.0)
  assert configs.language_from_hf(published, "phi3").to_dict() == presets.language("phi3_mini").to_dict()
