"""transformers-native InternVLForConditionalGeneration (Qwen2 and LLaMA text models) loads into InternVLChat:
logits with image tokens and greedy generation equal PyTorch's."""

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
IMG = 95  # image token id of the tiny models (last id of the 96-token vocabulary)
NEW = 16
VARIANTS = {
    # Qwen2 text, tied embeddings (like the small InternVL2.5/3 models), last ViT layer, LayerNorm ViT.
    "qwen2": dict(text=hf_refs.QWEN2, tie_word_embeddings=True, vision_variant="layer_norm"),
    # LLaMA text with GQA and head_dim != hidden/heads, second-to-last ViT layer, RMSNorm + QK-norm ViT.
    "llama": dict(text=hf_refs.LLAMA, vision_variant="rms_qk_norm", vision_feature_layer=-2),
}


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def pair(request, tmp_path_factory):
  folder = str(tmp_path_factory.mktemp(request.param))
  ref = hf_refs.chat_model(folder=folder, image_token_id=IMG, **VARIANTS[request.param])
  return request.param, ref, convert.load_pretrained(folder)


def test_config(pair):
  name, ref, ours = pair
  c = ours.config
  assert c.image_token_id == IMG and c.ps_version == "v2" and c.downsample_ratio == 0.5
  assert c.select_layer == ref.config.vision_feature_layer
  assert c.language.tie_embeddings == (name == "qwen2")
  assert (ours.language.lm_head is None) == (name == "qwen2")


@pytest.mark.parametrize("pad", [False, True], ids=["unpadded", "left_padded"])
def test_logits_match_torch(pair, pad):
  name, ref, ours = pair
  ids, mask, pixels = hf_refs.chat_prompts(pad, IMG)
  with torch.no_grad():
    want = ref(**hf_refs.torch_chat_inputs(ids, mask, pixels)).logits.numpy()
  got = np.asarray(ours(jnp.asarray(ids), pixel_values=jnp.asarray(pixels), attention_mask=jnp.asarray(mask)).logits)
  real = mask.astype(bool)
  abs_err, rel_err = hf_refs.errors(got[real], want[real])
  print(f"chat {name} logits pad={pad}: max abs {abs_err:.2e}, max rel {rel_err:.2e}")
  assert rel_err < REL_TOL
  # The image really matters: other pixels change the logits after the image tokens.
  other = np.asarray(ours(jnp.asarray(ids), pixel_values=jnp.asarray(pixels[::-1]), attention_mask=mask).logits)
  assert np.max(np.abs(other - got)) > 1e-3


@pytest.mark.parametrize("pad", [False, True], ids=["unpadded", "left_padded"])
def test_greedy_generate_equals_torch(pair, pad):
  name, ref, ours = pair
  ids, mask, pixels = hf_refs.chat_prompts(pad, IMG)
  with torch.no_grad():
    want = ref.generate(**hf_refs.torch_chat_inputs(ids, mask, pixels), do_sample=False,
                        max_new_tokens=NEW).numpy()
  got = np.asarray(generate(ours, ids, pixel_values=pixels, attention_mask=mask, max_new_tokens=NEW))
  assert got.shape == (2, 11 + NEW)
  np.testing.assert_array_equal(got, want)
