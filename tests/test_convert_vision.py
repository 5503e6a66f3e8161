"""InternViT loaded from a transformers-native InternVLVisionModel equals PyTorch (float32)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import hf_refs
from internvl_jax import convert

jax.config.update("jax_default_matmul_precision", "highest")
REL_TOL = 1e-5  # max |ours - torch| / max |torch| on last_hidden_state


@pytest.fixture(scope="module", params=sorted(hf_refs.VISION_VARIANTS))
def pair(request, tmp_path_factory):
  folder = str(tmp_path_factory.mktemp(request.param))
  ref = hf_refs.vision_model(request.param, folder)
  return request.param, ref, convert.load_pretrained(folder)


@pytest.mark.parametrize("hw", [(56, 56), (84, 84), (56, 84)], ids=["native", "larger", "non_square"])
def test_last_hidden_state_matches_torch(pair, hw):
  variant, ref, ours = pair
  pixels = np.random.default_rng(1).standard_normal((2, *hw, 3)).astype(np.float32)
  with torch.no_grad():
    want = ref(torch.from_numpy(pixels).permute(0, 3, 1, 2)).last_hidden_state.numpy()
  got = np.asarray(ours(jnp.asarray(pixels)).last_hidden_state)
  assert got.shape == want.shape == (2, 1 + (hw[0] // 14) * (hw[1] // 14), 32)
  abs_err, rel_err = hf_refs.errors(got, want)
  print(f"vision {variant} {hw}: max abs {abs_err:.2e}, max rel {rel_err:.2e}")
  assert rel_err < REL_TOL


def test_config_fields(pair):
  variant, ref, ours = pair
  c = ours.config
  assert (c.norm_type, c.qk_norm, c.qkv_bias) == (ref.config.norm_type, ref.config.use_qk_norm,
                                                  ref.config.attention_bias)
  assert c.image_size == 56 and c.num_layers == 2 and c.qkv_fused
