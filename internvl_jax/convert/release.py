"""A complete folder out: the weights and config of save_pretrained plus what users and serving tools need to run the
model the way it was trained, in the transformers-native layout or OpenGVLab's remote-code layout.

  native     config.json + safetensors (saver.py), tokenizer files, chat_template.jinja (the run's conversation
             template as Jinja: apply_chat_template writes the same prompt the model was trained on, its
             system message the default, or no system block for a run started from an -hf folder that wrote
             none), generation_config.json (stop ids: the template separator's token and the
             tokenizer's eos), preprocessor_config.json + processor_config.json (InternVLProcessor: GotOcr2 tiles,
             image_seq_length)
  opengvlab  config.json of InternVLChatModel (vision_config, llm_config, template, system_message, tiling) +
             safetensors under its names (vision_model.*, mlp1.*, language_model.*), tokenizer files,
             generation_config.json. No Python files are written: serving tools (vLLM, LMDeploy) read this layout
             themselves; `trust_remote_code` loading in transformers needs OpenGVLab's modeling files of the matching
             release copied into the folder.

`export(src, out)` takes a train.py workdir (its latest checkpoint, tokenizer and run config), a checkpoint of
`python -m internvl_jax.convert import`, or any folder load_pretrained reads.
"""

from __future__ import annotations

import json
import os

import ml_collections
from flax import nnx

from internvl_jax.convert import configs, keymaps, orbax_io, peft_export, saver
from internvl_jax.convert.configs import ConversionError
from internvl_jax.data import chat_format as chat_format_lib, templates, tokenizer as tokenizer_lib
from internvl_jax.models import internvl

LAYOUTS = ("native", "opengvlab")
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def opengvlab_plan(model: internvl.InternVLChat, chat: chat_format_lib.ChatFormat) -> tuple[dict, list]:
  """(config.json, rules) of OpenGVLab's InternVLChatModel layout for a chat model prompted with `chat`."""
  cfg = model.config
  if chat.template is None:
    raise ConversionError("the OpenGVLab layout names a conversation template (config.json 'template'); this model's "
                          "format is a Jinja chat template: export --layout native")
  if chat.system is None and not chat.default_system_block:
    raise ConversionError("this model was trained without a system block when no system message is given (as its "
                          "-hf chat template); OpenGVLab's conversation.py always writes one: export --layout native")
  hf = configs.chat_to_opengvlab(cfg, template=chat.template, system_message=chat.system,
                                 max_dynamic_patch=chat.max_num, use_thumbnail=chat.use_thumbnail)
  head = None if cfg.language.tie_embeddings else "language_model.lm_head"
  rules = (keymaps.internvit_opengvlab(cfg.vision, "vision_model", "vision") + keymaps.projector_opengvlab()
           + keymaps.decoder_for(cfg.language, "language_model.model", "language", head))
  return hf, rules


def generation_config(tok: tokenizer_lib.Tokenizer, stop_ids) -> dict:
  """generation_config.json: generation stops at any stop id; pad is the tokenizer's (else the first stop id)."""
  out = {"eos_token_id": [int(i) for i in stop_ids], "pad_token_id": tok.pad_id if tok.pad_id is not None
         else int(stop_ids[0])}
  if tok.bos_id is not None:
    out["bos_token_id"] = tok.bos_id
  return out


def processor_files(chat: chat_format_lib.ChatFormat) -> dict[str, dict]:
  """preprocessor_config.json and processor_config.json of transformers' InternVLProcessor for this format:
  GotOcr2 tiles of chat.image_size px (dynamic tiling up to max_num with a thumbnail when max_num > 1, bicubic,
  ImageNet normalisation) and chat.tokens_per_tile tokens per tile."""
  size = chat.image_size
  return {
      "preprocessor_config.json": {
          "image_processor_type": "GotOcr2ImageProcessorFast", "processor_class": "InternVLProcessor",
          "crop_to_patches": chat.max_num > 1, "min_patches": 1, "max_patches": chat.max_num,
          "size": {"height": size, "width": size}, "do_resize": True, "resample": 3, "do_rescale": True,
          "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": IMAGENET_MEAN, "image_std": IMAGENET_STD,
          "do_convert_rgb": True},
      "processor_config.json": {"image_seq_length": chat.tokens_per_tile, "processor_class": "InternVLProcessor"},
  }


def write_release(model: nnx.Module, out_dir: str, *, tokenizer: tokenizer_lib.Tokenizer | None = None,
                  chat: chat_format_lib.ChatFormat | None = None, layout: str = "native", dtype=None,
                  adapter_only: bool = False, run_config=None) -> list[str]:
  """Writes the folder described in the module docstring. tokenizer: written when given; chat: the chat model's
  prompt format (needs tokenizer). A LoRA model is written merged, or with adapter_only as a peft adapter folder
  (peft_export.py; run_config: the train.py run config, for what else it trained and its base model).
  Returns the names of the files written."""
  if layout not in LAYOUTS:
    raise ConversionError(f"layout {layout!r} is not one of {LAYOUTS}")
  is_chat = isinstance(model, internvl.InternVLChat)
  if adapter_only:
    if layout != "native":
      raise ConversionError("--adapter_only writes a peft adapter for the transformers-native model; drop --layout")
    if run_config is None:
      raise ConversionError("--adapter_only needs a train.py workdir of a LoRA run (its config says what was trained)")
    from internvl_jax.train import freezing  # local: a training-side import
    written = peft_export.write_adapter(model, out_dir, full_groups=peft_export.full_groups_of(
        freezing.resolve(run_config)), base_model=run_config.init.get("path") or None, dtype=dtype)
  elif layout == "opengvlab":
    if not is_chat or chat is None:
      raise ConversionError("--layout opengvlab is the InternVL chat layout: export a chat model with its tokenizer "
                            "(a stage-3 workdir or a released chat folder)")
    plain = peft_export.merged(model)
    hf, rules = opengvlab_plan(plain, chat)
    written = ["config.json", *saver.write_folder(plain, out_dir, hf, rules, dtype=dtype)]
  else:
    written = ["config.json", *saver.save_pretrained(peft_export.merged(model), out_dir, dtype=dtype)]
  written = [os.path.basename(w) for w in written]
  if tokenizer is not None:
    tokenizer.save(out_dir)
    written += sorted(f for f in os.listdir(out_dir) if f.startswith(("tokenizer", "vocab", "merges")))
  if is_chat and chat is not None:
    extra = {"generation_config.json": generation_config(chat.tokenizer, chat.stop_ids)}
    if layout == "native":
      extra.update(processor_files(chat))
      # the run's system message (or the template's default) becomes the Jinja template's default
      with open(os.path.join(out_dir, "chat_template.jinja"), "w", encoding="utf-8") as f:
        f.write(chat.jinja if chat.jinja is not None else templates.to_jinja(
            chat.template, chat.system, default_system_block=chat.default_system_block))
      written.append("chat_template.jinja")
    for name, content in extra.items():
      with open(os.path.join(out_dir, name), "w") as f:
        json.dump(content, f, indent=2, ensure_ascii=False)
      written.append(name)
  return written


def load_source(src: str):
  """(model, tokenizer or None, chat format or None, train.py run config or None) of a train.py workdir, an import
  checkpoint or a folder load_pretrained reads."""
  from internvl_jax.convert.loader import load_pretrained
  from internvl_jax.evaluate import models as eval_models  # local: pulls in the evaluation side
  if not os.path.isdir(src):
    raise ConversionError(f"{src} does not exist; pass a train.py workdir, an import checkpoint or a model folder")
  if orbax_io.is_checkpoint(src):
    return orbax_io.load_checkpoint(src), None, None, None
  run = _train_run(src)
  if run is not None:
    run_config = ml_collections.ConfigDict(_run_config(run))
    loaded = eval_models.load_workdir(run, "caption" if run_config.task == "instruct" else "retrieval")
    return loaded.model, loaded.tokenizer, loaded.chat, run_config
  model = load_pretrained(src)
  if not tokenizer_lib.saved_in(src):
    return model, None, None, None
  tok = tokenizer_lib.load(src)
  chat = chat_format_lib.ChatFormat.from_folder(src, model.config, tok) if isinstance(
      model, internvl.InternVLChat) else None
  return model, tok, chat, None


def _run_config(run: str) -> dict:
  with open(os.path.join(run, "config.json")) as f:
    return json.load(f)


def _train_run(src: str) -> str | None:
  """src itself when it is a train.py run (config.json with a task and a checkpoints/ folder), else the last
  stage sub-folder of a multi-stage workdir, else None."""
  def is_run(d):
    return os.path.isdir(os.path.join(d, "checkpoints")) and os.path.exists(os.path.join(d, "config.json")) and \
        bool(_run_config(d).get("task"))
  if is_run(src):
    return src
  stages = [os.path.join(src, d) for d in sorted(os.listdir(src)) if is_run(os.path.join(src, d))]
  return stages[-1] if stages else None
