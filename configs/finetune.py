"""Fine-tune a released InternVL chat model the way OpenGVLab's 2nd-finetune recipes do (internvl_chat/shell/
internvl2.5/2nd_finetune/*_lora.sh and internvl3.0/2nd_finetune/*_full.sh), on data in the official format:

  python train.py --config configs/finetune.py:path=/models/InternVL3_5-8B,lora=16 --workdir DIR \\
      --config.data.train.source=internvl --config.data.train.path=META.json --config.total_steps=N

Arguments (after the colon, comma-separated):
  path=FOLDER   a released folder, in OpenGVLab's remote-code layout (config.json with `template`) or
                transformers-native (-hf, InternVLForConditionalGeneration): the model config is read from it (no
                weights are read here), the weights at the start of the run (config.init.path), its tokenizer
                files (config.tokenizer) and its conversation template and system message: the OpenGVLab
                config's `template` / `system_message`, or the named template whose rendering equals the -hf
                folder's Jinja chat template on probe conversations (data/template_match.py; the -hf InternVL
                templates are internvl2_5 without a default system block, data.default_system_block=False), so
                the trained prompts are the ones transformers' apply_chat_template writes
  model=PRESET  a chat preset instead of a folder (planning, or a run from scratch), e.g. internvl3_5_8b
  lora=R        LoRA rank on the language model (default 16); 0 = full fine-tuning (the full recipe)

Recipe defaults (override any with --config.x=y):
  LoRA (lora=R > 0): freeze_backbone, freeze_mlp, freeze_llm, use_llm_lora=R (alpha 2R, dropout 0.05), lr 4e-5,
                     max_dynamic_patch 6, max_seq_length 8192
  full (lora=0):     freeze_backbone only (projector + language model train), lr 2e-5, max_dynamic_patch 12,
                     max_seq_length 16384
  both:              weight decay 0.05, warmup 3% of the steps, cosine to 0, bfloat16 compute (float32 master
                     weights), full rematerialisation (grad_checkpoint), global batch 128 as 16 rows x 8
                     accumulation steps, loss_reduction 'token' (the official default), thumbnail tile on
An -hf folder whose chat template is none of ours (data/templates.py) is refused in one line: train from the
OpenGVLab-layout release of the model.
"""

import os

import ml_collections

from internvl_jax.train import defaults

LORA_RECIPE = dict(freeze_backbone=True, freeze_mlp=True, freeze_llm=True, lr=4e-5, max_dynamic_patch=6,
                   max_text_len=8192)
FULL_RECIPE = dict(freeze_backbone=True, freeze_mlp=False, freeze_llm=False, lr=2e-5, max_dynamic_patch=12,
                   max_text_len=16384)


def _release(folder: str) -> tuple[ml_collections.ConfigDict, dict]:
  """(our chat model config, config.data's template fields) of a released folder; a one-line error otherwise."""
  from internvl_jax import convert  # local: pulls in the converters
  path = os.path.join(folder, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"path={folder} has no config.json; give a released InternVL chat folder")
  from internvl_jax.data import template_match  # local: config files stay light to import
  model = convert.model_config(folder)
  if "language" not in model or "vision" not in model:
    raise ValueError(f"{folder} is not an InternVL chat model; configs/finetune.py fine-tunes chat models")
  return model, template_match.folder_template(folder)


def get_config(arg=None):
  args = defaults.parse_arg(arg, allowed=("path", "model", "lora"))
  path, preset = args.get("path", ""), args.get("model", "")
  if bool(path) == bool(preset):
    raise ValueError("configs/finetune.py needs exactly one of path=RELEASED_FOLDER or model=CHAT_PRESET")
  rank = int(args.get("lora", 16))
  recipe = LORA_RECIPE if rank > 0 else FULL_RECIPE
  c = defaults.base_config("instruct", preset or "tiny")
  if path:
    c.model, template = _release(path)
    c.model_name = os.path.basename(os.path.normpath(path))
    c.init.path = path
    c.tokenizer = path
    c.data.template = template["template"]
    c.data.default_system_block = template["default_system_block"]
    if template["system_message"] is not None:
      c.data.system_message = template["system_message"]
  c.model.freeze_vision = True
  for tower in (c.model.vision, c.model.language):
    tower.dtype, tower.remat = "bfloat16", "full"
  c.freeze_backbone = recipe["freeze_backbone"]
  c.freeze_mlp, c.freeze_llm = recipe["freeze_mlp"], recipe["freeze_llm"]
  c.use_llm_lora = max(rank, 0)
  c.lora_dropout = 0.05 if rank > 0 else 0.0  # wrap_llm_lora's lora_dropout
  c.lr, c.weight_decay, c.min_lr_ratio = recipe["lr"], 0.05, 0.0
  c.data.max_dynamic_patch = recipe["max_dynamic_patch"]
  c.data.max_tiles = recipe["max_dynamic_patch"] + 1  # + the thumbnail
  c.data.max_text_len = recipe["max_text_len"]
  c.batch_size, c.grad_accum_steps = 16, 8
  c.total_steps = 1000
  # warmup_ratio 0.03 of the optimizer updates, following --config.total_steps / grad_accum_steps
  c.warmup_steps = (c.get_ref("total_steps") * 3) // (c.get_ref("grad_accum_steps") * 100)
  c.checkpoint_every, c.log_every = 200, 10
  return c
