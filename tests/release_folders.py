"""Tiny model folders laid out like four InternVL releases, with random weights and release-style tokenizer files
(a helper for tests): everything a user downloads except the size.

  internvl_14b        InternVL-14B-224px (InternVL-C/G): OpenGVLab layout, QLLaMA, a LLaMA sentencepiece
                      tokenizer.model with add_eos_token false, no tokenizer.json
  internvl_chat_v1_5  InternVL-Chat-V1-5 / InternVL2-8B: OpenGVLab InternVLChatModel, InternLM2 language model
                      (fused wqkv), template internlm2-chat, InternLM2 sentencepiece tokenizer (remote-code config)
  internvl2_1b        InternVL2-1B: OpenGVLab InternVLChatModel, Qwen2, template Hermes-2, vocab.json + merges.txt
  internvl3_hf        InternVL3-1B-hf: transformers-native InternVLForConditionalGeneration, Qwen2 tokenizer.json,
                      the -hf chat_template.jinja, generation_config.json stop ids
  internvl2_5_llama_hf  InternVL2_5-8B-MPO-hf / InternVL3-9B-hf: the same with a LLaMA language model and a
                      LlamaTokenizer (tokenizer.json, BOS added) holding <|im_start|> <|im_end|> and InternVL's tokens,
                      as transformers' conversion writes them for the InternLM2-based releases

Each builder writes into `folder` and returns (folder, the transformers model or None). The chat models'
vocabulary is the tokenizer's, and their image_token_id its <IMG_CONTEXT>; their vision tower takes 56 px tiles
(4 tokens per tile after pixel shuffle).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import numpy as np

import hf_refs
import opengvlab_layout
import tokenizer_folders

HF_TEMPLATE = os.path.join(os.path.dirname(__file__), "fixtures", "internvl_hf_chat_template.json")
_TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json",
                    "special_tokens_map.json", "added_tokens.json")


def _tokenizer(kind: str, folder: str, **kw):
  from internvl_jax.data import tokenizer
  build = {"llama": tokenizer_folders.llama_sentencepiece, "internlm2": tokenizer_folders.internlm2_sentencepiece,
           "qwen2": tokenizer_folders.qwen2_bpe}[kind]
  build(folder, **kw)
  return tokenizer.load(folder)


def _copy_tokenizer(src: str, dst: str) -> None:
  for name in _TOKENIZER_FILES:
    if os.path.exists(os.path.join(src, name)):
      shutil.copy(os.path.join(src, name), os.path.join(dst, name))


def internvl_14b(folder: str):
  from safetensors.numpy import save_file
  from test_convert_internvl14b import CONFIG, official_shapes
  tok = _tokenizer("llama", folder)
  rng = np.random.default_rng(0)
  shapes = official_shapes(tok.vocab_size)
  save_file({k: np.asarray(rng.standard_normal(v) * 0.3, np.float32) for k, v in shapes.items()},
            os.path.join(folder, "model.safetensors"))
  config = dict(CONFIG, qllama_config=dict(CONFIG["qllama_config"], vocab_size=tok.vocab_size))
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(config, f)
  return folder, None


def _opengvlab_chat(folder: str, kind: str, template: str, text: dict, lm: str, **config):
  with tempfile.TemporaryDirectory() as tmp:
    tok = _tokenizer(kind, os.path.join(tmp, "tok"))
    native = os.path.join(tmp, "native")
    ref = hf_refs.chat_model(dict(text, vocab_size=tok.vocab_size), native, image_token_id=tok.image_token_id)
    opengvlab_layout.chat_to_opengvlab(native, folder, lm)
    _copy_tokenizer(os.path.join(tmp, "tok"), folder)  # the release's files, not the layout helper's stub
  tokenizer_folders.update_json(folder, "config.json", template=template, **config)
  return folder, ref


def internvl_chat_v1_5(folder: str):
  text = {k: v for k, v in hf_refs.LLAMA.items() if k != "head_dim"}  # InternLM2 configs have no head_dim
  return _opengvlab_chat(folder, "internlm2", "internlm2-chat", text, "internlm2", use_thumbnail=True,
                         max_dynamic_patch=6)


def internvl2_1b(folder: str):
  return _opengvlab_chat(folder, "qwen2", "Hermes-2", hf_refs.QWEN2, "qwen2", use_thumbnail=True,
                         max_dynamic_patch=6)


def _hf_files(folder: str, stops: list[int]) -> None:
  """The -hf chat_template.jinja (transformers' conversion text), generation_config.json, preprocessor_config.json."""
  with open(HF_TEMPLATE, encoding="utf-8") as f:
    template = json.load(f)["chat_template"]
  with open(os.path.join(folder, "chat_template.jinja"), "w", encoding="utf-8") as f:
    f.write(template)
  with open(os.path.join(folder, "generation_config.json"), "w") as f:
    json.dump({"eos_token_id": stops, "pad_token_id": stops[-1]}, f)
  with open(os.path.join(folder, "preprocessor_config.json"), "w") as f:
    json.dump({"crop_to_patches": True, "max_patches": 12, "min_patches": 1, "size": {"height": 56, "width": 56}}, f)


def internvl2_5_llama_hf(folder: str):
  from transformers import AutoTokenizer
  from internvl_jax.data import tokenizer
  with tempfile.TemporaryDirectory() as tmp:
    hf_tok = AutoTokenizer.from_pretrained(tokenizer_folders.llama_sentencepiece(tmp), legacy=False,
                                           extra_special_tokens={"start_image_token": "<img>",
                                                                 "end_image_token": "</img>",
                                                                 "context_image_token": "<IMG_CONTEXT>"})
  hf_tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>",
                                                           *tokenizer_folders.INTERNVL_TOKENS]})
  hf_tok.save_pretrained(folder)
  tok = tokenizer.load(folder)
  ref = hf_refs.chat_model(dict(hf_refs.LLAMA, vocab_size=tok.vocab_size), folder, image_token_id=tok.image_token_id)
  _hf_files(folder, [tok.token_id("<|im_end|>")])  # as the conversion's generation config: eos <|im_end|>
  return folder, ref


def internvl3_hf(folder: str):
  tok = _tokenizer("qwen2", folder, tokenizer_json=True)
  ref = hf_refs.chat_model(dict(hf_refs.QWEN2, vocab_size=tok.vocab_size), folder, image_token_id=tok.image_token_id)
  _hf_files(folder, [tok.token_id("<|im_end|>"), tok.token_id("<|endoftext|>")])
  return folder, ref

