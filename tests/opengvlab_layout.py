"""Rewrites a transformers-native checkpoint folder into the OpenGVLab remote-code layouts (InternVLChatModel,
InternVisionModel, InternLM2ForCausalLM), written here independently of the converter's key maps: fused ViT qkv
rows (q, k, v), `mlp1.{0,1,3}`, `vision_model.*`, and InternLM2's wqkv interleaved per KV head exactly as its
attention splits it (rearrange 'b q (h gs d) -> b q h gs d', gs = groups + 2: queries, then k, then v)."""

from __future__ import annotations

import json
import os
import re

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

VISION_RENAMES = [
    (r"embeddings\.cls_token$", "embeddings.class_embedding"),
    (r"embeddings\.position_embeddings$", "embeddings.position_embedding"),
    (r"embeddings\.patch_embeddings\.projection\.", "embeddings.patch_embedding."),
    (r"encoder\.layer\.(\d+)\.attention\.projection_layer\.", r"encoder.layers.\1.attn.proj."),
    (r"encoder\.layer\.(\d+)\.attention\.(q|k)_norm\.", r"encoder.layers.\1.attn.\2_norm."),
    (r"encoder\.layer\.(\d+)\.lambda_1$", r"encoder.layers.\1.ls1"),
    (r"encoder\.layer\.(\d+)\.lambda_2$", r"encoder.layers.\1.ls2"),
    (r"encoder\.layer\.(\d+)\.layernorm_before\.", r"encoder.layers.\1.norm1."),
    (r"encoder\.layer\.(\d+)\.layernorm_after\.", r"encoder.layers.\1.norm2."),
    (r"encoder\.layer\.(\d+)\.mlp\.", r"encoder.layers.\1.mlp."),
]
INTERNLM2_RENAMES = [
    (r"embed_tokens\.", "tok_embeddings."), (r"self_attn\.o_proj\.", "attention.wo."),
    (r"mlp\.gate_proj\.", "feed_forward.w1."), (r"mlp\.up_proj\.", "feed_forward.w3."),
    (r"mlp\.down_proj\.", "feed_forward.w2."), (r"input_layernorm\.", "attention_norm."),
    (r"post_attention_layernorm\.", "ffn_norm."),
]


def read(folder: str) -> dict:
  with safe_open(os.path.join(folder, "model.safetensors"), "np") as f:
    return {k: f.get_tensor(k) for k in f.keys()}


def rename(name: str, rules) -> str:
  for pattern, repl in rules:
    name, n = re.subn(pattern, repl, name)
    if n:
      break
  return name


def internlm2_wqkv(q, k, v, num_heads, num_kv, head_dim):
  """Rows of wqkv, built one KV head at a time: its `groups` query heads, then its key, then its value."""
  g = num_heads // num_kv
  rows = []
  for j in range(num_kv):
    for i in range(g):
      h = j * g + i
      rows.append(q[h * head_dim:(h + 1) * head_dim])
    rows.append(k[j * head_dim:(j + 1) * head_dim])
    rows.append(v[j * head_dim:(j + 1) * head_dim])
  return np.concatenate(rows, axis=0)


def vision_tensors(t: dict, prefix: str, out_prefix: str) -> dict:
  out = {}
  for name, x in t.items():
    if not name.startswith(prefix):
      continue
    rest = name[len(prefix):]
    m = re.match(r"encoder\.layer\.(\d+)\.attention\.q_proj\.(weight|bias)$", rest)
    if m:
      i, kind = m.groups()
      parts = [t[f"{prefix}encoder.layer.{i}.attention.{p}_proj.{kind}"] for p in "qkv"]
      out[f"{out_prefix}encoder.layers.{i}.attn.qkv.{kind}"] = np.concatenate(parts, axis=0)
    elif re.match(r"encoder\.layer\.\d+\.attention\.[kv]_proj\.", rest):
      continue
    else:
      out[out_prefix + rename(rest, VISION_RENAMES)] = x
  return out


def lm_tensors(t: dict, prefix: str, out_prefix: str, head: str, out_head: str, text: dict, internlm2: bool) -> dict:
  out = {}
  heads, kv = text["num_attention_heads"], text["num_key_value_heads"]
  hd = text["hidden_size"] // heads
  for name, x in t.items():
    if name == head:
      out[out_head] = x
      continue
    if not name.startswith(prefix):
      continue
    rest = name[len(prefix):]
    if internlm2:
      m = re.match(r"layers\.(\d+)\.self_attn\.q_proj\.weight$", rest)
      if m:
        base = f"{prefix}layers.{m.group(1)}.self_attn"
        q, k, v = (t[f"{base}.{p}_proj.weight"] for p in "qkv")
        out[f"{out_prefix}layers.{m.group(1)}.attention.wqkv.weight"] = internlm2_wqkv(q, k, v, heads, kv, hd)
        continue
      if re.match(r"layers\.\d+\.self_attn\.[kv]_proj\.weight$", rest):
        continue
      rest = rename(rest, INTERNLM2_RENAMES)
    out[out_prefix + rest] = x
  return out


def opengvlab_vision_config(v: dict) -> dict:
  return dict(model_type="intern_vit_6b", architectures=["InternVisionModel"], hidden_size=v["hidden_size"],
              num_hidden_layers=v["num_hidden_layers"], num_attention_heads=v["num_attention_heads"],
              intermediate_size=v["intermediate_size"], qkv_bias=v["attention_bias"],
              qk_normalization=v["use_qk_norm"], norm_type=v["norm_type"], layer_norm_eps=v["layer_norm_eps"],
              initializer_factor=v["layer_scale_init_value"], image_size=v["image_size"][0],
              patch_size=v["patch_size"][0], num_channels=3, hidden_act="gelu", drop_path_rate=0.0,
              use_flash_attn=False)


def write(folder: str, tensors: dict, config: dict, image_token_id: int | None = None) -> None:
  os.makedirs(folder, exist_ok=True)
  save_file(tensors, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(config, f)
  if image_token_id is not None:
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
      json.dump({"added_tokens_decoder": {str(image_token_id): {"content": "<IMG_CONTEXT>", "special": True}}}, f)


def phi3_remote_rope(rope: dict) -> dict:
  """Phi-3's remote-code config spelling (as InternVL2-4B ships it): rope_theta top level, and longrope as
  rope_scaling {"type": "su", "short_factor", "long_factor"} with original_max_position_embeddings top level."""
  out = dict(rope_theta=rope["rope_theta"], rope_scaling=None)
  if rope.get("partial_rotary_factor", 1.0) != 1.0:
    out["partial_rotary_factor"] = rope["partial_rotary_factor"]
  if rope["rope_type"] == "longrope":
    out["rope_scaling"] = {"type": "su", "short_factor": rope["short_factor"], "long_factor": rope["long_factor"]}
  return out


def chat_to_opengvlab(native: str, out: str, lm: str = "qwen2") -> None:
  """lm: 'qwen2' | 'llama' | 'qwen3' | 'qwen3_moe' | 'internlm2' | 'internlm3' | 'phi3' | 'gpt_oss' (the native
  folder's text model must be LLaMA-shaped for 'internlm2' / 'internlm3', Phi-3 for 'phi3', GPT-OSS for 'gpt_oss').
  Qwen3 / Qwen3-MoE / GPT-OSS tensors keep their names (InternVL3.5 wraps Qwen3ForCausalLM / Qwen3MoeForCausalLM /
  GptOssForCausalLM as language_model)."""
  with open(os.path.join(native, "config.json")) as f:
    cfg = json.load(f)
  t = read(native)
  text = cfg["text_config"]
  tensors = vision_tensors(t, "vision_tower.", "vision_model.")
  for src, dst in (("layer_norm", "0"), ("linear_1", "1"), ("linear_2", "3")):
    for kind in ("weight", "bias"):
      tensors[f"mlp1.{dst}.{kind}"] = t[f"multi_modal_projector.{src}.{kind}"]
  internlm2 = lm == "internlm2"
  tensors.update(lm_tensors(t, "language_model.model.", "language_model.model.", "language_model.lm_head.weight",
                            "language_model.output.weight" if internlm2 else "language_model.lm_head.weight",
                            text, internlm2))
  arch = {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM", "internlm2": "InternLM2ForCausalLM",
          "internlm3": "InternLM3ForCausalLM", "phi3": "Phi3ForCausalLM", "qwen3": "Qwen3ForCausalLM",
          "qwen3_moe": "Qwen3MoeForCausalLM", "gpt_oss": "GptOssForCausalLM"}[lm]
  llm_config = dict(text, architectures=[arch], model_type=lm,
                    rope_theta=text["rope_parameters"]["rope_theta"], bias=False)
  rope = llm_config.pop("rope_parameters")
  if lm == "phi3":
    llm_config.update(phi3_remote_rope(rope))
  if lm == "gpt_oss":  # the 4.5x GptOssConfig spelling the release carries: rope_theta top level, rope_scaling
    llm_config["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
  if lm == "internlm3":  # its remote config names: qkv_bias (q/k/v) and bias (o_proj, MLP), no attention_bias
    hd = text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"]
    llm_config.update(qkv_bias=False, head_dim=hd)
    llm_config.pop("attention_bias", None)
    llm_config.pop("mlp_bias", None)
  config = dict(model_type="internvl_chat", architectures=["InternVLChatModel"],
                vision_config=opengvlab_vision_config(cfg["vision_config"]), llm_config=llm_config,
                select_layer=cfg["vision_feature_layer"], downsample_ratio=cfg["downsample_ratio"], ps_version="v2",
                template="phi3-chat" if lm == "phi3" else "internvl2_5",
                force_image_size=cfg["vision_config"]["image_size"][0],
                use_backbone_lora=0, use_llm_lora=0, tie_word_embeddings=cfg["tie_word_embeddings"])
  write(out, tensors, config, cfg["image_token_id"])


def vision_to_opengvlab(native: str, out: str) -> None:
  with open(os.path.join(native, "config.json")) as f:
    cfg = json.load(f)
  write(out, vision_tensors(read(native), "", ""), opengvlab_vision_config(cfg))


def lm_to_internlm2(native: str, out: str) -> None:
  with open(os.path.join(native, "config.json")) as f:
    cfg = json.load(f)
  tensors = lm_tensors(read(native), "model.", "model.", "lm_head.weight", "output.weight", cfg, True)
  config = dict(cfg, model_type="internlm2", architectures=["InternLM2ForCausalLM"], bias=False,
                rope_theta=cfg["rope_parameters"]["rope_theta"])
  config.pop("rope_parameters")
  write(out, tensors, config)
