"""InternVL-14B (InternVL-C / InternVL-G with QLLaMA): transformers has no class for it, so a tiny checkpoint is
written here with the OpenGVLab names and shapes; the test checks where each tensor lands, and the attention
pooling and QLLaMA cross-attention against short PyTorch statements of the official modules (DESIGN §5)."""

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from internvl_jax import convert
from internvl_jax.models import stack

jax.config.update("jax_default_matmul_precision", "highest")
DV, DT, E, V, L, Q = 24, 32, 16, 96, 4, 4  # vision width, text width, embed dim, vocab, QLLaMA layers, queries
CONFIG = dict(
    model_type="internvl", architectures=["InternVLModel"], clip_embed_dim=E, attn_pool_num_heads=2,
    num_query_token=Q, cross_attention_frequency=2, force_image_size=56, use_backbone_lora=0, use_qllama_lora=0,
    vision_config=dict(model_type="intern_vit_6b", hidden_size=DV, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=48, qkv_bias=False, qk_normalization=True, norm_type="rms_norm",
                       layer_norm_eps=1e-6, initializer_factor=0.1, image_size=56, patch_size=14, hidden_act="gelu"),
    qllama_config=dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=V, hidden_size=DT,
                       num_hidden_layers=L, num_attention_heads=4, intermediate_size=64, rms_norm_eps=1e-6,
                       rope_theta=10000.0))


def official_shapes(vocab: int = V) -> dict:
  s = {"vision_model.embeddings.class_embedding": (1, 1, DV), "vision_model.embeddings.position_embedding": (1, 17, DV),
       "vision_model.embeddings.patch_embedding.weight": (DV, 3, 14, 14),
       "vision_model.embeddings.patch_embedding.bias": (DV,), "query_tokens": (1, Q, DT),
       "text_projection": (DT, E), "logit_scale": (), "itm_head.weight": (2, DT), "itm_head.bias": (2,),
       "qllama.model.embed_tokens.weight": (vocab, DT), "qllama.model.norm.weight": (DT,),
       "qllama.lm_head.weight": (vocab, DT)}
  for i in range(2):
    p = f"vision_model.encoder.layers.{i}."
    s.update({p + "attn.qkv.weight": (3 * DV, DV), p + "attn.q_norm.weight": (DV,), p + "attn.k_norm.weight": (DV,),
              p + "attn.proj.weight": (DV, DV), p + "attn.proj.bias": (DV,), p + "ls1": (DV,), p + "ls2": (DV,),
              p + "norm1.weight": (DV,), p + "norm2.weight": (DV,), p + "mlp.fc1.weight": (48, DV),
              p + "mlp.fc1.bias": (48,), p + "mlp.fc2.weight": (DV, 48), p + "mlp.fc2.bias": (DV,)})
  for name, dim in (("clip_projector", DV), ("clip_projector2", DT)):
    for p in "qkv":
      s.update({f"{name}.norm1_{p}.weight": (dim,), f"{name}.norm1_{p}.bias": (dim,),
                f"{name}.cross_attn.{p}.weight": (dim, dim), f"{name}.cross_attn.{p}_bias": (dim,)})
    s.update({f"{name}.cross_attn.proj.weight": (E, dim), f"{name}.cross_attn.proj.bias": (E,)})
  for i in range(L):
    p = f"qllama.model.layers.{i}."
    s.update({p + f"self_attn.{n}_proj.weight": (DT, DT) for n in "qkvo"})
    s.update({p + "mlp.gate_proj.weight": (64, DT), p + "mlp.up_proj.weight": (64, DT),
              p + "mlp.down_proj.weight": (DT, 64), p + "input_layernorm.weight": (DT,),
              p + "post_attention_layernorm.weight": (DT,)})
    if i % 2 == 0:  # cross-attention in layers 0, 2, ...
      s.update({p + "cross_attn.q_proj.weight": (DT, DT), p + "cross_attn.k_proj.weight": (DT, DV),
                p + "cross_attn.v_proj.weight": (DT, DV), p + "cross_attn.o_proj.weight": (DT, DT),
                p + "cross_attn.norm1.weight": (DT,), p + "cross_attn.norm2.weight": (DV,)})
  return s


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  folder = str(tmp_path_factory.mktemp("internvl14b"))
  rng = np.random.default_rng(10)
  tensors = {k: np.asarray(rng.standard_normal(v) * 0.3, np.float32) for k, v in official_shapes().items()}
  save_file(tensors, os.path.join(folder, "model.safetensors"))
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(CONFIG, f)
  return folder, tensors


@pytest.fixture(scope="module")
def model_g(checkpoint):
  return convert.load_pretrained(checkpoint[0])


def arr(x):
  return np.asarray(x[...] if hasattr(x, "get_value") else x)


def test_tensors_land_where_the_official_model_uses_them(checkpoint, model_g):
  _, t = checkpoint
  m = model_g
  c = m.config
  assert (c.variant, c.embed_dim, c.text.num_query_tokens, c.text.cross_attention_frequency) == ("g", E, Q, 2)
  assert (c.vision.pooling, c.vision.pool_heads, c.text.vision_width, c.text_prefix) == ("attention", 2, DV,
                                                                                         "summarize:")
  checks = [  # (official name, our array, transform from official layout to ours)
      ("qllama.model.layers.2.cross_attn.k_proj.weight", m.text.cross_attention.k.kernel[1], np.transpose),
      ("qllama.model.layers.0.cross_attn.norm2.weight", m.text.cross_attention.norm_kv.scale[0], None),
      ("qllama.model.layers.2.cross_attn.norm1.weight", m.text.cross_attention.norm_q.scale[1], None),
      ("qllama.model.layers.3.self_attn.q_proj.weight", m.text.decoder.layers.attn.q.kernel[3], np.transpose),
      ("qllama.model.layers.1.mlp.down_proj.weight", m.text.decoder.layers.mlp.down.kernel[1], np.transpose),
      ("qllama.lm_head.weight", m.text.decoder.lm_head.kernel, np.transpose),
      ("clip_projector.cross_attn.k_bias", m.vision.pool.k.bias, None),
      ("clip_projector.norm1_v.weight", m.vision.pool.norm_v.scale, None),
      ("clip_projector2.cross_attn.proj.weight", m.query_pool.proj.kernel, np.transpose),
      ("vision_model.encoder.layers.1.attn.qkv.weight", m.vision.blocks.attn.qkv.kernel[1], np.transpose),
      ("text_projection", m.text_projection.kernel, None),  # an nn.Parameter used as x @ P: already [in, out]
      ("logit_scale", m.logit_scale, None), ("query_tokens", m.text.query_tokens, None),
  ]
  for name, ours, fn in checks:
    want = t[name] if fn is None else fn(t[name])
    np.testing.assert_array_equal(arr(ours), want, err_msg=name)


def torch_attention_pooling(t, prefix, x, heads):
  """OpenGVLab AttentionPoolingBlock: query = mean token; LayerNorm(eps 1e-5) on q / k / v inputs; q/k/v Linears
  without bias plus q_bias / k_bias / v_bias; softmax(q k^T * hd^-0.5) v; proj."""
  g = lambda n: torch.from_numpy(t[f"{prefix}.{n}"])
  ln = lambda y, n: F.layer_norm(y, y.shape[-1:], g(f"{n}.weight"), g(f"{n}.bias"), eps=1e-5)
  b, n, d = x.shape
  xq = x.mean(1, keepdim=True)
  q = F.linear(ln(xq, "norm1_q"), g("cross_attn.q.weight"), g("cross_attn.q_bias"))
  k = F.linear(ln(x, "norm1_k"), g("cross_attn.k.weight"), g("cross_attn.k_bias"))
  v = F.linear(ln(x, "norm1_v"), g("cross_attn.v.weight"), g("cross_attn.v_bias"))
  split = lambda y: y.reshape(b, y.shape[1], heads, -1).transpose(1, 2)
  q, k, v = split(q), split(k), split(v)
  attn = ((q * (d // heads) ** -0.5) @ k.transpose(-2, -1)).softmax(-1)
  out = (attn @ v).transpose(1, 2).reshape(b, 1, d)
  return F.linear(out, g("cross_attn.proj.weight"), g("cross_attn.proj.bias")).squeeze(1)


def torch_cross_attention(t, layer, x, vision, heads):
  """QLLaMA LlamaCrossAttention + residual: x + o(attn(q(rms1(x)), k(rms2(vision)), v(rms2(vision))))."""
  g = lambda n: torch.from_numpy(t[f"qllama.model.layers.{layer}.cross_attn.{n}"])
  rms = lambda y, w: y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + 1e-6) * w
  b, nq, d = x.shape
  vis = rms(vision, g("norm2.weight"))
  q = F.linear(rms(x, g("norm1.weight")), g("q_proj.weight"))
  k, v = F.linear(vis, g("k_proj.weight")), F.linear(vis, g("v_proj.weight"))
  split = lambda y: y.reshape(b, y.shape[1], heads, -1).transpose(1, 2)
  attn = (split(q) @ split(k).transpose(-2, -1) / math.sqrt(d // heads)).softmax(-1)
  return x + F.linear((attn @ split(v)).transpose(1, 2).reshape(b, nq, d), g("o_proj.weight"))


def test_attention_pooling_matches_official_statement(checkpoint, model_g):
  _, t = checkpoint
  rng = np.random.default_rng(11)
  for prefix, module, dim in (("clip_projector", model_g.vision.pool, DV), ("clip_projector2", model_g.query_pool, DT)):
    x = rng.standard_normal((2, 5, dim)).astype(np.float32)
    want = torch_attention_pooling(t, prefix, torch.from_numpy(x), 2).numpy()
    np.testing.assert_allclose(np.asarray(module(jnp.asarray(x))), want, rtol=1e-5, atol=1e-5)


def test_cross_attention_matches_official_statement(checkpoint, model_g):
  _, t = checkpoint
  rng = np.random.default_rng(12)
  x = rng.standard_normal((2, Q, DT)).astype(np.float32)
  vision = rng.standard_normal((2, 17, DV)).astype(np.float32)
  for slot, layer in ((0, 0), (1, 2)):
    ours = stack.layer_at(model_g.text.cross_attention, slot)(jnp.asarray(x), jnp.asarray(vision))
    want = torch_cross_attention(t, layer, torch.from_numpy(x), torch.from_numpy(vision), 4).numpy()
    np.testing.assert_allclose(np.asarray(ours), want, rtol=1e-5, atol=1e-5)


def test_encoders_run_and_c_variant_loads(checkpoint, model_g):
  folder, _ = checkpoint
  pixels = jnp.asarray(np.random.default_rng(13).standard_normal((2, 56, 56, 3)), jnp.float32)
  ids = jnp.asarray([[5, 6, 7, 2], [8, 9, 2, 0]])
  encode_image = nnx.jit(lambda m, x: (m.encode_image(x), m.vision(x).pooler_output))  # one compile, not op by op
  img, pooled = encode_image(model_g, pixels)
  txt = nnx.jit(lambda m, i, a: m.encode_text(i, a))(model_g, ids, jnp.asarray([[1, 1, 1, 1], [1, 1, 1, 0]]))
  assert img.shape == txt.shape == (2, E)
  np.testing.assert_allclose(np.linalg.norm(np.asarray(img), axis=-1), 1.0, rtol=1e-5)
  model_c = convert.load_pretrained(folder, variant="c")
  assert model_c.config.variant == "c" and model_c.query_pool is None
  # C's image feature is G's first term: the normalised attention-pooled ViT feature.
  c_img = np.asarray(nnx.jit(lambda m, x: m.encode_image(x))(model_c, pixels))
  pooled = np.asarray(pooled)
  np.testing.assert_allclose(c_img, pooled / np.linalg.norm(pooled, axis=-1, keepdims=True), rtol=1e-5, atol=1e-6)


def test_export_writes_the_official_layout(checkpoint, model_g, tmp_path):
  folder, t = checkpoint
  out = str(tmp_path / "export")
  convert.save_pretrained(model_g, out)
  with safe_open(os.path.join(out, "model.safetensors"), "np") as f:
    written = {k: f.get_tensor(k) for k in f.keys()}
  assert set(written) == set(t) - {"itm_head.weight", "itm_head.bias"}
  for k, v in written.items():
    np.testing.assert_array_equal(v, t[k], err_msg=k)
  again = convert.load_pretrained(out)
  a = {p: v.get_value() for p, v in nnx.to_flat_state(nnx.state(again, nnx.Param))}
  b = {p: v.get_value() for p, v in nnx.to_flat_state(nnx.state(model_g, nnx.Param))}
  assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_text_feature_is_the_official_statement_on_transformers_llama(checkpoint, model_g):
  # Official InternVL_C/G.encode_text (clip_benchmark's internvl_huggingface): attention_mask = ids > 0, QLLaMA's
  # text path (a LLaMA without its queries and cross-attention), the hidden state at attention_mask.sum(1) - 1
  # (the EOS the evaluation tokenizer appends), times text_projection. The reference LLaMA is transformers'.
  from transformers import LlamaConfig, LlamaModel
  folder, t = checkpoint
  q = CONFIG["qllama_config"]
  cfg = LlamaConfig(vocab_size=V, hidden_size=DT, num_hidden_layers=L, num_attention_heads=4, intermediate_size=64,
                    rms_norm_eps=1e-6, rope_theta=10000.0, attn_implementation="eager")
  assert q["vocab_size"] == V
  ref = LlamaModel(cfg).eval()
  state = {k[len("qllama.model."):]: torch.from_numpy(v) for k, v in t.items()
           if k.startswith("qllama.model.") and "cross_attn" not in k}
  ref.load_state_dict(state, strict=True)
  ids = np.asarray([[1, 7, 8, 9, 2, 0, 0], [1, 5, 6, 7, 8, 9, 2]])  # <s> ... </s>, right-padded with 0
  mask = ids > 0
  with torch.no_grad():
    hidden = ref(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask.astype(np.int64)))
  hidden = hidden.last_hidden_state.numpy()
  last = hidden[np.arange(2), mask.sum(1) - 1] @ t["text_projection"]
  want = last / np.linalg.norm(last, axis=-1, keepdims=True)
  ours = nnx.jit(lambda m, i, a: m.encode_text(i, a))(model_g, jnp.asarray(ids), jnp.asarray(mask.astype(np.int32)))
  np.testing.assert_allclose(np.asarray(ours), want, rtol=1e-4, atol=1e-5)
