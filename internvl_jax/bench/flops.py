"""Analytic model FLOPs (DESIGN §8) and device peaks, so that every case reports achieved TFLOP/s and MFU from
the same formulas whichever framework ran it.

Conventions (model FLOPs, not hardware FLOPs):
- a matmul of [m, k] x [k, n] is 2 m k n FLOPs; norms, activations, softmax and the optimizer are not counted;
- ViT layer with N tokens, width D, MLP width M: qkv 6 N D^2 + out-proj 2 N D^2 + MLP 4 N D M + attention
  (QK^T and AV) 4 N^2 D. With M = 4 D this is the 24 N D^2 + 4 N^2 D of DESIGN §8;
- decoder token: 2 x (matmul parameters) plus attention 4 x (heads x head_dim) x (keys it attends to) per layer;
  causal attention counts only the keys a token can see (the useful half), whatever the kernel computes;
- training (forward + backward) = 3 x forward; recomputation under remat is NOT counted (that is the MFU
  convention: remat lowers MFU, it does not raise it).
"""

from __future__ import annotations

import ml_collections

from internvl_jax.models import moe

# Dense bf16 peaks in TFLOP/s by device kind substring (lower-cased), first match wins. DESIGN §8.
PEAK_TFLOPS_BF16 = (
    ("h100 pcie", 756.0),
    ("h100", 989.0),
    ("h200", 989.0),
    ("gh200", 989.0),
    ("a100", 312.0),
    ("tpu v5 lite", 197.0),
    ("tpu v5e", 197.0),
    ("tpu v5p", 459.0),
    ("tpu v5", 459.0),
    ("tpu v6 lite", 918.0),
    ("tpu v6e", 918.0),
    ("tpu v4", 275.0),
)


def table_peak_tflops(device_kind: str) -> float | None:
  """The dense bf16 peak of an accelerator from the table, or None (CPU, or a device we have no number for)."""
  kind = device_kind.lower()
  for key, peak in PEAK_TFLOPS_BF16:
    if key in kind:
      return peak
  return None


def vit_tokens(vision: ml_collections.ConfigDict, image_size: int) -> int:
  """Tokens of one square image: CLS + (image_size / patch)^2."""
  return 1 + (image_size // vision.patch_size) ** 2


def vit_layer_flops(n: int, d: int, m: int) -> float:
  """One InternViT block on n tokens: 8 n d^2 (qkv + proj) + 4 n d m (MLP) + 4 n^2 d (attention)."""
  return 8.0 * n * d * d + 4.0 * n * d * m + 4.0 * n * n * d


def vit_forward_flops(vision: ml_collections.ConfigDict, image_size: int, num_layers: int | None = None) -> float:
  """Forward FLOPs of one image: patch-embedding conv + `num_layers` (default all) blocks."""
  p, d = vision.patch_size, vision.hidden_size
  patches = (image_size // p) ** 2
  layers = vision.num_layers if num_layers is None else num_layers
  patch = 2.0 * patches * (p * p * vision.num_channels) * d
  return patch + layers * vit_layer_flops(vit_tokens(vision, image_size), d, vision.mlp_dim)


def decoder_matmul_params(lm: ml_collections.ConfigDict, include_head: bool = True) -> int:
  """Parameters that take part in a matmul per token: q, k, v, o, SwiGLU (3 matrices; for a MoE layer the router
  and the top-k experts' SwiGLUs) per layer, plus the LM head (tied or not) when the model produces logits. The embedding lookup is a gather and is not counted."""
  d, hd = lm.hidden_size, (lm.get("head_dim") or lm.hidden_size // lm.num_heads)
  attn = d * lm.num_heads * hd * 2 + d * lm.num_kv_heads * hd * 2
  sparse = len(moe.moe_layer_ids(lm))
  # A MoE layer runs its router and only the top-k experts of each token: active, not total, parameters.
  routed = d * lm.get("num_experts", 0) + lm.get("num_experts_per_tok", 0) * 3 * d * lm.get("moe_mlp_dim", 0)
  ffn = (lm.num_layers - sparse) * 3 * d * lm.mlp_dim + sparse * routed
  head = d * lm.vocab_size if (include_head and lm.lm_head) else 0
  return lm.num_layers * attn + ffn + head


def decoder_attention_flops(lm: ml_collections.ConfigDict, keys: float) -> float:
  """Attention FLOPs of one token attending `keys` keys, over all layers: 4 x heads x head_dim x keys x L."""
  hd = lm.get("head_dim") or lm.hidden_size // lm.num_heads
  return 4.0 * lm.num_layers * lm.num_heads * hd * keys


def decoder_sequence_flops(lm: ml_collections.ConfigDict, tokens: int, *, causal: bool | None = None,
                           logits_positions: int | None = None) -> float:
  """Forward FLOPs of one sequence of `tokens` tokens (no cache). logits_positions: how many positions go
  through the LM head (default all when the config has one; prefill for generation needs only 1)."""
  causal = lm.causal if causal is None else causal
  body = 2.0 * decoder_matmul_params(lm, include_head=False) * tokens
  head_positions = tokens if logits_positions is None else logits_positions
  head = 2.0 * lm.hidden_size * lm.vocab_size * head_positions if lm.lm_head else 0.0
  keys = tokens * (tokens + 1) / 2.0 if causal else float(tokens * tokens)
  return body + head + decoder_attention_flops(lm, keys)


def decode_flops(lm: ml_collections.ConfigDict, prompt_len: int, new_tokens: int) -> float:
  """FLOPs of generating `new_tokens` tokens one at a time after a `prompt_len` prefill, per sequence: each step
  runs every matmul parameter once (LM head included) and attends to the keys written so far (itself included)."""
  per_token = 2.0 * decoder_matmul_params(lm, include_head=True)
  keys = sum(prompt_len + i + 1 for i in range(new_tokens))
  return per_token * new_tokens + decoder_attention_flops(lm, keys)


def chat_projector_flops(chat: ml_collections.ConfigDict, image_size: int) -> float:
  """Projector of one tile: Linear(4 Dv, Dl) + Linear(Dl, Dl) over the pixel-shuffled tokens."""
  f = round(1 / chat.downsample_ratio)
  tokens = (image_size // chat.vision.patch_size // f) ** 2
  dv, dl = chat.vision.hidden_size * f * f, chat.language.hidden_size
  return 2.0 * tokens * (dv * dl + dl * dl)


def chat_image_tokens(chat: ml_collections.ConfigDict, image_size: int) -> int:
  """Language tokens one tile becomes after pixel shuffle (256 for 448 px with patch 14 and ratio 0.5)."""
  f = round(1 / chat.downsample_ratio)
  return (image_size // chat.vision.patch_size // f) ** 2


def chat_vision_layers(chat: ml_collections.ConfigDict) -> int:
  """ViT blocks the chat model runs (it stops at select_layer)."""
  sel, total = chat.select_layer, chat.vision.num_layers
  return total + 1 + sel if sel < 0 else sel


def chat_prefill_flops(chat: ml_collections.ConfigDict, image_size: int, text_tokens: int) -> float:
  """One prompt of one tile + `text_tokens` text tokens: ViT (up to select_layer) + projector + decoder prefill
  with logits for the last position only (what generation needs)."""
  seq = chat_image_tokens(chat, image_size) + text_tokens
  return (vit_forward_flops(chat.vision, image_size, chat_vision_layers(chat))
          + chat_projector_flops(chat, image_size)
          + decoder_sequence_flops(chat.language, seq, causal=True, logits_positions=1))


def contrastive_forward_flops(vision: ml_collections.ConfigDict, image_size: int,
                              text: ml_collections.ConfigDict, text_len: int, embed_dim: int) -> float:
  """One (image, caption) pair through the seed-style contrastive model: ViT + 2-layer image projection MLP
  (D -> E -> E) + bidirectional text tower + text projection (Dt -> E). The B x B similarity is not counted."""
  d, dt = vision.hidden_size, text.hidden_size
  image = vit_forward_flops(vision, image_size) + 2.0 * (d * embed_dim + embed_dim * embed_dim)
  txt = decoder_sequence_flops(text, text_len, causal=False, logits_positions=0) + 2.0 * dt * embed_dim
  return image + txt


def achieved(flops: float, seconds: float) -> float:
  """TFLOP/s."""
  return flops / seconds / 1e12 if seconds > 0 else 0.0
