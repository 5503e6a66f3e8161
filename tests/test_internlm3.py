"""InternLM3 (InternVL3-9B's language model) against transformers.

Facts used (InternLM3's remote code `modeling_internlm3.py` / `configuration_internlm3.py` as published with
internlm/internlm3-8b-instruct, and transformers 5's InternLM3Config, which maps model_type 'internlm3' to
LlamaForCausalLM): the decoder is LLaMA's (pre-norm RMSNorm, SwiGLU gate/up/down, GQA, half-split RoPE, scale
head_dim^-0.5) with LLaMA's tensor names (model.embed_tokens, layers.{i}.self_attn.{q,k,v,o}_proj,
mlp.{gate,up,down}_proj, input_layernorm, post_attention_layernorm, model.norm, lm_head); head_dim is an explicit
field (128 in the release); `qkv_bias` puts biases on q/k/v only and `bias` on o_proj and the MLP (both false in the
release); rope_scaling {'rope_type': 'dynamic', 'factor': 6.0} changes RoPE only beyond max_position_embeddings
(32768). References: transformers' LlamaForCausalLM built from an InternLM3Config (no biases, head_dim != hidden /
heads), and Qwen2ForCausalLM for qkv_bias=True (biases on q/k/v only, as InternLM3's qkv_bias)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import hf_refs
import opengvlab_layout
from internvl_jax import convert
from internvl_jax.generate import generate

jax.config.update("jax_default_matmul_precision", "highest")
REL_TOL = 1e-5
NEW = 8
IMG = 95
INTERNLM3 = dict(model_type="internlm3", vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, intermediate_size=64, rms_norm_eps=1e-5,
                 tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 50000.0},
                 bos_token_id=None, eos_token_id=None, pad_token_id=None)


def remote_config(native: dict, qkv_bias: bool) -> dict:
  """The remote-code spelling of an InternLM3 config: qkv_bias / bias, rope_theta and rope_scaling top level."""
  dropped = ("attention_bias", "mlp_bias", "rope_parameters", "use_sliding_window", "sliding_window",
             "max_window_layers", "layer_types")
  out = {k: v for k, v in native.items() if k not in dropped}
  out.update(model_type="internlm3", architectures=["InternLM3ForCausalLM"], qkv_bias=qkv_bias, bias=False,
             head_dim=native.get("head_dim") or native["hidden_size"] // native["num_attention_heads"],
             rope_theta=native["rope_parameters"]["rope_theta"], max_position_embeddings=32768,
             rope_scaling={"rope_type": "dynamic", "factor": 6.0})
  return out


def rewrite_config(folder: str, out: str, qkv_bias: bool) -> None:
  with open(f"{folder}/config.json") as f:
    cfg = json.load(f)
  opengvlab_layout.write(out, opengvlab_layout.read(folder), remote_config(cfg, qkv_bias))






def check_logits(ours, ref, pad, what):
  ids, mask = hf_refs.prompts(pad, seed=3)
  got = np.asarray(ours(jnp.asarray(ids), attention_mask=jnp.asarray(mask)).logits)
  real = mask.astype(bool)
  abs_err, rel_err = hf_refs.errors(got[real], hf_refs.torch_logits(ref, ids, mask)[real])
  print(f"{what} pad={pad}: max abs {abs_err:.2e}, max rel {rel_err:.2e}")
  assert rel_err < REL_TOL


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
  folder = str(tmp_path_factory.mktemp("internlm3"))
  ref = hf_refs.causal_lm(INTERNLM3, folder)
  assert type(ref).__name__ == "LlamaForCausalLM"  # transformers computes InternLM3 with its LLaMA
  return folder, ref


@pytest.mark.parametrize("pad", [False, True], ids=["unpadded", "left_padded"])
@pytest.mark.parametrize("layout", ["transformers", "remote"])
def test_lm_logits_match_llama(lm, tmp_path, layout, pad):
  folder, ref = lm
  if layout == "remote":
    rewrite_config(folder, str(tmp_path / "remote"), qkv_bias=False)
    folder = str(tmp_path / "remote")
  ours = convert.load_pretrained(folder)
  c = ours.config
  assert (c.head_dim, c.num_kv_heads, c.qkv_bias, c.rope_theta) == (16, 2, False, 50000.0)
  check_logits(ours, ref, pad, f"internlm3 {layout}")


def test_greedy_generate_and_cache_decode(lm):
  folder, ref = lm
  ours = convert.load_pretrained(folder)
  ids, mask = hf_refs.prompts(True, seed=3)
  with torch.no_grad():
    want = ref.generate(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), do_sample=False,
                        max_new_tokens=NEW).numpy()
  np.testing.assert_array_equal(np.asarray(generate(ours, ids, attention_mask=mask, max_new_tokens=NEW)), want)
  # KV-cache decode, one token at a time after a 4-token prefill, equals the full forward
  full = np.asarray(ours(jnp.asarray(ids), attention_mask=jnp.asarray(mask)).logits)
  out = ours(jnp.asarray(ids[:, :4]), attention_mask=jnp.asarray(mask[:, :4]), cache=ours.init_cache(2, 7))
  steps, cache = [out.logits[:, -1]], out.cache
  for i in range(4, 6):
    out = ours(jnp.asarray(ids[:, i:i + 1]), attention_mask=jnp.ones((2, 1), bool), cache=cache)
    steps.append(out.logits[:, -1])
    cache = out.cache
  np.testing.assert_allclose(np.stack(steps, 1), full[:, 3:6], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pad", [False, True], ids=["unpadded", "left_padded"])
def test_remote_qkv_bias_matches_qwen2(tmp_path, pad):
  """qkv_bias=True: biases on q/k/v only, which is Qwen2's attention."""
  native, remote = str(tmp_path / "qwen2"), str(tmp_path / "remote")
  ref = hf_refs.causal_lm(hf_refs.QWEN2, native)
  rewrite_config(native, remote, qkv_bias=True)
  ours = convert.load_pretrained(remote)
  assert ours.config.qkv_bias and ours.layers.attn.q.bias is not None
  check_logits(ours, ref, pad, "internlm3 remote qkv_bias")


def test_unsupported_biases_are_refused(lm, tmp_path):
  folder, _ = lm
  with open(f"{folder}/config.json") as f:
    cfg = json.load(f)
  for name, edit, message in (("bias", dict(remote_config(cfg, False), bias=True), "InternLM3 bias=True"),
                              ("attn", dict(cfg, attention_bias=True), "InternLM3 attention_bias=True")):
    out = tmp_path / name
    opengvlab_layout.write(str(out), opengvlab_layout.read(folder), edit)
    with pytest.raises(convert.ConversionError, match=message):
      convert.load_pretrained(str(out))


def test_opengvlab_chat_with_internlm3(tmp_path):
  """InternVL3-9B-style folder: InternVLChatModel with llm_config.model_type 'internlm3'."""
  native, og = str(tmp_path / "native"), str(tmp_path / "og")
  ref = hf_refs.chat_model(INTERNLM3, native, image_token_id=IMG)
  opengvlab_layout.chat_to_opengvlab(native, og, "internlm3")
  with open(f"{og}/config.json") as f:
    assert json.load(f)["llm_config"]["architectures"] == ["InternLM3ForCausalLM"]
  ours, base = convert.load_pretrained(og), convert.load_pretrained(native)  # base: transformers-native -hf layout
  assert ours.config.language.head_dim == 16 and ours.config.image_token_id == IMG
  assert ours.config.to_dict() == base.config.to_dict()
  rng = np.random.default_rng(6)
  ids = rng.integers(0, IMG, (2, 9))
  ids[0, 1:5] = IMG
  ids[1, 4:8] = IMG
  pixels = rng.standard_normal((2, 56, 56, 3)).astype(np.float32)
  with torch.no_grad():
    want = ref(input_ids=torch.from_numpy(ids), pixel_values=torch.from_numpy(pixels).permute(0, 3, 1, 2)).logits
  got = np.asarray(ours(jnp.asarray(ids), pixel_values=jnp.asarray(pixels)).logits)
  abs_err, rel_err = hf_refs.errors(got, want.numpy())
  print(f"internlm3 opengvlab chat: max abs {abs_err:.2e}, max rel {rel_err:.2e}")
  assert rel_err < REL_TOL


def test_presets_match_the_released_sizes():
  """InternLM3-8B (8.8B: 48 layers, 32 heads / 2 KV heads of 128, MLP 10240, vocab 128512) and InternVL3-9B."""
  from flax import nnx
  from internvl_jax.models import internvl, llm, presets, summary
  assert summary.count_params(lambda: llm.Decoder(presets.language("internlm3_8b"), rngs=nnx.Rngs(0)))["total"] \
      == 8_804_241_408
  chat = summary.count_params(lambda: internvl.InternVLChat(presets.chat("internvl3_9b"), rngs=nnx.Rngs(0)))
  assert chat["total"] == 9_141_824_512
