"""Key maps: which checkpoint tensors fill which of our parameters, per checkpoint family (DESIGN §6).

A `Rule` names one parameter of ours by its dotted nnx path (e.g. "vision.blocks.attn.qkv.kernel"), the source
tensor names it is built from (templates; "{i}" marks a per-layer name, and such a rule fills our stacked
[L, ...] parameter one layer at a time), and the transform between the two layouts (transforms.py).

Source names here are *canonical* names: what transformers (or the OpenGVLab remote code) writes to disk.
`canonical_name(family, name)` maps the other accepted spellings (in-memory `model.`-prefixed names) onto them.
"""

from __future__ import annotations

import dataclasses
import re

import ml_collections

from internvl_jax.convert import transforms as T
from internvl_jax.models import llm, moe


@dataclasses.dataclass(frozen=True)
class Rule:
  target: str  # dotted path in our nnx state
  sources: tuple[str, ...]  # canonical source names, "{i}" = layer index
  transform: object
  stride: int = 1  # our slot i reads source layer i * stride (QLLaMA cross-attention lives in every 2nd layer)
  layer_ids: tuple[int, ...] | None = None  # our slot i reads source layer layer_ids[i] (e.g. the MoE layers)
  experts: int = 0  # > 0: sources hold "{j}" too; our [L, E, ...] parameter is filled one expert tensor at a time

  def names(self, slot: int | None = None, expert: int | None = None) -> tuple[str, ...]:
    """The source names for our stacked slot `slot` (None: an unstacked rule) and expert `expert`."""
    if slot is None:
      return self.sources
    layer = self.layer_ids[slot] if self.layer_ids is not None else slot * self.stride
    return tuple(s.format(i=layer, j=expert) for s in self.sources)

  @property
  def stacked(self) -> bool:
    return any("{i}" in s for s in self.sources)

  def pieces(self, shape: tuple[int, ...]) -> list[tuple[tuple[int, ...], tuple[str, ...], tuple[int, ...]]]:
    """(index into our parameter of `shape`, source names, shape of our piece) for each piece it is built from:
    the whole parameter, one layer [i], or one expert of one layer [i, j]."""
    shape = tuple(shape)
    if not self.stacked:
      return [((), self.sources, shape)]
    if self.experts:
      return [((i, j), self.names(i, j), shape[2:]) for i in range(shape[0]) for j in range(shape[1])]
    return [((i,), self.names(i), shape[1:]) for i in range(shape[0])]


def linear(dst: str, src: str, bias: bool = True) -> list[Rule]:
  """A Linear: our `{dst}.kernel` [in, out] (+ `.bias`) from a PyTorch `{src}.weight` [out, in] (+ `.bias`)."""
  return _linear(dst, src, bias)


def same(dst: str, src: str) -> Rule:
  """A tensor stored as is."""
  return _same(dst, src)


def _join(prefix: str, name: str) -> str:
  return f"{prefix}.{name}" if prefix else name


def _linear(dst: str, src: str, bias: bool = True) -> list[Rule]:
  rules = [Rule(f"{dst}.kernel", (f"{src}.weight",), T.Linear())]
  if bias:
    rules.append(Rule(f"{dst}.bias", (f"{src}.bias",), T.Identity()))
  return rules


def _norm(dst: str, src: str, kind: str) -> list[Rule]:
  rules = [Rule(f"{dst}.scale", (f"{src}.weight",), T.Identity())]
  if kind == "layer_norm":
    rules.append(Rule(f"{dst}.bias", (f"{src}.bias",), T.Identity()))
  return rules


def _same(dst: str, src: str) -> Rule:
  return Rule(dst, (src,), T.Identity())


# ----------------------------------------------------------------------------------------------------------------
# InternViT


def internvit_native(cfg: ml_collections.ConfigDict, src: str = "", dst: str = "") -> list[Rule]:
  """transformers InternVLVisionModel names (vision_tower.* inside a chat model)."""
  s, d = (lambda n: _join(src, n)), (lambda n: _join(dst, n))
  lay, blk = s("encoder.layer.{i}"), d("blocks")
  rules = [_same(d("embeddings.cls_token"), s("embeddings.cls_token")),
           _same(d("embeddings.position"), s("embeddings.position_embeddings")),
           Rule(d("embeddings.patch.kernel"), (s("embeddings.patch_embeddings.projection.weight"),), T.Conv()),
           _same(d("embeddings.patch.bias"), s("embeddings.patch_embeddings.projection.bias")),
           _same(f"{blk}.ls1", f"{lay}.lambda_1"), _same(f"{blk}.ls2", f"{lay}.lambda_2")]
  qkv = tuple(f"{lay}.attention.{p}_proj" for p in "qkv")
  if cfg.qkv_fused:
    rules.append(Rule(f"{blk}.attn.qkv.kernel", tuple(f"{n}.weight" for n in qkv), T.FuseLinear(3)))
    if cfg.qkv_bias:
      rules.append(Rule(f"{blk}.attn.qkv.bias", tuple(f"{n}.bias" for n in qkv), T.FuseBias(3)))
  else:
    for p, n in zip("qkv", qkv):
      rules += _linear(f"{blk}.attn.{p}", n, cfg.qkv_bias)
  if cfg.qk_norm:
    rules += [_same(f"{blk}.attn.q_norm.scale", f"{lay}.attention.q_norm.weight"),
              _same(f"{blk}.attn.k_norm.scale", f"{lay}.attention.k_norm.weight")]
  rules += _linear(f"{blk}.attn.proj", f"{lay}.attention.projection_layer")
  rules += _norm(f"{blk}.norm1", f"{lay}.layernorm_before", cfg.norm_type)
  rules += _norm(f"{blk}.norm2", f"{lay}.layernorm_after", cfg.norm_type)
  rules += _linear(f"{blk}.mlp.fc1", f"{lay}.mlp.fc1") + _linear(f"{blk}.mlp.fc2", f"{lay}.mlp.fc2")
  return rules


def internvit_opengvlab(cfg: ml_collections.ConfigDict, src: str = "", dst: str = "") -> list[Rule]:
  """OpenGVLab InternVisionModel names (vision_model.* inside InternVLChatModel / InternVL-14B)."""
  s, d = (lambda n: _join(src, n)), (lambda n: _join(dst, n))
  lay, blk = s("encoder.layers.{i}"), d("blocks")
  rules = [_same(d("embeddings.cls_token"), s("embeddings.class_embedding")),
           _same(d("embeddings.position"), s("embeddings.position_embedding")),
           Rule(d("embeddings.patch.kernel"), (s("embeddings.patch_embedding.weight"),), T.Conv()),
           _same(d("embeddings.patch.bias"), s("embeddings.patch_embedding.bias")),
           _same(f"{blk}.ls1", f"{lay}.ls1"), _same(f"{blk}.ls2", f"{lay}.ls2")]
  if cfg.qkv_fused:  # both fused with rows q, k, v: a plain transpose
    rules += _linear(f"{blk}.attn.qkv", f"{lay}.attn.qkv", cfg.qkv_bias)
  else:
    for j, p in enumerate("qkv"):
      rules.append(Rule(f"{blk}.attn.{p}.kernel", (f"{lay}.attn.qkv.weight",), T.SliceRows(j, 3)))
      if cfg.qkv_bias:
        rules.append(Rule(f"{blk}.attn.{p}.bias", (f"{lay}.attn.qkv.bias",), T.SliceRows(j, 3, bias=True)))
  if cfg.qk_norm:
    rules += [_same(f"{blk}.attn.q_norm.scale", f"{lay}.attn.q_norm.weight"),
              _same(f"{blk}.attn.k_norm.scale", f"{lay}.attn.k_norm.weight")]
  rules += _linear(f"{blk}.attn.proj", f"{lay}.attn.proj")
  rules += _norm(f"{blk}.norm1", f"{lay}.norm1", cfg.norm_type) + _norm(f"{blk}.norm2", f"{lay}.norm2", cfg.norm_type)
  rules += _linear(f"{blk}.mlp.fc1", f"{lay}.mlp.fc1") + _linear(f"{blk}.mlp.fc2", f"{lay}.mlp.fc2")
  return rules


# ----------------------------------------------------------------------------------------------------------------
# Decoders


def decoder_hf(cfg: ml_collections.ConfigDict, src: str, dst: str = "", lm_head: str | None = None) -> list[Rule]:
  """LLaMA / Qwen2 / Qwen3 / Qwen3-MoE / GPT-OSS names: `{src}.embed_tokens`, `{src}.layers.{i}.self_attn.q_proj`, ...;
  lm_head: its full source name prefix (e.g. "lm_head") when the model has a separate output matrix. A model
  mixing dense and MoE layers keeps them in two stacks (llm.Decoder), each slot naming its source layer."""
  s, d = (lambda n: _join(src, n)), (lambda n: _join(dst, n))
  lay = s("layers.{i}")
  rules = [_same(d("embed.embedding"), s("embed_tokens.weight"))]
  sparse = moe.moe_layer_ids(cfg)
  if 0 < len(sparse) < cfg.num_layers:
    dense = tuple(i for i in range(cfg.num_layers) if i not in sparse)
    rules += [dataclasses.replace(r, layer_ids=sparse) for r in _decoder_layer(cfg, lay, d("layers"), True)]
    rules += [dataclasses.replace(r, layer_ids=dense) for r in _decoder_layer(cfg, lay, d("dense_layers"), False)]
  else:
    rules += _decoder_layer(cfg, lay, d("layers"), bool(sparse))
  rules.append(_same(d("norm.scale"), s("norm.weight")))
  if lm_head is not None:
    rules += _linear(d("lm_head"), lm_head, bias=False)
  return rules


def _decoder_layer(cfg: ml_collections.ConfigDict, lay: str, blk: str, sparse: bool) -> list[Rule]:
  rules = []
  for p in "qkv":
    rules += _linear(f"{blk}.attn.{p}", f"{lay}.self_attn.{p}_proj", cfg.qkv_bias)
  rules += _linear(f"{blk}.attn.o", f"{lay}.self_attn.o_proj", bias=cfg.get("o_bias", False))
  if cfg.get("attention_sinks", False):
    rules.append(_same(f"{blk}.attn.sinks", f"{lay}.self_attn.sinks"))
  if cfg.get("qk_norm", False):
    rules += [_same(f"{blk}.attn.{p}_norm.scale", f"{lay}.self_attn.{p}_norm.weight") for p in "qk"]
  if sparse and cfg.get("hf_model_type") == "gpt_oss":
    rules += _gpt_oss_experts(lay, blk)
  elif sparse:  # Qwen3-MoE on disk: router `mlp.gate`, one tensor per expert `mlp.experts.{j}.{gate,up,down}_proj`
    rules += _linear(f"{blk}.mlp.router", f"{lay}.mlp.gate", bias=False)
    for ours, theirs in (("gate", "gate_proj"), ("up", "up_proj"), ("down", "down_proj")):
      rules.append(Rule(f"{blk}.mlp.{ours}", (f"{lay}.mlp.experts.{{j}}.{theirs}.weight",), T.Linear(),
                        experts=cfg.num_experts))
  else:
    for ours, theirs in (("gate", "gate_proj"), ("up", "up_proj"), ("down", "down_proj")):
      rules += _linear(f"{blk}.mlp.{ours}", f"{lay}.mlp.{theirs}", bias=False)
  rules += [_same(f"{blk}.input_norm.scale", f"{lay}.input_layernorm.weight"),
            _same(f"{blk}.post_attention_norm.scale", f"{lay}.post_attention_layernorm.weight")]
  return rules


def mxfp4_experts(rules: list[Rule]) -> list[Rule]:
  """The rules of a GPT-OSS checkpoint whose experts are stored MXFP4 (`experts.gate_up_proj_blocks` / `_scales`
  and `experts.down_proj_blocks` / `_scales` in place of `gate_up_proj` / `down_proj`): those weights are read
  from the two tensors and dequantized (T.MXFP4); biases and everything else as before."""
  out = []
  for r in rules:
    src = r.sources[0]
    if len(r.sources) == 1 and src.endswith(("experts.gate_up_proj", "experts.down_proj")):
      r = dataclasses.replace(r, sources=(src + "_blocks", src + "_scales"), transform=T.MXFP4(r.transform))
    out.append(r)
  return out


def _gpt_oss_experts(lay: str, blk: str) -> list[Rule]:
  """GPT-OSS on disk: router `mlp.router` (Linear with bias), every expert in one tensor per layer:
  `mlp.experts.gate_up_proj` [E, D, 2I] (gate columns 0::2, up 1::2) and its bias [E, 2I], `down_proj` [E, I, D]
  (already [in, out]) and its bias [E, D]."""
  ex = f"{lay}.mlp.experts"
  rules = _linear(f"{blk}.mlp.router", f"{lay}.mlp.router", bias=True)
  for j, p in enumerate(("gate", "up")):
    rules += [Rule(f"{blk}.mlp.{p}", (f"{ex}.gate_up_proj",), T.Interleaved(j, 2)),
              Rule(f"{blk}.mlp.{p}_bias", (f"{ex}.gate_up_proj_bias",), T.Interleaved(j, 2))]
  return rules + [_same(f"{blk}.mlp.down", f"{ex}.down_proj"), _same(f"{blk}.mlp.down_bias", f"{ex}.down_proj_bias")]


def decoder_phi3(cfg: ml_collections.ConfigDict, src: str, dst: str = "", lm_head: str | None = None) -> list[Rule]:
  """Phi-3 names: LLaMA's, except self_attn.qkv_proj (rows q [H*hd], k [Hkv*hd], v [Hkv*hd]) and mlp.gate_up_proj
  (rows gate [I], up [I]), each split into our separate kernels."""
  lay, blk = _join(src, "layers.{i}"), _join(dst, "layers")
  fused = {f"{blk}.attn.{p}.kernel" for p in "qkv"} | {f"{blk}.mlp.{p}.kernel" for p in ("gate", "up")}
  rules = [r for r in decoder_hf(cfg, src, dst, lm_head) if r.target not in fused]
  q, kv, mlp = cfg.num_heads * llm.head_dim(cfg), cfg.num_kv_heads * llm.head_dim(cfg), cfg.mlp_dim
  qkv = f"{lay}.self_attn.qkv_proj.weight"
  for p, (start, stop) in zip("qkv", ((0, q), (q, q + kv), (q + kv, q + 2 * kv))):
    rules.append(Rule(f"{blk}.attn.{p}.kernel", (qkv,), T.Rows(start, stop, q + 2 * kv)))
  for p, (start, stop) in zip(("gate", "up"), ((0, mlp), (mlp, 2 * mlp))):
    rules.append(Rule(f"{blk}.mlp.{p}.kernel", (f"{lay}.mlp.gate_up_proj.weight",), T.Rows(start, stop, 2 * mlp)))
  return rules


def decoder_for(cfg: ml_collections.ConfigDict, src: str, dst: str = "", lm_head: str | None = None) -> list[Rule]:
  """The transformers-layout rules of a decoder config: Phi-3's fused names or LLaMA / Qwen2's."""
  make = decoder_phi3 if cfg.get("hf_model_type") == "phi3" else decoder_hf
  return make(cfg, src, dst, lm_head)


def decoder_internlm2(cfg: ml_collections.ConfigDict, src: str, dst: str = "",
                      lm_head: str | None = None) -> list[Rule]:
  """InternLM2 names (remote code): tok_embeddings, attention.wqkv (fused, interleaved per KV head), attention.wo,
  feed_forward.w1 (gate) / w3 (up) / w2 (down), attention_norm, ffn_norm, norm, output."""
  s, d = (lambda n: _join(src, n)), (lambda n: _join(dst, n))
  lay, blk = s("layers.{i}"), d("layers")
  rules = [_same(d("embed.embedding"), s("tok_embeddings.weight"))]
  dims = (cfg.num_heads, cfg.num_kv_heads, llm.head_dim(cfg))
  for p in "qkv":
    rules.append(Rule(f"{blk}.attn.{p}.kernel", (f"{lay}.attention.wqkv.weight",), T.InternLM2QKV(p, *dims)))
    if cfg.qkv_bias:
      rules.append(Rule(f"{blk}.attn.{p}.bias", (f"{lay}.attention.wqkv.bias",),
                        T.InternLM2QKV(p, *dims, bias=True)))
  rules += _linear(f"{blk}.attn.o", f"{lay}.attention.wo", bias=False)
  for ours, theirs in (("gate", "w1"), ("up", "w3"), ("down", "w2")):
    rules += _linear(f"{blk}.mlp.{ours}", f"{lay}.feed_forward.{theirs}", bias=False)
  rules += [_same(f"{blk}.input_norm.scale", f"{lay}.attention_norm.weight"),
            _same(f"{blk}.post_attention_norm.scale", f"{lay}.ffn_norm.weight"),
            _same(d("norm.scale"), s("norm.weight"))]
  if lm_head is not None:
    rules += _linear(d("lm_head"), lm_head, bias=False)
  return rules


# ----------------------------------------------------------------------------------------------------------------
# Chat projector


def projector_native(dst: str = "projector") -> list[Rule]:
  src = "multi_modal_projector"
  return (_norm(f"{dst}.norm", f"{src}.layer_norm", "layer_norm") + _linear(f"{dst}.linear_1", f"{src}.linear_1")
          + _linear(f"{dst}.linear_2", f"{src}.linear_2"))


def projector_opengvlab(dst: str = "projector") -> list[Rule]:
  """`mlp1` is nn.Sequential(LayerNorm, Linear, GELU, Linear): indices 0, 1, 3."""
  return _norm(f"{dst}.norm", "mlp1.0", "layer_norm") + _linear(f"{dst}.linear_1", "mlp1.1") + _linear(
      f"{dst}.linear_2", "mlp1.3")


# ----------------------------------------------------------------------------------------------------------------
# InternVL-14B (InternVL-C / InternVL-G, OpenGVLab remote code `InternVLModel`)


def attention_pooling(dst: str, src: str) -> list[Rule]:
  """OpenGVLab AttentionPoolingBlock: norm1_q/k/v LayerNorms, cross_attn.{q,k,v} Linears without bias plus
  separate q_bias/k_bias/v_bias vectors, cross_attn.proj with bias."""
  rules = []
  for p in "qkv":
    rules += _norm(f"{dst}.norm_{p}", f"{src}.norm1_{p}", "layer_norm")
    rules += [Rule(f"{dst}.{p}.kernel", (f"{src}.cross_attn.{p}.weight",), T.Linear()),
              _same(f"{dst}.{p}.bias", f"{src}.cross_attn.{p}_bias")]
  return rules + _linear(f"{dst}.proj", f"{src}.cross_attn.proj")


def internvl_14b(cfg: ml_collections.ConfigDict, head: str | None) -> list[Rule]:
  """vision_model.* (InternViT-6B) + clip_projector (attention pooling), qllama.* (LLaMA with cross_attn in layers
  0, f, 2f, ...), query_tokens, text_projection ([in, out] already), logit_scale, clip_projector2 (G only)."""
  text = cfg.text
  rules = internvit_opengvlab(cfg.vision, "vision_model", "vision")
  rules += attention_pooling("vision.pool", "clip_projector")
  rules += decoder_hf(text, "qllama.model", "text.decoder", head)
  cross, f = "qllama.model.layers.{i}.cross_attn", text.cross_attention_frequency
  for ours, theirs in (("norm_q", "norm1"), ("norm_kv", "norm2")):
    rules.append(Rule(f"text.cross_attention.{ours}.scale", (f"{cross}.{theirs}.weight",), T.Identity(), f))
  for p in "qkvo":
    rules.append(Rule(f"text.cross_attention.{p}.kernel", (f"{cross}.{p}_proj.weight",), T.Linear(), f))
  rules += [_same("text.query_tokens", "query_tokens"), _same("text_projection.kernel", "text_projection"),
            _same("logit_scale", "logit_scale")]
  if cfg.variant == "g":
    rules += attention_pooling("query_pool", "clip_projector2")
  return rules


# ----------------------------------------------------------------------------------------------------------------
# Source name spellings

# (accepted prefix, canonical prefix), first match wins.
_ALIASES = {
    # transformers InternVLForConditionalGeneration: in-memory names -> the names it writes to disk.
    "internvl": (("model.vision_tower.", "vision_tower."), ("model.multi_modal_projector.", "multi_modal_projector."),
                 ("model.language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head.")),
    # A vision tower saved on its own, or pulled out of a chat checkpoint.
    "internvl_vision": (("model.vision_tower.", ""), ("vision_tower.", ""), ("internvl_vision.", "")),
    "intern_vit_6b": (("vision_model.", ""),),
}

# Tensors a checkpoint may hold that carry nothing our models need (buffers, unused mask tokens).
IGNORED = (re.compile(r"(^|\.)rotary_emb\.inv_freq$"), re.compile(r"(^|\.)embeddings\.mask_token$"))


def canonical_name(family: str, name: str) -> str:
  for accepted, canonical in _ALIASES.get(family, ()):
    if name.startswith(accepted):
      return canonical + name[len(accepted):]
  return name


def is_ignored(name: str) -> bool:
  return any(p.search(name) for p in IGNORED)
