"""InternVL chat models with a Phi-3 language model (InternVL2-4B-style): a transformers-native
InternVLForConditionalGeneration folder with a phi3 text_config, and the OpenGVLab InternVLChatModel layout with
llm_config.model_type 'phi3' (remote-code rope spelling, template phi3-chat), against transformers."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import hf_refs
import opengvlab_layout
from internvl_jax import convert
from internvl_jax.generate import generate
from test_phi3 import VARIANTS

jax.config.update("jax_default_matmul_precision", "highest")
REL_TOL = 1e-5
IMG = 95
NEW = 12  # 11 prompt tokens + 12 cross the longrope variant's 16 original positions


@pytest.fixture(scope="module")
def native(tmp_path_factory):
  folder = str(tmp_path_factory.mktemp("phi3_chat"))
  ref = hf_refs.chat_model(VARIANTS["longrope"], folder, image_token_id=IMG)
  return folder, ref


def torch_logits(ref, ids, mask, pixels):
  with torch.no_grad():
    return ref(**hf_refs.torch_chat_inputs(ids, mask, pixels)).logits.numpy()


def params(model) -> dict:
  return {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


@pytest.mark.parametrize("pad", [False, True], ids=["unpadded", "left_padded"])
def test_native_chat_logits_match_torch(native, pad):
  folder, ref = native
  ours = convert.load_pretrained(folder)
  assert ours.config.language.rope_type == "longrope" and ours.config.language.hf_model_type == "phi3"
  ids, mask, pixels = hf_refs.chat_prompts(pad, IMG)
  got = np.asarray(ours(jnp.asarray(ids), pixel_values=jnp.asarray(pixels), attention_mask=jnp.asarray(mask)).logits)
  real = mask.astype(bool)
  abs_err, rel_err = hf_refs.errors(got[real], torch_logits(ref, ids, mask, pixels)[real])
  print(f"phi3 native chat pad={pad}: max abs {abs_err:.2e}, max rel {rel_err:.2e}")
  assert rel_err < REL_TOL


def test_native_chat_greedy_generate_equals_torch(native):
  """Across the original length: InternVLForConditionalGeneration keeps its cache (no Phi-3 recompute), so
  positions past 16 use the long factors against keys cached with the short ones, as our per-call choice does."""
  folder, ref = native
  ours = convert.load_pretrained(folder)
  ids, mask, pixels = hf_refs.chat_prompts(True, IMG)
  with torch.no_grad():
    want = ref.generate(**hf_refs.torch_chat_inputs(ids, mask, pixels), do_sample=False,
                        max_new_tokens=NEW).numpy()
  got = generate(ours, ids, pixel_values=pixels, attention_mask=mask, max_new_tokens=NEW)
  np.testing.assert_array_equal(np.asarray(got), want)


def test_opengvlab_phi3_chat_matches_native_and_torch(native, tmp_path):
  folder, ref = native
  og = str(tmp_path / "og")
  opengvlab_layout.chat_to_opengvlab(folder, og, "phi3")
  with open(f"{og}/config.json") as f:
    llm_config = json.load(f)["llm_config"]
  assert llm_config["rope_scaling"]["type"] == "su" and "rope_parameters" not in llm_config
  ours, base = convert.load_pretrained(og), convert.load_pretrained(folder)
  assert ours.config.to_dict() == base.config.to_dict()
  p_ours, p_base = params(ours), params(base)
  assert p_ours.keys() == p_base.keys()
  for k in p_ours:
    np.testing.assert_array_equal(p_ours[k], p_base[k], err_msg=k)
  ids, mask, pixels = hf_refs.chat_prompts(True, IMG)
  got = np.asarray(ours(jnp.asarray(ids), pixel_values=jnp.asarray(pixels), attention_mask=jnp.asarray(mask)).logits)
  real = mask.astype(bool)
  abs_err, rel_err = hf_refs.errors(got[real], torch_logits(ref, ids, mask, pixels)[real])
  print(f"phi3 opengvlab chat: max abs {abs_err:.2e}, max rel {rel_err:.2e}")
  assert rel_err < REL_TOL


def test_chat_export_loads_in_transformers(native, tmp_path):
  from transformers import InternVLForConditionalGeneration
  folder, ref = native
  convert.save_pretrained(convert.load_pretrained(folder), str(tmp_path))
  back, info = InternVLForConditionalGeneration.from_pretrained(str(tmp_path), output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"]
  assert back.config.text_config.model_type == "phi3"
  ids, mask, pixels = hf_refs.chat_prompts(True, IMG)
  np.testing.assert_allclose(torch_logits(back.eval(), ids, mask, pixels), torch_logits(ref, ids, mask, pixels),
                             rtol=1e-6, atol=1e-6)
