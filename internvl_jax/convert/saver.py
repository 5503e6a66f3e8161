"""save_pretrained: one of our models -> a transformers-native folder (config.json + safetensors) that
`transformers` loads with from_pretrained, reporting no missing or unexpected keys.

  InternViT     -> InternVLVisionModel (model_type internvl_vision)
  Decoder       -> Qwen3MoeForCausalLM (experts), Qwen3ForCausalLM (QK-norm), Qwen2ForCausalLM (q/k/v biases),
                   Phi3ForCausalLM / GptOssForCausalLM (hf_model_type) or LlamaForCausalLM (none)
  InternVLChat  -> InternVLForConditionalGeneration (model_type internvl)
  InternVLContrastive (variant c / g) -> OpenGVLab InternVL-14B layout (transformers has no InternVL-C/G class)
  InternVLContrastive (seed)          -> model_type internvl_seed: transformers InternVLVisionModel names for the
                                         image tower, LLaMA names for the text tower, plus the PyTorch files of
                                         convert/torch_remote/, so AutoModel.from_pretrained(out,
                                         trust_remote_code=True) runs it (no PyTorch library defines this model)
  anything else (e.g. a prefix-mode chat model) -> our own documented layout (own_layout_plan)
The key maps are the loader's (keymaps.py) run backwards, so a save -> load round trip is exact.
"""

from __future__ import annotations

import json
import logging
import os
import shutil

import numpy as np
from flax import nnx

from internvl_jax.convert import configs, families, files, keymaps, transforms
from internvl_jax.convert.configs import ConversionError
from internvl_jax.models import internvl, layers, llm, vit


def export_plan(model: nnx.Module) -> tuple[dict, list]:
  """(config.json dict, rules) of the transformers-native layout for `model`."""
  cfg = model.config
  if isinstance(model, vit.InternViT):
    hf = configs.vision_to_native(cfg)
    hf["architectures"] = ["InternVLVisionModel"]
    return hf, keymaps.internvit_native(cfg)
  if isinstance(model, llm.Decoder):
    return configs.language_to_hf(cfg), keymaps.decoder_for(cfg, "model", "", None if cfg.tie_embeddings else "lm_head")
  if isinstance(model, internvl.InternVLChat):
    head = None if cfg.language.tie_embeddings else "language_model.lm_head"
    rules = (keymaps.internvit_native(cfg.vision, "vision_tower", "vision") + keymaps.projector_native()
             + keymaps.decoder_for(cfg.language, "language_model.model", "language", head))
    return configs.chat_to_native(cfg), rules
  if isinstance(model, internvl.InternVLContrastive) and cfg.variant in ("c", "g"):
    if cfg.get("logit_bias_init", None) is not None:  # InternVLModel has no logit bias to hold it
      logging.warning("a sigmoid-loss InternVL-C/G model is written in the internvl_jax layout (the InternVL-14B "
                      "layout has no logit bias)")
      return own_layout_plan(model)
    hf = configs.contrastive_to_14b(cfg)  # InternVL-C/G: no transformers class; OpenGVLab's InternVL-14B layout
    return hf, keymaps.internvl_14b(cfg, None if cfg.text.tie_embeddings else "qllama.lm_head")
  if isinstance(model, internvl.InternVLContrastive) and cfg.variant == "seed":
    try:
      return seed_plan(cfg)
    except ConversionError as e:
      logging.warning("seed model written in the internvl_jax layout (no PyTorch files): %s", e)
  return own_layout_plan(model)


SEED_REMOTE_FILES = ("configuration_internvl_seed.py", "modeling_internvl_seed.py")


def seed_plan(cfg) -> tuple[dict, list]:
  """(config.json, rules) of the internvl_seed layout (convert/torch_remote/modeling_internvl_seed.py reads it);
  our config is kept under "internvl_jax" so load_pretrained rebuilds the model exactly."""
  t, v = cfg.text, cfg.vision
  configs.require(cfg.text_kind == "decoder" and v.pooling == "cls" and not t.get("num_experts", 0) and
                  t.get("rope_type", "default") == "default" and not t.get("rotary_dim") and
                  not t.get("sliding_window"), "the PyTorch seed model covers CLS-pooled InternViT + dense "
                  "LLaMA-style text towers with plain RoPE")
  text = dict(vocab_size=t.vocab_size, hidden_size=t.hidden_size, num_hidden_layers=t.num_layers,
              num_attention_heads=t.num_heads, num_key_value_heads=t.num_kv_heads, head_dim=llm.head_dim(t),
              intermediate_size=t.mlp_dim, rms_norm_eps=t.norm_eps, rope_theta=float(t.rope_theta),
              attention_bias=bool(t.qkv_bias), qk_norm=bool(t.get("qk_norm", False)), causal=bool(t.causal))
  hf = dict(model_type="internvl_seed", architectures=["InternVLSeedModel"],
            auto_map={"AutoConfig": "configuration_internvl_seed.InternVLSeedConfig",
                      "AutoModel": "modeling_internvl_seed.InternVLSeedModel"},
            vision_config=configs.vision_to_native(v), text_config=text, embed_dim=cfg.embed_dim,
            num_proj_layers=cfg.num_proj_layers, text_pooling=cfg.text_pooling,
            logit_bias=cfg.get("logit_bias_init", None) is not None,  # a sigmoid-loss (SigLIP) model's bias b
            internvl_jax=json.loads(cfg.to_json()))
  rules = keymaps.internvit_native(v, "vision_model", "vision") + keymaps.decoder_hf(t, "text_model", "text")
  for j in range(cfg.num_proj_layers):
    rules += keymaps.linear(f"image_projection.linears.{j}", f"image_projection.{j}")
  rules += keymaps.linear("text_projection", "text_projection") + [keymaps.same("logit_scale", "logit_scale")]
  if hf["logit_bias"]:
    rules.append(keymaps.same("logit_bias", "logit_bias"))
  return hf, rules


def own_layout_plan(model: nnx.Module) -> tuple[dict, list]:
  """The internvl_jax layout, for models no PyTorch codebase defines (e.g. the seed contrastive design):
  config.json {"model_type": "internvl_jax", "kind": ..., "config": <our ConfigDict>}, and one safetensors
  tensor per parameter named by its nnx path (e.g. "vision.blocks.attn.qkv.kernel", layers stacked on axis 0,
  Linear kernels [in, out]). load_pretrained reads it back."""
  kind = families.model_kind(model)
  hf = {"model_type": "internvl_jax", "kind": kind, "config": json.loads(model.config.to_json())}
  return hf, families.own_layout_rules(type(model), model.config)


def save_pretrained(model: nnx.Module, out_dir: str, dtype=None, *,
                    max_shard_bytes: int = files.MAX_SHARD_BYTES) -> list[str]:
  """Writes config.json and model.safetensors (or shards of at most max_shard_bytes with an index) to out_dir.

  dtype: None keeps each parameter's dtype; 'float32' / 'bfloat16' / 'float16' (or a jnp dtype) casts every
  tensor. Returns the safetensors files written."""
  hf, rules = export_plan(model)
  return write_folder(model, out_dir, hf, rules, dtype=dtype, max_shard_bytes=max_shard_bytes)


def write_folder(model: nnx.Module, out_dir: str, hf: dict, rules: list, *, dtype=None,
                 max_shard_bytes: int = files.MAX_SHARD_BYTES) -> list[str]:
  """config.json (`hf`, its dtype filled in) and the parameters written under the source names of `rules` (a
  loader key map run backwards). Returns the safetensors files written."""
  params = {".".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  by_target = {r.target: r for r in rules}
  if set(params) != set(by_target):  # a key-map bug, never a user error
    raise AssertionError(f"export key map mismatch: {sorted(set(params) ^ set(by_target))[:5]}")
  cast = None if dtype is None else np.dtype(layers.to_dtype(dtype))
  entries = []
  fused: dict[str, list] = {}  # source template -> [(Rows, stacked value)]: parts written as one tensor
  for target, value in params.items():
    rule = by_target[target]
    if isinstance(rule.transform, transforms.FUSED):
      fused.setdefault(rule.sources[0], []).append((rule, value))
      continue
    if rule.transform.save is None:
      raise ConversionError(f"parameter {target} has no transformers layout to export to")
    out_dtype = cast or np.dtype(value.dtype)
    for index, names, piece_shape in rule.pieces(value.shape):
      for j, (name, shape) in enumerate(zip(names, rule.transform.source_shapes(piece_shape))):
        entries.append((name, tuple(shape), out_dtype, _maker(rule.transform, value, index, j, out_dtype)))
  for parts in fused.values():
    rule, value = parts[0]
    out_dtype = cast or np.dtype(value.dtype)
    for index, names, piece_shape in rule.pieces(value.shape):
      shape = rule.transform.source_shapes(piece_shape)[0]
      entries.append((names[0], tuple(shape), out_dtype, _fused_maker(parts, index, out_dtype)))
  entries.sort(key=lambda e: e[0])
  written = files.write_safetensors(out_dir, entries, max_shard_bytes)
  dtypes = {np.dtype(e[2]).name for e in entries}
  hf["dtype"] = dtypes.pop() if len(dtypes) == 1 else "float32"
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(hf, f, indent=2, sort_keys=True)
  if hf.get("model_type") == "internvl_seed":  # the PyTorch code that runs this layout
    here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "torch_remote")
    for name in SEED_REMOTE_FILES:
      shutil.copy(os.path.join(here, name), os.path.join(out_dir, name))
  return written


def _fused_maker(parts, index, dtype):
  """Produces piece `index` (a layer) of a fused source tensor (Phi-3's qkv_proj, GPT-OSS's gate_up_proj) from its
  parts when asked."""
  def make():
    pieces = [(r.transform, np.asarray(v[index] if index else v)) for r, v in parts]
    return transforms.fused_save(pieces).astype(dtype)
  return make


def _maker(transform, value, index, j, dtype):
  """Produces source tensor j of piece `index` (a layer, or one expert of a layer) only when the writer asks for
  it (one piece in host memory)."""
  def make():
    x = np.asarray(value[index] if index else value)
    return np.asarray(transform.save(x)[j]).astype(dtype)
  return make

