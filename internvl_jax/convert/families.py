"""Checkpoint families: detection from config.json, and for each family our config, model class and key map.

  family            config.json                                     our model
  internvl_vision   transformers InternVLVisionModel                vit.InternViT
  intern_vit_6b     OpenGVLab InternVisionModel (300M and 6B)       vit.InternViT
  internvl          transformers InternVLForConditionalGeneration   internvl.InternVLChat
  internvl_chat     OpenGVLab InternVLChatModel                     internvl.InternVLChat
  llama / qwen2     transformers *ForCausalLM                       llm.Decoder
  phi3              transformers Phi3ForCausalLM (fused qkv_proj)    llm.Decoder
  internlm3         InternLM3ForCausalLM (remote code; LLaMA names)  llm.Decoder
  qwen3 / qwen3_moe transformers Qwen3 / Qwen3Moe ForCausalLM       llm.Decoder (QK-norm; routed experts)
  gpt_oss           transformers GptOssForCausalLM (MXFP4 experts   llm.Decoder (sinks, windows, biased experts)
                    dequantized on read)
  internlm2         OpenGVLab InternLM2ForCausalLM                  llm.Decoder
  internvl_14b      OpenGVLab InternVLModel (InternVL-14B-224px)    internvl.InternVLContrastive (variant c / g)
  internvl_seed     a seed contrastive model we exported with its      internvl.InternVLContrastive (seed)
                    PyTorch files (saver.seed_plan)
  internvl_jax      our own layout (save_pretrained of a model with  any of ours (config.json names the kind)
                    no PyTorch layout)

transformers' chat models and InternVL-14B share model_type 'internvl'; the 14B config has `qllama_config`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Callable

import ml_collections
import numpy as np
from flax import nnx

from internvl_jax.convert import configs, keymaps
from internvl_jax.convert.configs import ConversionError
from internvl_jax.models import internvl, llm, vit

FAMILIES = ("internvl_vision", "intern_vit_6b", "internvl", "internvl_chat", "llama", "qwen2", "internlm2",
            "internvl_14b", "internvl_jax", "internvl_seed", "qwen3", "qwen3_moe", "phi3", "internlm3", "gpt_oss")
CAUSAL_LMS = ("llama", "qwen2", "internlm2", "qwen3", "qwen3_moe", "phi3", "internlm3", "gpt_oss")
# Our model classes by the kind name stored in our own configs (orbax_io, the internvl_jax layout).
KINDS = {"vision": vit.InternViT, "language": llm.Decoder, "chat": internvl.InternVLChat,
         "contrastive": internvl.InternVLContrastive}


def model_kind(model) -> str:
  for kind, cls in KINDS.items():
    if isinstance(model, cls):
      return kind
  raise ConversionError(f"no model kind for a {type(model).__name__}")


def own_layout_rules(model_class, cfg) -> list:
  """The internvl_jax layout: one tensor per parameter, named by its nnx path, stacked layers kept stacked."""
  abstract = nnx.eval_shape(lambda: model_class(cfg, rngs=nnx.Rngs(0)))
  paths = [".".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(abstract, nnx.Param))]
  return [keymaps.Rule(p, (p,), keymaps.T.Identity()) for p in paths]


@dataclasses.dataclass
class Spec:
  family: str
  config: ml_collections.ConfigDict
  model_class: type
  rules: list
  ignored: set  # canonical source names present on disk that are read on purpose by nobody (a tied lm_head)


def detect(hf: dict) -> str:
  """The family of a config.json (model_type first, architectures to tell same-named types apart)."""
  model_type = hf.get("model_type")
  archs = hf.get("architectures") or []
  if model_type == "internvl" and "qllama_config" in hf:
    return "internvl_14b"
  if model_type in FAMILIES:
    return model_type
  if model_type == "internlm2" or any("InternLM2" in a for a in archs):
    return "internlm2"
  raise ConversionError(f"unknown model_type {model_type!r} (architectures {archs}); supported: {', '.join(FAMILIES)}")


def image_token_from_tokenizer(folder: str) -> int | None:
  """The id of `<IMG_CONTEXT>` from tokenizer.json / tokenizer_config.json / added_tokens.json, if present."""
  token = "<IMG_CONTEXT>"
  path = os.path.join(folder, "tokenizer.json")
  if os.path.isfile(path):
    with open(path) as f:
      for entry in json.load(f).get("added_tokens", []):
        if entry.get("content") == token:
          return int(entry["id"])
  path = os.path.join(folder, "tokenizer_config.json")
  if os.path.isfile(path):
    with open(path) as f:
      for idx, entry in (json.load(f).get("added_tokens_decoder") or {}).items():
        if entry.get("content") == token:
          return int(idx)
  path = os.path.join(folder, "added_tokens.json")
  if os.path.isfile(path):
    with open(path) as f:
      found = json.load(f).get(token)
      if found is not None:
        return int(found)
  return None


def _settle_head(cfg: ml_collections.ConfigDict, ckpt, embed: str, head: str) -> set:
  """Decides tie_embeddings from the files, as transformers does: a head present on disk is kept unless the config
  ties it and it equals the embedding; a tied config with no head ties. Returns the names to ignore."""
  if head not in ckpt:
    cfg.tie_embeddings = True
    return set()
  if cfg.tie_embeddings and embed in ckpt and ckpt.shape(head) == ckpt.shape(embed) and np.array_equal(
      ckpt.read(head), ckpt.read(embed)):
    return {head}
  cfg.tie_embeddings = False
  return set()


def _decoder_rules(family: str, cfg, src: str, dst: str, head: str | None) -> list:
  if family == "internlm2":
    return keymaps.decoder_internlm2(cfg, src, dst, head)
  return keymaps.decoder_for(cfg, src, dst, head)


def build(family: str, hf: dict, ckpt, *, image_token_id: int | None = None, variant: str = "g") -> Spec:
  """Our config, model class and rules for a checkpoint of `family` whose tensors are in `ckpt`.
  image_token_id: overrides the tokenizer's <IMG_CONTEXT> (internvl_chat); variant: 'c' | 'g' (internvl_14b).
  GPT-OSS experts stored MXFP4 (openai's releases) are dequantized as they are read."""
  spec = _build(family, hf, ckpt, image_token_id=image_token_id, variant=variant)
  if any(n.endswith("experts.gate_up_proj_blocks") for n in ckpt.names()):
    spec.rules = keymaps.mxfp4_experts(spec.rules)
  return spec


def _build(family: str, hf: dict, ckpt, *, image_token_id: int | None, variant: str) -> Spec:
  if family == "internvl_vision":
    cfg = configs.vision_from_native(hf)
    return Spec(family, cfg, vit.InternViT, keymaps.internvit_native(cfg), set())
  if family == "intern_vit_6b":
    cfg = configs.vision_from_opengvlab(hf)
    return Spec(family, cfg, vit.InternViT, keymaps.internvit_opengvlab(cfg), set())
  if family in CAUSAL_LMS:
    cfg = configs.language_from_hf(hf, family)
    embed, head = ("model.tok_embeddings.weight", "output") if family == "internlm2" else (
        "model.embed_tokens.weight", "lm_head")
    ignored = _settle_head(cfg, ckpt, embed, f"{head}.weight")
    rules = _decoder_rules(family, cfg, "model", "", None if cfg.tie_embeddings else head)
    return Spec(family, cfg, llm.Decoder, rules, ignored)
  if family == "internvl":
    cfg = configs.chat_from_native(hf)
    ignored = _settle_head(cfg.language, ckpt, "language_model.model.embed_tokens.weight",
                           "language_model.lm_head.weight")
    head = None if cfg.language.tie_embeddings else "language_model.lm_head"
    rules = (keymaps.internvit_native(cfg.vision, "vision_tower", "vision") + keymaps.projector_native()
             + keymaps.decoder_for(cfg.language, "language_model.model", "language", head))
    return Spec(family, cfg, internvl.InternVLChat, rules, ignored)
  if family == "internvl_chat":
    if image_token_id is None:
      image_token_id = image_token_from_tokenizer(ckpt.folder)
    cfg = configs.chat_from_opengvlab(hf, image_token_id)
    lm_family = configs.language_family(hf.get("llm_config") or {})
    embed = "tok_embeddings" if lm_family == "internlm2" else "embed_tokens"
    head = "language_model.output" if lm_family == "internlm2" else "language_model.lm_head"
    ignored = _settle_head(cfg.language, ckpt, f"language_model.model.{embed}.weight", f"{head}.weight")
    rules = (keymaps.internvit_opengvlab(cfg.vision, "vision_model", "vision") + keymaps.projector_opengvlab()
             + _decoder_rules(lm_family, cfg.language, "language_model.model", "language",
                              None if cfg.language.tie_embeddings else head))
    return Spec(family, cfg, internvl.InternVLChat, rules, ignored)
  if family == "internvl_14b":
    cfg = configs.contrastive_from_14b(hf, variant)
    ignored = _settle_head(cfg.text, ckpt, "qllama.model.embed_tokens.weight", "qllama.lm_head.weight")
    ignored |= {n for n in ckpt.names() if n.startswith("itm_head.")}  # image-text matching head: unused here
    if variant == "c":
      ignored |= {n for n in ckpt.names() if n.startswith("clip_projector2.")}
    rules = keymaps.internvl_14b(cfg, None if cfg.text.tie_embeddings else "qllama.lm_head")
    return Spec(family, cfg, internvl.InternVLContrastive, rules, ignored)
  if family == "internvl_seed":
    from internvl_jax.convert import saver  # local: saver imports this module
    cfg = ml_collections.ConfigDict(hf["internvl_jax"])
    return Spec(family, cfg, internvl.InternVLContrastive, saver.seed_plan(cfg)[1], set())
  if family == "internvl_jax":
    if hf.get("kind") not in KINDS:
      raise ConversionError(f"internvl_jax config.json names an unknown model kind {hf.get('kind')!r}")
    cfg = ml_collections.ConfigDict(hf["config"])
    return Spec(family, cfg, KINDS[hf["kind"]], own_layout_rules(KINDS[hf["kind"]], cfg), set())
  raise ConversionError(f"unknown checkpoint family {family!r}")


def canonical(family: str) -> Callable[[str], str]:
  return lambda name: keymaps.canonical_name(family, name)
