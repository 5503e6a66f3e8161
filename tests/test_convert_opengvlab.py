"""OpenGVLab remote-code layouts (no remote code offline): the tiny transformers references' tensors are rewritten
into InternVLChatModel / InternVisionModel / InternLM2 names (opengvlab_layout.py); loading them must give the
same parameters as the native load and the same outputs as PyTorch."""

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
from internvl_jax.convert import transforms

jax.config.update("jax_default_matmul_precision", "highest")
REL_TOL = 1e-4
IMG = 95
LLAMA_PLAIN = {k: v for k, v in hf_refs.LLAMA.items() if k != "head_dim"}  # InternLM2 has no head_dim field


def params(model) -> dict:
  return {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


@pytest.fixture(scope="module")
def refs(tmp_path_factory):
  """Native chat references: Qwen2 (tied) and LLaMA (untied, RMSNorm+QK-norm ViT, select_layer -2)."""
  out = {}
  for name, kw in (("qwen2", dict(text=hf_refs.QWEN2, tie_word_embeddings=True)),
                   ("llama", dict(text=LLAMA_PLAIN, vision_variant="rms_qk_norm", vision_feature_layer=-2))):
    folder = str(tmp_path_factory.mktemp(name))
    out[name] = (folder, hf_refs.chat_model(folder=folder, image_token_id=IMG, **kw))
  return out


def chat_logits_torch(ref, ids, pixels):
  with torch.no_grad():
    return ref(input_ids=torch.from_numpy(ids), pixel_values=torch.from_numpy(pixels).permute(0, 3, 1, 2)).logits


def chat_inputs():
  rng = np.random.default_rng(6)
  ids = rng.integers(0, IMG, (2, 9))
  ids[0, 1:5] = IMG
  ids[1, 4:8] = IMG
  return ids, rng.standard_normal((2, 56, 56, 3)).astype(np.float32)


@pytest.mark.parametrize("name,lm", [("qwen2", "qwen2"), ("llama", "llama"), ("llama", "internlm2")])
def test_chat_layout_matches_native_and_torch(refs, tmp_path, name, lm):
  folder, ref = refs[name]
  og = str(tmp_path / "og")
  opengvlab_layout.chat_to_opengvlab(folder, og, lm)
  ours = convert.load_pretrained(og)
  native = convert.load_pretrained(folder)
  assert ours.config.image_token_id == IMG  # read from tokenizer_config.json
  assert ours.config.to_dict() == native.config.to_dict()
  p_ours, p_native = params(ours), params(native)
  assert p_ours.keys() == p_native.keys()
  for k in p_ours:
    np.testing.assert_array_equal(p_ours[k], p_native[k], err_msg=k)
  ids, pixels = chat_inputs()
  got = np.asarray(ours(jnp.asarray(ids), pixel_values=jnp.asarray(pixels)).logits)
  abs_err, rel_err = hf_refs.errors(got, chat_logits_torch(ref, ids, pixels).numpy())
  print(f"opengvlab chat {lm}: max abs {abs_err:.2e}, max rel {rel_err:.2e}")
  assert rel_err < REL_TOL


def test_internvit_layout_matches_torch(tmp_path):
  native, og = str(tmp_path / "native"), str(tmp_path / "og")
  ref = hf_refs.vision_model("rms_qk_norm", native)
  opengvlab_layout.vision_to_opengvlab(native, og)
  ours = convert.load_pretrained(og)
  pixels = np.random.default_rng(7).standard_normal((2, 56, 56, 3)).astype(np.float32)
  with torch.no_grad():
    want = ref(torch.from_numpy(pixels).permute(0, 3, 1, 2)).last_hidden_state.numpy()
  abs_err, rel_err = hf_refs.errors(ours(jnp.asarray(pixels)).last_hidden_state, want)
  print(f"opengvlab intern_vit_6b: max abs {abs_err:.2e}, max rel {rel_err:.2e}")
  assert rel_err < 1e-5


def test_internlm2_lm_splits_wqkv_and_matches_llama(tmp_path):
  native, og = str(tmp_path / "llama"), str(tmp_path / "internlm2")
  ref = hf_refs.causal_lm(LLAMA_PLAIN, native)
  opengvlab_layout.lm_to_internlm2(native, og)
  ours = convert.load_pretrained(og)
  sd = ref.state_dict()
  for i in range(2):  # the split equals the unfused weights
    for p in "qkv":
      np.testing.assert_array_equal(np.asarray(getattr(ours.layers.attn, p).kernel[i]),
                                    sd[f"model.layers.{i}.self_attn.{p}_proj.weight"].numpy().T)
  ids = np.random.default_rng(8).integers(0, 96, (2, 6))
  with torch.no_grad():
    want = ref(torch.from_numpy(ids)).logits.numpy()
  abs_err, rel_err = hf_refs.errors(ours(jnp.asarray(ids)).logits, want)
  print(f"internlm2 lm: max abs {abs_err:.2e}, max rel {rel_err:.2e}")
  assert rel_err < REL_TOL


@pytest.mark.parametrize("heads,kv", [(6, 2), (4, 4), (8, 1)])
def test_internlm2_wqkv_split_follows_its_attention(heads, kv):
  """InternLM2's attention: qkv = x @ wqkv.T viewed as [kv, groups + 2, hd]; queries are [:, :groups] flattened
  (head h = kv_index * groups + i), keys [:, -2], values [:, -1]. Our split must give the same projections."""
  hd, d = 4, 8
  rng = np.random.default_rng(9)
  wqkv = rng.standard_normal((kv * (heads // kv + 2) * hd, d)).astype(np.float32)
  x = rng.standard_normal((3, d)).astype(np.float32)
  qkv = (x @ wqkv.T).reshape(3, kv, heads // kv + 2, hd)
  want = {"q": qkv[:, :, :-2].reshape(3, heads * hd), "k": qkv[:, :, -2].reshape(3, -1),
          "v": qkv[:, :, -1].reshape(3, -1)}
  for p in "qkv":
    kernel = transforms.InternLM2QKV(p, heads, kv, hd).load(wqkv)
    np.testing.assert_allclose(x @ kernel, want[p], rtol=1e-6, atol=1e-6)
  q, k, v = (transforms.InternLM2QKV(p, heads, kv, hd).load(wqkv).T for p in "qkv")
  np.testing.assert_array_equal(transforms.fuse_internlm2_wqkv(q, k, v, heads, kv, hd), wqkv)
  np.testing.assert_array_equal(opengvlab_layout.internlm2_wqkv(q, k, v, heads, kv, hd), wqkv)


def test_cli_exports_opengvlab_chat_to_transformers(refs, tmp_path):
  """`export` of a remote-code folder gives a transformers folder with the reference's exact outputs."""
  from transformers import InternVLForConditionalGeneration
  from internvl_jax.convert import __main__ as cli
  folder, ref = refs["llama"]
  og, out = str(tmp_path / "og"), str(tmp_path / "hf")
  opengvlab_layout.chat_to_opengvlab(folder, og, "internlm2")
  assert cli.main(["export", og, out]) == 0
  back, info = InternVLForConditionalGeneration.from_pretrained(out, output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"]
  ids, pixels = chat_inputs()
  np.testing.assert_array_equal(chat_logits_torch(back.eval(), ids, pixels).numpy(),
                                chat_logits_torch(ref, ids, pixels).numpy())


def test_force_image_size_sets_the_input_size_not_the_position_table(refs, tmp_path):
  # InternVLChatModel: image_size = config.force_image_size or vision_config.image_size sets num_image_token;
  # the position embeddings keep vision_config.image_size and are interpolated to the input grid.
  folder, _ = refs["qwen2"]
  og = str(tmp_path / "og")
  opengvlab_layout.chat_to_opengvlab(folder, og, "qwen2")
  with open(f"{og}/config.json") as f:
    cfg = json.load(f)
  native_size = cfg["vision_config"]["image_size"]
  cfg["force_image_size"] = native_size * 2
  with open(f"{og}/config.json", "w") as f:
    json.dump(cfg, f)
  model = convert.load_pretrained(og)
  assert model.config.image_size == native_size * 2 and model.config.vision.image_size == native_size
  grid = native_size // cfg["vision_config"]["patch_size"]
  assert model.vision.embeddings.position.shape[1] == 1 + grid**2
  with pytest.raises(convert.ConversionError, match="force_image_size"):
    convert.save_pretrained(model, str(tmp_path / "native"))
