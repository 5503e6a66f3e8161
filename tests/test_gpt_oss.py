"""GPT-OSS (the language model of InternVL3.5-GPT-OSS-20B-A4B): transformers' GptOssForCausalLM (4 layers
alternating 4-token sliding windows and full attention, attention sinks, q/k/v/o biases, YaRN RoPE, 4 biased
experts top-2 with the clamped SwiGLU) loads into our decoder and matches PyTorch (eager attention): logits on
prompts longer than the window, the router loss, greedy generation with left padding, KV-cache decoding, and
save_pretrained back; the same through InternVL chat folders in both layouts; the attention sink against a numpy
softmax with an extra column; the 20B preset's parameter count against transformers'."""

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
from internvl_jax.models import attention, llm

jax.config.update("jax_default_matmul_precision", "highest")
REL_TOL = 1e-5
IMG = 95
LEN = 12  # prompt length: three times the 4-token window
NEW = 8


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
  folder = str(tmp_path_factory.mktemp("gpt_oss"))
  ref = hf_refs.causal_lm(hf_refs.GPT_OSS, folder)
  assert ref.config._attn_implementation == "eager"
  return ref, convert.load_pretrained(folder), folder


def test_config_fields_and_stacks(lm):
  _, ours, _ = lm
  c = ours.config
  assert c.hf_model_type == "gpt_oss" and c.rope_type == "yarn" and c.expert_act == "gpt_oss_clamped"
  assert c.window_cache
  assert llm.layer_windows(c) == (4, 0, 4, 0)
  assert (c.num_experts, c.num_experts_per_tok, c.moe_mlp_dim, c.swiglu_limit) == (4, 2, 32, 0.5)
  assert ours.layers.attn.sinks.shape == (4, 4) and ours.layers.attn.o.bias.shape == (4, 64)
  assert ours.layers.mlp.gate.shape == (4, 4, 64, 32) and ours.layers.mlp.gate_bias.shape == (4, 4, 32)
  assert ours.layers.mlp.router.bias.shape == (4, 4) and ours.dense_layers is None


def test_yarn_tables_equal_transformers(lm):
  ref, ours, _ = lm
  rot = ref.model.rotary_emb
  pos = np.arange(40)[None]
  cos, sin = llm.rope_tables(ours.config, jnp.asarray(pos))
  with torch.no_grad():
    want_cos, want_sin = rot(torch.zeros(1, dtype=torch.float32), torch.from_numpy(pos))
  np.testing.assert_allclose(llm.yarn_inv_freq(ours.config, 16), rot.inv_freq.numpy(), rtol=5e-7)  # ulps of pow
  # transformers' GPT-OSS tables hold rd/2 columns (each half rotated by the same angle); ours repeat them. Angles
  # near 40 rad carry float32 rounding of ~4e-6 (XLA's and torch's cos / sin differ there).
  np.testing.assert_allclose(np.asarray(cos)[..., :8], want_cos.numpy(), rtol=0, atol=1e-5)
  np.testing.assert_allclose(np.asarray(sin)[..., 8:], want_sin.numpy(), rtol=0, atol=1e-5)
  assert ours.config.rope_attention_factor == pytest.approx(rot.attention_scaling, rel=1e-12)


@pytest.mark.parametrize("pad", [False, True], ids=["unpadded", "left_padded"])
def test_logits_and_router_loss_match_torch(lm, pad):
  ref, ours, _ = lm
  ids, mask = hf_refs.prompts(pad, LEN)
  hf_refs.check_logits_and_router_loss(ref, ours, ids, mask, f"gpt_oss pad={pad}", REL_TOL)


def _variant(model, **changes):
  """The same weights under a changed config (e.g. no clamp)."""
  cfg = model.config.copy_and_resolve_references()
  cfg.update(changes)
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: llm.Decoder(cfg, rngs=nnx.Rngs(0))))
  return nnx.merge(graphdef, nnx.state(model))


@pytest.mark.parametrize("change", [dict(swiglu_limit=1e9), dict(layer_types=[]), dict(sliding_window=0),
                                    dict(rope_type="default")], ids=["no_clamp", "all_windowed", "no_window",
                                                                     "plain_rope"])
def test_each_gpt_oss_option_changes_the_logits(lm, change):
  """The parity above would not see an option the test inputs never exercise: each one, turned off, moves the
  logits far beyond the tolerance (the clamps bite, windows cut prompts of 12, YaRN differs at these positions)."""
  ref, ours, _ = lm
  ids, mask = hf_refs.prompts(False, LEN)
  want = hf_refs.torch_logits(ref, ids, mask)
  got = np.asarray(_variant(ours, **change)(jnp.asarray(ids), attention_mask=jnp.asarray(mask)).logits)
  assert hf_refs.errors(got, want)[1] > 100 * REL_TOL


def test_one_scan_runs_all_layers_with_their_windows(lm):
  _, ours, _ = lm
  text = str(jax.make_jaxpr(lambda ids: ours(ids).logits)(jnp.zeros((1, LEN), jnp.int32)))
  assert text.count("scan[") == 1 and "length=4" in text
  assert text.count("ragged_dot") >= 3


@pytest.mark.parametrize("rings", [True, False], ids=["window_rings", "full_cache"])
def test_kv_cache_decoding_equals_the_full_forward(lm, rings):
  """Rings (the converter's choice): sliding layers keep 4 slots, full ones 12; or every layer the full 12."""
  _, ours, _ = lm
  ours = ours if rings else _variant(ours, window_cache=False)
  ids, mask = hf_refs.prompts(True, LEN)
  full = np.asarray(ours(jnp.asarray(ids), attention_mask=jnp.asarray(mask)).logits)
  cache = ours.init_cache(2, LEN)
  assert cache["k"].shape[:3] == ((2, 2, LEN) if rings else (4, 2, LEN))
  assert ("k_ring" in cache) == rings and (not rings or cache["k_ring"].shape[:3] == (2, 2, 4))
  step = nnx.jit(lambda m, i, a, c: m(i, attention_mask=a, cache=c))  # one compile for the 1-token steps
  out = step(ours, jnp.asarray(ids[:, :5]), jnp.asarray(mask[:, :5]), cache)  # a prefill longer than the ring
  steps = [np.asarray(out.logits)]
  for t in range(5, LEN):  # slots 5..11: the windowed layers drop keys from the cache as decoding goes on
    out = step(ours, jnp.asarray(ids[:, t:t + 1]), jnp.asarray(mask[:, t:t + 1]), out.cache)
    steps.append(np.asarray(out.logits))
  real = mask.astype(bool)
  rel = hf_refs.errors(np.concatenate(steps, 1)[real], full[real])[1]
  print(f"gpt_oss cache (rings={rings}) vs full forward: max rel {rel:.1e}")
  assert rel < 1e-6


def test_greedy_generate_with_left_padding_equals_torch(lm):
  ref, ours, _ = lm
  ids, mask = hf_refs.prompts(True, LEN)
  with torch.no_grad():
    want = ref.generate(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), do_sample=False,
                        max_new_tokens=NEW).numpy()
  np.testing.assert_array_equal(np.asarray(generate(ours, ids, attention_mask=mask, max_new_tokens=NEW)), want)


def test_save_pretrained_round_trips_through_transformers(lm, tmp_path):
  from safetensors import safe_open
  from transformers import GptOssForCausalLM
  ref, ours, _ = lm
  convert.save_pretrained(ours, str(tmp_path))
  with safe_open(str(tmp_path / "model.safetensors"), "np") as f:
    assert f.get_slice("model.layers.0.mlp.experts.gate_up_proj").get_shape() == [4, 64, 64]
  back = GptOssForCausalLM.from_pretrained(str(tmp_path)).eval()
  ids, mask = hf_refs.prompts(True, LEN)
  np.testing.assert_array_equal(hf_refs.torch_logits(back, ids, mask), hf_refs.torch_logits(ref, ids, mask))
  with open(tmp_path / "config.json") as f:
    saved = json.load(f)
  assert saved["layer_types"] == ["sliding_attention", "full_attention"] * 2 and saved["swiglu_limit"] == 0.5


def test_attention_sinks_equal_a_numpy_softmax_with_an_extra_column():
  """CPU path in one block and in several, fully-masked rows included (they attend to the sink only: zero)."""
  rng = np.random.default_rng(0)
  b, t, h, hkv, hd = 2, 9, 4, 2, 8
  q, k, v = (rng.standard_normal(s).astype(np.float32) for s in ((b, t, h, hd), (b, t, hkv, hd), (b, t, hkv, hd)))
  sinks = rng.standard_normal(h).astype(np.float32) * 2
  mask = np.broadcast_to(np.tril(np.ones((t, t), bool)), (b, 1, t, t)).copy()
  mask[1, :, :3] = False  # padded queries see nothing
  kr, vr = np.repeat(k, h // hkv, axis=2), np.repeat(v, h // hkv, axis=2)
  logits = np.einsum("bthd,bshd->bhts", q, kr) / np.sqrt(hd)
  logits = np.where(mask, logits, -np.inf)
  full = np.concatenate([logits, np.broadcast_to(sinks[None, :, None, None], (b, h, t, 1))], axis=-1)
  probs = np.exp(full - full.max(-1, keepdims=True))
  probs = (probs / probs.sum(-1, keepdims=True))[..., :-1]
  want = np.einsum("bhts,bshd->bthd", probs, vr)
  args = [jnp.asarray(x) for x in (q, k, v)]
  one = attention.dot_product_attention(*args, mask=jnp.asarray(mask), sinks=jnp.asarray(sinks), impl="auto")
  blocks = attention._cpu_attention(*args, mask=jnp.asarray(mask), causal=False, scale=None, budget_bytes=64 * 4,
                                    sinks=jnp.asarray(sinks))
  for got in (one, blocks):
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)
  assert np.abs(np.asarray(one)[1, :3]).max() == 0.0


@pytest.mark.parametrize("change, message", [
    (dict(quantization_config={"quant_method": "bitsandbytes"}), "quantized with 'bitsandbytes'.*dequantize"),
    (dict(rope_parameters={"rope_type": "longrope", "rope_theta": 500.0}), "RoPE scaling 'longrope'"),
    (dict(layer_types=["sliding_attention", "chunked_attention"] * 2), "layer_types"),
], ids=["bitsandbytes", "longrope", "layer_type"])
def test_unsupported_configs_are_refused_in_one_line(change, message):
  with pytest.raises(convert.configs.ConversionError, match=message) as e:
    convert.configs.language_from_hf(dict(hf_refs.GPT_OSS, **change), "gpt_oss")
  assert "\n" not in str(e.value)


def test_mxfp4_experts_are_dequantized_as_transformers_does(lm, tmp_path):
  # openai's gpt-oss folders store the experts MXFP4: `_blocks` (two FP4 codes per byte) + `_scales` (powers of
  # two). Random codes and scales, dequantized by transformers' own converter into the reference model.
  import copy
  import os
  from safetensors.numpy import load_file, save_file
  from transformers.integrations.mxfp4 import convert_moe_packed_tensors
  ref, _, folder = lm
  ref = copy.deepcopy(ref)
  tensors = load_file(os.path.join(folder, "model.safetensors"))
  rng = np.random.default_rng(0)
  e, d, i = 4, 64, 32
  for layer in range(4):
    experts = ref.model.layers[layer].mlp.experts
    for name, rows, cols in (("gate_up_proj", 2 * i, d), ("down_proj", d, i)):
      key = f"model.layers.{layer}.mlp.experts.{name}"
      assert key in tensors
      del tensors[key]
      blocks = rng.integers(0, 256, (e, rows, cols // 32, 16), dtype=np.uint8)
      scales = rng.integers(118, 122, (e, rows, cols // 32), dtype=np.uint8)  # 2^-9 .. 2^-6: weights like init
      tensors[key + "_blocks"], tensors[key + "_scales"] = blocks, scales
      dense = convert_moe_packed_tensors(torch.from_numpy(blocks), torch.from_numpy(scales), dtype=torch.float32)
      getattr(experts, name).data.copy_(dense)
  out = str(tmp_path / "mxfp4")
  os.makedirs(out)
  save_file(tensors, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
  with open(os.path.join(folder, "config.json")) as f:
    config = json.load(f)
  with open(os.path.join(out, "config.json"), "w") as f:
    json.dump(dict(config, quantization_config={"quant_method": "mxfp4"}), f)
  ours = convert.load_pretrained(out)
  ids, mask = hf_refs.prompts(False, LEN)
  with torch.no_grad():
    want = ref(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.numpy()
  got = np.asarray(ours(jnp.asarray(ids), attention_mask=jnp.asarray(mask)).logits)
  assert hf_refs.errors(got, want)[1] < REL_TOL
  # the same codes read as the unquantized layout would be garbage: the dequantization is what matches
  assert not np.allclose(got, np.asarray(convert.load_pretrained(folder)(jnp.asarray(ids)).logits), atol=1e-3)


@pytest.fixture(scope="module")
def chat(tmp_path_factory):
  folder = str(tmp_path_factory.mktemp("gpt_oss_chat"))
  return folder, hf_refs.chat_model(hf_refs.GPT_OSS, folder, image_token_id=IMG)


@pytest.mark.parametrize("layout", ["native", "opengvlab"])
def test_chat_folders_match_torch(chat, tmp_path, layout):
  folder, ref = chat
  if layout == "opengvlab":
    opengvlab_layout.chat_to_opengvlab(folder, str(tmp_path), "gpt_oss")
    folder = str(tmp_path)
  ours = convert.load_pretrained(folder)
  assert ours.config.language.hf_model_type == "gpt_oss" and ours.config.image_token_id == IMG
  ids, mask, pixels = hf_refs.chat_prompts(True, IMG)
  with torch.no_grad():
    want = ref(**hf_refs.torch_chat_inputs(ids, mask, pixels)).logits.numpy()
  got = np.asarray(ours(jnp.asarray(ids), pixel_values=jnp.asarray(pixels), attention_mask=jnp.asarray(mask)).logits)
  abs_err, rel_err = hf_refs.errors(got[mask.astype(bool)], want[mask.astype(bool)])
  print(f"chat gpt_oss {layout} logits: max abs {abs_err:.2e}, max rel {rel_err:.2e}")
  assert rel_err < REL_TOL


@pytest.mark.slow  # the LM's greedy test covers the rings; this adds the image path (~20 s)
def test_chat_greedy_generate_equals_torch(chat):
  """11 prompt tokens (4 of them the image) + 6 new ones through the ring caches of 4 slots."""
  folder, ref = chat
  ours = convert.load_pretrained(folder)
  ids, mask, pixels = hf_refs.chat_prompts(True, IMG)
  with torch.no_grad():
    want = ref.generate(**hf_refs.torch_chat_inputs(ids, mask, pixels), do_sample=False, max_new_tokens=6).numpy()
  got = generate(ours, ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=6)
  np.testing.assert_array_equal(np.asarray(got), want)


def test_chat_save_pretrained_round_trips_through_transformers(chat, tmp_path):
  from transformers import InternVLForConditionalGeneration
  folder, ref = chat
  convert.save_pretrained(convert.load_pretrained(folder), str(tmp_path))
  back = InternVLForConditionalGeneration.from_pretrained(str(tmp_path)).eval()
  assert back.config.text_config.model_type == "gpt_oss"
  ids, mask, pixels = hf_refs.chat_prompts(True, IMG)
  with torch.no_grad():
    np.testing.assert_array_equal(back(**hf_refs.torch_chat_inputs(ids, mask, pixels)).logits.numpy(),
                                  ref(**hf_refs.torch_chat_inputs(ids, mask, pixels)).logits.numpy())


def test_20b_preset_counts_what_transformers_does():
  from transformers import GptOssConfig, GptOssForCausalLM

  from internvl_jax.models import presets
  cfg = presets.language("gpt_oss_20b")
  ours = nnx.eval_shape(lambda: llm.Decoder(cfg, rngs=nnx.Rngs(0)))
  n_ours = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(ours, nnx.Param)))
  with torch.device("meta"):
    theirs = GptOssForCausalLM(GptOssConfig(**convert.configs.language_to_hf(cfg)))
  n_theirs = sum(p.numel() for p in theirs.parameters())
  print(f"gpt_oss_20b parameters: ours {n_ours:,}, transformers {n_theirs:,}")
  assert n_ours == n_theirs
  assert theirs.config.layer_types[:2] == ["sliding_attention", "full_attention"]
  chat = presets.chat("internvl3_5_gpt_oss_20b_a4b")
  assert chat.language.hidden_size == 2880 and chat.vision.hidden_size == 1024


@pytest.mark.slow
def test_eight_devices_with_expert_4_equal_one_device(lm):
  """The expert biases travel through the experts' shard_map split like their weights."""
  import os
  import subprocess
  import sys
  _, _, folder = lm
  here = os.path.dirname(os.path.abspath(__file__))
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  mesh = "fsdp=2,expert=4"
  proc = subprocess.run([sys.executable, os.path.join(here, "moe_on_mesh.py"), folder, mesh], capture_output=True,
                        text=True, env=env, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  r = json.loads(proc.stdout.strip().splitlines()[-1])
  print(f"gpt_oss 8 devices ({mesh}) vs 1: {r}")
  assert r.pop("devices") == 8 and set(r) == {f"{mesh}/rows8", f"{mesh}/rows2"}
  for name, c in r.items():  # rows8: tokens gathered over 'expert' and reduce-scattered; rows2: psum
    assert c["expert_spec"][:2] == ["None", "expert"] and c["shard_map"], name
    assert c["logits_rel"] < 1e-5 and abs(c["aux"][0] - c["aux"][1]) < 1e-6, name
    assert c["expert_grad_max"] > 0 and c["grad_rel"] < 1e-5, name
  assert r[f"{mesh}/rows8"]["reduce_scatter"] and not r[f"{mesh}/rows2"]["reduce_scatter"]
