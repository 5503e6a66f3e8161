"""PyTorch model of an internvl_jax seed contrastive model (InternViT image tower + a LLaMA-style text tower, both
projected to a shared unit-norm space), written next to the exported weights by `python -m internvl_jax.convert
export` and loaded with `AutoModel.from_pretrained(folder, trust_remote_code=True)`.

  image: InternVLVisionModel (transformers) -> CLS of the last layer -> MLP (Linear, exact GELU, ..., Linear)
  text:  embeddings -> pre-norm blocks (RMSNorm, grouped-query attention with RoPE over positions that count real
         tokens, bidirectional unless `causal`, SwiGLU) -> RMSNorm -> pooling over real tokens -> Linear
  both L2-normalised; logits = exp(logit_scale) * image @ text.T (+ logit_bias for a model trained with the sigmoid
  loss, config.logit_bias)

Norms, RoPE and the softmax run in float32, as in the JAX model.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.models.internvl.modeling_internvl import InternVLVisionModel

from .configuration_internvl_seed import InternVLSeedConfig


class RMSNorm(nn.Module):
  def __init__(self, dim, eps):
    super().__init__()
    self.weight = nn.Parameter(torch.ones(dim))
    self.eps = eps

  def forward(self, x):
    x32 = x.float()
    y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
    return (y * self.weight.float()).to(x.dtype)


def rotate(x, cos, sin):
  """x [B, H, T, hd]; cos, sin [B, T, hd] (the frequencies repeated over both halves)."""
  x32 = x.float()
  half = x.shape[-1] // 2
  rotated = torch.cat([-x32[..., half:], x32[..., :half]], dim=-1)
  return (x32 * cos[:, None] + rotated * sin[:, None]).to(x.dtype)


class TextAttention(nn.Module):
  def __init__(self, c):
    super().__init__()
    d, hd = c["hidden_size"], c["head_dim"]
    self.heads, self.kv_heads, self.head_dim = c["num_attention_heads"], c["num_key_value_heads"], hd
    bias = bool(c.get("attention_bias", False))
    self.q_proj = nn.Linear(d, self.heads * hd, bias=bias)
    self.k_proj = nn.Linear(d, self.kv_heads * hd, bias=bias)
    self.v_proj = nn.Linear(d, self.kv_heads * hd, bias=bias)
    self.o_proj = nn.Linear(self.heads * hd, d, bias=False)
    qk_norm = bool(c.get("qk_norm", False))
    self.q_norm = RMSNorm(hd, c["rms_norm_eps"]) if qk_norm else None
    self.k_norm = RMSNorm(hd, c["rms_norm_eps"]) if qk_norm else None

  def forward(self, x, cos, sin, allowed):
    b, t, _ = x.shape
    q = self.q_proj(x).view(b, t, self.heads, self.head_dim)
    k = self.k_proj(x).view(b, t, self.kv_heads, self.head_dim)
    v = self.v_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
    if self.q_norm is not None:
      q, k = self.q_norm(q), self.k_norm(k)
    q, k = rotate(q.transpose(1, 2), cos, sin), rotate(k.transpose(1, 2), cos, sin)
    groups = self.heads // self.kv_heads
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    logits = torch.matmul(q.float(), k.float().transpose(-1, -2)) / math.sqrt(self.head_dim)
    logits = logits.masked_fill(~allowed, torch.finfo(torch.float32).min)
    probs = logits.softmax(-1).to(v.dtype)
    out = torch.matmul(probs, v).transpose(1, 2).reshape(b, t, -1)
    return self.o_proj(out)


class TextMLP(nn.Module):
  def __init__(self, c):
    super().__init__()
    d, i = c["hidden_size"], c["intermediate_size"]
    self.gate_proj, self.up_proj = nn.Linear(d, i, bias=False), nn.Linear(d, i, bias=False)
    self.down_proj = nn.Linear(i, d, bias=False)

  def forward(self, x):
    return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class TextLayer(nn.Module):
  def __init__(self, c):
    super().__init__()
    self.input_layernorm = RMSNorm(c["hidden_size"], c["rms_norm_eps"])
    self.self_attn = TextAttention(c)
    self.post_attention_layernorm = RMSNorm(c["hidden_size"], c["rms_norm_eps"])
    self.mlp = TextMLP(c)

  def forward(self, x, cos, sin, allowed):
    x = x + self.self_attn(self.input_layernorm(x), cos, sin, allowed)
    return x + self.mlp(self.post_attention_layernorm(x))


class TextEncoder(nn.Module):
  """input_ids [B, T], attention_mask [B, T] (1 = real) -> hidden [B, T, D] after the final norm."""

  def __init__(self, c):
    super().__init__()
    self.config = c
    self.embed_tokens = nn.Embedding(c["vocab_size"], c["hidden_size"])
    self.layers = nn.ModuleList([TextLayer(c) for _ in range(c["num_hidden_layers"])])
    self.norm = RMSNorm(c["hidden_size"], c["rms_norm_eps"])

  def forward(self, input_ids, attention_mask):
    c = self.config
    mask = attention_mask.bool()
    t = input_ids.shape[1]
    positions = (mask.long().cumsum(1) - 1).clamp(min=0).float()  # real tokens only: padding keeps them
    hd = c["head_dim"]
    inv_freq = 1.0 / (c["rope_theta"] ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
    freqs = positions[..., None] * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)
    cos, sin = emb.cos(), emb.sin()
    allowed = mask[:, None, None, :]  # keys that are real tokens
    if c.get("causal", False):
      allowed = allowed & torch.ones(t, t, dtype=torch.bool, device=input_ids.device).tril()
    x = self.embed_tokens(input_ids)
    for layer in self.layers:
      x = layer(x, cos, sin, allowed)
    return self.norm(x)


def pool(hidden, attention_mask, how):
  mask = attention_mask.bool()
  if how == "first":
    return hidden[:, 0]
  if how == "mean":
    w = mask.float()[..., None]
    return ((hidden.float() * w).sum(1) / w.sum(1).clamp(min=1.0)).to(hidden.dtype)
  if how == "last":
    last = hidden.shape[1] - 1 - mask.flip(1).float().argmax(1)
    return hidden[torch.arange(hidden.shape[0]), last]
  raise ValueError(f"text_pooling {how!r} is not 'first', 'mean' or 'last'")


class InternVLSeedModel(PreTrainedModel):
  config_class = InternVLSeedConfig
  base_model_prefix = ""
  main_input_name = "pixel_values"

  def __init__(self, config):
    super().__init__(config)
    self.vision_model = InternVLVisionModel(config.vision_config)
    d_v, e = config.vision_config.hidden_size, config.embed_dim
    dims = [d_v] + [e] * config.num_proj_layers
    self.image_projection = nn.ModuleList([nn.Linear(a, b) for a, b in zip(dims, dims[1:])])
    self.text_model = TextEncoder(config.text_config)
    self.text_projection = nn.Linear(config.text_config["hidden_size"], e)
    self.logit_scale = nn.Parameter(torch.tensor(0.0))
    self.logit_bias = nn.Parameter(torch.tensor(0.0)) if getattr(config, "logit_bias", False) else None
    self.post_init()

  def _init_weights(self, module):
    pass  # weights always come from the exported checkpoint

  def get_image_features(self, pixel_values):
    """pixel_values [B, 3, H, W] (ImageNet-normalised) -> unit-norm [B, embed_dim]."""
    x = self.vision_model(pixel_values=pixel_values).last_hidden_state[:, 0]
    for i, linear in enumerate(self.image_projection):
      x = linear(x)
      if i < len(self.image_projection) - 1:
        x = F.gelu(x)
    return F.normalize(x.float(), dim=-1)

  def get_text_features(self, input_ids, attention_mask=None):
    """input_ids [B, T], attention_mask [B, T] -> unit-norm [B, embed_dim]."""
    if attention_mask is None:
      attention_mask = torch.ones_like(input_ids)
    hidden = self.text_model(input_ids, attention_mask)
    pooled = pool(hidden, attention_mask, self.config.text_pooling)
    return F.normalize(self.text_projection(pooled).float(), dim=-1)

  def forward(self, pixel_values=None, input_ids=None, attention_mask=None):
    """Returns (image embeddings, text embeddings, logits_per_image [B_img, B_txt])."""
    image = self.get_image_features(pixel_values)
    text = self.get_text_features(input_ids, attention_mask)
    logits = self.logit_scale.exp() * image @ text.T
    return image, text, logits if self.logit_bias is None else logits + self.logit_bias
