"""peft adapters (convert/peft_export.py) of LoRA chat models whose language model is fused on one side, against
peft on transformers' InternVL:
  internlm2  an OpenGVLab InternVL-Chat-V1-5-style folder: InternLM2 with the fused, per-KV-head interleaved wqkv,
             split into our q, k, v at load; the native export writes LLaMA q_proj / k_proj / v_proj
  phi3       transformers' Phi-3 fuses what we keep apart (qkv_proj = q, k, v; gate_up_proj = gate, up): one
             adapter of rank k r per fused module (peft rank_pattern / alpha_pattern)
Each exported adapter, put by PeftModel.from_pretrained on the native export of the LoRA model's base, must give our
LoRA model's logits; the same adapter with permuted rows of B must not."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from peft import PeftModel
from safetensors.numpy import load_file, save_file
from transformers import InternVLForConditionalGeneration

import hf_refs
import opengvlab_layout
from conftest import tiny_config
from internvl_jax import convert
from internvl_jax.convert import peft_export, release
from internvl_jax.models import internvl
from test_phi3 import VARIANTS

jax.config.update("jax_default_matmul_precision", "highest")
IMG = 95
RANK, ALPHA, VIT_RANK, VIT_ALPHA = 4, 8.0, 2, 6.0
LAYER0 = "base_model.model.model.language_model.layers.0"


def _with_lora(plain: internvl.InternVLChat, seed: int = 1) -> internvl.InternVLChat:
  """`plain`'s weights plus LoRA on both towers, B random (a trained run's), the projector moved (trained in full)."""
  cfg = plain.config.copy_and_resolve_references()
  cfg.language.lora_rank, cfg.language.lora_alpha = RANK, ALPHA
  cfg.vision.lora_rank, cfg.vision.lora_alpha = VIT_RANK, VIT_ALPHA
  model = internvl.InternVLChat(cfg, rngs=nnx.Rngs(0))
  base = {p: v.get_value() for p, v in nnx.to_flat_state(nnx.state(plain, nnx.Param))}
  rng = np.random.default_rng(seed)
  state = nnx.state(model, nnx.Param)
  for path, var in nnx.to_flat_state(state):
    x = var.get_value() if str(path[-1]) == "lora_a" else base.get(path, var.get_value())
    if str(path[-1]) == "lora_b":
      x = rng.normal(0, 0.1, x.shape)
    elif str(path[0]) == "projector":
      x = x + rng.normal(0, 0.05, x.shape)
    var.set_value(jnp.asarray(x, jnp.float32))
  nnx.update(model, state)
  return model


# the other language families the native export writes: every adapter on an unfused Linear (no adapters on routed
# experts, so GPT-OSS's interleaved gate_up_proj has none)
OTHERS = [pytest.param(f, marks=pytest.mark.slow) for f in ("qwen3_moe", "gpt_oss")]


@pytest.fixture(scope="module", params=["internlm2", "phi3"] + OTHERS)
def exported(request, tmp_path_factory):
  """(family, our LoRA model, native base folder, adapter folder)."""
  family, tmp = request.param, tmp_path_factory.mktemp(request.param)
  native = str(tmp / "native")
  if family == "internlm2":
    hf_refs.chat_model({k: v for k, v in hf_refs.LLAMA.items() if k != "head_dim"}, native, image_token_id=IMG)
    src = str(tmp / "opengvlab")
    opengvlab_layout.chat_to_opengvlab(native, src, "internlm2")
  else:
    hf_refs.chat_model(VARIANTS["window"] if family == "phi3" else getattr(hf_refs, family.upper()), native,
                       image_token_id=IMG)
    src = native
  model = _with_lora(convert.load_pretrained(src))
  base_dir, adapter_dir = str(tmp / "base"), str(tmp / "adapter")
  convert.save_pretrained(peft_export.without_adapters(model), base_dir)
  run = tiny_config("instruct", use_llm_lora=RANK, use_backbone_lora=VIT_RANK)  # what the run trained: + projector
  written = release.write_release(model, adapter_dir, adapter_only=True, run_config=run)
  assert sorted(written) == sorted(peft_export.ADAPTER_FILES)
  return family, model, base_dir, adapter_dir


def _logits(model, ids, mask, pixels):
  if isinstance(model, internvl.InternVLChat):
    return np.asarray(model(jnp.asarray(ids), pixel_values=jnp.asarray(pixels),
                            attention_mask=jnp.asarray(mask)).logits)
  with torch.no_grad():
    return model(**hf_refs.torch_chat_inputs(ids, mask, pixels)).logits.numpy()


def test_the_base_export_has_the_expected_torch_layout(exported):
  family, _, base_dir, adapter_dir = exported
  with open(os.path.join(base_dir, "config.json")) as f:
    text = json.load(f)["text_config"]
  assert text["model_type"] == {"internlm2": "llama"}.get(family, family)
  names = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
  modules = {"internlm2": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj",
                           "mlp.down_proj"),
             "phi3": ("self_attn.qkv_proj", "mlp.gate_up_proj", "mlp.down_proj")}.get(family, ("self_attn.q_proj",))
  for module in modules + ("self_attn.o_proj",):
    assert f"{LAYER0}.{module}.lora_A.weight" in names


def test_peft_on_the_native_base_gives_our_lora_logits(exported):
  family, model, base_dir, adapter_dir = exported
  ids, mask, pixels = hf_refs.chat_prompts(True, IMG)
  ours = _logits(model, ids, mask, pixels)
  torch_base = InternVLForConditionalGeneration.from_pretrained(base_dir)
  real = mask.astype(bool)
  assert hf_refs.errors(_logits(torch_base, ids, mask, pixels)[real], ours[real])[1] > 1e-3  # the adapters matter
  peft_model = PeftModel.from_pretrained(torch_base, adapter_dir).eval()
  abs_err, rel_err = hf_refs.errors(_logits(peft_model, ids, mask, pixels)[real], ours[real])
  print(f"{family}: peft adapter vs our LoRA model: max abs {abs_err:.2e}, max rel {rel_err:.2e}")
  assert rel_err < 1e-5
  layer = peft_model.base_model.model.model.language_model.layers[0]
  hidden = model.config.language.hidden_size
  if family == "phi3":  # one adapter of rank 3 r (2 r) per fused module, at our scaling alpha / r
    assert layer.self_attn.qkv_proj.lora_A["default"].weight.shape == (3 * RANK, hidden)
    assert layer.mlp.gate_up_proj.lora_B["default"].weight.shape[1] == 2 * RANK
    for module in (layer.self_attn.qkv_proj, layer.mlp.gate_up_proj, layer.self_attn.o_proj):
      assert module.scaling["default"] == pytest.approx(ALPHA / RANK)
  else:
    assert layer.self_attn.q_proj.lora_A["default"].weight.shape == (RANK, hidden)
    assert not hasattr(layer.self_attn, "qkv_proj")
  vit = peft_model.base_model.model.model.vision_tower.encoder.layer[0].attention.q_proj
  assert vit.scaling["default"] == pytest.approx(VIT_ALPHA / VIT_RANK)


def _permuted(adapter_dir: str, out_dir: str, family: str, cfg) -> None:
  """The adapter with rows of one lora_B permuted as a wrong layout would: Phi-3's k and v row blocks of qkv_proj
  swapped; otherwise (InternLM2's de-interleaved heads) query heads 0 and 1 (both read KV head 0) swapped in
  q_proj."""
  tensors = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
  hd = cfg.head_dim or cfg.hidden_size // cfg.num_heads
  if family == "phi3":
    name, q, kv = f"{LAYER0}.self_attn.qkv_proj.lora_B.weight", cfg.num_heads * hd, cfg.num_kv_heads * hd
    order = np.r_[0:q, q + kv:q + 2 * kv, q:q + kv]
  else:
    name = f"{LAYER0}.self_attn.q_proj.lora_B.weight"
    order = np.r_[hd:2 * hd, 0:hd, 2 * hd:cfg.num_heads * hd]
  tensors[name] = np.ascontiguousarray(tensors[name][order])
  os.makedirs(out_dir)
  save_file(tensors, os.path.join(out_dir, "adapter_model.safetensors"), metadata={"format": "pt"})
  with open(os.path.join(adapter_dir, "adapter_config.json")) as f, \
      open(os.path.join(out_dir, "adapter_config.json"), "w") as g:
    g.write(f.read())


def test_a_wrong_row_order_is_caught(exported, tmp_path):
  family, model, base_dir, adapter_dir = exported
  wrong = str(tmp_path / "wrong")
  _permuted(adapter_dir, wrong, family, model.config.language)
  ids, mask, pixels = hf_refs.chat_prompts(False, IMG)
  ours = _logits(model, ids, mask, pixels)
  peft_model = PeftModel.from_pretrained(InternVLForConditionalGeneration.from_pretrained(base_dir), wrong).eval()
  assert hf_refs.errors(_logits(peft_model, ids, mask, pixels), ours)[1] > 1e-4
