"""config.json (transformers or OpenGVLab remote code) <-> our ml_collections model configs.

Only fields that change the computation are read; a field whose value our models cannot reproduce (an output
bias, a sliding window, RoPE scaling, a final vision LayerNorm) raises a one-line error instead of loading a model
that would silently compute something else.
"""

from __future__ import annotations

import logging
import math

import ml_collections

from internvl_jax.models import llm, moe, presets


class ConversionError(ValueError):
  """A checkpoint or config that cannot be converted; the message says which key / field and why."""


def _square(v, name: str) -> int:
  if isinstance(v, (list, tuple)):
    if len(set(v)) != 1:
      raise ConversionError(f"{name}={list(v)} is not square; only square images/patches are supported")
    v = v[0]
  return int(v)


def _require(cond: bool, message: str) -> None:
  if not cond:
    raise ConversionError(message)


require = _require  # for the other converter modules


# ----------------------------------------------------------------------------------------------------------------
# Vision


def vision_from_native(c: dict) -> ml_collections.ConfigDict:
  """transformers InternVLVisionConfig (model_type 'internvl_vision')."""
  _require(c.get("hidden_act", "gelu") == "gelu", f"vision hidden_act {c.get('hidden_act')!r} is not 'gelu'")
  _require(c.get("use_mean_pooling", True), "use_mean_pooling=False adds a final LayerNorm that InternViT does not have")
  _require(c.get("use_absolute_position_embeddings", True), "vision models without position embeddings are unsupported")
  eps = c.get("layer_norm_eps", 1e-6)
  if c.get("use_qk_norm", False) and eps != 1e-6:
    # transformers' QK-norm always uses eps 1e-6 while ours uses norm_eps; say so rather than differ silently.
    logging.warning("vision layer_norm_eps %g differs from transformers' fixed QK-norm eps 1e-6", eps)
  return presets.vision_config(
      hidden_size=c.get("hidden_size", 1024), num_layers=c.get("num_hidden_layers", 24),
      num_heads=c.get("num_attention_heads", 16), mlp_dim=c.get("intermediate_size", 4096),
      norm_type=c.get("norm_type", "layer_norm"), norm_eps=eps, qkv_bias=c.get("attention_bias", False),
      qk_norm=c.get("use_qk_norm", False), qkv_fused=True, layer_scale_init=c.get("layer_scale_init_value", 0.1),
      image_size=_square(c.get("image_size", 448), "image_size"),
      patch_size=_square(c.get("patch_size", 14), "patch_size"), num_channels=c.get("num_channels", 3))


def vision_from_opengvlab(c: dict) -> ml_collections.ConfigDict:
  """OpenGVLab InternVisionConfig (model_type 'intern_vit_6b'; also used for InternViT-300M)."""
  _require(c.get("hidden_act", "gelu") == "gelu", f"vision hidden_act {c.get('hidden_act')!r} is not 'gelu'")
  return presets.vision_config(
      hidden_size=c.get("hidden_size", 3200), num_layers=c.get("num_hidden_layers", 48),
      num_heads=c.get("num_attention_heads", 25), mlp_dim=c.get("intermediate_size", 12800),
      norm_type=c.get("norm_type", "rms_norm"), norm_eps=c.get("layer_norm_eps", 1e-6),
      qkv_bias=c.get("qkv_bias", False), qk_norm=c.get("qk_normalization", True), qkv_fused=True,
      # InternVisionEncoderLayer initialises ls1/ls2 to config.initializer_factor.
      layer_scale_init=c.get("initializer_factor", 0.1), drop_path_rate=c.get("drop_path_rate", 0.0),
      image_size=_square(c.get("image_size", 224), "image_size"),
      patch_size=_square(c.get("patch_size", 14), "patch_size"), num_channels=c.get("num_channels", 3))


def vision_to_native(v: ml_collections.ConfigDict) -> dict:
  """Our vision config -> transformers InternVLVisionConfig fields."""
  return dict(model_type="internvl_vision", hidden_size=v.hidden_size, num_hidden_layers=v.num_layers,
              num_attention_heads=v.num_heads, intermediate_size=v.mlp_dim, norm_type=v.norm_type,
              layer_norm_eps=v.norm_eps, attention_bias=v.qkv_bias, use_qk_norm=v.qk_norm, hidden_act="gelu",
              layer_scale_init_value=v.layer_scale_init, image_size=[v.image_size] * 2,
              patch_size=[v.patch_size] * 2, num_channels=v.num_channels, use_mean_pooling=True,
              use_absolute_position_embeddings=True, use_mask_token=False)


def vision_to_opengvlab(v: ml_collections.ConfigDict) -> dict:
  """Our vision config -> OpenGVLab InternVisionConfig fields (InternVL-14B and InternVLChatModel layouts)."""
  _require(v.qkv_fused, "the OpenGVLab layout stores the ViT qkv fused")
  return dict(model_type="intern_vit_6b", architectures=["InternVisionModel"], hidden_size=v.hidden_size,
              num_hidden_layers=v.num_layers, num_attention_heads=v.num_heads, intermediate_size=v.mlp_dim,
              qkv_bias=v.qkv_bias, qk_normalization=v.qk_norm, norm_type=v.norm_type, layer_norm_eps=v.norm_eps,
              initializer_factor=v.layer_scale_init, image_size=v.image_size, patch_size=v.patch_size,
              num_channels=v.num_channels, hidden_act="gelu", drop_path_rate=v.drop_path_rate)


# ----------------------------------------------------------------------------------------------------------------
# Language models


def _rope_theta(c: dict) -> float:
  params = c.get("rope_parameters") or {}
  scaling = c.get("rope_scaling") or {}
  kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
  if kind == "dynamic":
    # Dynamic NTK only changes RoPE beyond max_position_embeddings; below it, it is the default rotation.
    logging.warning("RoPE scaling 'dynamic' is treated as plain RoPE (exact up to max_position_embeddings)")
  elif kind != "default":
    raise ConversionError(f"RoPE scaling {kind!r} is not supported (only plain RoPE)")
  return float(params.get("rope_theta", c.get("rope_theta", 10000.0)))


def _phi3_rope(c: dict, hd: int) -> dict:
  """Phi-3's RoPE fields (transformers Phi3Config / rope_utils): partial_rotary_factor, and 'longrope' ('su' and
  'yarn' are its old names) with short / long factors, original_max_position_embeddings (the top-level field wins),
  and the attention factor: given, else sqrt(1 + ln(f) / ln(original)) with f = factor or max_position_embeddings /
  original (1 when f <= 1)."""
  params = dict(c.get("rope_parameters") or c.get("rope_scaling") or {})
  kind = params.get("rope_type") or params.get("type") or "default"
  kind = "longrope" if kind in ("su", "yarn") else kind
  _require(kind in ("default", "longrope"), f"Phi-3 RoPE scaling {kind!r} is not 'default' or 'longrope'")
  factor = float(params.get("partial_rotary_factor", c.get("partial_rotary_factor", 1.0)))
  rd = int(hd * factor)
  _require(0 < rd <= hd and rd % 2 == 0, f"partial_rotary_factor {factor} gives an odd or empty rotary dim {rd}")
  out = dict(rope_theta=float(params.get("rope_theta", c.get("rope_theta", 10000.0))), rotary_dim=0 if rd == hd else rd)
  if kind == "longrope":
    short, long = params.get("short_factor"), params.get("long_factor")
    _require(short is not None and long is not None and len(short) == len(long) == rd // 2,
             f"longrope needs short_factor and long_factor of length {rd // 2}")
    original = c.get("original_max_position_embeddings") or params.get("original_max_position_embeddings")
    _require(bool(original), "longrope needs original_max_position_embeddings")
    scale = params.get("factor") or c.get("max_position_embeddings", 4096) / original
    attn = params.get("attention_factor")
    if attn is None:
      attn = 1.0 if scale <= 1.0 else math.sqrt(1 + math.log(scale) / math.log(original))
    out.update(rope_type="longrope", rope_short_factor=[float(x) for x in short],
               rope_long_factor=[float(x) for x in long], rope_original_max=int(original),
               rope_attention_factor=float(attn))
  return out


def language_from_hf(c: dict, family: str) -> ml_collections.ConfigDict:
  """transformers LlamaConfig / Qwen2Config, or OpenGVLab InternLM2Config -> our decoder config.
  tie_embeddings is settled later by the loader (it depends on which tensors the files hold)."""
  _require(c.get("hidden_act", "silu") == "silu", f"language hidden_act {c.get('hidden_act')!r} is not 'silu'")
  _require(not c.get("mlp_bias", False), "mlp_bias=True is not supported (our SwiGLU has no biases)")
  if family == "llama":
    _require(not c.get("attention_bias", False), "LLaMA attention_bias=True (with an output bias) is not supported")
    qkv_bias = False
  elif family == "qwen2":
    _require(not c.get("use_sliding_window", False), "Qwen2 use_sliding_window=True is not supported")
    qkv_bias = True
  elif family == "internlm2":
    _require(not c.get("bias", False), "InternLM2 bias=True (with an output bias) is not supported")
    qkv_bias = False
  elif family == "internlm3":
    # Remote code: qkv_bias on q/k/v, bias on o_proj and the MLP; transformers' copy (a LlamaConfig) spells them
    # attention_bias (q/k/v and o_proj) and mlp_bias.
    _require(not c.get("bias", False), "InternLM3 bias=True (o_proj and MLP biases) is not supported")
    _require("qkv_bias" in c or not c.get("attention_bias", False),
             "InternLM3 attention_bias=True (with an o_proj bias) is not supported")
    qkv_bias = bool(c.get("qkv_bias", False))
  elif family == "phi3":
    _require(not c.get("attention_bias", False), "Phi-3 attention_bias=True is not supported")
    qkv_bias = False
  elif family in ("qwen3", "qwen3_moe"):
    _qwen3_checks(c)
    qkv_bias = False
  elif family == "gpt_oss":
    return _gpt_oss_from_hf(c)
  else:
    raise ConversionError(f"unknown language model family {family!r}")
  _require("vocab_size" in c, f"the {family} config has no vocab_size")
  heads = c.get("num_attention_heads", 32)
  hidden = c.get("hidden_size", 4096)
  # Qwen3Config's head_dim defaults to 128 (not hidden / heads); Qwen3MoeConfig has no default of its own.
  hd = c.get("head_dim") or (128 if family == "qwen3" else hidden // heads)
  extra = dict(rope_theta=_rope_theta(c)) if family != "phi3" else dict(
      _phi3_rope(c, hd), sliding_window=int(c.get("sliding_window") or 0), hf_model_type="phi3")
  cfg = presets.language_config(
      vocab_size=c["vocab_size"], hidden_size=hidden, num_layers=c.get("num_hidden_layers", 32), num_heads=heads,
      num_kv_heads=c.get("num_key_value_heads") or heads, head_dim=0 if hd * heads == hidden else hd,
      mlp_dim=c.get("intermediate_size", 11008), norm_eps=c.get("rms_norm_eps", 1e-6), qkv_bias=qkv_bias,
      tie_embeddings=bool(c.get("tie_word_embeddings", False)), lm_head=True, causal=True, **extra)
  if family in ("qwen3", "qwen3_moe"):
    cfg.qk_norm = True
  if family == "qwen3_moe":
    cfg.update(_qwen3_moe_fields(c, cfg.num_layers))
  return cfg


def _qwen3_checks(c: dict) -> None:
  _require(not c.get("attention_bias", False), "Qwen3 attention_bias=True (with an output bias) is not supported")
  _require(not c.get("use_sliding_window", False), "Qwen3 use_sliding_window=True is not supported")
  kinds = set(c.get("layer_types") or ["full_attention"])
  _require(kinds == {"full_attention"}, f"Qwen3 layer_types {sorted(kinds)} are not supported (only full_attention)")


def _qwen3_moe_fields(c: dict, num_layers: int) -> dict:
  """Qwen3MoeConfig's expert fields (its defaults where absent) -> our config fields (models/moe.py)."""
  experts = int(c.get("num_experts", c.get("num_local_experts", 128)))
  top_k = int(c.get("num_experts_per_tok", 8))
  _require(0 < top_k <= experts, f"num_experts_per_tok {top_k} must be in 1..num_experts ({experts})")
  step = int(c.get("decoder_sparse_step", 1))
  _require(step >= 1, f"decoder_sparse_step {step} must be >= 1")
  only = [int(i) for i in c.get("mlp_only_layers") or ()]
  _require(all(0 <= i < num_layers for i in only), f"mlp_only_layers {list(only)} name layers outside 0..{num_layers - 1}")
  return dict(num_experts=experts, num_experts_per_tok=top_k, moe_mlp_dim=int(c.get("moe_intermediate_size", 768)),
              norm_topk_prob=bool(c.get("norm_topk_prob", False)), decoder_sparse_step=step, mlp_only_layers=only,
              router_aux_loss_coef=float(c.get("router_aux_loss_coef", 0.001)))


# GptOssConfig's RoPE when config.json names none (transformers' __post_init__).
_GPT_OSS_ROPE = {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                 "original_max_position_embeddings": 4096}


def _yarn_fields(c: dict, params: dict) -> dict:
  """rope_parameters of type 'yarn' -> our fields, with transformers' defaults (_compute_yarn_parameters): factor
  (else max_position_embeddings / original), beta_fast 32, beta_slow 1, truncate True, and the attention factor
  (given, else from mscale / mscale_all_dim, else 0.1 ln(factor) + 1 when factor > 1)."""
  original = params.get("original_max_position_embeddings") or c.get("original_max_position_embeddings")
  _require(bool(original), "YaRN RoPE needs original_max_position_embeddings")
  factor = params.get("factor") or c.get("max_position_embeddings", 131072) / original
  mscale = lambda f, m=1.0: 1.0 if f <= 1 else 0.1 * m * math.log(f) + 1.0
  attn = params.get("attention_factor")
  if attn is None:
    ms, ms_all = params.get("mscale"), params.get("mscale_all_dim")
    attn = mscale(factor, ms) / mscale(factor, ms_all) if ms and ms_all else mscale(factor)
  return dict(rope_type="yarn", rope_factor=float(factor), rope_beta_fast=float(params.get("beta_fast") or 32),
              rope_beta_slow=float(params.get("beta_slow") or 1), rope_truncate=bool(params.get("truncate", True)),
              rope_original_max=int(original), rope_attention_factor=float(attn))


def _gpt_oss_from_hf(c: dict) -> ml_collections.ConfigDict:
  """transformers GptOssConfig (its defaults where absent) -> our decoder config: every layer routed, attention
  sinks, q/k/v/o biases (attention_bias), per-layer sliding windows (layer_types), YaRN or plain RoPE."""
  quant = (c.get("quantization_config") or {}).get("quant_method")
  _require(quant in (None, "mxfp4"), f"GPT-OSS checkpoints quantized with {quant!r} are not supported (MXFP4 "
           "experts are); dequantize to bfloat16 / float32 first")
  _require("vocab_size" in c, "the gpt_oss config has no vocab_size")
  layers_n = int(c.get("num_hidden_layers", 36))
  types = list(c.get("layer_types") or ["sliding_attention" if i % 2 == 0 else "full_attention"
                                        for i in range(layers_n)])
  _require(len(types) == layers_n and set(types) <= {"sliding_attention", "full_attention"},
           f"GPT-OSS layer_types {types} must name 'sliding_attention' or 'full_attention' for each of {layers_n} "
           "layers")
  params = dict(c.get("rope_parameters") or c.get("rope_scaling") or _GPT_OSS_ROPE)
  kind = params.get("rope_type") or params.get("type") or "default"
  _require(kind in ("default", "yarn"), f"GPT-OSS RoPE scaling {kind!r} is not 'default' or 'yarn'")
  _require(float(params.get("partial_rotary_factor", 1.0)) == 1.0, "GPT-OSS partial_rotary_factor is not supported")
  rope = _yarn_fields(c, params) if kind == "yarn" else {}
  heads, hidden = c.get("num_attention_heads", 64), c.get("hidden_size", 2880)
  hd = c.get("head_dim") or hidden // heads
  experts, top_k = int(c.get("num_local_experts", c.get("num_experts", 128))), int(c.get("num_experts_per_tok", 4))
  _require(0 < top_k <= experts, f"num_experts_per_tok {top_k} must be in 1..num_local_experts ({experts})")
  bias = bool(c.get("attention_bias", True))
  return presets.language_config(
      vocab_size=c["vocab_size"], hidden_size=hidden, num_layers=layers_n, num_heads=heads,
      num_kv_heads=c.get("num_key_value_heads") or heads, head_dim=0 if hd * heads == hidden else hd,
      mlp_dim=c.get("intermediate_size", 2880), norm_eps=c.get("rms_norm_eps", 1e-5),
      rope_theta=float(params.get("rope_theta", c.get("rope_theta", 150000.0))), qkv_bias=bias, o_bias=bias,
      tie_embeddings=bool(c.get("tie_word_embeddings", False)), lm_head=True, causal=True,
      attention_sinks=True, sliding_window=int(c.get("sliding_window") or 0), layer_types=types,
      num_experts=experts, num_experts_per_tok=top_k, moe_mlp_dim=int(c.get("intermediate_size", 2880)),
      norm_topk_prob=True, router_bias=True, expert_bias=True, expert_act="gpt_oss_clamped",
      swiglu_alpha=float(c.get("swiglu_alpha", 1.702)), swiglu_limit=float(c.get("swiglu_limit", 7.0)),
      router_aux_loss_coef=float(c.get("router_aux_loss_coef", 0.001)), hf_model_type="gpt_oss", window_cache=True,
      **rope)


def _gpt_oss_to_hf(cfg: ml_collections.ConfigDict) -> dict:
  """Our GPT-OSS-shaped decoder config -> a transformers GptOssConfig."""
  _require(cfg.qkv_bias == cfg.o_bias and cfg.attention_sinks and cfg.expert_act == "gpt_oss_clamped" and
           cfg.router_bias and cfg.expert_bias and cfg.norm_topk_prob and moe.moe_layer_ids(cfg) == tuple(
               range(cfg.num_layers)), "only GPT-OSS-shaped decoders export as gpt_oss")
  rope = {"rope_type": cfg.rope_type, "rope_theta": float(cfg.rope_theta)}
  if cfg.rope_type == "yarn":
    rope.update(factor=float(cfg.rope_factor), beta_fast=float(cfg.rope_beta_fast),
                beta_slow=float(cfg.rope_beta_slow), truncate=bool(cfg.rope_truncate),
                original_max_position_embeddings=int(cfg.rope_original_max),
                attention_factor=float(cfg.rope_attention_factor))
  else:
    _require(cfg.rope_type == "default", f"GPT-OSS has no {cfg.rope_type!r} RoPE")
  return dict(model_type="gpt_oss", architectures=["GptOssForCausalLM"], vocab_size=cfg.vocab_size,
              hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
              num_key_value_heads=cfg.num_kv_heads, head_dim=llm.head_dim(cfg), intermediate_size=cfg.moe_mlp_dim,
              rms_norm_eps=cfg.norm_eps, attention_bias=bool(cfg.qkv_bias),
              tie_word_embeddings=bool(cfg.tie_embeddings),
              sliding_window=int(cfg.sliding_window) or None, layer_types=list(cfg.layer_types) or None,
              rope_parameters=rope, num_local_experts=cfg.num_experts, num_experts_per_tok=cfg.num_experts_per_tok,
              swiglu_alpha=float(cfg.swiglu_alpha), swiglu_limit=float(cfg.swiglu_limit),
              router_aux_loss_coef=float(cfg.router_aux_loss_coef), bos_token_id=None, eos_token_id=None,
              pad_token_id=None)


def language_to_hf(cfg: ml_collections.ConfigDict) -> dict:
  """Our decoder config -> a transformers Qwen3MoeConfig (experts), Qwen3Config (QK-norm), Qwen2Config (q/k/v
  biases) or LlamaConfig (none of these)."""
  _require(cfg.causal and cfg.lm_head, "only causal decoders with an LM head export to transformers")
  if cfg.get("hf_model_type") == "phi3":
    return _phi3_to_hf(cfg)
  if cfg.get("hf_model_type") == "gpt_oss":
    return _gpt_oss_to_hf(cfg)
  _require(cfg.get("rope_type", "default") == "default" and not cfg.get("rotary_dim") and not cfg.get(
      "sliding_window"), "longrope, partial rotary and sliding windows export only as Phi-3 (hf_model_type='phi3')")
  _require(not (cfg.get("o_bias") or cfg.get("attention_sinks") or cfg.get("expert_bias") or cfg.get("router_bias")),
           "output biases, attention sinks and expert / router biases export only as GPT-OSS (hf_model_type='gpt_oss')")
  out = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
             num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
             head_dim=llm.head_dim(cfg), intermediate_size=cfg.mlp_dim, rms_norm_eps=cfg.norm_eps,
             hidden_act="silu", rope_parameters={"rope_type": "default", "rope_theta": float(cfg.rope_theta)},
             tie_word_embeddings=bool(cfg.tie_embeddings))
  if cfg.get("num_experts", 0):
    _require(cfg.get("qk_norm", False) and not cfg.qkv_bias, "only Qwen3-MoE-shaped MoE decoders (QK-norm, no "
             "q/k/v biases) export to transformers")
    out.update(model_type="qwen3_moe", architectures=["Qwen3MoeForCausalLM"], attention_bias=False,
               use_sliding_window=False, num_experts=cfg.num_experts, num_experts_per_tok=cfg.num_experts_per_tok,
               moe_intermediate_size=cfg.moe_mlp_dim, norm_topk_prob=bool(cfg.norm_topk_prob),
               decoder_sparse_step=cfg.decoder_sparse_step, mlp_only_layers=list(cfg.mlp_only_layers),
               router_aux_loss_coef=float(cfg.router_aux_loss_coef))
  elif cfg.get("qk_norm", False):
    _require(not cfg.qkv_bias, "transformers' Qwen3 has no q/k/v-only biases (attention_bias adds an output bias)")
    out.update(model_type="qwen3", architectures=["Qwen3ForCausalLM"], attention_bias=False,
               use_sliding_window=False)
  elif cfg.qkv_bias:
    out.update(model_type="qwen2", architectures=["Qwen2ForCausalLM"], use_sliding_window=False)
    if llm.head_dim(cfg) * cfg.num_heads != cfg.hidden_size:
      raise ConversionError("Qwen2 in transformers derives head_dim from hidden_size / num_heads; this model's "
                            f"head_dim {llm.head_dim(cfg)} differs")
  else:
    out.update(model_type="llama", architectures=["LlamaForCausalLM"], attention_bias=False, mlp_bias=False)
  return out


def _phi3_to_hf(cfg: ml_collections.ConfigDict) -> dict:
  """Our decoder config -> a transformers Phi3Config (fused qkv_proj / gate_up_proj on disk)."""
  hd = llm.head_dim(cfg)
  _require(not cfg.qkv_bias and hd * cfg.num_heads == cfg.hidden_size,
           "Phi-3 has no q/k/v biases and derives head_dim from hidden_size / num_heads")
  rope = {"rope_type": cfg.rope_type, "rope_theta": float(cfg.rope_theta),
          "partial_rotary_factor": (cfg.rotary_dim or hd) / hd}
  out = dict(model_type="phi3", architectures=["Phi3ForCausalLM"], vocab_size=cfg.vocab_size,
             hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
             num_key_value_heads=cfg.num_kv_heads, intermediate_size=cfg.mlp_dim, rms_norm_eps=cfg.norm_eps,
             hidden_act="silu", tie_word_embeddings=bool(cfg.tie_embeddings),
             sliding_window=int(cfg.sliding_window) or None, rope_parameters=rope,
             # Phi3Config's defaults (32000) may lie outside a small vocabulary; our configs carry no token ids
             bos_token_id=None, eos_token_id=None, pad_token_id=None)
  if cfg.rope_type == "longrope":
    rope.update(short_factor=list(cfg.rope_short_factor), long_factor=list(cfg.rope_long_factor),
                original_max_position_embeddings=int(cfg.rope_original_max),
                attention_factor=float(cfg.rope_attention_factor))
    out["original_max_position_embeddings"] = int(cfg.rope_original_max)
  return out


# ----------------------------------------------------------------------------------------------------------------
# Chat models


def chat_config(vision: ml_collections.ConfigDict, language: ml_collections.ConfigDict, *, select_layer: int,
                downsample_ratio: float, ps_version: str, image_token_id: int,
                image_size: int | None = None) -> ml_collections.ConfigDict:
  """The same fields as presets.chat(), plus image_size: the tile size fed to the model (OpenGVLab's
  force_image_size; default the vision tower's), which may differ from the size its position embeddings were
  trained at (they are resized then)."""
  _require(ps_version in ("v1", "v2"), f"ps_version {ps_version!r} is not 'v1' or 'v2'")
  size = int(image_size or vision.image_size)
  _require(size % vision.patch_size == 0, f"force_image_size {size} is not a multiple of the patch size "
           f"{vision.patch_size}")
  return ml_collections.ConfigDict(dict(
      vision=vision, language=language, select_layer=int(select_layer), downsample_ratio=float(downsample_ratio),
      ps_version=ps_version, image_token_id=int(image_token_id), mode="replace", freeze_vision=False,
      image_size=size))


def input_size(cfg: ml_collections.ConfigDict) -> int:
  """The image (tile) size a chat or contrastive model config is fed: its image_size (OpenGVLab's
  force_image_size), else the vision tower's."""
  return int(cfg.get("image_size", 0) or cfg.vision.image_size)


# text_config model_types of transformers' InternVL we read
NATIVE_TEXT = ("qwen2", "llama", "qwen3", "qwen3_moe", "phi3", "internlm3", "gpt_oss")


def chat_from_native(c: dict) -> ml_collections.ConfigDict:
  """transformers InternVLConfig (model_type 'internvl')."""
  text = dict(c.get("text_config") or {})
  family = text.get("model_type", "qwen2")
  _require(family in NATIVE_TEXT, f"InternVL text model_type {family!r} is not one of {', '.join(NATIVE_TEXT)}")
  _require(c.get("vision_feature_select_strategy", "default") == "default",
           "vision_feature_select_strategy 'full' (keeping the CLS token) is not supported")
  layer = c.get("vision_feature_layer", -1)
  _require(isinstance(layer, int), f"vision_feature_layer {layer!r} must be one integer")
  _require(c.get("projector_hidden_act", "gelu") == "gelu", "projector_hidden_act must be 'gelu'")
  text["tie_word_embeddings"] = c.get("tie_word_embeddings", True)  # the composite decides tying
  return chat_config(vision_from_native(c.get("vision_config") or {}), language_from_hf(text, family),
                     select_layer=layer, downsample_ratio=c.get("downsample_ratio", 0.5), ps_version="v2",
                     image_token_id=c.get("image_token_id", 151667))


def chat_to_native(cfg: ml_collections.ConfigDict) -> dict:
  _require(cfg.mode == "replace", "only 'replace'-mode chat models (InternVL 1.5+) export to transformers")
  _require(cfg.ps_version == "v2", "transformers' InternVL implements pixel shuffle v2 only")
  v = cfg.vision
  text = language_to_hf(cfg.language)
  text.pop("architectures")
  _require(input_size(cfg) == v.image_size, f"transformers' InternVL feeds the vision tower its own image_size "
           f"({v.image_size}); this model is fed {input_size(cfg)} px (force_image_size): export the OpenGVLab layout")
  tokens = int((v.image_size // v.patch_size * cfg.downsample_ratio) ** 2)
  return dict(model_type="internvl", architectures=["InternVLForConditionalGeneration"],
              vision_config=vision_to_native(v), text_config=text, image_token_id=cfg.image_token_id,
              image_seq_length=tokens, downsample_ratio=cfg.downsample_ratio, projector_hidden_act="gelu",
              vision_feature_layer=cfg.select_layer, vision_feature_select_strategy="default",
              tie_word_embeddings=bool(cfg.language.tie_embeddings))


def chat_to_opengvlab(cfg: ml_collections.ConfigDict, *, template: str, system_message: str | None = None,
                      max_dynamic_patch: int = 12, use_thumbnail: bool = True) -> dict:
  """Our chat config -> an OpenGVLab InternVLChatConfig (model_type 'internvl_chat'): vision_config, llm_config
  (the transformers config of the language model, with top-level rope_theta and rope_scaling as the
  transformers-4 era remote code reads them), the conversation template and the tiling settings."""
  _require(cfg.mode == "replace", "only 'replace'-mode chat models (InternVL 1.5+) have an OpenGVLab chat layout")
  llm_cfg = language_to_hf(cfg.language)
  rope = dict(llm_cfg.get("rope_parameters") or {})
  llm_cfg["rope_theta"] = float(rope.pop("rope_theta", cfg.language.rope_theta))
  if rope.get("rope_type", "default") != "default":
    llm_cfg["rope_scaling"] = dict(rope, type=rope["rope_type"])
  out = dict(model_type="internvl_chat", architectures=["InternVLChatModel"],
             vision_config=vision_to_opengvlab(cfg.vision), llm_config=llm_cfg, select_layer=cfg.select_layer,
             downsample_ratio=cfg.downsample_ratio, ps_version=cfg.ps_version, template=template,
             force_image_size=input_size(cfg), dynamic_image_size=max_dynamic_patch > 1, use_thumbnail=use_thumbnail,
             min_dynamic_patch=1, max_dynamic_patch=max_dynamic_patch, use_backbone_lora=0, use_llm_lora=0,
             tie_word_embeddings=bool(cfg.language.tie_embeddings))
  if system_message is not None:
    out["system_message"] = system_message
  return out


# Fallback IMG_CONTEXT ids when the folder has no tokenizer files (DESIGN §5).
# <IMG_CONTEXT> of releases whose folder lacks tokenizer files: InternVL2 / 2.5 / 3 add <img>, </img>, <IMG_CONTEXT>
# after Qwen2's 22 added tokens (151643..151664); Qwen3 adds four more (<tool_response>, </tool_response>, <think>,
# </think> up to 151668), so InternVL3.5's Qwen3 / Qwen3-MoE releases have it at 151671.
DEFAULT_IMAGE_TOKEN = {"qwen2": 151667, "qwen3": 151671, "qwen3_moe": 151671, "internlm2": 92546}


def chat_from_opengvlab(c: dict, image_token_id: int | None) -> ml_collections.ConfigDict:
  """OpenGVLab InternVLChatConfig (model_type 'internvl_chat')."""
  _require(not c.get("use_backbone_lora") and not c.get("use_llm_lora"),
           "checkpoints with unmerged LoRA weights (use_backbone_lora / use_llm_lora) are not supported; merge first")
  llm_cfg = c.get("llm_config") or {}
  family = language_family(llm_cfg)
  if image_token_id is None:
    if family not in DEFAULT_IMAGE_TOKEN:
      raise ConversionError("no <IMG_CONTEXT> token id found (no tokenizer files) and no default for a "
                            f"{family} language model; pass image_token_id=")
    image_token_id = DEFAULT_IMAGE_TOKEN[family]
    logging.warning("no tokenizer files: using the %s default IMG_CONTEXT id %d", family, image_token_id)
  return chat_config(vision_from_opengvlab(c.get("vision_config") or {}), language_from_hf(llm_cfg, family),
                     select_layer=c.get("select_layer", -1), downsample_ratio=c.get("downsample_ratio", 0.5),
                     ps_version=c.get("ps_version", "v1"), image_token_id=image_token_id,
                     image_size=c.get("force_image_size"))


def language_family(c: dict) -> str:
  """'llama' | 'qwen2' | 'qwen3' | 'qwen3_moe' | 'internlm2' | 'internlm3' | 'phi3' | 'gpt_oss' from a language
  config's model_type / architectures."""
  names = [c.get("model_type") or ""] + list(c.get("architectures") or [])
  text = " ".join(names).lower()
  # Qwen3-MoE first: its names contain 'qwen3' (model_type qwen3_moe, class Qwen3MoeForCausalLM).
  for family, marks in (("gpt_oss", ("gpt_oss", "gptoss")), ("internlm2", ("internlm2",)),
                        ("internlm3", ("internlm3",)), ("phi3", ("phi3",)),
                        ("qwen3_moe", ("qwen3_moe", "qwen3moe")), ("qwen3", ("qwen3",)), ("qwen2", ("qwen2",)),
                        ("llama", ("llama",))):
    if any(m in text for m in marks):
      return family
  raise ConversionError(f"unknown language model {names}; supported: LLaMA, Qwen2, Qwen3, Qwen3-MoE, InternLM2, "
                        "InternLM3, Phi-3, GPT-OSS")


# ----------------------------------------------------------------------------------------------------------------
# InternVL-14B (InternVL-C / G): OpenGVLab InternVLConfig with vision_config + qllama_config


def contrastive_from_14b(c: dict, variant: str = "g") -> ml_collections.ConfigDict:
  """OpenGVLab InternVL-14B config -> presets.contrastive-shaped config (variant 'c' or 'g'; one checkpoint
  holds both: 'c' leaves clip_projector2 unused)."""
  _require(variant in ("c", "g"), f"InternVL-14B variant {variant!r} is not 'c' or 'g'")
  _require(not c.get("use_backbone_lora") and not c.get("use_qllama_lora"),
           "checkpoints with unmerged LoRA weights (use_backbone_lora / use_qllama_lora) are not supported")
  q = dict(c.get("qllama_config") or {})
  embed_dim = int(c.get("clip_embed_dim", 768))
  heads = int(c.get("attn_pool_num_heads", 16))
  vision = vision_from_opengvlab(c.get("vision_config") or {})
  vision.pooling, vision.pool_heads, vision.pool_out_dim = "attention", heads, embed_dim
  text = language_from_hf(q, "llama")
  text.vision_width = vision.hidden_size
  text.num_query_tokens = int(c.get("num_query_token", q.get("num_query_token", 96)))
  text.cross_attention_frequency = int(c.get("cross_attention_frequency", q.get("cross_attention_frequency", 2)))
  # force_image_size is the size the model is fed; the position embeddings keep the vision config's size (they
  # are resized at run time, as InternVisionEmbeddings does)
  return ml_collections.ConfigDict(dict(
      image_size=int(c.get("force_image_size") or vision.image_size),
      vision=vision, text=text, text_kind="qllama", variant=variant, embed_dim=embed_dim, text_pooling="last",
      num_proj_layers=2, proj_dropout=0.0, query_pool_heads=heads, text_prefix="summarize:",
      logit_scale_init=2.659260036932778))


def contrastive_to_14b(cfg: ml_collections.ConfigDict) -> dict:
  """An InternVL-C/G-shaped contrastive config -> OpenGVLab InternVL-14B config.json fields."""
  _require(cfg.variant in ("c", "g") and cfg.text_kind == "qllama" and cfg.vision.pooling == "attention",
           "only InternVL-C/G-shaped contrastive models export to the InternVL-14B layout")
  _require(cfg.query_pool_heads == cfg.vision.pool_heads and cfg.vision.pool_out_dim == cfg.embed_dim,
           "the InternVL-14B layout has one attn_pool_num_heads and clip_embed_dim for both pooling blocks")
  v, t = cfg.vision, cfg.text
  vision = vision_to_opengvlab(v)
  qllama = language_to_hf(t)
  _require(qllama["model_type"] == "llama", "QLLaMA is a LLaMA: no q/k/v biases")
  qllama.update(num_query_token=t.num_query_tokens, cross_attention_frequency=t.cross_attention_frequency)
  return dict(model_type="internvl", architectures=["InternVLModel"], vision_config=vision, qllama_config=qllama,
              clip_embed_dim=cfg.embed_dim, attn_pool_num_heads=cfg.query_pool_heads,
              num_query_token=t.num_query_tokens, cross_attention_frequency=t.cross_attention_frequency,
              force_image_size=input_size(cfg), use_backbone_lora=0, use_qllama_lora=0)
