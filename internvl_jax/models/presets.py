"""Model presets as ml_collections ConfigDicts (DESIGN §4). `vision(name)`, `language(name)`, `qllama(name)`,
`contrastive(name)` and `chat(name)` return fresh, mutable configs.

Real presets match the released checkpoints; `seed_*` presets are the sizes of the seed description, kept under
honest names (they are not released models)."""

from __future__ import annotations

import math

import ml_collections

_COMMON = dict(dtype="float32", attention_impl="xla", scan_layers=True, remat="none")


def vision_config(**overrides) -> ml_collections.ConfigDict:
  """InternViT fields with their defaults (InternViT-300M-448px); overrides replace them."""
  cfg = dict(hidden_size=1024, num_layers=24, num_heads=16, mlp_dim=4096, norm_type="layer_norm", norm_eps=1e-6,
             qkv_bias=True, qk_norm=False, qkv_fused=True, layer_scale_init=1.0, drop_path_rate=0.0, dropout=0.0,
             image_size=448, patch_size=14, num_channels=3, pooling="cls", pool_heads=16, pool_out_dim=768,
             **_COMMON)
  unknown = set(overrides) - set(cfg)
  if unknown:
    raise ValueError(f"unknown vision config fields {sorted(unknown)}")
  cfg.update(overrides)
  return ml_collections.ConfigDict(cfg)


# Phi-3 fields (defaults change nothing): rotary_dim 0 = whole head (else partial rotary); rope_type 'default' |
# 'longrope' with its short / long factors [rotary_dim / 2], original max positions and attention factor;
# sliding_window 0 = none; hf_model_type names the transformers layout to export to ('' = llama / qwen2 by bias).
_PHI3 = dict(rotary_dim=0, rope_type="default", rope_short_factor=[], rope_long_factor=[], rope_original_max=0,
             rope_attention_factor=1.0, sliding_window=0, hf_model_type="")
# GPT-OSS fields (defaults change nothing): rope_type 'yarn' with rope_factor, rope_beta_fast / slow, rope_truncate
# (and rope_original_max, rope_attention_factor above); o_bias (attention output bias), attention_sinks (a learned
# logit per head), layer_types ('sliding_attention' | 'full_attention' per layer; [] = sliding_window on all);
# router_bias, expert_bias, expert_act ('swiglu' | 'gpt_oss_clamped') with swiglu_alpha / swiglu_limit (moe.py);
# window_cache: sliding layers keep only their window in the KV cache (window_cache.py).
_GPT_OSS = dict(rope_factor=1.0, rope_beta_fast=32.0, rope_beta_slow=1.0, rope_truncate=True, o_bias=False,
                attention_sinks=False, layer_types=[], router_bias=False, expert_bias=False, expert_act="swiglu",
                swiglu_alpha=1.702, swiglu_limit=7.0, window_cache=False)


def language_config(**overrides) -> ml_collections.ConfigDict:
  """Decoder fields with their defaults (LLaMA-7B); overrides replace them."""
  cfg = dict(vocab_size=32000, hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=32, head_dim=0,
             mlp_dim=11008, norm_eps=1e-6, rope_theta=10000.0, qkv_bias=False, tie_embeddings=False, lm_head=True,
             causal=True, init_std=0.02, **_COMMON)
  cfg.update(_PHI3)
  cfg.update(_GPT_OSS)
  # Qwen3: per-head RMSNorm on q and k. Qwen3-MoE: routed experts (num_experts 0 = dense; see models/moe.py).
  cfg.update(qk_norm=False, num_experts=0, num_experts_per_tok=0, moe_mlp_dim=0, norm_topk_prob=False,
             decoder_sparse_step=1, mlp_only_layers=[], router_aux_loss_coef=0.0)
  unknown = set(overrides) - set(cfg)
  if unknown:
    raise ValueError(f"unknown language config fields {sorted(unknown)}")
  cfg.update(overrides)
  return ml_collections.ConfigDict(cfg)


_INTERNVIT_6B = dict(hidden_size=3200, num_heads=25, mlp_dim=12800, norm_type="rms_norm", qkv_bias=False,
                     qk_norm=True, layer_scale_init=0.1)

VISION = {
    "tiny": dict(hidden_size=32, num_layers=2, num_heads=2, mlp_dim=64, image_size=56, qk_norm=True,
                 layer_scale_init=0.5),
    "internvit_300m": dict(),
    "internvit_6b": dict(_INTERNVIT_6B, num_layers=48, image_size=224),
    "internvit_6b_448": dict(_INTERNVIT_6B, num_layers=45, image_size=448),
    "seed_300m": dict(hidden_size=768, num_layers=12, num_heads=12, mlp_dim=3072, image_size=224),
    "seed_1b": dict(hidden_size=1024, num_layers=24, num_heads=16, mlp_dim=4096, image_size=224),
    "seed_6b": dict(_INTERNVIT_6B, num_layers=48, image_size=224),
}

# fields every Qwen3 model shares: vocabulary, head_dim 128 given explicitly, QK-norm, RoPE base, norm eps
_QWEN3 = dict(vocab_size=151936, head_dim=128, qk_norm=True, rope_theta=1000000.0, norm_eps=1e-6)

LANGUAGE = {
    "tiny": dict(vocab_size=128, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=64),
    "llama_7b": dict(),
    "llama_13b": dict(hidden_size=5120, num_layers=40, num_heads=40, num_kv_heads=40, mlp_dim=13824),
    "qwen2_0_5b": dict(vocab_size=151936, hidden_size=896, num_layers=24, num_heads=14, num_kv_heads=2,
                       mlp_dim=4864, norm_eps=1e-6, rope_theta=1000000.0, qkv_bias=True, tie_embeddings=True),
    # Qwen3-0.6B (InternVL3.5-1B): head_dim 128 given explicitly (16 x 128 = 2048 != hidden 1024), QK-norm.
    "qwen3_0_6b": dict(vocab_size=151936, hidden_size=1024, num_layers=28, num_heads=16, num_kv_heads=8,
                       head_dim=128, mlp_dim=3072, norm_eps=1e-6, rope_theta=1000000.0, tie_embeddings=True,
                       qk_norm=True),
    # The other Qwen3 dense models of InternVL3.5 (2B, 4B, 8B, 14B, 38B): Qwen3-1.7B / 4B / 8B / 14B / 32B.
    "qwen3_1_7b": dict(_QWEN3, hidden_size=2048, num_layers=28, num_heads=16, num_kv_heads=8, mlp_dim=6144,
                       tie_embeddings=True),
    "qwen3_4b": dict(_QWEN3, hidden_size=2560, num_layers=36, num_heads=32, num_kv_heads=8, mlp_dim=9728,
                     tie_embeddings=True),
    "qwen3_8b": dict(_QWEN3, hidden_size=4096, num_layers=36, num_heads=32, num_kv_heads=8, mlp_dim=12288),
    "qwen3_14b": dict(_QWEN3, hidden_size=5120, num_layers=40, num_heads=40, num_kv_heads=8, mlp_dim=17408),
    "qwen3_32b": dict(_QWEN3, hidden_size=5120, num_layers=64, num_heads=64, num_kv_heads=8, mlp_dim=25600),
    # Qwen3-30B-A3B (InternVL3.5-30B-A3B): every layer routed, 128 experts, top-8.
    "qwen3_30b_a3b": dict(vocab_size=151936, hidden_size=2048, num_layers=48, num_heads=32, num_kv_heads=4,
                          head_dim=128, mlp_dim=6144, norm_eps=1e-6, rope_theta=1000000.0, qk_norm=True,
                          num_experts=128, num_experts_per_tok=8, moe_mlp_dim=768, norm_topk_prob=True,
                          router_aux_loss_coef=0.001),
    # Qwen3-235B-A22B (InternVL3.5-241B-A28B): 94 routed layers, 128 experts of width 1536, top-8.
    "qwen3_235b_a22b": dict(_QWEN3, hidden_size=4096, num_layers=94, num_heads=64, num_kv_heads=4, mlp_dim=12288,
                            num_experts=128, num_experts_per_tok=8, moe_mlp_dim=1536, norm_topk_prob=True,
                            router_aux_loss_coef=0.001),
    # Phi-3-mini (InternVL2-4B / Mini-InternVL-Chat-4B): the 4k config's RoPE and window; the 128k releases add
    # longrope factors, read from their config.json by the converter.
    "phi3_mini": dict(vocab_size=32064, hidden_size=3072, num_layers=32, num_heads=32, num_kv_heads=32,
                      mlp_dim=8192, norm_eps=1e-5, sliding_window=2047, hf_model_type="phi3"),
    # InternLM3-8B (InternVL3-9B): LLaMA-shaped, 2 KV heads, head_dim 128.
    "internlm3_8b": dict(vocab_size=128512, hidden_size=4096, num_layers=48, num_heads=32, num_kv_heads=2,
                         mlp_dim=10240, norm_eps=1e-5, rope_theta=50000000.0),
    # gpt-oss-20b (InternVL3.5-GPT-OSS-20B-A4B): every layer routed (32 experts, top-4, biased clamped SwiGLU),
    # attention sinks and biases, 128-token windows on even layers, YaRN x32 over 4096 positions. The aux-loss
    # coefficient is transformers' default; a release's config.json sets its own when loaded.
    "gpt_oss_20b": dict(vocab_size=201088, hidden_size=2880, num_layers=24, num_heads=64, num_kv_heads=8,
                        head_dim=64, mlp_dim=2880, norm_eps=1e-5, rope_theta=150000.0, qkv_bias=True, o_bias=True,
                        attention_sinks=True, sliding_window=128,
                        layer_types=["sliding_attention", "full_attention"] * 12, rope_type="yarn",
                        rope_factor=32.0, rope_beta_fast=32.0, rope_beta_slow=1.0, rope_truncate=False,
                        rope_original_max=4096, rope_attention_factor=0.1 * math.log(32.0) + 1.0,
                        num_experts=32, num_experts_per_tok=4, moe_mlp_dim=2880, norm_topk_prob=True,
                        router_bias=True, expert_bias=True, expert_act="gpt_oss_clamped",
                        router_aux_loss_coef=0.001, hf_model_type="gpt_oss", window_cache=True),
    # BERT-base-sized bidirectional text tower of the seed_300m preset (our decoder blocks, causal=False).
    "bert_base": dict(vocab_size=30522, hidden_size=768, num_layers=12, num_heads=12, num_kv_heads=12,
                      mlp_dim=3072, causal=False, lm_head=False),
}


def vision(name: str) -> ml_collections.ConfigDict:
  """A vision preset: tiny | internvit_300m | internvit_6b | internvit_6b_448 | seed_300m | seed_1b | seed_6b."""
  if name not in VISION:
    raise ValueError(f"unknown vision preset {name!r}; choose from {sorted(VISION)}")
  return vision_config(**VISION[name])


def language(name: str) -> ml_collections.ConfigDict:
  """A language preset: tiny | llama_7b | llama_13b | qwen2_0_5b | qwen3_0_6b | qwen3_1_7b | qwen3_4b | qwen3_8b |
  qwen3_14b | qwen3_32b | qwen3_30b_a3b | qwen3_235b_a22b | phi3_mini | internlm3_8b | gpt_oss_20b | bert_base."""
  if name not in LANGUAGE:
    raise ValueError(f"unknown language preset {name!r}; choose from {sorted(LANGUAGE)}")
  return language_config(**LANGUAGE[name])


def qllama(name: str = "llama_7b", *, vision_width: int = 3200, num_query_tokens: int = 96,
           cross_attention_frequency: int = 2, **overrides) -> ml_collections.ConfigDict:
  """QLLaMA: a language preset plus its query tokens and cross-attention fields (InternVL-14B: llama_7b)."""
  cfg = language(name)
  cfg.update(overrides)
  cfg.vision_width = vision_width
  cfg.num_query_tokens = num_query_tokens
  cfg.cross_attention_frequency = cross_attention_frequency
  return cfg


# Contrastive (stage 1/2) model presets: vision tower + text tower + heads.
_CONTRASTIVE = {
    "tiny": dict(vision="tiny", text="tiny", text_kind="decoder", variant="seed", embed_dim=16),
    "seed_300m": dict(vision="seed_300m", text="bert_base", text_kind="decoder", variant="seed", embed_dim=768),
    "seed_1b": dict(vision="seed_1b", text="llama_7b", text_kind="decoder", variant="seed", embed_dim=4096),
    "seed_6b": dict(vision="seed_6b", text="llama_13b", text_kind="decoder", variant="seed", embed_dim=5120),
    "tiny_internvl_c": dict(vision="tiny", text="tiny", text_kind="qllama", variant="c", embed_dim=16),
    "tiny_internvl_g": dict(vision="tiny", text="tiny", text_kind="qllama", variant="g", embed_dim=16),
    "internvl_c": dict(vision="internvit_6b", text="llama_7b", text_kind="qllama", variant="c", embed_dim=768),
    "internvl_g": dict(vision="internvit_6b", text="llama_7b", text_kind="qllama", variant="g", embed_dim=768),
}


def contrastive(name: str) -> ml_collections.ConfigDict:
  """A contrastive model preset. Fields: vision, text (configs), variant ('seed' | 'c' | 'g'), embed_dim,
  vision_pooling, text_pooling, num_proj_layers, proj_dropout, text_prefix ('summarize:' for InternVL-C/G)."""
  if name not in _CONTRASTIVE:
    raise ValueError(f"unknown contrastive preset {name!r}; choose from {sorted(_CONTRASTIVE)}")
  spec = _CONTRASTIVE[name]
  v = vision(spec["vision"])
  internvl = spec["variant"] in ("c", "g")
  if spec["text_kind"] == "qllama":
    small = spec["text"] == "tiny"
    text = qllama(spec["text"], vision_width=v.hidden_size, num_query_tokens=4 if small else 96, causal=True)
  else:
    text = language(spec["text"])
    text.causal, text.lm_head = False, False
  if internvl:
    v.pooling, v.pool_heads, v.pool_out_dim = "attention", 2 if spec["vision"] == "tiny" else 16, spec["embed_dim"]
  return ml_collections.ConfigDict(dict(
      vision=v, text=text, text_kind=spec["text_kind"], variant=spec["variant"], embed_dim=spec["embed_dim"],
      text_pooling="last" if internvl else "mean", num_proj_layers=2, proj_dropout=0.0,
      query_pool_heads=2 if spec["text"] == "tiny" else 16,
      text_prefix="summarize:" if internvl else "", logit_scale_init=2.659260036932778))  # log(1 / 0.07)


_CHAT = {
    "tiny": dict(vision="tiny", language="tiny", image_token_id=127),
    "seed_1b": dict(vision="seed_1b", language="llama_7b", image_token_id=31999),
    "internvl2_1b_like": dict(vision="internvit_300m", language="qwen2_0_5b", image_token_id=151667),
    # InternVL3.5: Qwen3's tokenizer holds <think> / </think> at 151667 / 151668, so <IMG_CONTEXT> is 151671. The
    # releases untie the LM head of Qwen3-0.6B / 1.7B / 4B: their published language sizes (0.8B, 2.0B, 4.4B) are the
    # Qwen3 counts plus a second vocab x hidden matrix. 38B and 241B use InternViT-6B-448px-V2.5 (45 layers).
    "internvl3_5_1b": dict(vision="internvit_300m", language="qwen3_0_6b", image_token_id=151671, untie=True),
    "internvl3_5_2b": dict(vision="internvit_300m", language="qwen3_1_7b", image_token_id=151671, untie=True),
    "internvl3_5_4b": dict(vision="internvit_300m", language="qwen3_4b", image_token_id=151671, untie=True),
    "internvl3_5_8b": dict(vision="internvit_300m", language="qwen3_8b", image_token_id=151671),
    "internvl3_5_14b": dict(vision="internvit_300m", language="qwen3_14b", image_token_id=151671),
    "internvl3_5_38b": dict(vision="internvit_6b_448", language="qwen3_32b", image_token_id=151671),
    "internvl3_5_30b_a3b": dict(vision="internvit_300m", language="qwen3_30b_a3b", image_token_id=151671),
    "internvl3_5_241b_a28b": dict(vision="internvit_6b_448", language="qwen3_235b_a22b", image_token_id=151671),
    # InternVL2-4B (InternViT-300M + Phi-3-mini) and InternVL3-9B (InternViT-300M-V2.5 + InternLM3-8B). Their
    # <IMG_CONTEXT> ids come from the release's tokenizer when loaded; the ids here are placeholders (the last id).
    "internvl2_4b": dict(vision="internvit_300m", language="phi3_mini", image_token_id=32063),
    "internvl3_9b": dict(vision="internvit_300m", language="internlm3_8b", image_token_id=128511),
    # InternViT-300M + gpt-oss-20b. NOT VERIFIED against the release: OpenGVLab's training code adds <img>,
    # </img>, <IMG_CONTEXT>, ... with tokenizer.add_tokens after gpt-oss's tokenizer (o200k_harmony, ids up to
    # 200018), which would make <IMG_CONTEXT> 200021; the release's tokenizer files decide when loaded.
    "internvl3_5_gpt_oss_20b_a4b": dict(vision="internvit_300m", language="gpt_oss_20b", image_token_id=200021),
}


def chat(name: str) -> ml_collections.ConfigDict:
  """A chat model preset. Fields: vision, language, select_layer, downsample_ratio, ps_version,
  image_token_id, mode ('replace' InternVL 1.5+ | 'prefix' seed), freeze_vision."""
  if name not in _CHAT:
    raise ValueError(f"unknown chat preset {name!r}; choose from {sorted(_CHAT)}")
  spec = _CHAT[name]
  lm = language(spec["language"])
  if spec.get("untie"):
    lm.tie_embeddings = False
  return ml_collections.ConfigDict(dict(
      vision=vision(spec["vision"]), language=lm, select_layer=-1, downsample_ratio=0.5,
      ps_version="v2", image_token_id=spec["image_token_id"], mode="replace", freeze_vision=False))
